"""The CONV op's epilogue, as one Triton pass over the convolution's result.

    out[n, c, s] = (residual[n, c, s] + h[n, c, s] + bias[c]) / divisor          (each piece optional)

For when the convolution itself runs on cuDNN: ``aten.cudnn_convolution.out`` writes h straight into the planned
buffer but adds no bias (torch's F.conv2d adds it in a pass of its own) and no residual, so a resnet block's
``(x + conv(h) + b) / s`` costs this one read-modify-write instead of three elementwise passes. (The GEMM
epilogue, kernels/epilogue.py, does not fit: its bias runs along the last dim of a [M, N] view, a conv's along
the channels, dim 1 of NCHW, and a channels-last h is no [M, N] view of an NCHW output.)

Every tensor is read as [N, C, S] (S = H * W) through its own strides, so h, the residual and out may each be
NCHW or NHWC (a broadcast residual has stride 0 where it broadcasts). Tiles are [BLOCK_C, BLOCK_S] of one
sample; each program reads exactly the h and residual elements it writes, so ``out`` may be h itself (in place
after cuDNN) or the residual. Math is float32; the output has h's dtype.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# triton.jit picks the interpreter from this variable when the kernel below is defined; read it then too
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# the interpreter is slow per program: small tiles, so irregular test shapes span several in both directions
INTERPRET_CONFIG = dict(BLOCK_C=8, BLOCK_S=32, num_warps=1)


@triton.jit
def _conv_epilogue_kernel(
    h_ptr, bias_ptr, res_ptr, out_ptr,
    C, S, divisor,
    stride_hn, stride_hc, stride_hs,
    stride_rn, stride_rc, stride_rs,
    stride_on, stride_oc, stride_os,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_DIVISOR: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    pid_s = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    mask = (offs_c < C)[:, None] & (offs_s < S)[None, :]
    c = offs_c.to(tl.int64)[:, None]  # [BLOCK_C, 1]; int64: N * C * S may pass 2**31
    s = offs_s.to(tl.int64)[None, :]  # [1, BLOCK_S]

    acc = tl.load(h_ptr + n * stride_hn + c * stride_hc + s * stride_hs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)[:, None]
    if HAS_RESIDUAL:
        acc += tl.load(res_ptr + n * stride_rn + c * stride_rc + s * stride_rs, mask=mask, other=0.0).to(tl.float32)
    if HAS_DIVISOR:
        acc = acc / divisor
    tl.store(out_ptr + n * stride_on + c * stride_oc + s * stride_os, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _config(c: int, s: int) -> dict:
    """GPU tiles, no tuning (the pass is memory-bound): 32 channels, so a channels-last h is read in 64-byte runs, by
    up to 128 positions, so an NCHW one is read in 256-byte runs."""
    return dict(BLOCK_C=min(triton.next_power_of_2(c), 32), BLOCK_S=min(triton.next_power_of_2(s), 128), num_warps=4)


def _nc_s(name: str, t: torch.Tensor, shape: tuple, view: bool) -> torch.Tensor:
    """``t`` broadcast to ``shape`` [N, C, *] and read as [N, C, S]: a view (``out`` must be one), else a copy if its
    spatial dims do not flatten."""
    n, c = shape[:2]
    e = t.expand(shape)
    try:
        return e.view(n, c, -1)
    except RuntimeError:
        if view:
            raise ValueError(f"conv_epilogue: {name} with strides {t.stride()} cannot be viewed as [{n}, {c}, S]") from None
        return e.reshape(n, c, -1)


def _check(h, bias, residual, divisor, out):
    if not isinstance(h, torch.Tensor) or h.dim() < 2:
        raise ValueError("conv_epilogue: h must be a tensor [N, C, *]")
    if h.dtype not in DTYPES:
        raise ValueError(f"conv_epilogue: h has dtype {h.dtype}; supported: float16, bfloat16, float32")
    if bias is not None and tuple(bias.shape) != (h.shape[1],):
        raise ValueError(f"conv_epilogue: bias {tuple(bias.shape)} for h {tuple(h.shape)} must be [{h.shape[1]}]")
    if residual is not None and (residual.dim() > h.dim()
                                 or any(a not in (1, b) for a, b in zip(reversed(residual.shape), reversed(h.shape)))):
        raise ValueError(f"conv_epilogue: residual {tuple(residual.shape)} does not broadcast to {tuple(h.shape)}")
    for name, t in (("bias", bias), ("residual", residual), ("out", out)):
        if t is not None and (t.dtype != h.dtype or t.device != h.device):
            raise ValueError(f"conv_epilogue: {name} is {t.dtype} on {t.device}, h {h.dtype} on {h.device}")
    if out is not None and out.shape != h.shape:
        raise ValueError(f"conv_epilogue: out {tuple(out.shape)} must have h's shape {tuple(h.shape)}")
    if divisor is not None and float(divisor) == 0.0:
        raise ValueError("conv_epilogue: the divisor is 0")
    if not INTERPRET and h.device.type != "cuda":
        raise ValueError(f"conv_epilogue: h is on {h.device}; the kernel needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def conv_epilogue(h, bias=None, residual=None, divisor=None, out=None) -> torch.Tensor:
    """``(residual + h + bias[:, None, None]) / divisor`` in one pass (see the module docstring).

    h [N, C, *] (float16, bfloat16, float32) with any strides; bias [C]; residual broadcasts to h's shape; all in
    h's dtype. ``out`` (h's shape and dtype, its spatial dims flattenable by a view) may be h or the residual."""
    _check(h, bias, residual, divisor, out)
    shape = tuple(h.shape)
    if out is None:
        out = torch.empty(shape, dtype=h.dtype, device=h.device)
    h3, o3 = _nc_s("h", h, shape, False), _nc_s("out", out, shape, True)
    r3 = _nc_s("residual", residual, shape, False) if residual is not None else h3
    n, c, s = o3.shape
    if n * c * s == 0:
        return out
    cfg = INTERPRET_CONFIG if INTERPRET else _config(c, s)
    grid = (triton.cdiv(s, cfg["BLOCK_S"]), triton.cdiv(c, cfg["BLOCK_C"]), n)
    _conv_epilogue_kernel[grid](
        h3, bias if bias is not None else h3, r3, o3, c, s, float(divisor or 1.0),
        *h3.stride(), *r3.stride(), *o3.stride(),
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, HAS_DIVISOR=divisor not in (None, 1.0), **cfg)
    return out


def reference(h, bias=None, residual=None, divisor=None) -> torch.Tensor:
    """The same math in torch: float32 compute (float64 for float64 operands), cast back to h's dtype."""
    wide = torch.promote_types(h.dtype, torch.float32)
    t = h.to(wide)
    if bias is not None:
        t = t + bias.to(wide).reshape(-1, *([1] * (h.dim() - 2)))
    if residual is not None:
        t = t + residual.to(wide)
    if divisor is not None:
        t = t / divisor
    return t.to(h.dtype)
