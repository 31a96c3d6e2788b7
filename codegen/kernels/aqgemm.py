"""GEMM on quantized activations AND weights (W8A8 int8, FP8 e4m3): the AQGEMM op's matmul, as one Triton template.

    acc[m, n] = sum_k qx[m, k] * qw[n, k]              int8 x int8 -> int32 exactly, or fp8 x fp8 -> float32
    h[m, n]   = acc[m, n] * sx[m] * sw[n] (+ bias[n])  the row scale of x times the column scale of W, float32
    out       = residual + gate * epi(h)               gemm.py's epilogue (act, glu, gate, residual), one rounding

qx [M, K] and its scales sx [M] come from ``quantize_rows.py`` (per token, at run time); qw [N, K] (out, in) and
sw [N] are the weight's codes per output channel (``ir/quant.py``). Hopper's tensor cores run both operand types
at twice the bf16 rate; the dequantization costs two multiplies per output element, none per weight.

The template is gemm.py's (grouped program order, masked K steps, GLU as two accumulators sharing each x tile);
the accumulator is int32 for int8 (exact: |acc| <= 127 * 127 * K < 2**31 for K < 133000), float32 for fp8. The
same epilogue also runs alone (``scaled_epilogue``) on a library product: ``torch._int_mm``'s int32 [M, Nh].
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from ...ir.ops_fused import ACTIVATIONS, apply_epilogue
from .gemm import (_config, _gate_residual, _gate_residual_store, accumulators_fit, check_output_operands, grouped_tile,
                   output_operands)
from .qgemm import _bias_act_glu
from .quantize_rows import FORMATS, row_codes, row_scale
from .rope_cols import rope_tile, tables, tile_fits

# triton.jit picks the interpreter from this variable when the kernels below are defined; read it then too
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CODE_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, GROUP_M=2)


@triton.jit
def _scale(acc, acc_u, xs_ptr, ws_ptr, rows, cols, mask_m, mask_n, N, GLU: tl.constexpr):
    # acc (int32 or float32 [BLOCK_M, BLOCK_N]) * sx[rows] * sw[cols] in float32; acc_u: the up half, columns N + cols
    sx = tl.load(xs_ptr + rows, mask=mask_m, other=0.0)[:, None]
    acc = acc.to(tl.float32) * sx * tl.load(ws_ptr + cols, mask=mask_n, other=0.0)[None, :]
    if GLU:
        acc_u = acc_u.to(tl.float32) * sx * tl.load(ws_ptr + N + cols, mask=mask_n, other=0.0)[None, :]
    return acc, acc_u


@triton.jit
def _aqgemm_kernel(
    x_ptr, w_ptr, xs_ptr, ws_ptr, bias_ptr, gate_ptr, res_ptr, out_ptr, os_ptr, c_ptr,
    M, N, K,  # N: output columns (half of w's rows with GLU)
    stride_xm, stride_xk, stride_xs, stride_os,  # xs's row stride (XS_GROUP), the output scales' (CODES)
    stride_wn, stride_wk,
    gate_rows, stride_gb, stride_gm, stride_gn,  # gate row m sits at (m // gate_rows) * stride_gb + (m % gate_rows) * stride_gm
    res_rows, stride_rb, stride_rm, stride_rn,
    stride_om, stride_on,
    cos_ptr, sin_ptr, rope_seq, rope_end, stride_cb, stride_cs, stride_cd, stride_sb, stride_ss, stride_sd,  # ROPE_D
    ACT: tl.constexpr, GLU: tl.constexpr, INT8: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    XS_GROUP: tl.constexpr, CODES: tl.constexpr, QMAX: tl.constexpr, FP8_OUT: tl.constexpr, EMULATE_FP8: tl.constexpr,
    HAS_SMOOTH: tl.constexpr, ROPE_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # grouped program order (Triton matmul tutorial): GROUP_M row tiles share the weight tiles in L2
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, num_pid_m, num_pid_n, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    rows = offs_m.to(tl.int64)  # int64 addressing: M * K may pass 2**31
    cols = offs_n.to(tl.int64)

    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk  # [BLOCK_M, BLOCK_K]
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn  # [BLOCK_K, BLOCK_N] of w^T (K-major: wgmma's fp8 layout)
    ACC: tl.constexpr = tl.int32 if INT8 else tl.float32
    SUM: tl.constexpr = tl.float32 if XS_GROUP else ACC  # XS_GROUP: each K step's product times its group's x scales
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=SUM)
    acc_u = acc
    if GLU:
        wu_ptrs = w_ptr + offs_k[:, None] * stride_wk + (cols + N)[None, :] * stride_wn  # the up half
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=mask_m[:, None] & (offs_k[None, :] < k_left), other=0.0)
        b = tl.load(w_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
        if XS_GROUP:
            sx = tl.load(xs_ptr + rows * stride_xs + (k * BLOCK_K) // XS_GROUP, mask=mask_m, other=0.0)[:, None]
            acc += tl.dot(a, b, out_dtype=ACC).to(tl.float32) * sx
        else:
            acc = tl.dot(a, b, acc, out_dtype=ACC)
        if GLU:
            bu = tl.load(wu_ptrs, mask=(offs_k[:, None] < k_left) & mask_n[None, :], other=0.0)
            if XS_GROUP:
                acc_u += tl.dot(a, bu, out_dtype=ACC).to(tl.float32) * sx
            else:
                acc_u = tl.dot(a, bu, acc_u, out_dtype=ACC)
            wu_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    # epilogue, in float32, in the reference's order: scales, bias, activation (glu), gate, residual
    if XS_GROUP:  # x's scales are in the sums already
        acc, acc_u = _scale_w(acc, acc_u, ws_ptr, cols, mask_n, N, GLU)
    else:
        acc, acc_u = _scale(acc, acc_u, xs_ptr, ws_ptr, rows, cols, mask_m, mask_n, N, GLU)
    acc = _bias_act_glu(acc, acc_u, bias_ptr, cols, mask_n, N, ACT, GLU, HAS_BIAS)
    mask = mask_m[:, None] & mask_n[None, :]
    if ROPE_D:  # q's and k's heads rotated before the one rounding (rope_cols.py)
        acc = rope_tile(acc, offs_m, pid_n * BLOCK_N, mask_m, cos_ptr, sin_ptr, rope_seq, rope_end, stride_cb, stride_cs,
                        stride_cd, stride_sb, stride_ss, stride_sd, ROPE_D, BLOCK_M, BLOCK_N)
    if CODES:
        y = _gate_residual(acc, rows, cols, mask, gate_ptr, gate_rows, stride_gb, stride_gm, stride_gn, res_ptr,
                           res_rows, stride_rb, stride_rm, stride_rn, HAS_GATE, HAS_RESIDUAL)
        store_codes(y, rows, cols, mask_m, mask, pid_n * BLOCK_N, N, bias_ptr, c_ptr, out_ptr, stride_om, stride_on,
                    os_ptr, stride_os, CODES, QMAX, FP8_OUT, EMULATE_FP8, HAS_SMOOTH, BLOCK_M, BLOCK_N)
    else:
        _gate_residual_store(acc, rows, cols, mask, gate_ptr, gate_rows, stride_gb, stride_gm, stride_gn,
                             res_ptr, res_rows, stride_rb, stride_rm, stride_rn, out_ptr, stride_om, stride_on,
                             HAS_GATE, HAS_RESIDUAL)


@triton.jit
def _scale_w(acc, acc_u, ws_ptr, cols, mask_n, N, GLU: tl.constexpr):
    # acc * sw[cols] (x's block scales already in acc); acc_u: the up half, columns N + cols
    acc = acc * tl.load(ws_ptr + cols, mask=mask_n, other=0.0)[None, :]
    if GLU:
        acc_u = acc_u * tl.load(ws_ptr + N + cols, mask=mask_n, other=0.0)[None, :]
    return acc, acc_u


@triton.jit
def store_codes(y, rows, cols, mask_m, mask, off_n, N, like_ptr, c_ptr, q_ptr, stride_qm, stride_qn, s_ptr, stride_s,
                GROUP: tl.constexpr, QMAX: tl.constexpr, FP8: tl.constexpr, EMULATE_FP8: tl.constexpr,
                HAS_SMOOTH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # y [BLOCK_M, BLOCK_N] (float32, columns off_n..) rounded to like_ptr's dtype (the value a store would keep), times
    # the smooth vector c (HAS_SMOOTH), each row's GROUP-column groups quantized as quantize_rows quantizes a row (its
    # row_scale / row_codes): the codes at q_ptr, the scales [rows, N / GROUP] at s_ptr (groups past N: masked)
    y = tl.where(mask, y.to(like_ptr.dtype.element_ty).to(tl.float32), 0.0)
    if HAS_SMOOTH:
        y = y * tl.load(c_ptr + cols, mask=cols < N, other=0.0)[None, :]
    GROUPS: tl.constexpr = BLOCK_N // GROUP
    yg = tl.reshape(y, (BLOCK_M * GROUPS, GROUP))
    scale = row_scale(tl.max(tl.abs(yg), axis=1), QMAX)
    q = tl.reshape(row_codes(yg, scale, QMAX, FP8, EMULATE_FP8), (BLOCK_M, BLOCK_N))
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :] * stride_qn, q, mask=mask)
    g = off_n // GROUP + tl.arange(0, GROUPS)
    tl.store(s_ptr + rows[:, None] * stride_s + g[None, :], tl.reshape(scale, (BLOCK_M, GROUPS)),
             mask=mask_m[:, None] & (g < N // GROUP)[None, :])


@triton.jit
def _scaled_epilogue_kernel(
    h_ptr, xs_ptr, ws_ptr, bias_ptr, gate_ptr, res_ptr, out_ptr,
    M, N,  # N: output columns (half of h's with GLU)
    stride_hm, stride_hn,
    gate_rows, stride_gb, stride_gm, stride_gn,
    res_rows, stride_rb, stride_rm, stride_rn,
    stride_om, stride_on,
    ACT: tl.constexpr, GLU: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # the template's epilogue over a finished product h [M, Nh] (a library GEMM's): one read of h, one write
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    offs_m = (pid // num_pid_n) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = (pid % num_pid_n) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    rows = offs_m.to(tl.int64)
    cols = offs_n.to(tl.int64)
    h_ptrs = h_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_hn
    acc = tl.load(h_ptrs, mask=mask, other=0)
    acc_u = acc
    if GLU:
        acc_u = tl.load(h_ptrs + N * stride_hn, mask=mask, other=0)
    acc, acc_u = _scale(acc, acc_u, xs_ptr, ws_ptr, rows, cols, mask_m, mask_n, N, GLU)
    acc = _bias_act_glu(acc, acc_u, bias_ptr, cols, mask_n, N, ACT, GLU, HAS_BIAS)
    _gate_residual_store(acc, rows, cols, mask, gate_ptr, gate_rows, stride_gb, stride_gm, stride_gn,
                         res_ptr, res_rows, stride_rb, stride_rm, stride_rn, out_ptr, stride_om, stride_on,
                         HAS_GATE, HAS_RESIDUAL)


# H200: one-byte operands, so K steps of 128 (a 128-byte row per step, as the bf16 template's 64); large tiles for
# prefill / DiT (M in the thousands), thinner rows below SMALL_M
LARGE_M_CONFIGS = [
    _config(128, 128, 128, 8, 3),
    _config(128, 256, 128, 8, 3),
    _config(256, 128, 128, 8, 3),
    _config(128, 128, 64, 4, 4),
    _config(64, 128, 128, 4, 4),
]
SMALL_M_CONFIGS = [
    _config(64, 128, 128, 4, 4),
    _config(32, 128, 128, 4, 4),
    _config(64, 64, 128, 4, 4),
]
SMALL_M = 64


def _configs(small_m: bool, glu: bool) -> list:
    # (gemm.accumulators_fit: the GLU's 128 x 128 tile on 4 warps, every wgmma serialized, ran the 1B's gate/up in
    # 731 us against 152 on 8 warps, H100, session 44)
    cs = SMALL_M_CONFIGS if small_m else LARGE_M_CONFIGS
    return [c for c in cs if accumulators_fit(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, glu)]


@functools.cache
def _tuned(small_m: bool, glu: bool):
    # built on first GPU use (an Autotuner asks for the active driver); restore_value: out may be the residual
    return triton.autotune(_configs(small_m, glu), key=["M", "N", "K", "INT8"], restore_value=["out_ptr"])(_aqgemm_kernel)


def configs(m: int, glu: bool = False) -> list[dict]:
    """The launch configurations the autotuner tries for ``m`` rows, as plain dicts (JSON-able)."""
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in _configs(m <= SMALL_M, glu)]


def wave_fit(m: int, n: int, glu: bool, sms: int, cs: list[dict] | None = None) -> dict | None:
    """The configuration of ``cs`` (default ``configs(m, glu)``) whose tiles of the [m, n] output (n: output columns) fill the last wave
    over ``sms`` SMs best (tiles / (waves x sms)), tiles no smaller than 64 x 128 where the rows are many; None where
    it fills no better than the first configuration's (by 0.05). DiT-XL/2's 1152-wide outputs at 2048 rows: 144 tiles
    of 128 x 128 on 132 SMs are two waves, the second 12 tiles (55% filled); 288 of 64 x 128, three waves 73% filled."""
    def filled(c):
        tiles = triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"])
        return tiles / (triton.cdiv(tiles, sms) * sms)

    cs = configs(m, glu) if cs is None else cs
    pool = [c for c in cs if m <= SMALL_M or c["BLOCK_M"] * c["BLOCK_N"] >= 64 * 128]
    best = max(pool, key=lambda c: (round(filled(c), 3), c["BLOCK_M"] * c["BLOCK_N"]))
    return best if filled(best) > filled(cs[0]) + 0.05 else None


def _check(fn, lead, nw, xs, ws, bias, gate, residual, act, glu, out, dtype, xs_groups: int | None = None):
    """Validate the operands (``lead``: the leading dims of x / h, ``nw``: weight rows; ``xs_groups``: x's scales
    per row where it has several, a row's column groups); returns (output shape, a tensor of the output's dtype
    standing in for absent operands)."""
    if act not in ACTIVATIONS:
        raise ValueError(f"{fn}: unknown activation {act!r} (one of {', '.join(ACTIVATIONS)})")
    dtype = out.dtype if out is not None else dtype
    if dtype not in OUT_DTYPES:
        raise ValueError(f"{fn}: the output dtype must be float16 / bfloat16 / float32, got {dtype}")
    for name, t, size in (("xs", xs, tuple(lead) + ((xs_groups,) if xs_groups else ())), ("ws", ws, (nw,))):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.float32 or tuple(t.shape) != tuple(size):
            raise ValueError(f"{fn}: {name} must be float32 {list(size)}, got {getattr(t, 'dtype', None)} {tuple(getattr(t, 'shape', ()))}")
    if bias is not None and tuple(bias.shape) != (nw,):
        raise ValueError(f"{fn}: bias {tuple(bias.shape)} must be [{nw}]")
    if glu and nw % 2:
        raise ValueError(f"{fn}: glu needs an even number of weight rows ([gate; up]), got {nw}")
    shape = tuple(lead) + (nw // 2 if glu else nw,)
    like = torch.empty(0, dtype=dtype, device=xs.device)
    check_output_operands(fn, ("the output", like), shape, [("bias", bias)], gate, residual, out)
    if not INTERPRET and xs.device.type != "cuda":
        raise ValueError(f"{fn}: the operands are on {xs.device}; the kernel needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    return shape, like


def check_blocks(fn: str, k: int, n: int, xs_group: int | None, codes: tuple | None, config: dict) -> None:
    """The block-scale arguments of ``aqgemm`` / ``tma_gemm`` for K = ``k``, N = ``n`` and the launch ``config``:
    ``xs_group`` dividing K, a multiple of BLOCK_K; ``codes`` = (fmt, G), G dividing N and BLOCK_N. (The launchers
    check xs_group against K first, before the scales' shape.)"""
    if xs_group is not None and (xs_group <= 0 or k % xs_group):
        raise ValueError(f"{fn}: xs_group={xs_group} must divide K = {k}")
    if xs_group is not None and xs_group % config["BLOCK_K"]:
        raise ValueError(f"{fn}: xs_group={xs_group} must be a multiple of the config's BLOCK_K {config['BLOCK_K']}")
    if codes is not None:
        fmt, group = codes if isinstance(codes, tuple) and len(codes) == 2 else (None, 0)
        if fmt not in FORMATS or not isinstance(group, int) or group <= 0 or n % group or config["BLOCK_N"] % group:
            raise ValueError(f"{fn}: codes=(fmt, group) needs fmt one of {', '.join(FORMATS)} and a group dividing "
                             f"N = {n} and the config's BLOCK_N {config['BLOCK_N']}, got {codes!r}")


def codes_out(fn: str, out, shape: tuple, codes: tuple, device) -> tuple:
    """(codes [..., N], scales [..., N / G]) for ``codes=(fmt, G)``: ``out``'s, checked, or new."""
    fmt, group = codes
    want = ((FORMATS[fmt][0], tuple(shape)), (torch.float32, tuple(shape[:-1]) + (shape[-1] // group,)))
    if out is None:
        return tuple(torch.empty(sh, dtype=dt, device=device) for dt, sh in want)
    if (not isinstance(out, tuple) or len(out) != 2
            or any(not isinstance(t, torch.Tensor) or (t.dtype, tuple(t.shape)) != w for t, w in zip(out, want))):
        raise ValueError(f"{fn}: out must be (codes {want[0][0]} {list(want[0][1])}, scales float32 {list(want[1][1])}) "
                         f"for codes=, got {out!r:.200}")
    if not all(t.is_contiguous() for t in out):
        raise ValueError(f"{fn}: the codes and scales given as out must be contiguous")
    return out


def block_meta(xs_group: int | None, codes: tuple | None, smooth, interpret: bool) -> dict:
    """The kernels' block-scale switches."""
    fmt, group = codes or (None, 0)
    return dict(XS_GROUP=xs_group or 0, CODES=group, QMAX=FORMATS[fmt][1] if codes else 1.0, FP8_OUT=fmt == "fp8",
                EMULATE_FP8=interpret, HAS_SMOOTH=smooth is not None)


def check_smooth(fn: str, smooth, codes: tuple | None, n: int) -> None:
    if smooth is not None and (codes is None or not isinstance(smooth, torch.Tensor) or smooth.dtype != torch.float32
                               or tuple(smooth.shape) != (n,) or not smooth.is_contiguous()):
        raise ValueError(f"{fn}: smooth (the next AQGEMM's vector, codes= only) must be a contiguous float32 [{n}], got "
                         f"{getattr(smooth, 'dtype', None)} {tuple(getattr(smooth, 'shape', ()))}")


def aqgemm(qx, xs, qw, ws, bias=None, gate=None, residual=None, act="none", glu=False, out=None, dtype=torch.bfloat16,
           config: dict | None = None, xs_group: int | None = None, codes: tuple | None = None, smooth=None,
           rope: tuple | None = None):
    """``residual + gate * epi((qx @ qw^T) * xs[..., None] * ws + bias)`` in one kernel (module docstring).

    qx [..., K] and qw [N, K] both int8 or both float8_e4m3fn (qx's leading dims flattenable to M rows); xs [...] and
    ws [N] float32; bias [N], gate / residual broadcast to the output [..., N'] (N' = N, or N / 2 with ``glu``), in the
    output's dtype (``out``'s, else ``dtype``). ``out`` may be the residual itself. ``config``: one entry of
    ``configs`` run without the autotuner. Block scales (``xs_group``: xs [..., K / G]; ``codes=(fmt, G)``: the output
    as codes and scales by groups of G columns, times ``smooth`` first): as ``tma_gemm.tma_gemm``'s, with a ``config``;
    ``rope=(cos, sin, D, E)`` too (its tiles of BLOCK_N holding whole heads)."""
    fmt = next((f for f, d in CODE_DTYPES.items() if getattr(qx, "dtype", None) == d), None)
    if fmt is None or qw.dtype != qx.dtype or qx.dim() < 1 or qw.dim() != 2 or qx.shape[-1] != qw.shape[1]:
        raise ValueError(f"aqgemm: qx and qw must be int8 or float8_e4m3fn [..., K] and [N, K], got {getattr(qx, 'dtype', None)} "
                         f"{tuple(getattr(qx, 'shape', ()))} and {getattr(qw, 'dtype', None)} {tuple(getattr(qw, 'shape', ()))}")
    k = qx.shape[-1]
    blocks = xs_group is not None or codes is not None
    if (blocks or rope) and config is None and not INTERPRET:
        raise ValueError("aqgemm: block scales (xs_group / codes) and rope take a config (no autotuning)")
    if xs_group is not None:
        check_blocks("aqgemm", k, 0, xs_group, None, {"BLOCK_K": 1})  # (K first: xs's shape follows from it)
    shape, like = _check("aqgemm", qx.shape[:-1], qw.shape[0], xs, ws, bias, gate, residual, act, glu,
                         None if codes else out, dtype, xs_groups=k // xs_group if xs_group else None)
    m, n = math.prod(shape[:-1]), shape[-1]
    c = dict(GROUP_M=8) | dict(config or INTERPRET_CONFIG)
    check_blocks("aqgemm", k, n, xs_group, codes, c)
    check_smooth("aqgemm", smooth, codes, n)
    rope_args, rope_d = rope_operands("aqgemm", rope, shape, c["BLOCK_N"], glu or gate is not None or residual is not None
                                      or codes, like)
    if codes:
        out = codes_out("aqgemm", out, shape, codes, qx.device)
        _, out2, g, r = output_operands("aqgemm", out[0], shape, like, gate, residual)
        s2 = out[1].view(m, n // codes[1])
    else:
        out, out2, g, r = output_operands("aqgemm", out, shape, like, gate, residual)
        s2 = out2
    if m == 0 or n == 0:
        return out
    qx2, xs2 = qx.reshape(m, k), xs.reshape(m, -1)
    args = (qx2, qw, xs2, ws, bias if bias is not None else like, g[0], r[0], out2, s2,
            smooth if smooth is not None else xs2, m, n, k, qx2.stride(0),
            qx2.stride(1), xs2.stride(0), s2.stride(0), qw.stride(0), qw.stride(1), *g[1:], *r[1:], out2.stride(0),
            out2.stride(1), *rope_args)
    meta = dict(ACT=act, GLU=bool(glu), INT8=fmt == "int8", HAS_BIAS=bias is not None, HAS_GATE=gate is not None,
                HAS_RESIDUAL=residual is not None, **block_meta(xs_group, codes, smooth, INTERPRET), ROPE_D=rope_d)
    if INTERPRET or config is not None:
        _aqgemm_kernel[(triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)](*args, **meta, **c)
    else:
        grid = lambda c: (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)  # noqa: E731
        _tuned(m <= SMALL_M, bool(glu))[grid](*args, **meta)
    return out


def rope_operands(fn: str, rope: tuple | None, shape: tuple, block_n: int, other_epilogue, like: torch.Tensor) -> tuple[tuple, int]:
    """The GEMM kernels' rope arguments (cos, sin, seq, end, cos's and sin's strides as [B, S, D]) and ROPE_D for
    ``rope`` (None: placeholders, 0) on an output of ``shape`` in tiles of ``block_n`` columns; ValueError where the
    tiles hold no whole heads or another epilogue is asked for."""
    if rope is None:
        return (like, like, 1, 0) + (0,) * 6, 0
    cos, sin, dim, end = rope
    if other_epilogue:
        raise ValueError(f"{fn}: rope takes no glu, gate, residual, codes or xs_group")
    if not tile_fits(dim, block_n):
        raise ValueError(f"{fn}: rope's head dim {dim} must be a power of two dividing the {block_n} columns of a tile")
    seq, strides = tables(shape, cos, sin, dim, end)
    return (cos, sin, seq, end, *strides), dim


def scaled_epilogue(h, xs, ws, bias=None, gate=None, residual=None, act="none", glu=False, out=None,
                    dtype=torch.bfloat16) -> torch.Tensor:
    """``residual + gate * epi(h * xs[..., None] * ws + bias)`` in one pass over h [..., Nh] (int32 / float32, viewable
    as [M, Nh]: a library GEMM's product of the codes); arguments as ``aqgemm``'s."""
    if not isinstance(h, torch.Tensor) or h.dim() < 1 or h.dtype not in (torch.int32, torch.float32):
        raise ValueError(f"scaled_epilogue: h must be an int32 / float32 [..., Nh] tensor, got {getattr(h, 'dtype', None)}")
    shape, like = _check("scaled_epilogue", h.shape[:-1], h.shape[-1], xs, ws, bias, gate, residual, act, glu, out, dtype)
    m, n = math.prod(shape[:-1]), shape[-1]
    out, out2, g, r = output_operands("scaled_epilogue", out, shape, like, gate, residual)
    if m == 0 or n == 0:
        return out
    h2 = h.view(m, h.shape[-1])
    block_n = min(triton.next_power_of_2(n), 128 if glu else 256)
    c = dict(BLOCK_M=16, BLOCK_N=32) if INTERPRET else dict(BLOCK_M=max(1, min(triton.next_power_of_2(m), 8192 // block_n)),
                                                          BLOCK_N=block_n, num_warps=8)
    grid = (triton.cdiv(m, c["BLOCK_M"]) * triton.cdiv(n, c["BLOCK_N"]),)
    _scaled_epilogue_kernel[grid](h2, xs.reshape(m), ws, bias if bias is not None else like, g[0], r[0], out2, m, n, h2.stride(0),
                                  h2.stride(1), *g[1:], *r[1:], out2.stride(0), out2.stride(1), ACT=act, GLU=bool(glu),
                                  HAS_BIAS=bias is not None, HAS_GATE=gate is not None, HAS_RESIDUAL=residual is not None, **c)
    return out


def reference(qx, xs, qw, ws, bias=None, gate=None, residual=None, act="none", glu=False, dtype=torch.float64) -> torch.Tensor:
    """The formula in torch: codes and scales in ``dtype`` (float64: the test oracle), then GEMM's epilogue."""
    h = (qx.to(dtype) @ qw.to(dtype).T) * xs.to(dtype)[..., None] * ws.to(dtype)
    if bias is not None:
        h = h + bias.to(dtype)
    up = [t.to(dtype) if t is not None else None for t in (gate, residual)]
    return apply_epilogue(h, *up, dict(act=act, glu=glu))
