"""Skinny GEMM for LLM decode: kiln's ``GEMM`` op for M <= 16 rows, weight-bandwidth bound.

    out = residual + gate * epi(x @ W^T + bias)      W plain [N, K], or 8-/4-bit weight-only quantized

Decode reads every weight byte once per token for a handful of rows, so the time is the weight's bytes over
HBM bandwidth (4.8 TB/s on an H200) and the kernel's job is to keep enough loads in flight. It is qgemm.py's
template (see its docstring for the weight format and the dequantization) launched with one row tile:
- every program loads its BLOCK_N weight rows x BLOCK_K columns per step (contiguous along K) once and
  applies them to all M rows: as a GEMV in float32 (DOT False, M = 1), or by tl.dot on a 16-row tile
  (DOT True, M = 2..16: the tensor cores make the M-fold reuse free). With x's 16 rows as the MMA's M, Hopper's
  wgmma (64 rows a warpgroup) is out of reach and Triton falls back to mma.sync; SWAP computes the transposed
  product out^T [BLOCK_N, 16] = W x^T instead (decode kernels' usual trick: TensorRT-LLM, vLLM), the weight's
  64 / 128 rows wgmma's M, x's rows its N = 16, and transposes the accumulator once before the epilogue;
- split-K keeps the GPU busy when N / BLOCK_N tiles are too few (N = 2048 gives 64 tiles of 32 rows for 132
  SMs): SPLIT_K programs share a tile, each over K / SPLIT_K columns, and write float32 partial sums to a
  workspace [SPLIT_K, M, NW] (NW = N, the weight's rows). The splits are added in a fixed order (deterministic:
  the same bits whichever program finishes last) and the epilogue applied by (config REDUCE)
    "last"      the last program of each tile to arrive, in the same launch (qgemm.py's REDUCE_LAST): one kernel
                instead of two, which inside a CUDA graph saves a kernel's gap (~2-4 us) per GEMM;
    "separate"  ``_splitk_reduce_kernel``, a second launch (no counters).
  The workspace is ``workspace_bytes`` bytes that the caller may plan and pass in (CUDA graph replay: no
  allocation inside the call); REDUCE "last" also needs ``counter_bytes`` of int32 counters, one per output tile.

Counters. They must be zero when a call starts, and each call leaves them zero: the last program of a tile resets
its counter after reducing, so a caller plans them once, zeroed, and keeps them for its lifetime (runtime/kernel_plan.py:
bytes of the arena that no other buffer shares) — no memset launch per call. The bytes differ from zero only while a
launch runs. A launch that fails on the host (compile, resources, arguments) runs no program; a launch that stops
part-way on the GPU is a sticky CUDA error, after which nothing on that context runs again; under the Triton
interpreter (programs run one after another in Python) an exception can stop a launch part-way, so
``skinny_gemm`` zeroes the counters it was given before re-raising. A counter left nonzero by other means would
make a later call of that tile skip its epilogue or reduce too early; hence the counters belong to one caller
(one plan's GEMM group) alone.

Norm prologue. Decode's RMSNorm feeds a GEMM (the QKV and gate/up projections, the LM head) and nothing else,
so ``norm_weight`` / ``norm_eps`` fold it into this kernel instead of a launch of its own:

    out = residual + gate * epi(RMSNORM(x, norm_weight, eps) @ W^T + bias)

every program first reads its rows of x whole (K values a row: a few KB at decode) for rstd = 1 / sqrt(mean(x^2)
+ eps), then scales each x tile by rstd and the norm weight as it loads it, rounded as the RMSNORM op rounds. At 16
rows that statistics pass is 16 times a GEMV's (64 KB a program at K = 2048, from L2) and it comes before the first
weight load: it runs pipelined (qgemm.py ``_row_rstd``: tiles of 4096 values, three in flight; until session 7 one
tile at a time, K / BLOCK_K serial round trips), the norm weight's columns are loaded a step ahead, and ``configs``
offers fewer splits (fewer programs reading x). Measured on the H200 (bench/NOTES.md, session 7) the fused variant
still trails "norm kernel + best GEMM" by 2-4 us at 16 rows (the statistics traffic itself) and leads at one row.
Config NORM_POST skips that pass: RMSNORM(x) @ W^T = rstd * ((x * norm_weight) @ W^T) for each row's scalar rstd, so
the loop multiplies the x tiles it loads anyway by the norm weight (rounded once to x's dtype) and sums their
squares, and the epilogue scales each row by 1 / rms (split-K: each program's sums of squares beside its partials in
the workspace, added in split order by the last program). Session 14 on the H200: ahead of "norm kernel + cuBLAS" at
the 1B's 16-row qkv (12.3 / 12.6 us cold), at one row level with the prologue. The WORDS GEMV (one row, x de-interleaved
as the words are) has it too: each step's x values times the norm weight, the word columns' squares summed until after the
loop (session 20, not yet measured: at the 8B's one-row gate/up the plan's norm-fused GEMV ran 49.8 us cold against
35.6 us for the plain WORDS GEMV alone under Nsight Compute).

Which configuration is fastest depends on the shape and is measured by kiln's tuner: ``configs`` lists a few
worth trying on an H200; ``skinny_gemm`` without a config runs the first of them.
"""
from __future__ import annotations

import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ...ir.ops import OPS
from .gemm import reference as gemm_reference
from .qgemm import SplitK, Weight, _epilogue_store, _sum_splits, check_config, launch, prepare
from .qgemm import reference as qgemm_reference

# triton.jit picks the interpreter from this variable when the kernel below is defined; read it then too
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_M = 16  # rows this template takes: one tl.dot tile
H200_SMS = 132
PROGRAMS_PER_SM = 4  # split-K aims at this many programs: loads in flight to cover HBM latency
MIN_SPLIT_STEPS = 2  # K steps of one split at least
WORKSPACE_SHARE = 8  # split-K's workspace round trip stays under 1 / WORKSPACE_SHARE of the weight bytes
REDUCE_BLOCK_N = 32 if INTERPRET else 128

REDUCE = ("last", "separate")  # who adds the split-K partials: the last program of a tile, or a second launch

# the interpreter is slow per program and per K step: small tiles, so irregular test shapes span several
INTERPRET_CONFIG = dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=1)

class Tile(NamedTuple):
    """A launch tile of the template: BLOCK_N weight rows x BLOCK_K columns a step, num_warps, num_stages, and
    (tl.dot path only) whether the product is swapped, acc^T = W x^T (qgemm.py's SWAP)."""
    block_n: int
    block_k: int
    warps: int
    stages: int
    swap: bool = False
    words: bool = False  # (GEMV of a quantized weight only) read as int32 words, scales applied a word (qgemm.py WORDS)
    fewer: int = 1  # split K fewer times than _split_k's choice by this factor (a tile whose programs fit one an SM)
    ahead: bool = False  # (byte-tile GEMV of a quantized weight) each step's scales loaded a step before (qgemm.py AHEAD)
    maxnreg: int | None = None  # registers a thread at most (ptxas): 128 lets 4 programs of 4 warps share an SM
    magic: bool = False  # (swapped, 4-bit weight, any rows) codes - zero exact in x's dtype for the tensor cores (qgemm.py MAGIC)
    idot: bool = False  # (WORDS, 4-bit weight) each word's sum by integer dot products (qgemm.py IDOT)


# Tiles per (DOT, bits; 0: a 16-bit plain weight), the default first. A step streams 4-16 KB of weight (a GLU
# program two tiles). Checked by compiling for sm_90 (ptxas, SASS) at the Llama-3.2-1B shapes, GLU and the norm
# prologue included: no spills, the weight tile pipelined through cp.async.
# - GEMV (DOT False): tiles of 64 rows lose that pipelining (or spill), so the GEMV keeps BLOCK_N <= 32. On a quantized
#   weight the WORDS tiles (codes read as int32 words, qgemm.py) too, the best of bench/decode_gemm.py's sweep on the
#   H200 (session 8; 1B shapes, cold in one CUDA graph): down int4 16 x 1024 (4 warps, 4 splits) 8.3 us vs 10.6 for the
#   byte tile, int8 128 x 256 at half skinny's splits (8: one program an SM, 156 registers) 10.1 vs 11.3, int8 gate/up
#   32 x 256 (GLU halves) 14.6 vs 15.0; at int4 gate/up and qkv the byte tile stays best (14.2 / 5.2 us). None is near
#   the copy rate (int4 gate/up: 1.2 TB/s, int8 2.3, bf16 cuBLAS 3.5), though WORDS halves the ALU work a code: the
#   GEMV waits on latency, likely x's and the scales' loads, which cp.async's pipeline does not take (not yet profiled).
#   Profiled in session 9 (Nsight Compute, int4 gate/up, 512 programs of 4 warps): 150-168 registers a thread let 3
#   programs share an SM, so the grid ran as 1.29 waves (a tail wave of 117 programs, ncu's estimate: up to 50% of the
#   time) at 15% occupancy, the SM issue-bound at 3.8 cycles an instruction a warp. Capped at 128 registers (maxnreg;
#   bench/gemv_sass.py, sm_90, triton 3.6: no spills at the 1B shapes but 16-64 bytes in the norm-fused int4 qkv; 3.9
#   spills 16-96 bytes in more of them) 4 programs fit an SM and the 1B's 512-program GEMVs run as one wave. Measured
#   on the H200 (session 9, cold): int4 gate/up AHEAD 13.6 -> 12.4 us, the byte tiles 8-13% faster at every shape,
#   int8's 16 x 512 WORDS tile at down 10.6 -> 9.5. (int8's AHEAD tile spills at 128 with the norm: uncapped.)
# - tl.dot (M 2..16): unswapped, x's 16 rows are the MMA's M, which Hopper's wgmma cannot take (64 rows a
#   warpgroup): mma.sync, the weight through ldmatrix. Swapped, the weight's 64 / 128 rows are the M of
#   wgmma.m64n16k16 (HGMMA.64x16x16 in the SASS, asynchronous, one group in flight), x^T its N: a plain weight is
#   read by the tensor cores straight from shared memory, a quantized one dequantized in registers already in
#   wgmma's A-operand layout. Two swapped tiles, one warpgroup (4 warps, deeper pipeline) and two (8 warps, 128
#   rows), then the unswapped tile measured in session 1. Registers (triton 3.9; 1B shapes, norm included): plain
#   32-71; 8 bits 127-128 and 107-178; 4 bits 96-128 and 110-205. The 4-warp 64 x 256 tiles reach 255 with the
#   norm at 4 bits (and at 8 bits without it): not offered.
TILES = {
    (False, 0): [Tile(32, 256, 4, 3), Tile(16, 512, 4, 3)],
    (False, 8): [Tile(32, 256, 4, 3, maxnreg=128), Tile(32, 256, 4, 3, ahead=True), Tile(64, 256, 8, 3, words=True),
                 Tile(128, 256, 8, 3, words=True, fewer=2), Tile(16, 512, 4, 4, words=True, maxnreg=128)],
    (False, 4): [Tile(32, 256, 4, 3, maxnreg=128), Tile(32, 256, 4, 3, ahead=True, maxnreg=128),
                 Tile(16, 1024, 4, 3, words=True), Tile(32, 512, 8, 3, maxnreg=128)],
    (True, 0): [Tile(64, 128, 4, 4, True), Tile(128, 128, 8, 3, True), Tile(64, 128, 4, 3)],
    (True, 8): [Tile(64, 128, 4, 4, True), Tile(128, 128, 8, 3, True), Tile(64, 128, 4, 3)],
    (True, 4): [Tile(64, 128, 4, 4, True), Tile(128, 128, 8, 3, True), Tile(64, 256, 8, 3)],
}

# the swapped tl.dot tiles of a 4-bit weight with its codes dequantized for the tensor cores by packed bit operations
# (qgemm.py MAGIC; qweight_tiles.py): offered at 1..16 rows beside the tiles above, BLOCK_K at most the group. One row is
# x padded to wgmma's 16: the tensor cores have the headroom, and a code costs ~1.6 SASS instructions (3.25 a byte) against the
# GEMV's 4.4 (WORDS) / 6.6 (byte tiles); whole loops (bench/gemv_sass.py, triton 3.6, sm_90, 1B shapes): 3.0-3.8
# instructions a code at 64 rows a program, 96-128 registers. Measured on the H200 (session 14, cold): 1.2-1.85x the
# other tiles at 16 rows (the 8B gate/up 61.7 -> 33.3 us); at one row ~1.8 TB/s, behind WORDS (2.2): the same with
# 2-warp tiles on mma.sync (no warpgroup wait), so not wgmma's wait but each step's chain bounds it
MAGIC_TILES = [Tile(64, 128, 4, 4, True, magic=True), Tile(128, 128, 4, 3, True, magic=True),
               Tile(128, 128, 8, 4, True, magic=True)]

# the WORDS tiles of a 4-bit weight whose words are summed by integer dot products (qgemm.py IDOT; qweight_tiles.py):
# offered at one row beside the tiles above. x becomes 16-bit fixed point on each word column's power of two, a word's 8
# codes four dp4a against its byte planes: ~10 SASS instructions a word against ~21. WORDS at 4 bits measured
# issue-bound on the H200 (session 20: the 8B's gate/up 2.03 TB/s, a warp issuing every 4.85 cycles); a column's x
# costs ~41 instructions, shared by the rows a thread holds, hence 32 and 64 rows a program (GLU: a half each).
# bench/gemv_sass.py (triton 3.6, sm_90, bf16 x) at the 1B / 8B shapes, whole loops: 64 x 512 2.2-2.3 instructions a
# code (2.5-2.6 with the norm; 0-72 bytes of stack, 4-9 local accesses a step), 32 x 512 2.7-2.9 (3.1-3.5; none),
# against WORDS' 16 x 512 4.4-5.0
IDOT_TILES = [Tile(64, 512, 4, 3, words=True, maxnreg=128, idot=True), Tile(32, 512, 4, 3, words=True, maxnreg=128, idot=True)]
# (a switch for bench/decode.py --ab-set kernels.skinny.IDOT=0)
IDOT = True

# a GEMV tile run over the whole of K (no split), 8 warps: at the 1B's qkv and o shapes (K = 2048; 192 and 128
# programs) the fastest of 55 tiles measured on the H200 (bench/decode_gemm.py --sweep, session 5: 5.6 us vs 6.7 for
# the default at qkv, 5.0 vs 6.0 at o): there, split-K's partials and last-program reduction cost more than the
# loads in flight it adds
WHOLE_K = {(False, 0): Tile(16, 512, 8, 3)}
# one row of a quantized weight: a WORDS tile (IDOT at 4 bits) of 16 rows over a whole K step of 2048 codes, no split, so
# that with the peel (pdl.prefetch_words) a program of the 1B's qkv / o (192 / 128 programs) reads its whole weight
# slice before its PDL wait, while the kernel before it finishes. Measured on an H100 (bench/NOTES.md, session 30): the
# tuner takes them at the 1B's o (and qkv, down at 4 bits), 1B w4a16 at batch 1 1,673 -> 1,750 tok/s in one process.
# A GLU's tile takes 2048 codes of each half a step (its 16 rows cannot halve: configs doubles the tile's BLOCK_K, which
# tile_config halves back), since session 34 (its one step without the K loop: 64 registers a thread at 4 bits).
# WHOLE_K_WORDS: a switch for A/Bs (bench/decode.py --ab-set kernels.skinny.WHOLE_K_WORDS=0)
WHOLE_K_WORDS_TILES = {4: Tile(16, 2048, 8, 3, words=True, idot=True), 8: Tile(16, 2048, 8, 3, words=True)}
WHOLE_K_WORDS = True
# ... and where K is up to twice that step (the 8B's qkv / o / gate/up: K 4096), the tile over a step twice as long on
# twice the warps (the same codes a thread: at 4 bits 64 registers, 2 programs an SM, where the 8B gate/up's 2-step
# tile on 8 warps takes 186), one step, no loop (qgemm.ONE_STEP), since session 35: on an H100 the 8B w4a16 at batch 1
# 467 -> 484 tok/s in one process (its qkv's, 340 -> 247 us a step; the gate/up's lost in the step, to KILN_REFINE).
# Four times the step on 32 warps (the 1B's down, K 8192) was never taken and is not offered. A switch for A/Bs
WIDE_WHOLE_K = True
# the WORDS tiles come with NORM_POST too (configs; a switch for bench/decode.py --ab-set kernels.skinny.WORDS_NORM_POST=0)
WORDS_NORM_POST = True


@triton.jit
def _splitk_reduce_kernel(
    ws_ptr, bias_ptr, gate_ptr, res_ptr, out_ptr,
    M, N, SPLITS,  # N: output columns (half of the workspace's NW with GLU)
    gate_rows, stride_gb, stride_gm, stride_gn,
    res_rows, stride_rb, stride_rm, stride_rn,
    stride_om, stride_on,
    ACT: tl.constexpr, GLU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # REDUCE "separate": workspace [SPLITS, M, NW] float32 -> out [M, N], the splits added in order 0, 1, ... (the
    # sum REDUCE "last" computes too), then the epilogue. One program owns output columns [BLOCK_N] of all M rows.
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    mask = (offs_m < M)[:, None] & mask_n[None, :]
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    acc, acc_u = _sum_splits(ws_ptr, rows, cols, mask, M, N, SPLITS, GLU, BLOCK_M, BLOCK_N)
    _epilogue_store(acc, acc_u, rows, cols, mask_n, mask, N, bias_ptr, gate_ptr, gate_rows, stride_gb, stride_gm, stride_gn,
                    res_ptr, res_rows, stride_rb, stride_rm, stride_rn, out_ptr, stride_om, stride_on,
                    ACT, GLU, HAS_BIAS, HAS_GATE, HAS_RESIDUAL)


# ----------------------------------------------------------------------------- configurations


def _chunking(k: int, split_k: int, block_k: int) -> tuple[int, int]:
    """``(splits, k_chunk)`` actually run: chunks are whole BLOCK_K steps, so fewer splits may be needed
    (K = 192, BLOCK_K = 32, SPLIT_K = 4 runs 3 chunks of 64)."""
    k_chunk = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    return triton.cdiv(k, k_chunk), k_chunk


def _workspace_fits(m: int, n: int, k: int, bits: int | None, splits: int) -> bool:
    # float32 partials written once and read once, against the weight's bytes (16-bit when plain)
    return splits == 1 or 8 * splits * m * n * WORKSPACE_SHARE <= n * k * (bits or 16) // 8


def _split_k(m: int, n: int, k: int, bits: int | None, glu: bool, block_n: int, block_k: int) -> int:
    """Splits that bring the programs near PROGRAMS_PER_SM per SM, each split at least MIN_SPLIT_STEPS K steps,
    the workspace traffic a small share of the weight's, but not below one program an SM: at 16 rows the partials
    are 16 times a GEMV's and the workspace rule alone would leave a wide tile few programs (the 1B's o projection
    at 4 bits in tiles of 128 rows: 16 programs for 132 SMs), while the partials stay in L2 for the last program."""
    tiles = triton.cdiv(n // 2 if glu else n, block_n)
    want = (PROGRAMS_PER_SM * H200_SMS + tiles // 2) // tiles  # rounded: 512 tiles do not split in two
    steps = triton.cdiv(k, block_k) // MIN_SPLIT_STEPS
    split = max(1, min(want, steps))
    floor = max(1, min(triton.cdiv(H200_SMS, tiles), steps))
    while split > floor and not _workspace_fits(m, n, k, bits, split):
        split -= 1
    while _chunking(k, split, block_k)[0] < floor:  # chunks are whole steps: 5 splits of 16 steps run as 4
        split += 1
    return _chunking(k, split, block_k)[0]


def tile_config(m: int, n: int, k: int, bits: int | None, glu: bool, tile: Tile, split: int | None = None,
                group: int | None = None) -> dict:
    """The launch configuration of ``tile`` for ``m`` rows at a shape (arguments as for ``configs``). A GLU program
    streams a gate and an up tile: half the rows each, or half the columns where the rows cannot halve (16 rows, or
    64 swapped: wgmma's M). BLOCK_K at most K's power of two (a MAGIC tile's at most the group); ``split``: the splits of
    K wanted (None: ``_split_k``'s choice), named as they actually run."""
    bn, bk = tile.block_n, tile.block_k
    if glu:
        bn, bk = (bn // 2, bk) if bn > (64 if tile.swap else 16) else (bn, bk // 2)
    bk = min(bk, max(32, triton.next_power_of_2(k)))
    if tile.magic and group and 0 < group < k:
        bk = min(bk, group)
    if split is None:
        split = _split_k(m, n, k, bits, glu, bn, bk)
        split = split if tile.fewer == 1 else _chunking(k, max(1, split // tile.fewer), bk)[0]
    else:
        split = _chunking(k, split, bk)[0]
    c = dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split) | ({"REDUCE": "last"} if split > 1 else {})
    return (c | dict(DOT=m > 1 or tile.magic) | ({"SWAP": True} if tile.swap else {}) | ({"MAGIC": True} if tile.magic else {})
            | ({"WORDS": True} if tile.words else {}) | ({"IDOT": True} if tile.idot else {})
            | ({"AHEAD": True} if tile.ahead else {}) | dict(num_warps=tile.warps, num_stages=tile.stages)
            | ({"maxnreg": tile.maxnreg} if tile.maxnreg else {}))


def configs(m: int, n: int, k: int, bits: int | None = None, glu: bool = False, norm: bool = False,
            group: int | None = None) -> list[dict]:
    """At most 4 (one row of a quantized weight: 5) launch configurations worth measuring on an H200 for ``m`` rows
    against a weight of ``n`` rows (out features; gate and up together with ``glu``) and ``k`` columns, ``bits`` 8 / 4
    or None (plain 16-bit): dicts of BLOCK_N, BLOCK_K, SPLIT_K, REDUCE (where SPLIT_K > 1), DOT, SWAP (where swapped),
    WORDS / AHEAD (one row of a quantized weight), num_warps, num_stages. The first is the default; split-K
    configurations reduce in their last program (REDUCE "last"), and where the default splits, its two-launch twin
    (REDUCE "separate") is one of them. A plain GEMV also tries WHOLE_K's tile, a quantized one TILES' WORDS tiles and
    the default with its scales a step ahead; 2..16 rows try TILES' two swapped tiles and the unswapped one. With
    ``norm`` (the RMSNorm prologue)
    at 2..16 rows the fourth is the default tile at half its splits: every program reads x's rows whole for the
    statistics (M x K values), so the programs' statistics traffic (from L2) grows with the splits, by the weight's
    bytes at 16 rows and 192 programs of the 1B's qkv. One row of a 4-bit weight also gets the IDOT_TILES (words summed
    by dp4a), one row of a quantized weight WHOLE_K_WORDS_TILES' (WHOLE_K_WORDS), and a 4-bit weight whose
    ``group`` is given (its group size; 0 or K: one group a row) the MAGIC_TILES, after the others; with ``norm``, the
    first two tiles that load x as tiles, the WORDS tiles and the first MAGIC tile come again with NORM_POST (the norm's
    statistics summed in the main loop, no prologue pass: qgemm.py)."""
    if not 1 <= m <= MAX_M:
        raise ValueError(f"skinny configs: m = {m} rows, the template takes 1..{MAX_M}")
    dot = m > 1
    whole_words = bits in (4, 8) and k % (32 // bits) == 0  # (WORDS reads a row's codes as int32 words)
    out = [c for c in (tile_config(m, n, k, bits, glu, t) for t in TILES[(dot, bits or 0)] if whole_words or not t.words)
           if _words_fit(c, k, bits)]
    if norm and dot and out[0]["SPLIT_K"] > 1:
        half = tile_config(m, n, k, bits, glu, TILES[(dot, bits or 0)][0], split=out[0]["SPLIT_K"] // 2)
        if half != out[0]:
            out.append(half)
    if (dot, bits or 0) in WHOLE_K:
        out.append(tile_config(m, n, k, bits, glu, WHOLE_K[(dot, bits or 0)], split=1))
    # where the default splits: the default reduced by a second launch, and the same tile with twice the splits
    # (more loads in flight for a little more workspace traffic); the tuner measures which is faster
    first = out[0]
    if first["SPLIT_K"] > 1:
        out.append(dict(first, REDUCE="separate"))
    more = _chunking(k, 2 * first["SPLIT_K"], first["BLOCK_K"])[0]
    if first["SPLIT_K"] > 1 and more > first["SPLIT_K"] and _workspace_fits(m, n, k, bits, more):
        out.append(dict(first, SPLIT_K=more))
    unique = []
    for c in out:
        if c not in unique:
            unique.append(c)
    unique = unique[:5 if whole_words and not dot else 4]
    if IDOT and bits == 4 and whole_words and not dot:
        unique += [c for c in (tile_config(m, n, k, bits, glu, t) for t in IDOT_TILES) if c not in unique and _words_fit(c, k, bits)]
    if WHOLE_K_WORDS and whole_words and not dot:
        c = tile_config(m, n, k, bits, glu, whole_k_words_tile(bits, glu), split=1)
        tiles = [c]
        if WIDE_WHOLE_K and c["BLOCK_K"] < k <= 2 * c["BLOCK_K"]:  # (a step of twice the codes on twice the warps)
            tiles.append(dict(c, BLOCK_K=2 * c["BLOCK_K"], num_warps=2 * c["num_warps"]))
        for c in tiles:
            if c not in unique and _words_fit(c, k, bits) and (IDOT or not c.get("IDOT")):
                unique.append(c)
    if bits == 4 and group is not None and (not 0 < group < k or group >= 16):
        unique += [c for c in (tile_config(m, n, k, bits, glu, t, group=group) for t in MAGIC_TILES) if c not in unique]
    if norm:  # the norm without its statistics pass (NORM_POST): the first two tiles that load x as tiles, the WORDS
        # tiles, and MAGIC's first
        tiles = [c for c in unique if not c.get("WORDS") and c.get("REDUCE") != "separate" and not c.get("MAGIC")][:2]
        tiles += [c for c in unique if c.get("WORDS") and c.get("REDUCE") != "separate"] if WORDS_NORM_POST else []
        unique += [dict(c, NORM_POST=True) for c in tiles + [c for c in unique if c.get("MAGIC")][:1]]
    return unique


def whole_k_words_tile(bits: int, glu: bool) -> Tile:
    """WHOLE_K_WORDS_TILES' tile at ``bits``; a GLU's with twice its BLOCK_K, which tile_config halves back (a 16-row
    GLU tile's step: 2048 codes of each half, as a plain one's)."""
    tile = WHOLE_K_WORDS_TILES[bits]
    return tile._replace(block_k=2 * tile.block_k) if glu else tile


def _words_fit(c: dict, k: int, bits: int | None) -> bool:
    """Whether configuration ``c`` is no WORDS one or one that K allows: whole int32 words of codes a row, BLOCK_K (at
    most K's power of two: ``tile_config``) at least 16 words (a 4-bit weight of K = 64 has 8: no WORDS tile)."""
    return not c.get("WORDS") or (bits in (4, 8) and k % (32 // bits) == 0 and c["BLOCK_K"] * bits >= 32 * 16)


def _resolve(m: int, n: int, k: int, bits: int | None, glu: bool, config: dict | None) -> dict:
    """The configuration a call runs: ``config`` checked and completed (SPLIT_K 1, REDUCE "last", DOT by row count, SWAP off),
    or the default (``INTERPRET_CONFIG`` under the interpreter, else ``configs(...)[0]``)."""
    if config is None:
        config = INTERPRET_CONFIG if INTERPRET else configs(m, n, k, bits, glu)[0]
    c = check_config("skinny_gemm", config, ("BLOCK_N", "BLOCK_K"))
    c.setdefault("SPLIT_K", 1)
    c.setdefault("REDUCE", "last")
    c.setdefault("DOT", m > 1)
    c.setdefault("SWAP", False)
    if not (isinstance(c["SPLIT_K"], int) and c["SPLIT_K"] >= 1):
        raise ValueError(f"skinny_gemm: config {config!r}: SPLIT_K must be a positive int")
    if c["REDUCE"] not in REDUCE:
        raise ValueError(f"skinny_gemm: config {config!r}: REDUCE must be one of {', '.join(map(repr, REDUCE))}")
    if not c["DOT"] and m > 1:
        raise ValueError(f"skinny_gemm: config {config!r}: the GEMV path (DOT False) takes one row, x has {m}")
    if c["SWAP"] and not c["DOT"]:
        raise ValueError(f"skinny_gemm: config {config!r}: SWAP transposes tl.dot's product, it needs DOT")
    if c.get("WORDS") and (c["DOT"] or not _words_fit(c, k, bits)):
        raise ValueError(f"skinny_gemm: config {config!r}: WORDS is the GEMV of a 4- / 8-bit weight whose K ({k}) is whole "
                         f"int32 words of codes, BLOCK_K at least 16 words")
    if c.get("IDOT") and not (c.get("WORDS") and bits == 4):
        raise ValueError(f"skinny_gemm: config {config!r}: IDOT sums the words of a 4-bit weight (WORDS) by integer dot "
                         f"products")
    if c.get("AHEAD") and (c["DOT"] or c.get("WORDS") or bits not in (4, 8)):
        raise ValueError(f"skinny_gemm: config {config!r}: AHEAD is the byte-tile GEMV of a 4- / 8-bit weight (not WORDS)")
    if c.get("MAGIC") and not (c["DOT"] and c["SWAP"] and bits == 4):
        raise ValueError(f"skinny_gemm: config {config!r}: MAGIC is the swapped tl.dot tile (DOT, SWAP) of a 4-bit weight")
    if c.get("NORM_POST") and c["REDUCE"] != "last":
        raise ValueError(f"skinny_gemm: config {config!r}: NORM_POST (the norm's statistics summed in the main loop) needs "
                         f"split-K reduced by the last program (REDUCE 'last')")
    if "maxnreg" in c and not (isinstance(c["maxnreg"], int) and 24 <= c["maxnreg"] <= 255):
        raise ValueError(f"skinny_gemm: config {config!r}: maxnreg must be an int in 24..255 (registers a thread)")
    if "L2" in c and not (isinstance(c["L2"], int) and c["L2"] >= 0):
        raise ValueError(f"skinny_gemm: config {config!r}: L2 must be a number of bytes >= 0")
    return c


def workspace_bytes(m: int, n: int, k: int, bits: int | None = None, glu: bool = False, config: dict | None = None) -> int:
    """Bytes of float32 workspace ``skinny_gemm`` needs for ``m`` rows, a weight of ``n`` rows (out features) and
    ``k`` columns under ``config`` (None: the default it would run); 0 when the configuration does not split K."""
    c = _resolve(m, n, k, bits, glu, config)
    splits = _chunking(k, c["SPLIT_K"], c["BLOCK_K"])[0]
    return 0 if splits == 1 else 4 * _workspace_floats(m, n, glu, splits, c)


def _workspace_floats(m: int, n: int, glu: bool, splits: int, c: dict) -> int:
    # the partials [splits, m, n] (n: the weight's rows), and NORM_POST's sums of squares [splits, tiles, m]
    return splits * m * n + (splits * triton.cdiv(n // 2 if glu else n, c["BLOCK_N"]) * m if c.get("NORM_POST") else 0)


def counter_bytes(m: int, n: int, k: int, bits: int | None = None, glu: bool = False, config: dict | None = None) -> int:
    """Bytes of int32 counters (one per output tile) ``skinny_gemm`` needs under ``config`` (arguments as for
    ``workspace_bytes``): 0 unless the configuration splits K and reduces in its last program (REDUCE "last").
    They must be zero when planned; every call leaves them zero (module docstring)."""
    c = _resolve(m, n, k, bits, glu, config)
    if _chunking(k, c["SPLIT_K"], c["BLOCK_K"])[0] == 1 or c["REDUCE"] != "last":
        return 0
    return 4 * triton.cdiv(n // 2 if glu else n, c["BLOCK_N"])


# ----------------------------------------------------------------------------- the launcher


def _weight(w, qweight, scales, zeros, bits, group) -> Weight:
    if (w is None) == (qweight is None):
        raise ValueError("skinny_gemm: give exactly one weight: w (plain [N, K]) or qweight (with scales, zeros, bits, group)")
    if w is None:
        return Weight(qweight, scales, zeros, bits, group)
    if any(a is not None for a in (scales, zeros, bits, group)):
        raise ValueError("skinny_gemm: scales / zeros / bits / group describe a qweight; w is a plain weight")
    return Weight(w)


def scratch_view(fn: str, name: str, t, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``t`` (a ``workspace``, float32, or ``counters``, int32, of kernel wrapper ``fn``) as a flat [numel] view of
    ``dtype``: allocated when None (counters zeroed); given as ``dtype`` or as uint8 bytes (a slice of a planned arena)."""
    if t is None:
        return (torch.zeros if dtype == torch.int32 else torch.empty)(numel, dtype=dtype, device=device)
    nbytes = 4 * numel
    if (not isinstance(t, torch.Tensor) or t.dtype not in (dtype, torch.uint8) or not t.is_contiguous()
            or t.device != device or t.numel() * t.element_size() < nbytes or t.data_ptr() % 4):
        got = f"{t.dtype} {tuple(t.shape)} on {t.device}" if isinstance(t, torch.Tensor) else type(t).__name__
        size = "workspace_bytes" if name == "workspace" else "counter_bytes"
        raise ValueError(f"{fn}: {name} must be a contiguous, 4-byte aligned {str(dtype)[6:]} or uint8 tensor on {device} "
                         f"of at least {nbytes} bytes ({size}), got {got}")
    flat = t.view(-1)
    if t.dtype == torch.uint8:
        flat = flat[:nbytes].view(dtype)
    return flat[:numel]


def _norm(x, norm_weight, norm_eps) -> tuple | None:
    """The prologue's (weight, eps) checked against x [..., K], or None without a norm weight."""
    if norm_weight is None:
        if norm_eps is not None:
            raise ValueError("skinny_gemm: norm_eps without norm_weight")
        return None
    k = x.shape[-1]
    if (not isinstance(norm_weight, torch.Tensor) or tuple(norm_weight.shape) != (k,) or norm_weight.dtype != x.dtype
            or norm_weight.device != x.device or not norm_weight.is_contiguous()):
        got = f"{norm_weight.dtype} {tuple(norm_weight.shape)}" if isinstance(norm_weight, torch.Tensor) else type(norm_weight).__name__
        raise ValueError(f"skinny_gemm: norm_weight must be a contiguous [{k}] tensor of x's dtype {x.dtype} on {x.device}, got {got}")
    if not isinstance(norm_eps, (int, float)) or isinstance(norm_eps, bool) or norm_eps < 0:
        raise ValueError(f"skinny_gemm: norm_eps must be a number >= 0 with norm_weight, got {norm_eps!r}")
    return norm_weight, float(norm_eps)


def skinny_gemm(x, w=None, bias=None, gate=None, residual=None, act="none", glu=False, *, qweight=None, scales=None,
                zeros=None, bits=None, group=None, norm_weight=None, norm_eps=None, out=None, workspace=None, counters=None,
                config: dict | None = None, static_weight: bool = True) -> torch.Tensor:
    """``residual + gate * epi(x @ W^T + bias)`` for at most 16 rows (see the module docstring); with
    ``norm_weight`` [K] (x's dtype) and ``norm_eps``, ``x`` is RMSNORM(x, norm_weight, norm_eps) first.

    x [..., K] with prod(leading dims) <= 16, float16 / bfloat16 / float32. The weight is either ``w`` [N, K]
    in x's dtype, or ``qweight, scales, zeros, bits, group`` in kiln's weight-only format (qgemm.py; zeros
    None: symmetric). bias [N], gate and residual broadcast to the output [..., N'] (N' = N, or N / 2 with
    ``glu``), in x's dtype. float32 accumulation; the output has x's dtype; ``out`` may be given (it may be
    the residual itself). ``workspace``: a contiguous float32 / uint8 tensor of at least ``workspace_bytes``
    bytes for split-K partials (None: allocated here). ``counters``: a contiguous int32 / uint8 tensor of at least
    ``counter_bytes`` bytes, zero, that the call leaves zero (None: allocated zeroed here; see the module docstring).
    ``config``: one entry of ``configs`` (None: the first); it may also carry ``L2``, bytes of its weight slice each
    program asks the L2 for before it starts (qgemm.py ``launch``'s ``l2``; absent: ``pdl.l2``), which with the norm
    prologue overlaps the statistics pass with the weight's first bytes on their way from HBM (bench/decode_gemm.py
    ``--norm`` measures it). ``static_weight``: no kernel this call may overlap writes the weight (a model's stored
    weight), so under PDL its first tiles may be read before the wait (``pdl.prefetch``, the L2 prefetch); False: none
    of it is read before the wait.
    """
    weight = _weight(w, qweight, scales, zeros, bits, group)
    x2, out, out2, epi, m, n = prepare("skinny_gemm", x, weight, bias, gate, residual, act, glu, out)
    norm = _norm(x, norm_weight, norm_eps)
    if m > MAX_M:
        raise ValueError(f"skinny_gemm: x {tuple(x.shape)} has M = {m} rows (its leading dims flattened); the skinny "
                         f"template takes at most {MAX_M}: use qgemm / gemm")
    if m == 0 or n == 0:
        return out
    nw, k = weight.w.shape[0], x2.shape[1]
    c = _resolve(m, nw, k, weight.bits, glu, config)
    if c.get("WORDS") and (weight.w.stride(1) != 1 or weight.w.stride(0) % 4 or weight.w.data_ptr() % 4):
        raise ValueError(f"skinny_gemm: config WORDS reads the qweight as int32 words: its rows must be contiguous and "
                         f"start 4-byte aligned (strides {weight.w.stride()}, address % 4 = {weight.w.data_ptr() % 4})")
    if c.get("MAGIC") and 0 < weight.group < k and c["BLOCK_K"] > weight.group:
        raise ValueError(f"skinny_gemm: config {config!r}: a MAGIC step applies one group's scale, BLOCK_K "
                         f"({c['BLOCK_K']}) must be at most the group ({weight.group})")
    if c.get("NORM_POST") and norm is None:
        raise ValueError(f"skinny_gemm: config {config!r}: NORM_POST is a way to apply the norm prologue; give norm_weight")
    splits, k_chunk = _chunking(k, c.pop("SPLIT_K"), c["BLOCK_K"])
    reduce, dot, l2 = c.pop("REDUCE"), c.pop("DOT"), c.pop("L2", None)
    prefetch = None if static_weight else False  # (None: pdl.prefetch decides; a weight a kernel may write: never early)
    l2 = l2 if static_weight else 0
    c.update(BLOCK_M=16 if dot else 1, GROUP_M=1)
    if splits == 1:
        launch(x2, weight, epi, out2, m, n, c, dot=dot, norm=norm, l2=l2, prefetch=prefetch)
        return out
    ws = scratch_view("skinny_gemm", "workspace", workspace, _workspace_floats(m, nw, glu, splits, c), torch.float32, x.device)
    if reduce == "last":
        cnt = scratch_view("skinny_gemm", "counters", counters, triton.cdiv(n, c["BLOCK_N"]), torch.int32, x.device)  # one per tile
        try:
            launch(x2, weight, epi, out2, m, n, c, dot=dot, split=SplitK(splits, k_chunk, ws, cnt), norm=norm, l2=l2,
                   prefetch=prefetch)
        except BaseException:  # (the interpreter can stop part-way: the next call must find the counters zero)
            cnt.zero_()
            raise
        return out
    launch(x2, weight, epi, out2, m, n, c, dot=dot, split=SplitK(splits, k_chunk, ws), norm=norm, l2=l2,
           prefetch=prefetch)
    _splitk_reduce_kernel[(triton.cdiv(n, REDUCE_BLOCK_N),)](
        ws, epi.bias, epi.g[0], epi.r[0], out2, m, n, splits, *epi.g[1:], *epi.r[1:], out2.stride(0), out2.stride(1),
        **epi.meta, BLOCK_M=triton.next_power_of_2(m), BLOCK_N=REDUCE_BLOCK_N)
    return out


def reference(x, w=None, bias=None, gate=None, residual=None, act="none", glu=False, *, qweight=None, scales=None,
              zeros=None, bits=None, group=None, norm_weight=None, norm_eps=None) -> torch.Tensor:
    """Dequantize (when quantized) in x's dtype, then the GEMM op's reference (``OPS["GEMM"].ref``), on
    ``OPS["RMSNORM"].ref`` of x with a norm weight; pass float64 operands for a float64 reference."""
    if norm_weight is not None:
        x = OPS["RMSNORM"].ref([x, norm_weight], dict(eps=norm_eps, dims=1))
    if qweight is not None:
        return qgemm_reference(x, qweight, scales, zeros, bits, group, bias, gate, residual, act=act, glu=glu)
    return gemm_reference(x, w, bias, gate, residual, act=act, glu=glu)
