"""Per-token activation quantization: the AQGEMM op's first step, as one Triton row kernel.

    s[m] = max(amax_k |x[m, k] * c[k]| / qmax, tiny)                   (float32; c: the optional smooth vector)
    q[m, k] = clamp(round(x[m, k] * c[k] / s[m]), -127, 127)  int8     (round half to even)
            = e4m3(clamp(x[m, k] * c[k] / s[m], -448, 448))     fp8    (torch.float8_e4m3fn, round to nearest even)

The formulas of ``ir/quant.py``'s ``quantize_rows`` (the reference), with the same roundings: the division is
IEEE's, x / s rounded once, and round-half-even comes from adding and subtracting
1.5 * 2**23 (exact for |v| < 2**22: the float32 add itself rounds to nearest even), so the codes equal torch's
bit for bit. On the GPU the fp8 cast is cvt.rn.satfinite: torch's. The Triton interpreter's cast truncates and
loses the carry into the exponent (126.3 -> 64), so under the interpreter (``EMULATE_FP8``) v is first rounded to
e4m3's 4 significant bits by Veltkamp's split (hi = c - (c - v), c = v * (2**20 + 1): exact in IEEE float32 without
fused multiply-adds, which is why the GPU path does not use it) and the cast has nothing left to round; e4m3's
subnormals (|v| < 2**-6, i.e. below amax / 28672) the interpreter still flushes to zero.

The division costs a multiply and two fused multiply-adds an element, not ``tl.div_rn``'s ~15 instructions with their
branch around a slow path (which made the one-read quantizer issue-bound: ~28 SASS instructions an element, H200
session 16): with r = 1 / s rounded to nearest (one ``div_rn`` a row), q = x * r is within an ulp of x / s, its
residual e = x - q * s is exact in one fma, and q + e * r rounded once is x / s correctly rounded (Markstein's
theorem; it needs no underflow, and a quotient below 2**-126 codes to 0 either way).

One program owns BLOCK_M rows. Rows up to WHOLE_ROW wide are held whole: read once, their maxima, scales and codes
from registers. Wider ones are walked twice in BLOCK_K steps: the row maxima, then the codes (the second read of a
row partly hits L2). The scale and the codes of a tile are ``row_scale`` and ``row_codes``, which a generated
pointwise kernel holding whole rows calls too when it stores its output as codes (``codegen/pointwise.py``: the
quantizer fused into the kernel producing the activations, no pass of its own).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# triton.jit picks the interpreter from this variable when the kernel below is defined; read it then too
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FORMATS = {"int8": (torch.int8, 127.0), "fp8": (torch.float8_e4m3fn, 448.0)}  # as ir/quant.py's ACT_FORMATS
TINY = tl.constexpr(1.1754943508222875e-38)  # float32's smallest normal: the scale of an all-zero row (constexpr: a kernel reads it)

INTERPRET_CONFIG = dict(BLOCK_M=4, BLOCK_K=16)
# the widest row a program holds whole (one read of x; 32 float32 values a thread at 16 warps): wider rows are walked twice
WHOLE_ROW = 16384


@triton.jit
def row_scale(amax, QMAX: tl.constexpr):
    # amax [BLOCK_M] float32 -> the rows' scales: one IEEE division, never below TINY
    return tl.maximum(tl.div_rn(amax, QMAX), TINY)


@triton.jit
def row_codes(x, scale, QMAX: tl.constexpr, FP8: tl.constexpr, EMULATE_FP8: tl.constexpr):
    # x [BLOCK_M, BLOCK_K] float32 (smoothed), scale [BLOCK_M] -> int8 / e4m3 codes (module docstring)
    s = scale[:, None]
    r = tl.div_rn(tl.full(s.shape, 1.0, tl.float32), s)  # (module docstring: x / s by Markstein's correction)
    q = x * r
    v = tl.fma(tl.fma(q, -s, x), r, q)  # (-s: negated once a row, q's product not computed again negated)
    v = tl.minimum(tl.maximum(v, -QMAX), QMAX)
    if FP8:
        if EMULATE_FP8:  # (module docstring)
            c = v * 1048577.0
            v = c - (c - v)
        q = v.to(tl.float8e4nv)
    else:
        q = ((v + 12582912.0) - 12582912.0).to(tl.int8)  # round half to even (module docstring)
    return q


@triton.jit
def _tile(x_ptr, c_ptr, rows, cols, mask_m, K, stride_xm, stride_xk, HAS_SMOOTH: tl.constexpr):
    # x at rows x cols in float32, times the smooth vector; and the tile's mask
    mask = mask_m[:, None] & (cols < K)[None, :]
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :] * stride_xk, mask=mask, other=0.0).to(tl.float32)
    if HAS_SMOOTH:
        x = x * tl.load(c_ptr + cols, mask=cols < K, other=0.0)[None, :]
    return x, mask


@triton.jit
def _quantize_rows_kernel(
    x_ptr, c_ptr, q_ptr, s_ptr,
    M, K,
    stride_xm, stride_xk, stride_qm, stride_qk,
    QMAX: tl.constexpr, FP8: tl.constexpr, HAS_SMOOTH: tl.constexpr, EMULATE_FP8: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ONE_WALK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    rows = offs_m.to(tl.int64)  # int64 addressing: M * K may pass 2**31
    offs_k = tl.arange(0, BLOCK_K)

    if ONE_WALK:  # (BLOCK_K >= K) the whole rows in registers: one read
        x, mask = _tile(x_ptr, c_ptr, rows, offs_k, mask_m, K, stride_xm, stride_xk, HAS_SMOOTH)
        scale = row_scale(tl.max(tl.abs(x), axis=1), QMAX)
        tl.store(s_ptr + rows, scale, mask=mask_m)
        tl.store(q_ptr + rows[:, None] * stride_qm + offs_k[None, :] * stride_qk, row_codes(x, scale, QMAX, FP8, EMULATE_FP8),
                 mask=mask)
        return

    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for kk in range(0, K, BLOCK_K):
        x, mask = _tile(x_ptr, c_ptr, rows, kk + offs_k, mask_m, K, stride_xm, stride_xk, HAS_SMOOTH)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=1))
    scale = row_scale(amax, QMAX)  # [BLOCK_M]
    tl.store(s_ptr + rows, scale, mask=mask_m)

    for kk in range(0, K, BLOCK_K):
        x, mask = _tile(x_ptr, c_ptr, rows, kk + offs_k, mask_m, K, stride_xm, stride_xk, HAS_SMOOTH)
        q = row_codes(x, scale, QMAX, FP8, EMULATE_FP8)
        tl.store(q_ptr + rows[:, None] * stride_qm + (kk + offs_k)[None, :] * stride_qk, q, mask=mask)


def whole_rows(m: int, n: int, per_thread: int = 32) -> dict | None:
    """The tile of a row kernel holding whole rows n wide (``WHOLE_ROW`` at most): BLOCK_M rows of BLOCK_N =
    next_power_of_2(n), ~8K elements a program, warps for ~``per_thread`` elements a thread (4 to 16); None for wider
    rows (walked twice)."""
    block_n = triton.next_power_of_2(n)
    if block_n > WHOLE_ROW:
        return None
    block_m = max(1, min(triton.next_power_of_2(m), 8192 // block_n))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=min(16, max(4, block_m * block_n // (32 * per_thread))))


def _config(m: int, k: int) -> dict:
    """GPU tiles, no autotuning: a memory-bound pass; whole rows up to WHOLE_ROW wide (one read), wider ones in 4096-
    wide steps, 8-16 K elements a program."""
    whole = whole_rows(m, k)
    if whole is not None:
        return dict(BLOCK_M=whole["BLOCK_M"], BLOCK_K=whole["BLOCK_N"], num_warps=whole["num_warps"])
    block_m = max(1, min(triton.next_power_of_2(m), 2))
    return dict(BLOCK_M=block_m, BLOCK_K=4096, num_warps=8)


def quantize_rows(x: torch.Tensor, fmt: str, smooth: torch.Tensor | None = None, out: tuple | None = None) -> tuple:
    """x [M, K] (float16 / bfloat16 / float32, any strides) -> (codes [M, K] int8 / float8_e4m3fn, scales [M] float32),
    one scale per row (module docstring). ``smooth``: float32 [K], multiplied in first. ``out``: (codes, scales)."""
    if fmt not in FORMATS:
        raise ValueError(f"quantize_rows: format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.dtype not in DTYPES:
        raise ValueError(f"quantize_rows: x must be a float16 / bfloat16 / float32 [M, K] tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    m, k = x.shape
    if smooth is not None and (smooth.dtype != torch.float32 or tuple(smooth.shape) != (k,) or smooth.device != x.device):
        raise ValueError(f"quantize_rows: smooth must be float32 [{k}] on {x.device}, got {smooth.dtype} {tuple(smooth.shape)}")
    if not INTERPRET and x.device.type != "cuda":
        raise ValueError(f"quantize_rows: x is on {x.device}; the kernel needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    dtype, qmax = FORMATS[fmt]
    q, s = out if out is not None else (torch.empty(m, k, dtype=dtype, device=x.device), torch.empty(m, dtype=torch.float32, device=x.device))
    if q.dtype != dtype or tuple(q.shape) != (m, k) or s.dtype != torch.float32 or tuple(s.shape) != (m,):
        raise ValueError(f"quantize_rows: out must be ({dtype} [{m}, {k}], float32 [{m}])")
    if m == 0:
        return q, s
    c = INTERPRET_CONFIG if INTERPRET else _config(m, k)
    _quantize_rows_kernel[(triton.cdiv(m, c["BLOCK_M"]),)](
        x, smooth if smooth is not None else x, q, s, m, k, x.stride(0), x.stride(1), q.stride(0), q.stride(1),
        QMAX=qmax, FP8=fmt == "fp8", HAS_SMOOTH=smooth is not None, EMULATE_FP8=INTERPRET, ONE_WALK=c["BLOCK_K"] >= k, **c)
    return q, s
