"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's chain of small kernels.

A decode step is ~120 kernels of a few microseconds each, every one reading what the one before wrote. Between two
kernels of a CUDA graph the GPU drains the first, flushes its writes, then launches and rasterises the second: a gap
of about half a microsecond, plus the second kernel's ramp before its loads reach full bandwidth. With PDL the second
kernel is launched while the first is still running: its programs start, and wait (``griddepcontrol.wait``) until
the first grid has completed and its memory is visible, before they touch anything.

The contract, for a kernel launched with ``launch_pdl``: ``gdc`` runs at its top, before any load of a value an
earlier kernel wrote and before any store (a store could overwrite what an earlier kernel still reads: the arena
reuses memory). ``gdc`` also signals that the next kernel may launch (``griddepcontrol.launch_dependents``): the
next kernel's programs then wait in their own ``gdc``. The wait covers the whole chain (a grid completes only after
its own wait), and a kernel launched without PDL (cuBLAS, torch) waits for everything before it as usual.

On for CUDA devices of compute capability >= 9 whose Triton has the GDC ops; ``KILN_PDL=0`` turns it off (read at
each launch). Measured on the H200 (bench/NOTES.md, session 4): Llama-3.2-1B decode step 1.012 -> 0.968 ms at
batch 1 (976 -> 1020 tok/s), the same greedy tokens, and a ping-pong chain of split-K GEMMs and split-KV attention in
a CUDA graph bit for bit the plain launches' (tests/codegen/test_pdl.py). The weight-streaming GEMM also loads its
first K step's weight tiles before its wait (``prefetch``: weights are never written by a kernel), overlapping them
with the previous kernel's tail: the same sums (tested). Measured on the H200 in one process, runs interleaved (session
19): the 1B's bf16 decode at batch 1 1,140 -> 1,199 tok/s; its w4a16 decode 1,511 -> 1,518 (the quantized tiles'
own loops, WORDS / AHEAD / MAGIC, had no peeled first step; WORDS has one since: ``prefetch_words``, 1B w8a16 1,390
-> 1,468 tok/s, session 20; at 4 bits too since session 29, w4a16 1,558 -> 1,680 on an H100); at batch 16 14,793 ->
14,657 (-0.9%). So it is on by default for one row of x (``PREFETCH_MAX_ROWS``; session 5 had measured -13 us a step
across two processes, inside their spread); ``KILN_PDL=1+noprefetch`` turns it off.

``KILN_PDL=l2`` (``l2:<KB>``; ``prefetch+l2`` for both) goes deeper: before its wait each program of the weight-streaming
GEMM asks the L2 for the first ``l2`` bytes (default 32 KB) of its weight slice, one Hopper bulk prefetch per weight row
(``cp.async.bulk.prefetch.L2.global``, ``l2_prefetch``), so the loop's first loads hit L2 instead of paying the ~2.5 us
DRAM ramp each of a 1B step's 65 GEMVs shows (bench/NOTES.md, session 5). A prefetch is a hint: no register holds its
bytes, no value is read, so the sums are the plain loop's by construction; under the Triton interpreter it is skipped.
The budget is per program, so the resident programs of a big GEMV (gate/up 67 MB, the LM head 525 MB) prefetch ~17 MB
at most (528 programs x 32 KB), a third of the 50 MB L2, and do not evict each other's lines before their loop reads
them. Measured on the H200 (session 6, 1B decode, one process each): batch 1 step 0.989 -> 0.983 ms (noise; the
kernels' own time rose 0.927 -> 0.958 ms), batch 16 1.211 -> 1.266 ms (slower). It does not pay — the ramp is not
DRAM latency that an early hint hides, or the hints compete with the previous kernel's own loads — so it stays off
by default, kept for the measurement. Not prefetched: the scales of a quantized weight (1/64 of its bytes
at 4 bits in groups of 128, per-channel rows of 2 bytes that break the 16-byte rule) and the decode attention's K / V
rows: which keys it reads is known only after the wait (the attended length is read from the mask, an earlier kernel's
output), and the whole cache would be up to S / n times the bytes read.

``KILN_PDL=pointwise:<rows>`` (``1+pointwise:16``) also launches the generated pointwise / norm kernels of at most that
many rows with PDL (``pointwise_rows``; off by default). Measured on the H200 (session 17, the 1B decode, two
processes): batch 1 1006 -> 1008 tok/s, batch 16 13,059 -> 13,051: no gain, kept for the measurement.

Replicated prefetches. ``cp.async.bulk.prefetch`` is a per-thread PTX instruction, but sm_90 runs it on the uniform
datapath (SASS: ``UBLKPF.L2 [UR], UR``): ptxas wraps it in a loop that issues one prefetch per distinct (address, size)
among a warp's active lanes, so copies of one row inside a warp cost nothing, while each warp holding a copy issues its
own. A [BLOCK_N] tensor over 4 warps holds every element in every warp (16 rows: 64 prefetches, 16 a warp, serial);
``l2_prefetch``'s callers therefore hand it one row per thread, rows spread over the warps (16 rows over 4 warps: 4 a
warp, 16 in all), the other lanes predicated off.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ENV = "KILN_PDL"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
INTERPRETED = tl.constexpr(INTERPRET)  # (for kernels: a global a jit function reads must be a constexpr)
WORDS_PEEL_MIN_BITS = 4  # the WORDS GEMV's peel by default for codes of at least these bits (prefetch_words; 8: int8 only)
PREFETCH_MAX_ROWS = 1  # the weight-streaming GEMM prefetches its first weight tiles at most this many rows of x (prefetch)
L2_BYTES = 32 << 10  # bytes a program prefetches into L2 before its wait with KILN_PDL=l2 (l2:<KB> sets it)
POINTWISE_ROWS = 0  # generated pointwise kernels of at most this many rows launch with PDL (pointwise_rows)


@triton.jit
def gdc(PDL: tl.constexpr):
    """At a kernel's top: let the next kernel launch, then wait for the previous one (module docstring)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@functools.cache
def _device_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(tl.extra.cuda, "gdc_wait")


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device launch with PDL: a CUDA device of capability >= 9, not the interpreter, and
    ``KILN_PDL`` not "0". Read at each launch (a CUDA graph keeps what it captured), so a process may compare both."""
    return (os.environ.get(ENV, "1") != "0" and not INTERPRET and t.is_cuda
            and _device_ok(t.device.index if t.device.index is not None else torch.cuda.current_device()))


def _words() -> list[str]:
    # KILN_PDL's value as its "+"-separated words: "1", "1+noprefetch", "l2", "prefetch+l2:64"
    return os.environ.get(ENV, "1").split("+")


def prefetch(t: torch.Tensor, rows: int = 1) -> bool:
    """Whether the weight-streaming GEMM (qgemm.py) of ``rows`` rows of x also loads its first weight tiles before the
    wait, overlapping them with the previous kernel's tail: PDL on, ``KILN_PDL`` without the word "noprefetch", and at
    most PREFETCH_MAX_ROWS rows; or ``KILN_PDL`` with the word "prefetch", any rows (module docstring)."""
    words = _words()
    return enabled(t) and "noprefetch" not in words and (rows <= PREFETCH_MAX_ROWS or "prefetch" in words)


def prefetch_words(t: torch.Tensor, bits: int) -> bool:
    """Whether the WORDS GEMV of a ``bits``-bit weight (one row) also reads its first step's words and scales before the
    wait: PDL on, and codes of at least WORDS_PEEL_MIN_BITS bits (without the word "noprefetch"), or the word "prefetch"
    (``KILN_PDL=1+prefetch``: any codes). Measured on the H200, one process each, runs interleaved (bench/NOTES.md,
    session 20): the 1B's w8a16 decode at batch 1 1,387-1,392 -> 1,462-1,475 tok/s; its w4a16 decode then 1,515 ->
    1,488 (the int4 tiles held up to ~50 registers more with the peeled step: 118 -> 167 with the norm prologue), so
    8-bit codes only. Measured again since IDOT (session 21: the 1B's gate/up and down on 128-register tiles), it pays at
    4 bits too (session 29, an H100, one process, interleaved, the same plan choices and tokens: the 1B w4a16 1,558 ->
    1,680 tok/s, the 8B shape 452 -> 462); which of IDOT's tiles or the H100 turned it is not isolated."""
    words = _words()
    return enabled(t) and ("prefetch" in words or (bits >= WORDS_PEEL_MIN_BITS and "noprefetch" not in words))


def l2(t: torch.Tensor) -> int:
    """Bytes each program of the weight-streaming GEMM prefetches into L2 before its wait (module docstring), 0 for
    none: ``KILN_PDL=l2`` (L2_BYTES) or ``l2:<KB>``, PDL on; off by default (measured no gain: module docstring)."""
    words = [w for w in _words() if w == "l2" or w.startswith("l2:")]
    if not words or not enabled(t):
        return 0
    kb = words[-1][3:]
    if kb and not kb.isdigit():
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: l2:<KB> takes a whole number of kilobytes, got {kb!r}")
    return int(kb) << 10 if kb else L2_BYTES


def l2_bytes(w: torch.Tensor, step_bytes: int, budget: int) -> int:
    """The L2 prefetch budget of a program reading rows of ``w`` [R, C] from a byte offset that is a multiple of
    ``step_bytes`` (0: the row's start only): ``budget`` rounded down to 16 bytes, or 0 where a row range could start
    off a 16-byte boundary (``cp.async.bulk.prefetch`` needs the address and size 16-byte aligned): w's rows must be
    contiguous, start 16-byte aligned and lie a multiple of 16 bytes apart."""
    row_stride = w.stride(0) * w.element_size()
    if w.dim() != 2 or w.stride(1) != 1 or w.data_ptr() % 16 or row_stride % 16 or step_bytes % 16:
        return 0
    return max(budget, 0) // 16 * 16


@triton.jit
def l2_prefetch(ptr, nbytes, live):
    """Ask the L2 for ``nbytes`` bytes at each of ``ptr`` where ``live`` (tensors of one shape, broadcast): Hopper's
    ``cp.async.bulk.prefetch.L2.global`` (PTX ISA 8.0, sm_90), address and size 16-byte aligned. A hint: nothing is
    read into registers, no result; skipped under the interpreter (which cannot run inline asm). Give each thread one
    element (module docstring: replicated elements repeat the prefetch once per warp)."""
    if not INTERPRETED:
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }",
            "=r,l,r,r", [ptr, live.to(tl.int32), nbytes.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


def pointwise_rows() -> int:
    """The most rows a generated pointwise / norm kernel launches with PDL at: ``KILN_PDL=pointwise:<rows>`` (PDL on),
    else POINTWISE_ROWS. Many-row kernels stay plain launches: with PDL their programs wait on the SMs beside the GEMM
    before them (session 13: the 1B decode at batch 16 1.244 -> 1.345 ms a step with every many-row kernel on PDL)."""
    words = [w for w in _words() if w.startswith("pointwise:")]
    if not words:
        return POINTWISE_ROWS
    rows = words[-1][len("pointwise:"):]
    if not rows.isdigit():
        raise ValueError(f"{ENV}={os.environ[ENV]!r}: pointwise:<rows> takes a whole number of rows, got {rows!r}")
    return int(rows)


STREAM_PROGRAMS_PER_SM = 4  # stream's grid: programs an SM, as a one-row GEMV's 4-warp tiles run (4 an SM at 128 registers)
STREAM_WARPS = 16  # ... of 16 warps each: an SM's 64 warp slots full, as such a GEMV's registers fill it
STREAM_BLOCK = 1024  # int32 words a program reads a step (4 KB: a 16-row tile of 256 bytes a row)


@triton.jit
def _stream_kernel(buf_ptr, out_ptr, WORDS, BLOCK: tl.constexpr, PDL: tl.constexpr):
    # stream's program p: words [p * WORDS, (p + 1) * WORDS) of buf XORed BLOCK at a time, one word stored (no dead load)
    gdc(PDL)
    offs = tl.program_id(0).to(tl.int64) * WORDS + tl.arange(0, BLOCK)
    acc = tl.zeros([BLOCK], dtype=tl.int32)
    for k in range(0, WORDS, BLOCK):
        acc ^= tl.load(buf_ptr + offs + k)
    tl.store(out_ptr + tl.program_id(0), tl.reduce(acc, 0, _xor))


@triton.jit
def _xor(a, b):
    return a ^ b


def stream_programs(device: torch.device) -> int:
    """``stream``'s programs on ``device`` (the words its ``out`` needs): STREAM_PROGRAMS_PER_SM an SM (one SM on the CPU)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return sms * STREAM_PROGRAMS_PER_SM


def stream(buf: torch.Tensor, out: torch.Tensor) -> None:
    """Read int32 ``buf`` once from HBM as a one-row weight-streaming GEMV reads its weight (STREAM_PROGRAMS_PER_SM
    programs an SM, 4 KB steps), launched with PDL where it is on: the stand-in predecessor behind which the tuner times
    a decode decision's candidates with ``tuning.BEHIND_MB`` (they launch while it finishes, as in a plan's chain). Its
    programs fill every SM (STREAM_WARPS), as the GEMV before a GEMV does, so a candidate's programs find room only as
    they end: the overlap of a plan's GEMV after a GEMV, not the larger one after a kernel of fewer programs (the decode
    attention). ``out``: a word per program. Words past the grid's whole steps are not read."""
    programs = stream_programs(buf.device)
    words = buf.numel() // programs // STREAM_BLOCK * STREAM_BLOCK
    if words == 0 or out.numel() < programs:
        raise ValueError(f"pdl.stream: {buf.numel()} words are less than a {STREAM_BLOCK}-word step for each of "
                         f"{programs} programs, or out holds fewer than {programs} words")
    _stream_kernel[(programs,)](buf, out, words, BLOCK=STREAM_BLOCK, num_warps=STREAM_WARPS, **kwargs(buf))


def kwargs(t: torch.Tensor) -> dict:
    """The launch keywords of a kernel taking ``gdc``'s ``PDL`` constexpr, for tensors on ``t``'s device."""
    return {"PDL": True, "launch_pdl": True} if enabled(t) else {"PDL": False}
