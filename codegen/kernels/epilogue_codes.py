"""A GEMM's epilogue storing its output as the next AQGEMM's activation codes: the epilogue and the row quantizer in one
pass, where the GEMM itself ran in a library (cuBLAS / cuBLASLt's fp8 ``torch._scaled_mm`` / ``torch._int_mm``).

    y        = residual + gate * epi(h' + bias),   h' = h  or  h * xs[m] * sw[n]      (``epilogue.py``, ``aqgemm.py``)
    codes, s = quantize_rows(round(y) * c)          per row: ``quantize_rows.py``'s row_scale / row_codes

The value y is never stored: an LLM's gate/up product [M, 2N] goes through SiLU-GLU straight into the down
projection's codes [M, N] (one byte each) and scales, where the separate form writes y (two bytes each), reads it
back for the row maxima, and again for the codes. Which rows a program owns is the quantizer's (BLOCK_M rows, all N
columns), so a row's scale needs the whole row first: rows up to ``quantize_rows.WHOLE_ROW`` wide (half that with
GLU: its two halves are loaded) are held whole in registers, h read once; wider ones are walked twice in BLOCK_N
steps, the maxima, then the codes, computing the epilogue both times (the second read of h partly hits L2: the
two-walk form ran 50 us at the 1B's [2048, 2 x 8192] gate/up against ~23 us for its bytes, H200 session 16).

Numbers: y is computed as ``epilogue.py`` (h a float product) or ``aqgemm.py``'s scaled epilogue (h int32 / float32,
``xs`` and ``ws`` given) compute it, in the same order, rounded to y's dtype (the value the epilogue would store),
then times the smooth vector c and quantized with the row quantizer's own functions: under the interpreter the
codes and scales equal "epilogue, then quantize_rows" bit for bit (tests/codegen/test_epilogue_codes.py).
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ...ir.ops_fused import ACTIVATIONS
from .aqgemm import _scale
from .gemm import _gate_residual, _row_groups
from .qgemm import _bias_act_glu
from .quantize_rows import FORMATS, row_codes, row_scale, whole_rows

# triton.jit picks the interpreter from this variable when the kernel below is defined; read it then too
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # y's (h's too where it is a float product)

# the interpreter is slow per program: small tiles, so irregular test shapes span several tiles both ways
INTERPRET_CONFIG = dict(BLOCK_M=4, BLOCK_N=16)


@triton.jit
def _value(h_ptr, xs_ptr, ws_ptr, bias_ptr, c_ptr, gate_ptr, res_ptr, rows, cols, mask_m, mask_n, N, stride_hm, stride_hn,
           gate_rows, stride_gb, stride_gm, stride_gn, res_rows, stride_rb, stride_rm, stride_rn,
           ACT: tl.constexpr, GLU: tl.constexpr, SCALED: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr,
           HAS_RESIDUAL: tl.constexpr, HAS_SMOOTH: tl.constexpr):
    # y at rows x cols [BLOCK_M, BLOCK_N], rounded to y's dtype (bias_ptr's: the bias, or a stand-in of that dtype),
    # back in float32 and times the smooth vector
    mask = mask_m[:, None] & mask_n[None, :]
    h_ptrs = h_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_hn
    acc = tl.load(h_ptrs, mask=mask, other=0)
    acc_u = acc
    if GLU:
        acc_u = tl.load(h_ptrs + N * stride_hn, mask=mask, other=0)
    if SCALED:  # a product of codes: times the row's and the column's scales (aqgemm.py)
        acc, acc_u = _scale(acc, acc_u, xs_ptr, ws_ptr, rows, cols, mask_m, mask_n, N, GLU)
    else:
        acc = acc.to(tl.float32)
        acc_u = acc_u.to(tl.float32)
    acc = _bias_act_glu(acc, acc_u, bias_ptr, cols, mask_n, N, ACT, GLU, HAS_BIAS)
    acc = _gate_residual(acc, rows, cols, mask, gate_ptr, gate_rows, stride_gb, stride_gm, stride_gn,
                         res_ptr, res_rows, stride_rb, stride_rm, stride_rn, HAS_GATE, HAS_RESIDUAL)
    y = acc.to(bias_ptr.dtype.element_ty).to(tl.float32)  # what the epilogue would have stored
    if HAS_SMOOTH:
        y = y * tl.load(c_ptr + cols, mask=mask_n, other=0.0)[None, :]
    return y


@triton.jit
def _epilogue_codes_kernel(
    h_ptr, xs_ptr, ws_ptr, bias_ptr, c_ptr, gate_ptr, res_ptr, q_ptr, s_ptr,
    M, N,  # N: y's columns (half of h's with GLU)
    stride_hm, stride_hn,
    gate_rows, stride_gb, stride_gm, stride_gn,
    res_rows, stride_rb, stride_rm, stride_rn,
    stride_qm, stride_qn,
    ACT: tl.constexpr, GLU: tl.constexpr, SCALED: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_SMOOTH: tl.constexpr,
    QMAX: tl.constexpr, FP8: tl.constexpr, EMULATE_FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_WALK: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)  # int64 addressing: M * N may pass 2**31
    offs_n = tl.arange(0, BLOCK_N)

    if ONE_WALK:  # (BLOCK_N >= N) the whole rows in registers: h read once
        cols = offs_n.to(tl.int64)
        mask_n = cols < N
        y = _value(h_ptr, xs_ptr, ws_ptr, bias_ptr, c_ptr, gate_ptr, res_ptr, rows, cols, mask_m, mask_n, N, stride_hm,
                   stride_hn, gate_rows, stride_gb, stride_gm, stride_gn, res_rows, stride_rb, stride_rm, stride_rn,
                   ACT, GLU, SCALED, HAS_BIAS, HAS_GATE, HAS_RESIDUAL, HAS_SMOOTH)
        mask = mask_m[:, None] & mask_n[None, :]
        scale = row_scale(tl.max(tl.where(mask, tl.abs(y), 0.0), axis=1), QMAX)
        tl.store(s_ptr + rows, scale, mask=mask_m)
        tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :] * stride_qn, row_codes(y, scale, QMAX, FP8, EMULATE_FP8),
                 mask=mask)
        return

    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    scale = amax
    for walk in tl.static_range(2):  # the rows' maxima, then their codes
        if walk == 1:
            scale = row_scale(amax, QMAX)
            tl.store(s_ptr + rows, scale, mask=mask_m)
        for nn in range(0, N, BLOCK_N):
            cols = (nn + offs_n).to(tl.int64)
            mask_n = cols < N
            mask = mask_m[:, None] & mask_n[None, :]
            y = _value(h_ptr, xs_ptr, ws_ptr, bias_ptr, c_ptr, gate_ptr, res_ptr, rows, cols, mask_m, mask_n, N, stride_hm,
                       stride_hn, gate_rows, stride_gb, stride_gm, stride_gn, res_rows, stride_rb, stride_rm, stride_rn,
                       ACT, GLU, SCALED, HAS_BIAS, HAS_GATE, HAS_RESIDUAL, HAS_SMOOTH)
            if walk == 0:
                amax = tl.maximum(amax, tl.max(tl.where(mask, tl.abs(y), 0.0), axis=1))
            else:
                tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :] * stride_qn,
                         row_codes(y, scale, QMAX, FP8, EMULATE_FP8), mask=mask)


def _config(m: int, n: int, glu: bool) -> dict:
    """GPU tiles, no autotuning (memory-bound): whole rows where they fit (``quantize_rows.whole_rows``, half as wide
    with GLU: ~32 values of h a thread either way), else ~4-8K elements of h a step, a few rows a program."""
    whole = whole_rows(m, n * 2 if glu else n)
    if whole is not None:
        return dict(whole, BLOCK_N=whole["BLOCK_N"] // 2 if glu else whole["BLOCK_N"])
    block_n = 2048 if glu else 4096
    return dict(BLOCK_M=max(1, min(triton.next_power_of_2(m), 2)), BLOCK_N=block_n, num_warps=8)


def _check(h, fmt, codes, scales, xs, ws, bias, gate, residual, act, glu, smooth, dtype) -> tuple:
    """Validate the operands; returns (y's shape, y's dtype)."""
    if fmt not in FORMATS:
        raise ValueError(f"epilogue_codes: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if act not in ACTIVATIONS:
        raise ValueError(f"epilogue_codes: unknown activation {act!r} (one of {', '.join(ACTIVATIONS)})")
    scaled = xs is not None or ws is not None
    if not isinstance(h, torch.Tensor) or h.dim() < 1:
        raise ValueError(f"epilogue_codes: h must be a [..., Nh] tensor, got {type(h).__name__}")
    if h.dtype not in ((torch.int32, torch.float32) if scaled else DTYPES):
        raise ValueError(f"epilogue_codes: h has dtype {h.dtype}; a product of codes (xs, ws given) is int32 / float32, "
                         f"a float product float16 / bfloat16 / float32")
    dtype = dtype or h.dtype
    if dtype not in DTYPES:
        raise ValueError(f"epilogue_codes: y's dtype must be float16 / bfloat16 / float32, got {dtype}")
    nh = h.shape[-1]
    if glu and nh % 2:
        raise ValueError(f"epilogue_codes: glu needs an even last dim ([gate, up] halves), h is {tuple(h.shape)}")
    n = nh // 2 if glu else nh
    shape, lead = tuple(h.shape[:-1]) + (n,), tuple(h.shape[:-1])
    if scaled and (xs is None or ws is None or xs.dtype != torch.float32 or ws.dtype != torch.float32
                   or tuple(xs.shape) != lead or tuple(ws.shape) != (nh,)):
        raise ValueError(f"epilogue_codes: xs and ws must be float32 {list(lead)} and [{nh}] together")
    for name, t, size in (("bias", bias, (nh,)), ("smooth", smooth, (n,))):
        if t is not None and (tuple(t.shape) != size or not t.is_contiguous()):
            raise ValueError(f"epilogue_codes: {name} {tuple(t.shape)} must be a contiguous [{size[0]}]")
    for name, t, want in (("bias", bias, dtype), ("gate", gate, dtype), ("residual", residual, dtype), ("smooth", smooth, torch.float32)):
        if t is not None and (t.dtype != want or t.device != h.device):
            raise ValueError(f"epilogue_codes: {name} must be {want} on {h.device}, got {t.dtype} on {t.device}")
    for name, t in (("gate", gate), ("residual", residual)):
        if t is not None and (t.dim() > len(shape) or any(a not in (1, b) for a, b in zip(reversed(t.shape), reversed(shape)))):
            raise ValueError(f"epilogue_codes: {name} {tuple(t.shape)} does not broadcast to y {shape}")
    code_dtype = FORMATS[fmt][0]
    if codes.dtype != code_dtype or tuple(codes.shape) != shape or scales.dtype != torch.float32 or tuple(scales.shape) != lead:
        raise ValueError(f"epilogue_codes: codes and scales must be {code_dtype} {list(shape)} and float32 {list(lead)}, got "
                         f"{codes.dtype} {tuple(codes.shape)} and {scales.dtype} {tuple(scales.shape)}")
    if not INTERPRET and h.device.type != "cuda":
        raise ValueError(f"epilogue_codes: h is on {h.device}; the kernel needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    return shape, dtype


def epilogue_codes(h, fmt: str, codes: torch.Tensor, scales: torch.Tensor, xs=None, ws=None, bias=None, gate=None,
                   residual=None, act="none", glu=False, smooth=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Store y = ``residual + gate * epi(h' + bias)`` as ``fmt`` ("int8" / "fp8") codes [..., N] and float32 scales [...]
    (module docstring), writing ``codes`` and ``scales``; returns them.

    h [..., Nh] viewable as [M, Nh]: a float product (float16 / bfloat16 / float32), or with ``xs`` [...] and ``ws``
    [Nh] (float32) a product of codes (int32 / float32) scaled by them. N = Nh, or Nh / 2 with ``glu``. y's dtype
    ``dtype`` (default h's) is what the epilogue would store: bias [Nh], gate and residual (broadcast to y) have it.
    ``smooth``: float32 [N], multiplied into y before it is quantized (the AQGEMMs' SmoothQuant vector)."""
    shape, dtype = _check(h, fmt, codes, scales, xs, ws, bias, gate, residual, act, glu, smooth, dtype)
    lead, n, nh = shape[:-1], shape[-1], h.shape[-1]
    m = math.prod(lead)
    if m == 0 or n == 0:
        return codes, scales
    try:
        h2, q2, s2 = h.view(m, nh), codes.view(m, n), scales.view(m)
    except RuntimeError as e:
        raise ValueError(f"epilogue_codes: h {tuple(h.shape)} {h.stride()} or codes {tuple(codes.shape)} {codes.stride()} "
                         f"cannot be viewed as rows") from e
    like = torch.empty(0, dtype=dtype, device=h.device)
    g = _row_groups(gate, lead, n) if gate is not None else (like, 1, 0, 0, 0)
    r = _row_groups(residual, lead, n) if residual is not None else (like, 1, 0, 0, 0)
    c = INTERPRET_CONFIG if INTERPRET else _config(m, n, bool(glu))
    scaled = xs is not None
    _epilogue_codes_kernel[(triton.cdiv(m, c["BLOCK_M"]),)](
        h2, xs.reshape(m) if scaled else like, ws if scaled else like, bias if bias is not None else like,
        smooth if smooth is not None else like, g[0], r[0], q2, s2, m, n, h2.stride(0), h2.stride(1), *g[1:], *r[1:],
        q2.stride(0), q2.stride(1), ACT=act, GLU=bool(glu), SCALED=scaled, HAS_BIAS=bias is not None,
        HAS_GATE=gate is not None, HAS_RESIDUAL=residual is not None, HAS_SMOOTH=smooth is not None,
        QMAX=FORMATS[fmt][1], FP8=fmt == "fp8", EMULATE_FP8=INTERPRET, ONE_WALK=c["BLOCK_N"] >= n, **c)
    return codes, scales
