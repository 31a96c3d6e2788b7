"""Weight-streaming GEMM: kiln's ``GEMM`` op on a plain, 8-bit or 4-bit weight, as ONE Triton template.

    out = residual + gate * epi(x @ W^T + bias)            (the epilogue of gemm.py, same semantics)
    W[n, k] = (q[n, k] - zero[n, k // group]) * scale[n, k // group]   (weight-only quantized)

Weight format (shared with the quantizer). W is [N, K] (out, in) like ``F.linear``, quantized in groups of
``group`` consecutive input features: group = K (one group per output channel) or 32 / 64 / 128 (any power
of two >= 16 dividing K is accepted). Codes are unsigned with a zero point:
- bits 8: qweight uint8 [N, K], codes 0..255;
- bits 4: qweight uint8 [N, K // 2]; byte j of a row holds k = 2j in bits 0-3 and k = 2j + 1 in bits 4-7
  (codes 0..15, K even);
- scales float16 / float32 [N, K // group] (loaded, used in float32);
- zeros uint8 [N, K // group] (asymmetric), or None (symmetric): zero = 2**(bits - 1), 128 or 8.

The template. Program (pid, split) owns the output tile [BLOCK_M, BLOCK_N] (grouped order as gemm.py) and
the K range [split * K_CHUNK, (split + 1) * K_CHUNK). Each step loads the weight tile of BLOCK_N rows x
BLOCK_K columns ONCE (contiguous along K: BLOCK_K bytes a row at 8 bits, BLOCK_K / 2 at 4 bits),
dequantizes it in registers in float32 and applies it to all BLOCK_M rows of x; two constexpr paths:
  DOT      tl.dot(x [BLOCK_M, BLOCK_K], W^T) with W cast to x's dtype (tensor cores, float32 accumulator);
           BLOCK_M >= 16: prefill (qgemm, BLOCK_M 32..128) and decode rows 2..16 (skinny.py); with SWAP (decode)
           the transposed product tl.dot(W, x^T) into acc^T [BLOCK_N, BLOCK_M], transposed after the loop: the
           weight's rows the MMA's M, which lets Hopper use wgmma for 16 rows of x;
  no DOT   GEMV, one row (BLOCK_M = 1): float32 products W * x accumulate in the weight tile's own layout
           [BLOCK_N, BLOCK_K] and are summed over K once after the loop (no per-step cross-thread
           reduction, no layout conversion of the weight);
  WORDS    the GEMV of a quantized weight read as int32 words of 8 / 4 codes (qweight_tiles.py ``_words_step``),
           the group's scale and zero applied once a word; the tuner measures its tiles beside the byte tiles';
  IDOT     (with WORDS, a 4-bit weight, 16-bit x) each word's sum by integer dot products against x in 16-bit fixed
           point, exact (qweight_tiles.py);
  AHEAD    the byte-tile GEMV of a quantized weight with each step's scales loaded a step before;
  MAGIC    (with DOT and SWAP, 1..16 rows, a 4-bit weight) the codes minus their zero exactly in x's dtype by packed bit
           operations, the group's scale applied once a step to tl.dot's product (qweight_tiles.py).

Dequantization (qweight_tiles.py): the code goes into the top mantissa bits of float32 1.0 by bit operations
and one FMA a weight applies its group's scale and zero; the WORDS GEMV applies them once a 32-bit word.

Split-K (decode, see skinny.py): with PARTIAL the program writes its raw float32 sums to a workspace
[SPLITS, M, NW] (NW = N, or 2N with GLU: gate sums at column j, up sums at N + j); ``_sum_splits`` adds them
in the fixed order 0, 1, ... (deterministic: the same bits whichever program finishes first), then the epilogue:
  REDUCE_LAST   in the same launch: each program then adds 1 to its output tile's int32 counter (acq_rel), and
                the program that sees SPLITS - 1 (the last to arrive) reduces and stores, then sets the
                counter back to 0 for the next call (a CUDA graph replay: no memset launch);
  else          in a second launch, skinny.py's ``_splitk_reduce_kernel``.
"""
from __future__ import annotations

import functools
import math
import os
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ...ir.ops_fused import ACTIVATIONS
from .gemm import _activation, _gate_residual, _residual_tile, check_output_operands, grouped_tile, output_operands
from .gemm import reference as gemm_reference
from . import pdl
from .pdl import INTERPRETED, gdc, l2_prefetch
from .qweight_tiles import (_codes_tile, _magic_tile, _perm_x, _rms_scale, _weight_tile, _words_load, _words_step,
                            _words_sz, _words_x)

# triton.jit picks the interpreter from this variable when the kernels below are defined; read it then too
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SCALE_DTYPES = (torch.float16, torch.float32)
STATS_ELEMS = 4096  # values of x a step of the norm prologue's statistics pass loads (_row_rstd): 16 rows x 256
# the last program of a split-K launch sums the splits' partials in straight-line code where they are few (_unroll_sum:
# at most SUM_UNROLL_SPLITS splits and SUM_UNROLL_REGS partials a thread): all loads in flight at once, the residual's
# beside them, not the loop's unrolled-by-4 steps one round trip each (a one-row GEMV of 8 splits: two, then the
# residual's). Measured with EARLY_RESIDUAL on an H100 (bench/NOTES.md, session 33, one process): the 1B's w4a16 decode
# at batch 1 1,809 -> 1,854 tok/s. A switch for bench/decode.py --ab-set kernels.qgemm.SUM_UNROLL=0
SUM_UNROLL = True
SUM_UNROLL_SPLITS = 32
SUM_UNROLL_REGS = 64
# a one-row GEMV without split-K loads its residual's tile right after its PDL wait, not after the loop (the load's round
# trip then overlaps the loop's instead of sitting between the loop and the store); a switch for A/Bs
# (bench/decode.py --ab-set kernels.qgemm.EARLY_RESIDUAL=0)
EARLY_RESIDUAL = True
# a WORDS GEMV whose one K step spans a split (the whole-K tiles) runs that step without the loop: a pipelined loop's
# prologue (the next step's copies, their addresses, the loads of its x and scales) ran though the loop never did,
# ~70 of a 1B qkv tile's ~660 instructions a thread after its PDL wait (triton 3.6, sm_90). A switch for A/Bs
# (bench/decode.py --ab-set kernels.qgemm.ONE_STEP=0)
ONE_STEP = True

# the interpreter is slow per program and per K step: small tiles, so irregular test shapes span several
INTERPRET_CONFIG = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, GROUP_M=2)


@triton.jit
def _mac(acc, a, b, DOT: tl.constexpr, SWAP: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    # one K step: a = x's tile [BLOCK_M, BLOCK_K], b = _weight_tile's [BLOCK_N, BLOCK_K].
    #   DOT:  acc [BLOCK_M, BLOCK_N] += a @ b^T
    #   SWAP: acc [BLOCK_N, BLOCK_M] += b @ a^T, the transposed product: the weight's rows are the MMA's M
    #         dimension (Hopper's wgmma needs 64 a warpgroup), x's 16 rows its N
    #   else: acc [BLOCK_N, BLOCK_K] += b * x (one row), summed over K after the loop: the weight stays in
    #         the layout it was loaded in, and the loop has no cross-thread reduction
    if SWAP:
        acc = tl.dot(b.to(a.dtype), tl.trans(a), acc, input_precision=DOT_PRECISION)
    elif DOT:
        acc = tl.dot(a, tl.trans(b.to(a.dtype)), acc, input_precision=DOT_PRECISION)
    else:
        acc += b.to(tl.float32) * tl.reshape(a.to(tl.float32), (BLOCK_K,))[None, :]
    return acc


@triton.jit
def _bias_act_glu(acc, acc_u, bias_ptr, cols, mask_n, N,
                  ACT: tl.constexpr, GLU: tl.constexpr, HAS_BIAS: tl.constexpr):
    # the first epilogue steps, in the reference's order, on float32 [BLOCK_M, BLOCK_N] (acc_u: the up half)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GLU:
            acc_u += tl.load(bias_ptr + N + cols, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    acc = _activation(acc, ACT)
    if GLU:
        acc = acc * acc_u
    return acc


@triton.jit
def _row_rstd(x_ptr, rows, mask_m, K, stride_xm, stride_xk, eps,
              BLOCK_M: tl.constexpr, RSTD_K: tl.constexpr, RSTD_STAGES: tl.constexpr):
    # the norm prologue's statistics: 1 / sqrt(mean(x^2, -1) + eps) of each row [BLOCK_M], float32, over the whole
    # row (a split of K too reads all K values). Tiles [BLOCK_M, RSTD_K] of ~STATS_ELEMS values, the loop pipelined
    # (cp.async, RSTD_STAGES - 1 tiles in flight): a plain loop waits for each tile's load before it issues the next,
    # K / BLOCK_K serial L2 (cold: HBM) round trips before the first product; each step's squares summed over the
    # tile at once, so only the tile is live
    offs_k = tl.arange(0, RSTD_K)
    ss = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for kk in tl.range(0, K, RSTD_K, num_stages=RSTD_STAGES):
        a = tl.load(x_ptr + rows[:, None] * stride_xm + (kk + offs_k)[None, :] * stride_xk,
                    mask=mask_m[:, None] & (kk + offs_k < K)[None, :], other=0.0).to(tl.float32)
        ss += tl.sum(a * a, 1)
    return tl.rsqrt(ss / K + eps)


@triton.jit
def _norm_weight(nw_ptr, kk, K, offs_k):
    # the RMSNORM weight at columns kk + offs_k [BLOCK_K], zero past K. The main loop loads it one step ahead: a
    # [BLOCK_K] vector is one element a thread, too narrow for the pipeliner's cp.async, so loaded where it is used it
    # is a synchronous L2 round trip every step waits for
    return tl.load(nw_ptr + kk + offs_k, mask=kk + offs_k < K, other=0.0)


@triton.jit
def _norm_tile(a, rstd, nw):
    # RMSNORM of x's tile a [BLOCK_M, BLOCK_K] with the norm weight's columns nw [BLOCK_K], rounded as the op's
    # reference rounds: the normalised value to x's dtype, then times the norm weight, rounded again
    return _rms_scale(a, rstd[:, None], nw[None, :])


@triton.jit
def _norm_step(a, rstd, nw, POST: tl.constexpr):
    # NORM on x's tile a [BLOCK_M, BLOCK_K] with the norm weight's columns nw: the prologue's (rstd: the rows' 1 / rms,
    # rounded as the op's reference rounds), or with POST (NORM_POST; rstd: the rows' running sums of squares) x times
    # the norm weight, rounded once, and the tile's squares added. Returns (the tile to multiply, rstd)
    if POST:
        af = a.to(tl.float32)
        return (af * nw[None, :].to(tl.float32)).to(a.dtype), rstd + tl.sum(af * af, 1)
    return _norm_tile(a, rstd, nw), rstd


@triton.jit
def _post_rstd(ss_ptr, stride, rows, mask_m, K, eps, SPLITS):
    # NORM_POST's 1 / rms of rows [BLOCK_M] from the splits' sums of squares at ss_ptr + split * stride + row, added in
    # split order 0, 1, ... (every caller gets the same bits; .cg: written by other SMs)
    ss = tl.zeros(rows.shape, dtype=tl.float32)
    for i in range(SPLITS):
        ss += tl.load(ss_ptr + i * stride + rows, mask=mask_m, other=0.0, cache_modifier=".cg")
    return tl.rsqrt(ss / K + eps)


@triton.jit
def _sum_splits(ws_ptr, rows, cols, mask, M, N, SPLITS, GLU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                UNROLLED: tl.constexpr = 0):
    # workspace [SPLITS, M, NW] float32 -> the sums over the splits at rows x cols, [BLOCK_M, BLOCK_N] (and of the up
    # half, at N + cols, with GLU), added in split order 0, 1, ...: every caller gets the same bits. The loads bypass
    # L1 (.cg): the partials of a split-K launch were written by other SMs. UNROLLED (= SPLITS, known at compile time):
    # straight-line code, every split's load issued before the first add (one round trip from L2, where the loop's
    # unrolled-by-4 steps took one each) and the caller's epilogue loads beside them
    NW = 2 * N if GLU else N
    part = ws_ptr + rows[:, None] * NW + cols[None, :]  # split 0
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = acc
    if UNROLLED:
        for s in tl.static_range(UNROLLED):
            acc += tl.load(part + s * M * NW, mask=mask, other=0.0, cache_modifier=".cg")
            if GLU:
                acc_u += tl.load(part + s * M * NW + N, mask=mask, other=0.0, cache_modifier=".cg")
    else:
        for _ in range(SPLITS):
            acc += tl.load(part, mask=mask, other=0.0, cache_modifier=".cg")
            if GLU:
                acc_u += tl.load(part + N, mask=mask, other=0.0, cache_modifier=".cg")
            part += M * NW
    return acc, acc_u


@triton.jit
def _epilogue_store(acc, acc_u, rows, cols, mask_n, mask, N, bias_ptr, gate_ptr, gate_rows, stride_gb, stride_gm, stride_gn,
                    res_ptr, res_rows, stride_rb, stride_rm, stride_rn, out_ptr, stride_om, stride_on,
                    ACT: tl.constexpr, GLU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                    res_pre=0.0, RES_PRE: tl.constexpr = False):
    # out = residual + gate * epi(acc + bias) of the float32 sums acc (and acc_u, the up half) [BLOCK_M, BLOCK_N].
    # RES_PRE: the residual tile is res_pre, loaded by the caller (gemm._residual_tile), added where _gate_residual adds it
    acc = _bias_act_glu(acc, acc_u, bias_ptr, cols, mask_n, N, ACT, GLU, HAS_BIAS)
    acc = _gate_residual(acc, rows, cols, mask, gate_ptr, gate_rows, stride_gb, stride_gm, stride_gn,
                         res_ptr, res_rows, stride_rb, stride_rm, stride_rn, HAS_GATE, HAS_RESIDUAL and not RES_PRE)
    if RES_PRE:
        acc = acc + res_pre.to(tl.float32)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _k_step(acc, acc_u, b, u, x_ptr, rows, mask_m, offs_k, kk, K, stride_xm, stride_xk, nw,
            rstd, NORM: tl.constexpr, GLU: tl.constexpr, DOT: tl.constexpr, SWAP: tl.constexpr, DOT_PRECISION: tl.constexpr,
            BLOCK_K: tl.constexpr, NORM_POST: tl.constexpr):
    # one K step of _wgemm_kernel on weight tiles loaded before (b, and u, the up half with GLU): x's tile [BLOCK_M,
    # BLOCK_K] at columns kk.. (with NORM normalised by the prologue's rstd and the norm weight's columns nw), into
    # the accumulators: the PREFETCH peel of the loop's first step, the same operations (rstd: NORM_POST's sums of
    # squares, returned with the step's added)
    a = tl.load(x_ptr + rows[:, None] * stride_xm + (kk + offs_k)[None, :] * stride_xk,
                mask=mask_m[:, None] & (kk + offs_k < K)[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
    if NORM:
        a, rstd = _norm_step(a, rstd, nw, NORM_POST)
    acc = _mac(acc, a, b, DOT, SWAP, DOT_PRECISION, BLOCK_K)
    if GLU:
        acc_u = _mac(acc_u, a, u, DOT, SWAP, DOT_PRECISION, BLOCK_K)
    return acc, acc_u, rstd


@triton.jit
def _l2_rows(w_ptr, pid_n, k_lo, k_hi, N, stride_wn,
             PACK: tl.constexpr, GLU: tl.constexpr, BLOCK_N: tl.constexpr, L2_BYTES: tl.constexpr, WARPS: tl.constexpr):
    # what _wgemm_kernel's program asks the L2 for before its wait (pdl.l2_prefetch): of each weight row it streams
    # (BLOCK_N, and their up rows at + N with GLU) the bytes from column k_lo on, L2_BYTES over all rows, none past k_hi
    # (a multiple of 16: the launcher checked that the starts are 16-byte aligned). One row a thread, row r on warp
    # r % WARPS: a warp issues its rows one after another (pdl.py), the warps side by side. Returns the row starts,
    # their byte counts and which lanes prefetch, [LANES] each.
    ROWS: tl.constexpr = 2 * BLOCK_N if GLU else BLOCK_N
    THREADS: tl.constexpr = 32 * WARPS
    LANES: tl.constexpr = ROWS if ROWS > THREADS else THREADS
    ROW_BYTES: tl.constexpr = L2_BYTES // ROWS // 16 * 16
    EB: tl.constexpr = w_ptr.dtype.element_ty.primitive_bitwidth // 8  # bytes an element (qweight: 1)
    i = tl.arange(0, LANES)  # element i sits on thread i % THREADS, in warp i // 32 % WARPS
    r = i // THREADS * THREADS + i % 32 * WARPS + i // 32 % WARPS
    n = pid_n * BLOCK_N + r % BLOCK_N
    row = (n + r // BLOCK_N * N).to(tl.int64)  # GLU: r >= BLOCK_N is column n's up row
    nbytes = tl.minimum((k_hi - k_lo) // PACK * EB // 16 * 16, ROW_BYTES)
    return w_ptr + row * stride_wn + k_lo // PACK, nbytes, (r < ROWS) & (n < N) & (nbytes > 0)


@triton.jit
def _wgemm_kernel(
    x_ptr, w_ptr, s_ptr, z_ptr, bias_ptr, gate_ptr, res_ptr, out_ptr,
    ws_ptr, cnt_ptr,  # PARTIAL: the float32 workspace [SPLITS, M, NW]; REDUCE_LAST: int32 counters, one per output tile
    nw_ptr, eps,  # NORM: the RMSNORM weight [K] and eps applied to x's rows first
    M, N, K, K_CHUNK,  # N: output columns (half of w's rows with GLU); K_CHUNK: K of one split
    stride_xm, stride_xk,
    stride_wn, stride_wk,  # of qweight (bytes) or of the plain weight
    stride_sn, stride_sg, stride_zn, stride_zg,
    gate_rows, stride_gb, stride_gm, stride_gn,  # gate row m sits at (m // gate_rows) * stride_gb + (m % gate_rows) * stride_gm
    res_rows, stride_rb, stride_rm, stride_rn,
    stride_om, stride_on,
    BITS: tl.constexpr, PACK: tl.constexpr, HAS_ZEROS: tl.constexpr, QGROUP: tl.constexpr,  # BITS 0: plain; PACK: codes a byte;
    # QGROUP: the group size, a power of two (per-channel: next_power_of_2(K), whose group 0 spans the row)
    ACT: tl.constexpr, GLU: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    PARTIAL: tl.constexpr, REDUCE_LAST: tl.constexpr, DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, NORM: tl.constexpr,
    LOOP_STAGES: tl.constexpr,  # the GEMV's num_stages: Triton pipelines a loop without tl.dot only when told
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SWAP: tl.constexpr = False,  # with DOT: the product transposed, acc [BLOCK_N, BLOCK_M] += W x^T (_mac); a config key
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (pdl.py): wait for the previous kernel first
    PREFETCH: tl.constexpr = False,  # the first K step's weight tiles loaded before that wait (pdl.py)
    L2_BYTES: tl.constexpr = 0,  # > 0: bytes of this program's weight asked of the L2 before that wait (pdl.py)
    RSTD_K: tl.constexpr = 16, RSTD_STAGES: tl.constexpr = 4,  # NORM: the statistics' tile [BLOCK_M, RSTD_K], its stages
    WORDS: tl.constexpr = False,  # GEMV of a quantized weight read as int32 words, scales applied a word (_words_step)
    AHEAD: tl.constexpr = False,  # (byte-tile GEMV of a quantized weight) each step's scales loaded a step before
    MAGIC: tl.constexpr = False,  # (swapped tl.dot tile of a 4-bit weight) codes - zero exact in x's dtype (qweight_tiles.py)
    NORM_POST: tl.constexpr = False,  # (NORM) no statistics pass: the loop sums x's squares, the epilogue scales by 1 / rms
    IDOT: tl.constexpr = False,  # (WORDS, 4 bits, 16-bit x) each word's sum by integer dot products (_words_step_idot)
    SUM_UNROLLED: tl.constexpr = 0,  # (REDUCE_LAST) the splits, for the last program's sum unrolled (_sum_splits); 0: a loop
    EARLY_RESIDUAL: tl.constexpr = True,  # (one row, no split) the residual loaded after the wait, not after the loop
    ONE_STEP: tl.constexpr = False,  # (WORDS) one BLOCK_K step spans a split's K: no loop (launch sets it)
):
    EARLY: tl.constexpr = PREFETCH or L2_BYTES > 0  # weights read before the wait (a kernel never writes them)
    if not EARLY:
        gdc(PDL)
    pid = tl.program_id(0)
    split = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)  # int64 addressing: N * K may pass 2**31
    cols = offs_n.to(tl.int64)

    SUB: tl.constexpr = (BLOCK_K + QGROUP - 1) // QGROUP  # groups one K step spans: > 1 when narrower than BLOCK_K
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    elif DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    elif WORDS:  # GEMV of int32 words of codes: per-word sums, reduced after the loop
        acc = tl.zeros((BLOCK_N, BLOCK_K * BITS // 32), dtype=tl.float32)
    else:  # GEMV, BLOCK_M = 1: per-column products, reduced after the loop
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_u = acc
    k_lo = split * K_CHUNK
    k_hi = tl.minimum(k_lo + K_CHUNK, K)
    if EARLY and PDL:
        tl.extra.cuda.gdc_launch_dependents()
    if L2_BYTES > 0:  # the first bytes of this program's weight rows on their way to L2 while the previous kernel runs
        pf, pf_bytes, pf_live = _l2_rows(w_ptr, pid_n, k_lo, k_hi, N, stride_wn, PACK, GLU, BLOCK_N, L2_BYTES,
                                         1 if INTERPRETED else tl.extra.cuda.num_warps())
        l2_prefetch(pf, pf_bytes, pf_live)
    if PREFETCH and WORDS:  # (the first step's words and scales, as the WORDS loop's first step reads them)
        wd0, wu0 = _words_load(w_ptr, cols, mask_n, k_lo, K, N, stride_wn, BITS, GLU, BLOCK_K)
        s, z, s_u, z_u = _words_sz(s_ptr, z_ptr, cols, mask_n, k_lo, K, N, stride_sn, stride_sg, stride_zn, stride_zg,
                                   HAS_ZEROS, QGROUP, GLU, BLOCK_K)
    elif PREFETCH:
        # the first step's tiles load while the previous kernel finishes, then the wait, then that step (accumulated
        # first, as in the loop: the same sums in the same order)
        b = _weight_tile(w_ptr, s_ptr, z_ptr, cols, mask_n, k_lo, K, stride_wn, stride_wk,
                         stride_sn, stride_sg, stride_zn, stride_zg, BITS, PACK, HAS_ZEROS, QGROUP, SUB, BLOCK_N, BLOCK_K)
        u = b
        if GLU:
            u = _weight_tile(w_ptr, s_ptr, z_ptr, cols + N, mask_n, k_lo, K, stride_wn, stride_wk,
                             stride_sn, stride_sg, stride_zn, stride_zg, BITS, PACK, HAS_ZEROS, QGROUP, SUB, BLOCK_N, BLOCK_K)
    if EARLY and PDL:
        tl.extra.cuda.gdc_wait()
    # a one-row GEMV that stores its own output: the residual's tile loaded now, its round trip under the loop's instead
    # of between the loop's end and the store
    RES_PRE: tl.constexpr = HAS_RESIDUAL and not PARTIAL and not DOT and EARLY_RESIDUAL
    res_pre = eps
    if RES_PRE:
        res_pre = _residual_tile(res_ptr, rows, cols, mask_m[:, None] & mask_n[None, :], res_rows, stride_rb, stride_rm,
                                 stride_rn)
    rstd = eps  # (rstd, nw: unused without NORM)
    nw = eps
    # the WORDS steps' norm (qweight_tiles._x_normed): 1 the prologue's, 2 NORM_POST's
    WNORM: tl.constexpr = (2 if NORM_POST else 1) if NORM else 0
    if NORM and NORM_POST and WORDS:  # rstd: the word columns' sums of squares until after the loop (the norm weight
        rstd = tl.zeros((BLOCK_K * BITS // 32,), dtype=tl.float32)  # loads with x)
    elif NORM and NORM_POST:  # rstd: the rows' sums of squares until after the loop
        rstd = tl.zeros((BLOCK_M,), dtype=tl.float32)
        nw = _norm_weight(nw_ptr, k_lo, K, offs_k)
    elif NORM:
        rstd = _row_rstd(x_ptr, rows, mask_m, K, stride_xm, stride_xk, eps, BLOCK_M, RSTD_K, RSTD_STAGES)
        if WORDS:  # one row: its rstd as a scalar (a [1] vector's layout would be converted to and from the words' at
            rstd = tl.sum(rstd, 0)  # every use: shared-memory round trips that spilled; WORDS loads the norm weight with x)
        else:
            nw = _norm_weight(nw_ptr, k_lo, K, offs_k)
    if PREFETCH and not WORDS:
        acc, acc_u, rstd = _k_step(acc, acc_u, b, u, x_ptr, rows, mask_m, offs_k, k_lo, K, stride_xm, stride_xk, nw,
                                   rstd, NORM, GLU, DOT, SWAP, DOT_PRECISION, BLOCK_K, NORM_POST)
        k_lo += BLOCK_K
        if NORM:
            nw = _norm_weight(nw_ptr, k_lo, K, offs_k)
    if WORDS:
        tl.static_assert(not DOT and BITS > 0, "WORDS: the GEMV of a quantized weight")
        # x, the norm weight and the scales of the first step; in the loop those of the next step load while this one
        # computes (the weight tiles go through cp.async's pipeline; these small loads do not)
        x0, x1, x2, x3, x4, x5, x6, x7, n0, n1, n2, n3, n4, n5, n6, n7 = _words_x(
            x_ptr, nw_ptr, rows * stride_xm, k_lo, K, stride_xk, NORM, BITS, BLOCK_K)
        # PREFETCH: the first step on its words and scales loaded before the wait, then the loop from the second.
        # ONE_STEP: that step spans the split (the whole-K tiles): no loop, nothing loaded for a next step (the pipelined
        # loop's prologue, its copies and addresses, ran though the loop never did)
        if PREFETCH or ONE_STEP:
            if not PREFETCH:
                wd0, wu0 = _words_load(w_ptr, cols, mask_n, k_lo, K, N, stride_wn, BITS, GLU, BLOCK_K)
                s, z, s_u, z_u = _words_sz(s_ptr, z_ptr, cols, mask_n, k_lo, K, N, stride_sn, stride_sg, stride_zn,
                                           stride_zg, HAS_ZEROS, QGROUP, GLU, BLOCK_K)
            if not ONE_STEP:
                y0, y1, y2, y3, y4, y5, y6, y7, m0, m1, m2, m3, m4, m5, m6, m7 = _words_x(
                    x_ptr, nw_ptr, rows * stride_xm, k_lo + BLOCK_K, K, stride_xk, NORM, BITS, BLOCK_K)
                s2, z2, s2_u, z2_u = _words_sz(s_ptr, z_ptr, cols, mask_n, k_lo + BLOCK_K, K, N, stride_sn, stride_sg,
                                               stride_zn, stride_zg, HAS_ZEROS, QGROUP, GLU, BLOCK_K)
            acc, acc_u, rstd = _words_step(acc, acc_u, wd0, wu0, rstd, x0, x1, x2, x3, x4, x5, x6, x7, n0, n1, n2, n3, n4, n5,
                                           n6, n7, s, z, s_u, z_u, BITS, HAS_ZEROS, QGROUP, WNORM, GLU, BLOCK_N, BLOCK_K, IDOT)
            if not ONE_STEP:
                x0, x1, x2, x3, x4, x5, x6, x7 = y0, y1, y2, y3, y4, y5, y6, y7
                n0, n1, n2, n3, n4, n5, n6, n7 = m0, m1, m2, m3, m4, m5, m6, m7
                s, z, s_u, z_u = s2, z2, s2_u, z2_u
                k_lo += BLOCK_K
        else:
            s, z, s_u, z_u = _words_sz(s_ptr, z_ptr, cols, mask_n, k_lo, K, N, stride_sn, stride_sg, stride_zn, stride_zg,
                                       HAS_ZEROS, QGROUP, GLU, BLOCK_K)
        if not ONE_STEP:
            for kk in tl.range(k_lo, k_hi, BLOCK_K, num_stages=LOOP_STAGES):
                y0, y1, y2, y3, y4, y5, y6, y7, m0, m1, m2, m3, m4, m5, m6, m7 = _words_x(
                    x_ptr, nw_ptr, rows * stride_xm, kk + BLOCK_K, K, stride_xk, NORM, BITS, BLOCK_K)
                s2, z2, s2_u, z2_u = _words_sz(s_ptr, z_ptr, cols, mask_n, kk + BLOCK_K, K, N, stride_sn, stride_sg, stride_zn,
                                               stride_zg, HAS_ZEROS, QGROUP, GLU, BLOCK_K)
                wd, wu = _words_load(w_ptr, cols, mask_n, kk, K, N, stride_wn, BITS, GLU, BLOCK_K)
                acc, acc_u, rstd = _words_step(acc, acc_u, wd, wu, rstd,
                                               x0, x1, x2, x3, x4, x5, x6, x7, n0, n1, n2, n3, n4, n5, n6, n7, s, z, s_u, z_u,
                                               BITS, HAS_ZEROS, QGROUP, WNORM, GLU, BLOCK_N, BLOCK_K, IDOT)
                x0, x1, x2, x3, x4, x5, x6, x7 = y0, y1, y2, y3, y4, y5, y6, y7
                n0, n1, n2, n3, n4, n5, n6, n7 = m0, m1, m2, m3, m4, m5, m6, m7
                s, z, s_u, z_u = s2, z2, s2_u, z2_u
    elif MAGIC:
        tl.static_assert(SWAP and BITS == 4 and SUB == 1 and not PREFETCH,
                         "MAGIC: the swapped tl.dot tile of a 4-bit weight, BLOCK_K within one group, no PREFETCH")
        for kk in tl.range(k_lo, k_hi, BLOCK_K, num_stages=LOOP_STAGES):
            a = tl.load(x_ptr + rows[:, None] * stride_xm + (kk + offs_k)[None, :] * stride_xk,
                        mask=mask_m[:, None] & (kk + offs_k < K)[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            if NORM:
                nw_next = _norm_weight(nw_ptr, kk + BLOCK_K, K, offs_k)
                a, rstd = _norm_step(a, rstd, nw, NORM_POST)
                nw = nw_next
            xt = tl.trans(_perm_x(a))  # [BLOCK_K, BLOCK_M], k in the codes' order
            s, b = _magic_tile(w_ptr, s_ptr, z_ptr, cols, mask_n, kk, K, stride_wn, stride_wk, stride_sn, stride_sg,
                               stride_zn, stride_zg, HAS_ZEROS, QGROUP, a.dtype, BLOCK_N, BLOCK_K)
            acc += s * tl.dot(b, xt, input_precision=DOT_PRECISION)  # the group's scale once a step
            if GLU:
                s_u, u = _magic_tile(w_ptr, s_ptr, z_ptr, cols + N, mask_n, kk, K, stride_wn, stride_wk, stride_sn, stride_sg,
                                     stride_zn, stride_zg, HAS_ZEROS, QGROUP, a.dtype, BLOCK_N, BLOCK_K)
                acc_u += s_u * tl.dot(u, xt, input_precision=DOT_PRECISION)
    else:
        if AHEAD:  # the first step's scales (a plain load waits for its round trip at first use: in the loop, every step)
            tl.static_assert(not DOT and not PREFETCH and BITS > 0, "AHEAD: the byte-tile GEMV of a quantized weight")
            s, z, s_u, z_u = _words_sz(s_ptr, z_ptr, cols, mask_n, k_lo, K, N, stride_sn, stride_sg, stride_zn, stride_zg,
                                       HAS_ZEROS, QGROUP, GLU, BLOCK_K)
        # (the loop keeps its own statements in the order measured on the H200; _k_step is the same operations)
        for kk in tl.range(k_lo, k_hi, BLOCK_K, num_stages=LOOP_STAGES):
            a = tl.load(x_ptr + rows[:, None] * stride_xm + (kk + offs_k)[None, :] * stride_xk,
                        mask=mask_m[:, None] & (kk + offs_k < K)[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            if NORM:
                nw_next = _norm_weight(nw_ptr, kk + BLOCK_K, K, offs_k)  # next step's, in flight during this one
                a, rstd = _norm_step(a, rstd, nw, NORM_POST)
                nw = nw_next
            if AHEAD:  # the next step's scales in flight during this one
                s2, z2, s2_u, z2_u = _words_sz(s_ptr, z_ptr, cols, mask_n, kk + BLOCK_K, K, N, stride_sn, stride_sg,
                                               stride_zn, stride_zg, HAS_ZEROS, QGROUP, GLU, BLOCK_K)
                b = _codes_tile(w_ptr, cols, mask_n, kk, K, stride_wn, stride_wk, s, z, BITS, PACK, HAS_ZEROS, SUB,
                                BLOCK_N, BLOCK_K)
            else:
                b = _weight_tile(w_ptr, s_ptr, z_ptr, cols, mask_n, kk, K, stride_wn, stride_wk,
                                 stride_sn, stride_sg, stride_zn, stride_zg, BITS, PACK, HAS_ZEROS, QGROUP, SUB, BLOCK_N, BLOCK_K)
            acc = _mac(acc, a, b, DOT, SWAP, DOT_PRECISION, BLOCK_K)
            if GLU:  # the up half: rows N + j of the merged [gate; up] weight, same x tile
                if AHEAD:
                    u = _codes_tile(w_ptr, cols + N, mask_n, kk, K, stride_wn, stride_wk, s_u, z_u, BITS, PACK, HAS_ZEROS,
                                    SUB, BLOCK_N, BLOCK_K)
                else:
                    u = _weight_tile(w_ptr, s_ptr, z_ptr, cols + N, mask_n, kk, K, stride_wn, stride_wk, stride_sn, stride_sg,
                                     stride_zn, stride_zg, BITS, PACK, HAS_ZEROS, QGROUP, SUB, BLOCK_N, BLOCK_K)
                acc_u = _mac(acc_u, a, u, DOT, SWAP, DOT_PRECISION, BLOCK_K)
            if AHEAD:
                s, z, s_u, z_u = s2, z2, s2_u, z2_u
    if SWAP:  # [BLOCK_N, BLOCK_M] -> [BLOCK_M, BLOCK_N]: one layout conversion a program, for the epilogue
        acc = tl.trans(acc)
        if GLU:
            acc_u = tl.trans(acc_u)
    if not DOT:
        acc = tl.sum(acc, 1)[None, :]  # [1, BLOCK_N]
        if GLU:
            acc_u = tl.sum(acc_u, 1)[None, :]
    if WORDS and NORM and NORM_POST:  # the word columns' sums of squares -> the row's, [BLOCK_M] (one row)
        rstd = tl.zeros((BLOCK_M,), dtype=tl.float32) + tl.sum(rstd, 0)

    mask = mask_m[:, None] & mask_n[None, :]
    POST: tl.constexpr = NORM and NORM_POST  # the rows' 1 / rms scales the products before the epilogue
    if PARTIAL:
        # workspace [SPLITS, M, NW], float32: this split's raw sums; bias and the rest come after the reduction. POST:
        # then [SPLITS, tiles, M], each program's sums of squares of x's rows over its split
        NW = 2 * N if GLU else N
        part = ws_ptr + split.to(tl.int64) * M * NW + rows[:, None] * NW + cols[None, :]
        tl.store(part, acc, mask=mask)
        if GLU:
            tl.store(part + N, acc_u, mask=mask)
        if POST:
            ss_tile = ws_ptr + tl.num_programs(1).to(tl.int64) * M * NW + pid * M  # this tile's split 0
            tl.store(ss_tile + split * tl.num_programs(0) * M + rows, rstd, mask=mask_m)
        if REDUCE_LAST:
            # the barrier: every warp's partial is stored before the count goes up (the scalar atomic is one
            # thread's); acq_rel: releases this program's partial, and acquires the others' for the last to arrive
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid, 1, sem="acq_rel")
            if arrived == tl.num_programs(1) - 1:
                tot, tot_u = _sum_splits(ws_ptr, rows, cols, mask, M, N, tl.num_programs(1), GLU, BLOCK_M, BLOCK_N, SUM_UNROLLED)
                if POST:
                    r = _post_rstd(ss_tile, tl.num_programs(0) * M, rows, mask_m, K, eps, tl.num_programs(1))[:, None]
                    tot *= r
                    if GLU:
                        tot_u *= r
                _epilogue_store(tot, tot_u, rows, cols, mask_n, mask, N, bias_ptr, gate_ptr, gate_rows, stride_gb, stride_gm,
                                stride_gn, res_ptr, res_rows, stride_rb, stride_rm, stride_rn, out_ptr, stride_om, stride_on,
                                ACT, GLU, HAS_BIAS, HAS_GATE, HAS_RESIDUAL)
                tl.store(cnt_ptr + pid, 0)  # no other program of this launch touches it again
    else:
        if POST:
            r = tl.rsqrt(rstd / K + eps)[:, None]
            acc *= r
            if GLU:  # (acc_u is acc's first value otherwise, its shape unswapped)
                acc_u *= r
        _epilogue_store(acc, acc_u, rows, cols, mask_n, mask, N, bias_ptr, gate_ptr, gate_rows, stride_gb, stride_gm, stride_gn,
                        res_ptr, res_rows, stride_rb, stride_rm, stride_rn, out_ptr, stride_om, stride_on,
                        ACT, GLU, HAS_BIAS, HAS_GATE, HAS_RESIDUAL, res_pre, RES_PRE)


# ----------------------------------------------------------------------------- the format, in torch


def dequantize(qweight, scales, zeros, bits: int, group: int, dtype=torch.float32) -> torch.Tensor:
    """W [N, K] in ``dtype`` from the packed format: ``(q - zero) * scale``, group by group (module docstring)."""
    q = qweight
    if bits == 4:
        q = torch.stack((q & 15, q >> 4), dim=-1).flatten(-2)  # [N, K]: byte j -> k = 2j (low), 2j + 1 (high)
    z = zeros.to(dtype).repeat_interleave(group, dim=1) if zeros is not None else 2 ** (bits - 1)
    return (q.to(dtype) - z) * scales.to(dtype).repeat_interleave(group, dim=1)


def check_qweight(fn: str, x: torch.Tensor, qweight, scales, zeros, bits, group) -> int:
    """Check the quantized weight operands against x [..., K] and the format; returns N (the weight's rows)."""
    if bits not in (4, 8):
        raise ValueError(f"{fn}: bits must be 4 or 8, got {bits!r}")
    k = x.shape[-1]
    if bits == 4 and k % 2:
        raise ValueError(f"{fn}: x's K = {k} is odd; a 4-bit qweight packs two input features a byte, K must be even")
    if not isinstance(qweight, torch.Tensor) or qweight.dtype != torch.uint8 or qweight.dim() != 2:
        got = f"{qweight.dtype} {tuple(qweight.shape)}" if isinstance(qweight, torch.Tensor) else type(qweight).__name__
        raise ValueError(f"{fn}: qweight must be a uint8 [N, K{' // 2' if bits == 4 else ''}] tensor, got {got}")
    n = qweight.shape[0]
    if qweight.shape[1] * (8 // bits) != k:
        raise ValueError(f"{fn}: qweight {tuple(qweight.shape)} does not fit x's K = {k} at {bits} bits "
                         f"(expected [{n}, {k * bits // 8}])")
    if not isinstance(group, int) or not (group == k or (16 <= group < k and group & (group - 1) == 0 and k % group == 0)):
        raise ValueError(f"{fn}: group {group!r} must be K = {k} or a power of two >= 16 dividing K = {k}")
    shape = (n, k // group)
    if not isinstance(scales, torch.Tensor) or scales.dtype not in SCALE_DTYPES or tuple(scales.shape) != shape:
        got = f"{scales.dtype} {tuple(scales.shape)}" if isinstance(scales, torch.Tensor) else type(scales).__name__
        raise ValueError(f"{fn}: scales must be float16 / float32 [N, K // group] = {list(shape)}, got {got}")
    if zeros is not None and (not isinstance(zeros, torch.Tensor) or zeros.dtype != torch.uint8 or tuple(zeros.shape) != shape):
        got = f"{zeros.dtype} {tuple(zeros.shape)}" if isinstance(zeros, torch.Tensor) else type(zeros).__name__
        raise ValueError(f"{fn}: zeros must be None (symmetric) or uint8 [N, K // group] = {list(shape)}, got {got}")
    for name, t in (("qweight", qweight), ("scales", scales), ("zeros", zeros)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, x is on {x.device}")
    return n


def check_operands(fn: str, x, w, bias, gate, residual, act, glu, out, n: int) -> tuple:
    """The checks every launcher of the template shares (``w``: the plain weight, or None when quantized;
    ``n``: the weight's rows). Returns the output shape."""
    if act not in ACTIVATIONS:
        raise ValueError(f"{fn}: unknown activation {act!r} (one of {', '.join(ACTIVATIONS)})")
    if x.dtype not in DTYPES:
        raise ValueError(f"{fn}: x has dtype {x.dtype}; supported: float16, bfloat16, float32")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != n):
        raise ValueError(f"{fn}: bias {tuple(bias.shape)} must be [{n}] (one per weight row)")
    if glu:
        if n % 2:
            raise ValueError(f"{fn}: glu needs an even number of weight rows ([gate; up]), the weight has {n}")
        n //= 2
    shape = tuple(x.shape[:-1]) + (n,)
    check_output_operands(fn, ("x", x), shape, [("w", w), ("bias", bias)], gate, residual, out)
    if INTERPRET:
        if x.dtype == torch.bfloat16:
            raise ValueError(f"{fn}: the Triton interpreter computes tl.dot on bfloat16 wrongly; use float16/float32 on CPU")
    elif x.device.type != "cuda":
        raise ValueError(f"{fn}: x is on {x.device}; the kernel needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    return shape


def reference(x, qweight, scales, zeros, bits, group, bias=None, gate=None, residual=None, act="none", glu=False):
    """Dequantize in x's dtype, then the GEMM op's reference (``OPS["GEMM"].ref``): pass float64 operands for
    a float64 reference."""
    w = dequantize(qweight, scales, zeros, bits, group, dtype=x.dtype)
    return gemm_reference(x, w, bias, gate, residual, act=act, glu=glu)


# ----------------------------------------------------------------------------- launching


class Weight(NamedTuple):
    """The weight operand as the template takes it: ``w`` the plain [N, K] weight (bits 0) or the qweight."""
    w: torch.Tensor
    scales: torch.Tensor | None = None
    zeros: torch.Tensor | None = None
    bits: int = 0
    group: int = 0


class Epilogue(NamedTuple):
    """The epilogue operands of one call: ``g`` / ``r`` are ``output_operands``'s (tensor, rows, stride_b,
    stride_m, stride_n) of the gate and the residual; ``meta`` the constexpr switches."""
    bias: torch.Tensor | None
    g: tuple
    r: tuple
    meta: dict


def prepare(fn: str, x, weight: Weight, bias, gate, residual, act, glu, out):
    """Checks, x flattened to [M, K] and the output: returns ``(x2, out, out2, epilogue, m, n)`` with n the
    output columns and out2 out's [M, n] view."""
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise ValueError(f"{fn}: x must be a tensor [..., K]")
    if weight.bits != 0:  # None too: check_qweight names it
        rows = check_qweight(fn, x, weight.w, weight.scales, weight.zeros, weight.bits, weight.group)
    else:
        if not isinstance(weight.w, torch.Tensor) or weight.w.dim() != 2 or x.shape[-1] != weight.w.shape[1]:
            got = tuple(weight.w.shape) if isinstance(weight.w, torch.Tensor) else type(weight.w).__name__
            raise ValueError(f"{fn}: x {tuple(x.shape)} and weight {got} do not fit (weight is [out, in], x's last dim must equal in)")
        rows = weight.w.shape[0]
    shape = check_operands(fn, x, None if weight.bits != 0 else weight.w, bias, gate, residual, act, glu, out, rows)
    m, n = math.prod(shape[:-1]), shape[-1]
    x2 = x.reshape(m, x.shape[-1])  # a view unless x's leading dims cannot be flattened
    out, out2, g, r = output_operands(fn, out, shape, x, gate, residual)
    meta = dict(ACT=act, GLU=bool(glu), HAS_BIAS=bias is not None, HAS_GATE=gate is not None, HAS_RESIDUAL=residual is not None)
    return x2, out, out2, Epilogue(bias if bias is not None else x, g, r, meta), m, n


class SplitK(NamedTuple):
    """Split-K of one launch: ``splits`` programs per output tile, each over ``k_chunk`` columns of K (a multiple of
    BLOCK_K), write float32 partial sums to ``workspace`` (flat, at least [splits, M, NW]). ``counters``: int32, one
    per output tile, zero on entry and on return: the last program of a tile to arrive reduces and runs the
    epilogue (REDUCE_LAST); None: the partials wait for a reduce launch of the caller's."""
    splits: int
    k_chunk: int
    workspace: torch.Tensor
    counters: torch.Tensor | None = None


def launch(x2, weight: Weight, epi: Epilogue, out2, m: int, n: int, config: dict | None, dot: bool = True,
           split: SplitK | None = None, kernel=None, norm: tuple | None = None, prefetch: bool | None = None,
           l2: int | None = None) -> None:
    """One launch of the template over x2 [M, K] (any strides) into ``out2``, the [M, n] output view (not written
    when ``split`` has no counters). ``config``: BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages; None with
    an autotuned ``kernel``. ``norm``: (weight [K], eps) of an RMSNORM applied to x2's rows as they are loaded
    (skinny.py's prologue). ``prefetch``: the first K step peeled, its weight tiles loaded before the PDL wait
    (None: ``pdl.prefetch``; True without PDL: the same sums, for tests). ``l2``: bytes each program asks the L2 for
    before the wait (None: ``pdl.l2``; 0: none), dropped where a row range could start off 16 bytes (``pdl.l2_bytes``)."""
    w, scales, zeros, bits, group = weight
    k = x2.shape[1]
    s = scales if scales is not None else w  # absent operands: any tensor will do, their switch is off
    z = zeros if zeros is not None else w
    nw, eps = norm if norm is not None else (x2, 0.0)
    splits, k_chunk, ws, counters = split if split is not None else (1, k, out2, None)
    args = (x2, w, s, z, epi.bias, epi.g[0], epi.r[0], out2, ws, counters if counters is not None else ws, nw, float(eps),
            m, n, k, k_chunk, x2.stride(0), x2.stride(1), w.stride(0), w.stride(1), s.stride(0), s.stride(-1), z.stride(0),
            z.stride(-1), *epi.g[1:], *epi.r[1:], out2.stride(0), out2.stride(-1))
    meta = dict(epi.meta, BITS=bits, PACK=2 if bits == 4 else 1, HAS_ZEROS=zeros is not None,
                QGROUP=group if 0 < group < k else triton.next_power_of_2(k),  # per-channel (or plain): group 0 spans the row
                PARTIAL=splits > 1, REDUCE_LAST=splits > 1 and counters is not None, DOT=dot,
                DOT_PRECISION="ieee" if x2.dtype == torch.float32 else "tf32", NORM=norm is not None,
                LOOP_STAGES=None if dot else (config or {}).get("num_stages", 3))
    budget = pdl.l2(x2) if l2 is None else l2
    step = k_chunk // meta["PACK"] * w.element_size() if splits > 1 else 0  # a split's first byte in a row: a multiple
    own_loop = any((config or {}).get(key) for key in ("AHEAD", "MAGIC"))  # (no peeled first step in those loops)
    own_loop = own_loop or ((config or {}).get("WORDS") and prefetch is None and not pdl.prefetch_words(x2, bits))
    meta.update(pdl.kwargs(x2), PREFETCH=not own_loop and (pdl.prefetch(x2, m) if prefetch is None else prefetch),
                L2_BYTES=pdl.l2_bytes(w, step, budget) if budget else 0)
    if norm is not None:  # the statistics' tiles: ~STATS_ELEMS values, at most K's power of two wide
        meta["RSTD_K"] = min(triton.next_power_of_2(k), max(16, STATS_ELEMS // (config or {}).get("BLOCK_M", 16)))
    meta["EARLY_RESIDUAL"] = EARLY_RESIDUAL
    if config is not None:
        meta["ONE_STEP"] = ONE_STEP and bool(config.get("WORDS")) and k_chunk <= config["BLOCK_K"]
        meta["SUM_UNROLLED"] = splits if meta["REDUCE_LAST"] and _unroll_sum(config, splits, meta["GLU"]) else 0
        grid = (triton.cdiv(m, config["BLOCK_M"]) * triton.cdiv(n, config["BLOCK_N"]), splits)
        (kernel or _wgemm_kernel)[grid](*args, **meta, **config)
    else:
        kernel[lambda c: (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]), splits)](*args, **meta)


def _unroll_sum(config: dict, splits: int, glu: bool) -> bool:
    """Whether the last program of a split-K launch sums the splits' partials unrolled (``_sum_splits``' UNROLLED): at
    most SUM_UNROLL_SPLITS splits and SUM_UNROLL_REGS float32 partials a thread in flight (a one-row GEMV's tile of 16-64
    columns: under one a thread a split; a 16-row tl.dot tile of 64-128 columns, GLU's two halves: 8-32, so 2-8 splits)."""
    per_split = config["BLOCK_M"] * config["BLOCK_N"] * (2 if glu else 1) / (32 * config.get("num_warps", 4))
    return SUM_UNROLL and splits <= SUM_UNROLL_SPLITS and per_split * splits <= SUM_UNROLL_REGS


def check_config(fn: str, config: dict, keys: tuple) -> dict:
    """``config`` with each of ``keys`` a power of two >= 16 (tl.dot's smallest tile), as a new dict."""
    if not isinstance(config, dict):
        raise ValueError(f"{fn}: config must be a dict, got {type(config).__name__}")
    for key in keys:
        v = config.get(key)
        if not (isinstance(v, int) and v >= 16 and v & (v - 1) == 0):
            raise ValueError(f"{fn}: config {config!r} needs {key}, a power of two >= 16")
    return dict(config)


def _config(bm, bn, bk, warps, stages, group_m=8):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m), num_warps=warps, num_stages=stages)


# H200 prefill. Beside the accumulator, the dequantized float32 weight tile [BLOCK_N, BLOCK_K] sits in
# registers before it is cast for tl.dot; every entry compiles for sm_90 without spilling (ptxas -v,
# glu included), where 128 x 256 tiles spill.
LARGE_M_CONFIGS = [
    _config(128, 128, 64, 8, 3),
    _config(128, 128, 64, 8, 4),
    _config(128, 64, 64, 4, 3),
    _config(64, 128, 64, 4, 3),
]
SMALL_M_CONFIGS = [  # 17..64 rows: thin row tiles, long K steps
    _config(32, 64, 128, 4, 4),
    _config(64, 64, 128, 4, 3),
    _config(32, 128, 64, 4, 4),
    _config(64, 128, 64, 4, 3),
]
SMALL_M = 64  # M at or below this uses SMALL_M_CONFIGS


def _configs(small_m: bool, glu: bool) -> list:
    # glu holds two accumulators and two weight tiles: tiles past 128 x 128 would spill
    cs = SMALL_M_CONFIGS if small_m else LARGE_M_CONFIGS
    return [c for c in cs if not glu or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 128]


@functools.cache
def _tuned(small_m: bool, glu: bool):
    # built on first GPU use: an Autotuner asks for the active driver, which the CPU interpreter lacks.
    # restore_value: the benchmark runs would otherwise re-add the residual when out IS the residual.
    return triton.autotune(_configs(small_m, glu), key=["M", "N", "K", "BITS", "QGROUP"], restore_value=["out_ptr"])(_wgemm_kernel)


def configs(m: int, glu: bool = False) -> list[dict]:
    """The launch configurations the autotuner tries for ``m`` rows, as plain dicts (JSON-able)."""
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in _configs(m <= SMALL_M, glu)]


def qgemm(x, qweight, scales, zeros, bits: int, group: int, bias=None, gate=None, residual=None, act="none", glu=False,
          out=None, config: dict | None = None) -> torch.Tensor:
    """``residual + gate * epi(x @ W^T + bias)`` with W weight-only quantized (module docstring), for many rows.

    x [..., K] float16 / bfloat16 / float32; qweight, scales, zeros, bits, group in kiln's format (zeros None:
    symmetric); bias [N], gate and residual broadcast to the output [..., N'] (N' = N, or N / 2 with ``glu``),
    all in x's dtype. float32 accumulation; the output has x's dtype; ``out`` may be given (it may be the
    residual itself). ``config``: one entry of ``configs`` run without the autotuner.
    """
    weight = Weight(qweight, scales, zeros, bits, group)
    x2, out, out2, epi, m, n = prepare("qgemm", x, weight, bias, gate, residual, act, glu, out)
    if config is not None:
        config = check_config("qgemm", config, ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    if m == 0 or n == 0:
        return out
    if INTERPRET or config is not None:
        launch(x2, weight, epi, out2, m, n, dict(GROUP_M=8) | (config or INTERPRET_CONFIG))
    else:
        launch(x2, weight, epi, out2, m, n, None, kernel=_tuned(m <= SMALL_M, bool(glu)))
    return out
