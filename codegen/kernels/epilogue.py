"""The GEMM epilogue alone, as one pointwise Triton pass over the matmul's result.

    out = residual + gate * epi(h + bias)
    epi(t) = act(t)                                  (glu=False, N = Nh)
    epi(t) = act(t[..., :Nh/2]) * t[..., Nh/2:]      (glu=True,  N = Nh/2)

For when the matmul itself runs on cuBLAS (``h = x @ w^T`` by torch.mm) and what kiln's ``GEMM`` op
adds after it must still cost one read of h and one write of the output, not one round trip per
elementwise op. h is [..., Nh] and must be viewable as [M, Nh] (rows along the last dim); bias is [Nh]
and is added before the activation and before the glu split. Every optional piece is a constexpr switch
of the ONE kernel below. Math is float32 whatever the dtype; the output has h's dtype.

Gate and residual broadcast to the output ``lead + (N,)`` (DiT's gate is [B, 1, N] against [B, S, N])
and are addressed as in gemm.py, through its ``_row_groups``: row m of the flattened output reads the
operand at ``(m // rows) * stride_b + (m % rows) * stride_m``.

Tiles are [BLOCK_M, BLOCK_N] of the [M, N] output. Each program reads exactly the h, gate and residual
elements of the output positions it writes (with glu, columns j and j + N of h for output column j), so
``out`` may be h itself (glu=False) or the residual itself: an in-place update.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ...ir.ops_fused import ACTIVATIONS
from .gemm import _activation, _gate_residual_store, check_output_operands, output_operands

# triton.jit picks the interpreter from this variable when the kernel below is defined; read it then too
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# the interpreter is slow per program: small tiles, so irregular test shapes (37 x 50) span several tiles
# in both directions and the masks are exercised
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=32, num_warps=1)


@triton.jit
def _epilogue_kernel(
    h_ptr, bias_ptr, gate_ptr, res_ptr, out_ptr,
    M, N,  # N: output columns (half of h's with GLU)
    stride_hm, stride_hn, stride_bias,
    gate_rows, stride_gb, stride_gm, stride_gn,  # gate row m sits at (m // gate_rows) * stride_gb + (m % gate_rows) * stride_gm
    res_rows, stride_rb, stride_rm, stride_rn,
    stride_om, stride_on,
    ACT: tl.constexpr, GLU: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # one flat grid, row-major over tiles: neighbouring programs share gate / residual rows
    pid = tl.program_id(0)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    pid_m = pid // num_pid_n
    pid_n = pid % num_pid_n

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    mask = mask_m[:, None] & mask_n[None, :]
    rows = offs_m.to(tl.int64)  # int64 addressing: M * Nh may pass 2**31
    cols = offs_n.to(tl.int64)

    h_ptrs = h_ptr + rows[:, None] * stride_hm + cols[None, :] * stride_hn  # [BLOCK_M, BLOCK_N]
    acc = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
    if GLU:
        acc_u = tl.load(h_ptrs + N * stride_hn, mask=mask, other=0.0).to(tl.float32)  # the up half

    # in the reference's order: bias, activation (glu), gate, residual
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
        if GLU:
            acc_u += tl.load(bias_ptr + (cols + N) * stride_bias, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    acc = _activation(acc, ACT)
    if GLU:
        acc = acc * acc_u
    _gate_residual_store(acc, rows, cols, mask, gate_ptr, gate_rows, stride_gb, stride_gm, stride_gn,
                         res_ptr, res_rows, stride_rb, stride_rm, stride_rn, out_ptr, stride_om, stride_on,
                         HAS_GATE, HAS_RESIDUAL)


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()  # triton.next_power_of_2 / triton.cdiv cost ~3 us a call in Triton 3.9


def _config(m: int, n: int, glu: bool) -> dict:
    """GPU tile sizes, no autotuning: the pass is memory-bound, so any tile of 4-8K elements with enough
    warps streams at bandwidth. Wide rows first (coalesced loads), then rows to fill the tile; glu reads two
    h tiles per output tile, so its output tile is half as large."""
    block_n = min(_next_pow2(n), 128 if glu else 256)
    block_m = max(1, min(_next_pow2(m), (4096 if glu else 8192) // block_n))
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=8 if block_m * block_n >= 8192 else 4)


def _check(h, bias, gate, residual, act, glu, out):
    """Validate the operands; returns the output shape."""
    if not isinstance(h, torch.Tensor):
        raise ValueError("epilogue: h must be a tensor")
    if act not in ACTIVATIONS:
        raise ValueError(f"epilogue: unknown activation {act!r} (one of {', '.join(ACTIVATIONS)})")
    if h.dtype not in DTYPES:
        raise ValueError(f"epilogue: h has dtype {h.dtype}; supported: float16, bfloat16, float32")
    if h.dim() < 1:
        raise ValueError("epilogue: h must have at least one dim ([..., Nh])")
    nh = h.shape[-1]
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != nh):
        raise ValueError(f"epilogue: bias {tuple(bias.shape)} for h {tuple(h.shape)} must be [{nh}]")
    n = nh
    if glu:
        if nh % 2:
            raise ValueError(f"epilogue: glu needs an even last dim ([gate, up] halves), h is {tuple(h.shape)}")
        if out is h:
            raise ValueError("epilogue: out cannot be h with glu (the output is half as wide)")
        n //= 2
    shape = tuple(h.shape[:-1]) + (n,)
    check_output_operands("epilogue", ("h", h), shape, [("bias", bias)], gate, residual, out)
    if not INTERPRET and h.device.type != "cuda":
        raise ValueError(f"epilogue: h is on {h.device}; the kernel needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    return shape


def epilogue(h, bias=None, gate=None, residual=None, act="none", glu=False, out=None) -> torch.Tensor:
    """``residual + gate * epi(h + bias)`` in one pass over h (see the module docstring).

    h [..., Nh], viewable as [M, Nh]; bias [Nh]; gate and residual broadcast to the output [..., N] with
    N = Nh, or Nh / 2 with ``glu``. All operands share h's dtype (float16, bfloat16, float32); float32 math.
    ``out`` may be given (output shape and dtype, viewable as [M, N]); it may be h itself (glu=False) or the
    residual itself, an in-place update, but must not partly overlap any operand.
    """
    shape = _check(h, bias, gate, residual, act, glu, out)
    lead, n, nh = shape[:-1], shape[-1], h.shape[-1]
    m = math.prod(lead)
    try:
        h2 = h.view(m, nh)
    except RuntimeError as e:
        raise ValueError(f"epilogue: h {tuple(h.shape)} with strides {h.stride()} cannot be viewed as [{m}, {nh}]") from e
    out, out2, g, r = output_operands("epilogue", out, shape, h, gate, residual)
    if m == 0 or n == 0:
        return out
    b = bias if bias is not None else h
    c = INTERPRET_CONFIG if INTERPRET else _config(m, n, bool(glu))
    grid = (-(-m // c["BLOCK_M"]) * -(-n // c["BLOCK_N"]),)  # cdiv
    _epilogue_kernel[grid](
        h2, b, g[0], r[0], out2, m, n,
        h2.stride(0), h2.stride(1), b.stride(0) if bias is not None else 0,
        *g[1:], *r[1:], out2.stride(0), out2.stride(1),
        ACT=act, GLU=bool(glu), HAS_BIAS=bias is not None, HAS_GATE=gate is not None,
        HAS_RESIDUAL=residual is not None, **c)
    return out


def reference(h, bias=None, gate=None, residual=None, act="none", glu=False) -> torch.Tensor:
    """The same math in torch: float32 compute (float64 for float64 operands), cast back to h's dtype."""
    wide = torch.promote_types(h.dtype, torch.float32)
    t = h.to(wide)
    if bias is not None:
        t = t + bias.to(wide)
    fn = ACTIVATIONS[act]
    if glu:
        a, u = t.chunk(2, dim=-1)
        t = fn(a) * u
    else:
        t = fn(t)
    if gate is not None:
        t = gate.to(wide) * t
    if residual is not None:
        t = residual.to(wide) + t
    return t.to(h.dtype)
