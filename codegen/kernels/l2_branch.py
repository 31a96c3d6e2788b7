"""Weights asked of the L2 ahead of their GEMMs, from a side branch of a decode step's CUDA graph (``KILN_L2_BRANCH``).

A one-row decode step alternates kernels that stream weights from HBM (the GEMVs) with kernels that barely touch it
(the decode attention: ~5 us of dependent round trips over under a megabyte of K / V). While those run HBM idles, and
the GEMVs after them start their streams cold. Measured on an H100 (bench/NOTES.md, session 34; ``bench/decode_gemm.py``
with ``DECODE_GEMM_WARM=1``): in a chain of PDL launches the 1B's 4-bit gate/up costs 8.2 us a call with its weight in
HBM and 6.4 with it in L2, down 5.5 / 4.8 (qkv and o ~0.1 us: their fixed cost is elsewhere), bf16 down 12.9 / 8.2.

Session 27 asked the L2 for the next GEMMs' weights from inside the decode attention's programs: a program does not
retire until its bulk prefetches are done, so their transfer landed on the step's critical path (the 1B bf16 -4..-9%).
Here the prefetch is a kernel of its own (``Prefetch``: every thread of a few programs issues
``cp.async.bulk.prefetch.L2`` for pieces of the weights, ``pdl.l2_prefetch``) on a second stream that forks from the
step's stream before a decode attention and joins it at the step's end, so no kernel of the chain waits for it: in the
CUDA graph it is a branch whose only successor is the graph's end. A prefetch is a hint (no value is read), so the
step's results are the same by construction; under the Triton interpreter it is skipped.

``KILN_L2_BRANCH=<MB>[:<programs>]``: before each decode attention, the weights of the GEMMs after it (up to the next
attention) are asked for, in order, up to MB megabytes, by ``programs`` programs (default PROGRAMS); unset or 0: off.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .pdl import l2_prefetch

ENV = "KILN_L2_BRANCH"
CHUNK = 64 << 10  # bytes a prefetch asks for (the last piece of a tensor: its rest, a multiple of 16)
PROGRAMS = 16  # the prefetch kernel's programs (each a warp: each issues its pieces' prefetches one after another)
THREADS = 32


def setting() -> tuple[int, int]:
    """(bytes, programs) of ``KILN_L2_BRANCH`` (0 bytes: off). Malformed values are a ValueError naming the variable."""
    value = os.environ.get(ENV, "").strip()
    if value in ("", "0"):
        return 0, PROGRAMS
    mb, sep, programs = value.partition(":")
    if not mb.isdigit() or (sep and not (programs.isdigit() and int(programs) >= 1)):
        raise ValueError(f"{ENV}={value!r}: expected <MB> or <MB>:<programs> (whole numbers), e.g. 24 or 24:16")
    return int(mb) << 20, int(programs) if programs else PROGRAMS


def pieces(tensors: list[torch.Tensor], budget: int, chunk: int = CHUNK) -> list[tuple[int, int]]:
    """(address, bytes) pieces covering ``tensors``' storage in order, at most ``chunk`` bytes each, until ``budget``
    bytes: each piece 16-byte aligned and a multiple of 16 bytes (``cp.async.bulk.prefetch``'s rule), so a tensor's
    last bytes past a multiple of 16 (and a tensor that does not start 16-byte aligned, or a strided one) are left out;
    a tensor met again (by address) is not asked for twice."""
    out, left, seen = [], budget, set()
    for t in tensors:
        start, nbytes = t.data_ptr(), t.numel() * t.element_size()
        if start % 16 or not t.is_contiguous() or start in seen:  # (a weight two calls read: asked for once)
            continue
        seen.add(start)
        nbytes = min(nbytes, left) // 16 * 16
        for off in range(0, nbytes, chunk):
            out.append((start + off, min(chunk, nbytes - off)))
        left -= nbytes
        if left < 16:
            break
    return out


@triton.jit
def _prefetch_kernel(addr_ptr, size_ptr, n, THREADS: tl.constexpr):
    # every thread of every program asks the L2 for pieces i, i + grid threads, ... of the table
    i = tl.program_id(0) * THREADS + tl.arange(0, THREADS)
    step = tl.num_programs(0) * THREADS
    for base in range(0, n, step):
        live = base + i < n
        addr = tl.load(addr_ptr + base + i, mask=live, other=0)
        size = tl.load(size_ptr + base + i, mask=live, other=0)
        l2_prefetch(addr, size, live)


class Prefetch:
    """One prefetch of fixed pieces (``pieces``), its table made once on the device (the weights' addresses do not
    change: a plan's stored tensors)."""

    def __init__(self, table: list[tuple[int, int]], device: torch.device, programs: int = PROGRAMS):
        self.n = len(table)
        self.nbytes = sum(s for _, s in table)
        self.addrs = torch.tensor([a for a, _ in table] or [0], dtype=torch.int64, device=device)
        self.sizes = torch.tensor([s for _, s in table] or [0], dtype=torch.int32, device=device)
        self.programs = max(1, min(programs, triton.cdiv(self.n, THREADS)))

    def __call__(self) -> None:
        if self.n:
            _prefetch_kernel[(self.programs,)](self.addrs, self.sizes, self.n, THREADS=THREADS, num_warps=1)
