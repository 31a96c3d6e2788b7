"""RoPE on a GEMM output's columns: the merged QKV projection's q and k heads rotated where the GEMM stores them.

    y[b, s, c] = x[b, s, c] * cos[b, s, c % D] + rotate_half(x[b, s, head(c)])[c % D] * sin[b, s, c % D]   c < END
    y[b, s, c] = x[b, s, c]                                                                              c >= END

x [B, S, N] is the GEMM's output (columns [0, END) whole heads of D: q's, then k's; v's after them), cos / sin
[B or 1, S, D] (any strides: a broadcast is stride 0) and rotate_half(h) = concat(-h[D/2:], h[:D/2]): the ROPE op of
each head, what ``passes/fuse_rope_epilogue.py`` folds into an AQGEMM (its ``rope_dim`` / ``rope_end``). A prefill of
the Llama-3.2-1B shape at 2048 tokens spends 32 launches a forward on ROPE(q) and ROPE(k) reading and writing 21 MB a
layer (bench/NOTES.md, session 41): here the GEMM's epilogue rotates its tile before the one rounding and the store.

Three forms:
- the TMA template's (``tma_gemm.py``, ROPE_D): a tile sums its heads' first and second halves as two accumulators (w
  read as [N / D, 2, D / 2, K]; or, ROPE_ONE, as one product over [2, N / D, D / 2, K] split after the K loop), so each
  pair meets in one thread and the tables load in the accumulators' layout;
- ``rope_tile``: the pointer template's epilogue, on a float32 tile [BLOCK_M, BLOCK_N] of whole heads (BLOCK_N a
  multiple of D), the two halves of each head split out of the tile in registers (reshape / permute / split), rotated,
  joined back. Compiled for sm_90 that split goes through shared memory (the TMA template's form of it cost ~10 us a
  1B QKV GEMM on an H100, bench/NOTES.md session 42);
- ``rope_columns``: a kernel of its own rotating those columns of a stored output in place (a library GEMM's, or a
  template's whose tile does not hold whole heads): a program a block of rows and a head, both halves loaded once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ir.ops_fused import rope_columns_ref

BLOCK_ROWS = 32  # rope_columns' rows a program


@triton.jit
def load_table(ptr, b, s, stride_b, stride_s, stride_d, j, mask):
    # cos or sin [BLOCK_M, len(j)] at the rows' (b, s) and the head dims j (mask [BLOCK_M, len(j)]), float32
    return tl.load(ptr + (b * stride_b + s * stride_s)[:, None] + j[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def rope_tile(h, offs_m, off_n, mask_m, cos_ptr, sin_ptr, seq, end, stride_cb, stride_cs, stride_cd, stride_sb, stride_ss,
              stride_sd, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The float32 tile h [BLOCK_M, BLOCK_N] at rows offs_m (row = b * seq + s) and columns off_n.. with the columns
    below ``end`` rotated per head of D (off_n a multiple of D, BLOCK_N of D, D a power of two: ``tile_fits``)."""
    HALF: tl.constexpr = D // 2
    b = (offs_m // seq).to(tl.int64)
    s = (offs_m % seq).to(tl.int64)
    j = tl.arange(0, HALF)
    mask = mask_m[:, None] & (j < HALF)[None, :]
    c1 = load_table(cos_ptr, b, s, stride_cb, stride_cs, stride_cd, j, mask)[:, None, :]  # [BLOCK_M, 1, HALF]
    c2 = load_table(cos_ptr, b, s, stride_cb, stride_cs, stride_cd, j + HALF, mask)[:, None, :]
    s1 = load_table(sin_ptr, b, s, stride_sb, stride_ss, stride_sd, j, mask)[:, None, :]
    s2 = load_table(sin_ptr, b, s, stride_sb, stride_ss, stride_sd, j + HALF, mask)[:, None, :]
    x1, x2 = tl.split(tl.permute(tl.reshape(h, (BLOCK_M, BLOCK_N // D, 2, HALF)), (0, 1, 3, 2)))  # [BLOCK_M, heads, HALF]
    y = tl.join(x1 * c1 - x2 * s1, x2 * c2 + x1 * s2)  # [BLOCK_M, heads, HALF, 2]
    y = tl.reshape(tl.permute(y, (0, 1, 3, 2)), (BLOCK_M, BLOCK_N))
    return tl.where((off_n + tl.arange(0, BLOCK_N) < end)[None, :], y, h)


@triton.jit
def _rope_columns_kernel(x_ptr, cos_ptr, sin_ptr, M, seq, stride_xm, stride_cb, stride_cs, stride_cd, stride_sb, stride_ss,
                         stride_sd, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_HALF: tl.constexpr):
    # grid (cdiv(M, BLOCK_M), END / D): rows pid_m * BLOCK_M.., head pid_h (columns pid_h * D..), rotated in place
    HALF: tl.constexpr = D // 2
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    b = (offs_m // seq).to(tl.int64)
    s = (offs_m % seq).to(tl.int64)
    j = tl.arange(0, BLOCK_HALF)
    mask = (offs_m < M)[:, None] & (j < HALF)[None, :]
    p = x_ptr + offs_m.to(tl.int64)[:, None] * stride_xm + tl.program_id(1) * D + j[None, :]
    x1 = tl.load(p, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = load_table(cos_ptr, b, s, stride_cb, stride_cs, stride_cd, j, mask)
    c2 = load_table(cos_ptr, b, s, stride_cb, stride_cs, stride_cd, j + HALF, mask)
    s1 = load_table(sin_ptr, b, s, stride_sb, stride_ss, stride_sd, j, mask)
    s2 = load_table(sin_ptr, b, s, stride_sb, stride_ss, stride_sd, j + HALF, mask)
    tl.store(p, (x1 * c1 - x2 * s1).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p + HALF, (x2 * c2 + x1 * s2).to(x_ptr.dtype.element_ty), mask=mask)


def tile_fits(dim: int, block_n: int) -> bool:
    """``rope_tile`` takes heads of ``dim`` in tiles of ``block_n`` columns."""
    return dim >= 2 and dim & (dim - 1) == 0 and block_n % dim == 0


def tables(x_shape: tuple, cos: torch.Tensor, sin: torch.Tensor, dim: int, end: int) -> tuple[int, tuple]:
    """(seq, (cos's and sin's strides as [B, S, D])) for an output x of ``x_shape`` [B, S, N] or [M, N] (one row of
    positions: seq M) and cos / sin broadcasting to [B, S, dim]; ValueError where they do not, or the heads do not
    fit (``dim`` even, ``end`` a multiple of it within N)."""
    lead = tuple(x_shape[:-1]) if len(x_shape) == 3 else (1, *x_shape[:-1])
    if len(x_shape) not in (2, 3):
        raise ValueError(f"rope: the output must be [B, S, N] or [M, N], got {list(x_shape)}")
    if dim < 2 or dim % 2 or end % dim or not 0 < end <= x_shape[-1]:
        raise ValueError(f"rope: head dim {dim} / end {end} do not fit {x_shape[-1]} columns (even dim, end a multiple "
                         "of it)")
    strides = []
    for name, t in (("cos", cos), ("sin", sin)):
        try:
            strides += list(t.expand(*lead, dim).stride())
        except RuntimeError:
            raise ValueError(f"rope: {name} {list(t.shape)} does not broadcast to {[*lead, dim]}") from None
    return lead[1], tuple(strides)


def rope_columns(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int, end: int) -> torch.Tensor:
    """x's columns [0, end) rotated in place per head of ``dim`` (module docstring); x [B, S, N] or [M, N] with unit
    column stride and rows that flatten to one stride, cos / sin broadcasting to [B, S, dim]. Returns x."""
    seq, strides = tables(tuple(x.shape), cos, sin, dim, end)
    m = x.numel() // x.shape[-1]
    if x.stride(-1) != 1 or (m > 1 and x.dim() == 3 and x.stride(0) != x.shape[1] * x.stride(1)):
        raise ValueError(f"rope_columns: x {list(x.shape)} strides {x.stride()}: want a unit column stride and flat rows")
    if m == 0:
        return x
    stride_xm = x.stride(-2) if m > 1 else x.shape[-1]
    _rope_columns_kernel[(triton.cdiv(m, BLOCK_ROWS), end // dim)](
        x, cos, sin, m, seq, stride_xm, *strides, D=dim, BLOCK_M=BLOCK_ROWS, BLOCK_HALF=triton.next_power_of_2(dim // 2))
    return x


def reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int, end: int) -> torch.Tensor:
    """``rope_columns`` by torch ops in x's dtype (the ROPE op's reference on each head): a new tensor."""
    return rope_columns_ref(x, cos, sin, dim, end)
