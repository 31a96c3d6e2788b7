"""The persistent GEMM template for Hopper: operands through TMA, one program per SM walking the output tiles.

    h[m, n] = sum_k x[m, k] * w[n, k]                       fp8 / int8 codes (SCALED), or float16 / bfloat16
    h[m, n] = h[m, n] * sx[m] * sw[n]                       SCALED only: the row scale of x times W's column scale
    out     = residual + gate * epi(h + bias)               gemm.py's epilogue (act, glu, gate, residual), one rounding

The same product as ``aqgemm.py`` (codes) and ``gemm.py`` (16-bit); what differs is how the operands travel. Those
templates launch a program per output tile and load x and w with per-thread pointer loads (cp.async), so every tile
pays its pipeline's fill and its epilogue with the tensor cores idle: at DiT-XL/2's K = 1152 a 128 x 256 tile has 9 K
steps, and its fill and stores take about as long as its products (the AQGEMMs ran at ~35% of e4m3's peak, NOTES,
session 16). Here:

- x [M, K] and w [N, K] are read by the Tensor Memory Accelerator from host-made descriptors (``TensorDescriptor``):
  one instruction a tile, out-of-range rows and K zero-filled, no masks, no address registers;
- ``min(SMs, tiles)`` programs each take every SMs-th tile in grouped order (GROUP_M row tiles share W's tiles in L2),
  and the tile loop and its K loop are one flattened, software-pipelined loop: the next tile's first loads are in
  flight while this tile's epilogue runs;
- GLU reads a tile's gate rows (W's rows n..) and up rows (N + n..) as one box of W viewed as [2, N, K]: one product
  of twice the tile's width a K step, its halves split after the K loop (with two products, one a half, Triton waited
  for each before the next, compiled for sm_90: the 1B's gate/up ran at ~860 TFLOP/s, H100 session 42);
- the epilogue runs on each half of a tile's columns in turn (no spills at 128 x 256), storing it with masked stores
  or, as a candidate of its own (TMA_STORE), through shared memory by the TMA unit.

TMA wants 16-byte aligned bases and row strides and a unit inner stride (``supported``); the lowering offers this
template only then, beside the others, and the tuner keeps what is measured fastest (``codegen/lower.py``).

Measured on the H200 (bench/fp8_gemm.py, CUDA graphs; bench/NOTES.md, session 17): on codes it is within a few percent
of the pointer template and torch._scaled_mm at most DiT-XL/2 / 1B-prefill shapes, ahead at some (DiT fc2 at 256 rows
14.6 -> 11.0 us, fc1 + GELU at 2048 rows 36.6 -> 33.5), behind at the 1B's GLU gate/up (156 vs 137 us); the tuner took
it for 85 of the DiT's 113 AQGEMMs at batch 1 and 48 of the w8a8 prefill's GEMMs (7.71 -> 7.41 ms). A program a tile
(PERSISTENT=False) timed the same as one an SM: a tile's epilogue does not overlap the next tile's loads. On 16-bit
operands it lost to cuBLAS at every shape, and is not offered there. Triton 3.6's Hopper warp specialization
(``tl.range(.., warp_specialize=True)`` on the K loop) was tried (sessions 40-41): on an H100 its 128-row tiles (two
consumer warpgroups) never finished, the attention kernel's read out of bounds, and its 64 x 128 tiles ran 1.2-1.5x
slower than the configs below, so none is kept (bench/NOTES.md, session 41).

Block scales (``tma_gemm``'s ``codes`` / ``xs_group``, also aqgemm.py's): the epilogue storing the next AQGEMM's codes
with a scale per row and G columns, and K steps scaled by x's G-column scales. Measured at the 1B prefill's gate/up ->
down on an H100 (bench/NOTES.md, session 39): the codes epilogue saves 15-17 us of 152-164, the scaled K steps cost
33-36 us more than 47-51 (each step's product waited for before the next is chained), so the plans use them only
where CompileConfig.quantize_act_blocks asks.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from . import aqgemm as taq
from .gemm import _check as _gemm_check
from .gemm import _gate_residual, _gate_residual_store, accumulators_fit, grouped_tile, output_operands
from .qgemm import _bias_act_glu
from .rope_cols import load_table

# triton.jit picks the interpreter from this variable when the kernel below is defined; read it then too
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
OPERAND_DTYPES = (torch.float8_e4m3fn, torch.int8, torch.float16, torch.bfloat16)
# the interpreter: small tiles and few programs, so that a program walks several tiles and rows / K are cut
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2)
INTERPRET_PROGRAMS = 3
SMALL_M = 64  # at or below: decode's skinny kernels, not this template


@triton.jit
def _tma_gemm_kernel(
    x_desc, w_desc, xs_ptr, ws_ptr, bias_ptr, gate_ptr, res_ptr, out_ptr, os_ptr, c_ptr, o_desc,
    M, N, K,  # N: output columns (half of w's rows with GLU)
    stride_xs,  # XS_GROUP: xs's row stride (K / XS_GROUP scales a row)
    gate_rows, stride_gb, stride_gm, stride_gn,  # gate row m sits at (m // gate_rows) * stride_gb + (m % gate_rows) * stride_gm
    res_rows, stride_rb, stride_rm, stride_rn,
    stride_om, stride_on, stride_os,  # stride_os: CODES: the output scales' row stride
    cos_ptr, sin_ptr, rope_seq, rope_end, stride_cb, stride_cs, stride_cd, stride_sb, stride_ss, stride_sd,  # ROPE_D
    ACT: tl.constexpr, GLU: tl.constexpr, SCALED: tl.constexpr, INT8: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    XS_GROUP: tl.constexpr, CODES: tl.constexpr, QMAX: tl.constexpr, FP8_OUT: tl.constexpr, EMULATE_FP8: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, ROPE_D: tl.constexpr, ROPE_ONE: tl.constexpr, TMA_STORE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    start = tl.program_id(0)
    programs = tl.num_programs(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    ACC: tl.constexpr = tl.int32 if INT8 else tl.float32
    # XS_GROUP: each K step's product is scaled by its group's x scales as it is added (float32 sums)
    SUM: tl.constexpr = tl.float32 if XS_GROUP else ACC
    # ROPE_D: a tile's BLOCK_N columns are BLOCK_N / D heads, summed as their first halves (acc) and second halves
    # (acc_u), w read as [N / D, 2, D / 2, K]: the rotation pairs the two accumulators' elements in place
    # GLU: the gate and up rows of a tile are one [2, BLOCK_N, BLOCK_K] box of w read as [2, N, K], one product
    # [BLOCK_M, 2 BLOCK_N] a K step, split into the halves after the K loop (two products of BLOCK_N were each waited
    # for, ``DEPBAR.LE gsb0, 0x0``: the 1B's gate/up at ~860 TFLOP/s against ~1,360 for the plain 128 x 256 tile)
    # ROPE_ONE: instead one product a K step, w's rows read as [2, N / D, D / 2, K] (the halves' dim outermost), so the
    # tile's columns come as (half, head, dim) and the halves split after the K loop as GLU's do
    ACC_N: tl.constexpr = BLOCK_N // 2 if ROPE_D and not ROPE_ONE else (2 * BLOCK_N if GLU else BLOCK_N)
    # the epilogue's tile is counted apart from the loads' (the tutorial's tile_id_c): the flattened loop's prologue
    # may then run the next tile's loads ahead of this tile's epilogue
    tile_c = start - programs
    for tile in tl.range(start, num_pid_m * num_pid_n, programs, flatten=True):
        pid_m, pid_n = grouped_tile(tile, num_pid_m, num_pid_n, GROUP_M)
        off_m = pid_m * BLOCK_M
        off_n = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, ACC_N), dtype=SUM)
        acc_u = acc
        for ki in range(k_tiles):
            off_k = ki * BLOCK_K
            a = x_desc.load([off_m, off_k])
            if ROPE_D and not ROPE_ONE:  # the heads' first halves, their second halves: two products
                w1 = tl.reshape(w_desc.load([off_n // ROPE_D, 0, 0, off_k]), (ACC_N, BLOCK_K))
                w2 = tl.reshape(w_desc.load([off_n // ROPE_D, 1, 0, off_k]), (ACC_N, BLOCK_K))
                acc = tl.dot(a, w1.T, acc, out_dtype=ACC)
                acc_u = tl.dot(a, w2.T, acc_u, out_dtype=ACC)
            else:  # one product of w's ACC_N rows for the tile
                if ROPE_ONE:
                    wk = tl.reshape(w_desc.load([0, off_n // ROPE_D, 0, off_k]), (ACC_N, BLOCK_K))
                elif GLU:  # (rows past N: zero-filled in each half)
                    wk = tl.reshape(w_desc.load([0, off_n, off_k]), (ACC_N, BLOCK_K))
                else:
                    wk = w_desc.load([off_n, off_k])
                if XS_GROUP:  # (rows past M: x zero-filled, their scales 0)
                    offs_xm = off_m + tl.arange(0, BLOCK_M)
                    sx = tl.load(xs_ptr + offs_xm.to(tl.int64) * stride_xs + off_k // XS_GROUP, mask=offs_xm < M,
                                 other=0.0)[:, None]
                    acc += tl.dot(a, wk.T, out_dtype=ACC).to(tl.float32) * sx
                else:
                    acc = tl.dot(a, wk.T, acc, out_dtype=ACC)

        tile_c += programs
        pid_m, pid_n = grouped_tile(tile_c, num_pid_m, num_pid_n, GROUP_M)
        if GLU:  # the gate half's columns, the up half's
            acc, acc_u = _halves(acc, BLOCK_M, BLOCK_N)
        if ROPE_ONE:  # the heads' first halves, their second halves
            acc, acc_u = _halves(acc, BLOCK_M, BLOCK_N // 2)
        if ROPE_D:
            _rope_epilogue(acc, acc_u, pid_m * BLOCK_M, pid_n * BLOCK_N, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N,
                           stride_om, stride_on, cos_ptr, sin_ptr, rope_seq, rope_end, stride_cb, stride_cs, stride_cd,
                           stride_sb, stride_ss, stride_sd, ACT, SCALED, HAS_BIAS, ROPE_D, BLOCK_M, BLOCK_N // 2)
        elif CODES:  # the whole tile at once: its column groups' maxima need their values together
            _epilogue(acc, acc_u, pid_m * BLOCK_M, pid_n * BLOCK_N, xs_ptr, ws_ptr, bias_ptr, gate_ptr, res_ptr, out_ptr,
                      os_ptr, c_ptr, o_desc, M, N, gate_rows, stride_gb, stride_gm, stride_gn, res_rows, stride_rb, stride_rm,
                      stride_rn, stride_om, stride_on, stride_os, ACT, GLU, SCALED, HAS_BIAS, HAS_GATE, HAS_RESIDUAL,
                      XS_GROUP, CODES, QMAX, FP8_OUT, EMULATE_FP8, HAS_SMOOTH, TMA_STORE, BLOCK_M, BLOCK_N)
        else:
            # the epilogue on each half of the columns: half its float32 temporaries live at once (whole tiles of
            # 128 x 256 spilled 1.2 KB a thread, compiled for sm_90)
            a0, a1 = _halves(acc, BLOCK_M, BLOCK_N // 2)
            u0, u1 = a0, a1
            if GLU:
                u0, u1 = _halves(acc_u, BLOCK_M, BLOCK_N // 2)
            _epilogue(a0, u0, pid_m * BLOCK_M, pid_n * BLOCK_N, xs_ptr, ws_ptr, bias_ptr, gate_ptr, res_ptr, out_ptr,
                      os_ptr, c_ptr, o_desc, M, N, gate_rows, stride_gb, stride_gm, stride_gn, res_rows, stride_rb, stride_rm,
                      stride_rn, stride_om, stride_on, stride_os, ACT, GLU, SCALED, HAS_BIAS, HAS_GATE, HAS_RESIDUAL,
                      XS_GROUP, CODES, QMAX, FP8_OUT, EMULATE_FP8, HAS_SMOOTH, TMA_STORE, BLOCK_M, BLOCK_N // 2)
            _epilogue(a1, u1, pid_m * BLOCK_M, pid_n * BLOCK_N + BLOCK_N // 2, xs_ptr, ws_ptr, bias_ptr, gate_ptr,
                      res_ptr, out_ptr, os_ptr, c_ptr, o_desc, M, N, gate_rows, stride_gb, stride_gm, stride_gn, res_rows, stride_rb,
                      stride_rm, stride_rn, stride_om, stride_on, stride_os, ACT, GLU, SCALED, HAS_BIAS, HAS_GATE,
                      HAS_RESIDUAL, XS_GROUP, CODES, QMAX, FP8_OUT, EMULATE_FP8, HAS_SMOOTH, TMA_STORE, BLOCK_M, BLOCK_N // 2)


@triton.jit
def _halves(t, BLOCK_M: tl.constexpr, W: tl.constexpr):
    # t [BLOCK_M, 2 W] -> its columns [0, W) and [W, 2 W) (in registers: each thread holds column c and c + W)
    return tl.split(tl.permute(tl.reshape(t, (BLOCK_M, 2, W)), (0, 2, 1)))


@triton.jit
def _epilogue(acc, acc_u, off_m, off_n, xs_ptr, ws_ptr, bias_ptr, gate_ptr, res_ptr, out_ptr, os_ptr, c_ptr, o_desc, M, N,
              gate_rows, stride_gb, stride_gm, stride_gn, res_rows, stride_rb, stride_rm, stride_rn, stride_om, stride_on,
              stride_os, ACT: tl.constexpr, GLU: tl.constexpr, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr,
              HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, XS_GROUP: tl.constexpr, CODES: tl.constexpr,
              QMAX: tl.constexpr, FP8_OUT: tl.constexpr, EMULATE_FP8: tl.constexpr, HAS_SMOOTH: tl.constexpr,
              TMA_STORE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # the [BLOCK_M, BLOCK_N] accumulators (acc_u: the up half's) at rows off_m.., columns off_n.., in float32, in the
    # reference's order: scales, bias, activation (glu), gate, residual
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    if XS_GROUP:  # x's scales are in the sums already: W's column scales only
        acc = acc * tl.load(ws_ptr + cols, mask=mask_n, other=0.0)[None, :]
        if GLU:
            acc_u = acc_u * tl.load(ws_ptr + N + cols, mask=mask_n, other=0.0)[None, :]
    elif SCALED:
        acc, acc_u = taq._scale(acc, acc_u, xs_ptr, ws_ptr, rows, cols, mask_m, mask_n, N, GLU)
    h = _bias_act_glu(acc.to(tl.float32), acc_u.to(tl.float32), bias_ptr, cols, mask_n, N, ACT, GLU, HAS_BIAS)
    mask = mask_m[:, None] & mask_n[None, :]
    if CODES:
        y = _gate_residual(h, rows, cols, mask, gate_ptr, gate_rows, stride_gb, stride_gm, stride_gn, res_ptr, res_rows,
                           stride_rb, stride_rm, stride_rn, HAS_GATE, HAS_RESIDUAL)
        taq.store_codes(y, rows, cols, mask_m, mask, off_n, N, bias_ptr, c_ptr, out_ptr, stride_om, stride_on, os_ptr,
                        stride_os, CODES, QMAX, FP8_OUT, EMULATE_FP8, HAS_SMOOTH, BLOCK_M, BLOCK_N)
    elif TMA_STORE:  # through shared memory by the TMA unit (rows / columns past the output clipped by it), the
        # store in flight while the next tile's products start
        y = _gate_residual(h, rows, cols, mask, gate_ptr, gate_rows, stride_gb, stride_gm, stride_gn, res_ptr, res_rows,
                           stride_rb, stride_rm, stride_rn, HAS_GATE, HAS_RESIDUAL)
        o_desc.store([off_m, off_n], y.to(out_ptr.dtype.element_ty))
    else:
        _gate_residual_store(h, rows, cols, mask, gate_ptr, gate_rows, stride_gb, stride_gm, stride_gn, res_ptr,
                             res_rows, stride_rb, stride_rm, stride_rn, out_ptr, stride_om, stride_on, HAS_GATE,
                             HAS_RESIDUAL)


@triton.jit
def _rope_epilogue(acc1, acc2, off_m, off_n, xs_ptr, ws_ptr, bias_ptr, out_ptr, M, N, stride_om, stride_on, cos_ptr,
                   sin_ptr, seq, end, stride_cb, stride_cs, stride_cd, stride_sb, stride_ss, stride_sd, ACT: tl.constexpr,
                   SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr):
    # acc1 / acc2 [BLOCK_M, BLOCK_N]: the first / second halves of the heads from column off_n on (element c: head
    # off_n / D + c / (D/2), dim c % (D/2)); scales, bias, activation, then (heads below ``end``) the rotation
    # (x1 cos1 - x2 sin1, x2 cos2 + x1 sin2) before the one rounding, each half stored to its columns
    HALF: tl.constexpr = D // 2
    offs_m = off_m + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)
    c = tl.arange(0, BLOCK_N)
    head = off_n // D + c // HALF
    d = c % HALF
    col1 = (head * D + d).to(tl.int64)
    col2 = col1 + HALF
    mask_n = col1 < N
    if SCALED:  # (each half at its own columns: aqgemm's scaling, once a half)
        acc1, _ = taq._scale(acc1, acc1, xs_ptr, ws_ptr, rows, col1, mask_m, mask_n, N, False)
        acc2, _ = taq._scale(acc2, acc2, xs_ptr, ws_ptr, rows, col2, mask_m, mask_n, N, False)
    x1 = _bias_act_glu(acc1.to(tl.float32), acc1, bias_ptr, col1, mask_n, N, ACT, False, HAS_BIAS)
    x2 = _bias_act_glu(acc2.to(tl.float32), acc2, bias_ptr, col2, mask_n, N, ACT, False, HAS_BIAS)
    mask = mask_m[:, None] & mask_n[None, :]
    b = (offs_m // seq).to(tl.int64)
    s = (offs_m % seq).to(tl.int64)
    cos1 = load_table(cos_ptr, b, s, stride_cb, stride_cs, stride_cd, d, mask)
    cos2 = load_table(cos_ptr, b, s, stride_cb, stride_cs, stride_cd, d + HALF, mask)
    sin1 = load_table(sin_ptr, b, s, stride_sb, stride_ss, stride_sd, d, mask)
    sin2 = load_table(sin_ptr, b, s, stride_sb, stride_ss, stride_sd, d + HALF, mask)
    rotate = (head * D < end)[None, :]
    y1 = tl.where(rotate, x1 * cos1 - x2 * sin1, x1)
    y2 = tl.where(rotate, x2 * cos2 + x1 * sin2, x2)
    out = out_ptr + rows[:, None] * stride_om
    tl.store(out + col1[None, :] * stride_on, y1.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(out + col2[None, :] * stride_on, y2.to(out_ptr.dtype.element_ty), mask=mask)


def _config(bm, bn, bk, warps, stages):
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=8, num_warps=warps, num_stages=stages)


# H200 (sm_90: wgmma, 227 KB of shared memory an SM). A K step moves 128 bytes of a row (fp8 / int8: 128 values,
# 16-bit: 64), the width of TMA's 128-byte swizzle; as many stages as fit next to the epilogue's scratch
CONFIGS = {
    1: [_config(128, 256, 128, 8, 3), _config(128, 128, 128, 8, 4), _config(128, 128, 128, 4, 4),
        _config(64, 128, 128, 4, 4)],
    2: [_config(128, 256, 64, 8, 3), _config(128, 128, 64, 8, 4), _config(128, 128, 64, 4, 4),
        _config(64, 128, 64, 4, 4)],
}


# 1-byte codes also try tiles small enough for two programs an SM (PER_SM: registers and shared memory for two), whose
# products interleave where one program's would stall. int8 for its products: Triton keeps a product into int32
# accumulators synchronous (its Hopper pipeliner makes only float32 ones properly async: each K step's wgmma is waited
# for before the next is issued; compiled for sm_90, ``DEPBAR.LE gsb0, 0x0`` in every int8 K loop against ``0x1`` for
# e4m3). e4m3 for its epilogues: one program's epilogue runs while the other's products do (at DiT-XL/2's K = 1152 a
# tile has 9 K steps, and the flattened loop's next loads do not hide its stores). Compiled for sm_90 (triton 3.6), no
# spills: e4m3 215 registers (251 with GELU), int8 226 (255); 106.5 KB shared. The GLU's 128 x 64 tile makes the same
# 128 x 128 product a K step (215 / 217 registers, 100 KB); its 64 x 128 / 2-stage form ran the 1B's int8 gate/up in
# 220 us against 163 for the 128 x 128 single tile (H100, session 44)
PAIRED = {False: _config(128, 128, 128, 4, 3), True: _config(128, 64, 128, 4, 3)}


def configs(m: int, dtype: torch.dtype, glu: bool = False) -> list[dict]:
    """The launch configurations for ``m`` rows of ``dtype`` operands (none at or below SMALL_M rows), each with at
    most 128 float32 accumulator registers a thread (glu keeps two accumulators); for 1-byte codes last the one of two
    programs an SM (``PAIRED``)."""
    if m <= SMALL_M:
        return []
    cs = [dict(c) for c in CONFIGS[dtype.itemsize] if accumulators_fit(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"], glu)]
    return cs + ([dict(PAIRED[bool(glu)], PER_SM=2)] if dtype.itemsize == 1 else [])


def supported(x: torch.Tensor | None, w: torch.Tensor) -> bool:
    """TMA can read x [..., K] (its leading dims flattenable; None: any contiguous, 16-byte aligned x of w's dtype and
    width, as kiln's code buffers and row quantizer write them) and w [N, K]: one operand dtype of OPERAND_DTYPES, unit
    inner strides, 16-byte aligned bases and row strides, on a CUDA device of compute capability 9 or later (or the
    interpreter)."""
    if w.dtype not in OPERAND_DTYPES or w.dim() != 2 or (w.shape[1] * w.element_size()) % 16:
        return False
    if x is not None and (x.dtype != w.dtype or x.dim() < 1 or x.shape[-1] != w.shape[1] or not _tma_rows(x)):
        return False
    return _tma_rows(w) and (INTERPRET or (w.device.type == "cuda" and _capability(w.device) >= (9, 0)))


def store_by_tma(out: torch.Tensor) -> bool:
    """Whether the TMA unit can store an output [..., N] (``tma_gemm``'s TMA_STORE)."""
    return _tma_rows(out)


def _tma_rows(t: torch.Tensor) -> bool:
    """t [..., C] viewable as [M, C] with a unit column stride and a 16-byte aligned base and row stride (TMA's rules)."""
    try:
        t2 = t.view(-1, t.shape[-1])
    except RuntimeError:
        return False
    return t2.stride(1) == 1 and t2.data_ptr() % 16 == 0 and (t2.stride(0) * t2.element_size()) % 16 == 0


@functools.cache
def _capability(device: torch.device) -> tuple:
    return torch.cuda.get_device_capability(device)


@functools.cache
def _sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def tma_gemm(x, w, xs=None, ws=None, bias=None, gate=None, residual=None, act="none", glu=False, out=None,
             dtype=torch.bfloat16, config: dict | None = None, xs_group: int | None = None, codes: tuple | None = None,
             smooth=None, rope: tuple | None = None):
    """``residual + gate * epi((x @ w^T) [* xs[..., None] * ws] + bias)`` (module docstring) by the persistent TMA
    template. Codes: x [..., K] and w [N, K] int8 / float8_e4m3fn with their float32 scales xs [...] and ws [N], the
    output in ``dtype`` (``out``'s where given), as ``aqgemm.aqgemm``. 16-bit: x and w float16 / bfloat16, xs = ws =
    None, the output in x's dtype, as ``gemm.gemm``. ``out`` may be the residual itself. ``config``: one of
    ``configs`` (default: the first), PERSISTENT=False in it launching a program a tile instead of one an SM,
    PER_SM=2 two programs an SM (the 1-byte codes' ``PAIRED`` tiles), TMA_STORE=True the output stored by the TMA unit (not with
    ``codes`` / ``rope``; the output TMA-writable: ``store_by_tma``), ROPE_ONE=True (with ``rope``) one product a K
    step instead of two.

    Block scales (DeepSeek-V3's fine-grained activation scaling, ``ir/quant.py``'s ``quantize_rows(.., group=)``):
    ``xs_group=G``: x's codes carry a scale per row and G columns, xs [..., K / G] (G a multiple of the config's
    BLOCK_K). ``codes=(fmt, G)``: the output y (rounded to ``dtype``) is stored as the next AQGEMM's codes with a scale
    per row and G columns, quantized as ``quantize_rows`` quantizes a row: returns (codes [..., N], scales
    [..., N / G]) (``out``: those two), G dividing the config's BLOCK_N and N, y times ``smooth`` (float32 [N], the
    consumer's SmoothQuant vector) first where given; the GEMM producing its consumer's codes with no pass over y of
    its own, as no row-wide scale allows.

    ``rope=(cos, sin, D, E)``: the output's columns [0, E) rotated per head of D before the one rounding
    (``rope_cols.py``: the merged QKV's q and k heads; cos / sin broadcasting to [B, S, D] of a [B, S, N] output),
    with no glu / gate / residual / codes / xs_group, N a multiple of D and BLOCK_N of D (``rope_cols.tile_fits``): a
    tile sums its heads' first halves and second halves as two accumulators (w read through a [N / D, 2, D / 2, K]
    descriptor), so each rotated pair meets in one thread, in the accumulators' own layout."""
    scaled = x.dtype in taq.CODE_DTYPES.values()
    if (xs is None) == scaled or (ws is None) == scaled:
        raise ValueError(f"tma_gemm: {x.dtype} operands take {'both' if scaled else 'no'} scales (xs, ws)")
    if not supported(x, w):
        raise ValueError(f"tma_gemm: TMA cannot read x {x.dtype} {tuple(x.shape)} strides {x.stride()} / w {w.dtype} "
                         f"{tuple(w.shape)} strides {w.stride()} (one dtype of {[str(d) for d in OPERAND_DTYPES]}, "
                         f"unit inner strides, 16-byte aligned bases and rows, compute capability >= 9.0)")
    k = x.shape[-1]
    if xs_group is not None and not scaled:
        raise ValueError("tma_gemm: xs_group takes code operands")
    if xs_group is not None:
        taq.check_blocks("tma_gemm", k, 0, xs_group, None, {"BLOCK_K": 1})  # (K first: xs's shape follows from it)
    if scaled:
        shape, like = taq._check("tma_gemm", x.shape[:-1], w.shape[0], xs, ws, bias, gate, residual, act, glu,
                                 None if codes else out, dtype, xs_groups=k // xs_group if xs_group else None)
    else:
        shape, like = _gemm_check(x, w, bias, gate, residual, act, glu, None if codes else out), x
    m, n = math.prod(shape[:-1]), shape[-1]
    c = dict(config or (INTERPRET_CONFIG if INTERPRET else configs(max(m, SMALL_M + 1), x.dtype, glu)[0]))
    taq.check_blocks("tma_gemm", k, n, xs_group, codes, c)
    taq.check_smooth("tma_gemm", smooth, codes, n)
    rope_args, rope_d = taq.rope_operands("tma_gemm", rope, shape, c["BLOCK_N"],
                                          glu or gate is not None or residual is not None or codes or xs_group, like)
    if rope_d and n % rope_d:
        raise ValueError(f"tma_gemm: rope reads the {n} output columns as heads of {rope_d}")
    if codes:
        out = taq.codes_out("tma_gemm", out, shape, codes, x.device)
        _, out2, g, r = output_operands("tma_gemm", out[0], shape, like, gate, residual)
        s2 = out[1].view(m, n // codes[1])
    else:
        out, out2, g, r = output_operands("tma_gemm", out, shape, like, gate, residual)
        s2 = out2
    if m == 0 or n == 0:
        return out
    launch = {key: c.pop(key) for key in ("num_warps", "num_stages") if key in c}
    persistent = c.pop("PERSISTENT", True)  # False: a program a tile (the same kernel, each program's loop one step)
    rope_one = bool(c.pop("ROPE_ONE", False)) and bool(rope_d)
    per_sm = c.pop("PER_SM", 1)  # programs an SM (two: the 1-byte codes' ``PAIRED`` tiles)
    tma_store = bool(c.pop("TMA_STORE", False))  # the output stored by the TMA unit (``store_by_tma``)
    if tma_store and (codes or rope_d or not store_by_tma(out2)):
        raise ValueError(f"tma_gemm: TMA_STORE takes no codes or rope and a TMA-writable output (unit column stride, "
                         f"16-byte aligned base and rows), got out {out2.dtype} strides {out2.stride()}")
    x_desc = TensorDescriptor.from_tensor(x.view(m, k), [c["BLOCK_M"], c["BLOCK_K"]])
    if rope_d:  # w as [N / D, 2, D / 2, K]: a tile's heads, their first or their second halves (ROPE_ONE: as
        # [2, N / D, D / 2, K], both halves of a tile's heads in one box, the halves' dim outermost)
        w4 = w.unflatten(0, (n // rope_d, 2, rope_d // 2))
        if rope_one:
            w4 = w4.transpose(0, 1)
        box = [2, c["BLOCK_N"] // rope_d] if rope_one else [c["BLOCK_N"] // rope_d, 1]
        w_desc = TensorDescriptor(w4, list(w4.shape), list(w4.stride()), box + [rope_d // 2, c["BLOCK_K"]])
    elif glu:  # w as [2, N, K]: a tile's gate rows and up rows in one box
        w3 = w.unflatten(0, (2, n))
        w_desc = TensorDescriptor(w3, list(w3.shape), list(w3.stride()), [2, c["BLOCK_N"], c["BLOCK_K"]])
    else:
        w_desc = TensorDescriptor.from_tensor(w, [c["BLOCK_N"], c["BLOCK_K"]])
    # (the epilogue stores half a tile's columns at a time)
    o_desc = TensorDescriptor.from_tensor(out2, [c["BLOCK_M"], c["BLOCK_N"] // 2]) if tma_store else x_desc
    tiles = triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"])
    grid = (min(tiles, INTERPRET_PROGRAMS if INTERPRET else per_sm * _sms(x.device)) if persistent else tiles,)
    xs2 = xs.reshape(m, -1) if scaled else like
    _tma_gemm_kernel[grid](
        x_desc, w_desc, xs2, ws if scaled else like, bias if bias is not None else like,
        g[0], r[0], out2, s2, smooth if smooth is not None else s2, o_desc, m, n, k, xs2.stride(0) if scaled else 0,
        *g[1:], *r[1:], out2.stride(0), out2.stride(1),
        s2.stride(0), *rope_args, ACT=act, GLU=bool(glu), SCALED=scaled, INT8=x.dtype == torch.int8, HAS_BIAS=bias is not None,
        HAS_GATE=gate is not None, HAS_RESIDUAL=residual is not None, **taq.block_meta(xs_group, codes, smooth, INTERPRET),
        ROPE_D=rope_d, ROPE_ONE=rope_one, TMA_STORE=tma_store, **c, **launch)
    return out
