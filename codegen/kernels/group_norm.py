"""Group normalisation (+ SiLU) in two passes over chunks of each group: kiln's ``GROUP_NORM`` op.

    y[n, c, s] = act((x[n, c, s] - mean[n, g]) * rstd[n, g] * w[c] + b[c]),    g = c // (C / G)
    mean, var over the group's C/G x S values (biased), rstd = 1 / sqrt(var + eps)

A group holds C/G x H x W values: 16 x 128 x 128 = 262144 in the SD VAE decoder's mid block at 1024 px, 4 x
1024 x 1024 in its last block. That is too long for one program, and one program per group gives 32 programs
per image for 132 SMs. So each group is cut into chunks and two kernels run over them:

1. ``_stats_kernel``: each program reduces its chunk to (count, mean, M2) in float32. It accumulates the
   shifted sums sum(x - k) and sum((x - k)^2) with k the chunk's first value, so M2 = S2 - S1^2/n does not
   cancel the way E[x^2] - E[x]^2 does when the mean is large against the spread.
2. ``_apply_kernel``: each program combines its group's partials (Chan et al.: mean = sum(n_i m_i) / n,
   M2 = sum(M2_i) + sum(n_i (m_i - mean)^2), in the same order in every program: deterministic), then
   normalises its chunk, applies w / b and the activation, and stores in the output's dtype.

x and out are read as [N, C, S] through their own strides, so each may be NCHW or channels-last (NHWC memory: a
position's C channels are adjacent). Two kernel pairs (``FORMS``), both right for any strides; ``group_norm`` runs
"nhwc" where x's channel stride is 1 and "group" otherwise (``kernel_form``), and the tuner may measure both
(codegen/lower.py's "kiln" and "kiln-nhwc").

"group", for NCHW: a program's tile is [BLOCK_C, BLOCK_S], BLOCK_C channels of ONE group (all of them, up to 16) by
BLOCK_S consecutive positions: runs of BLOCK_S values in NCHW (in NHWC only runs of C/G values, 8-32 bytes of a
C * 2-byte stride, which is why "nhwc" exists). C/G is a compile-time constant (a kernel per channels-per-group count:
4, 8, 16 in the SD VAE). The group's tiles are numbered channel-block-major (t = c_block * NSB + s_block) and chunk j
takes tiles [j * TPC, (j + 1) * TPC); the grid is (N*G, chunks).

"nhwc", for channels-last: a program's tile is [BLOCK_S, BLOCK_C], BLOCK_S positions by a block of GB WHOLE groups
(about WIDTH = 64 channels: each position a contiguous run of 128 bytes in bfloat16), and the grid is (N, chunks,
channel blocks), a chunk being a run of positions. The stats kernel shifts each group by its own k (its first
channel's value at the chunk's first position), sums per channel, then adds a group's channels (same shift) into its
partial; the apply kernel combines the partials of its block's groups ([GB, chunks], at most MAX_PARTIALS, which
bounds the chunks) and normalises with per-channel scale rstd[g(c)] * w[c].

The partials live in a float32 scratch [N*G, chunks, 3] (chunk j of image n's group g at [n*G + g, j]; chunks the
larger of the two forms' counts, each using the first of its row) that the kernels plan reserves in its arena
(``scratch_shape``), so a CUDA graph captures both launches.
"""
from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from ...ir.ops import OPS

# triton.jit picks the interpreter from this variable when the kernels below are defined; read it then too
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACTS = ("none", "silu")
FORMS = ("group", "nhwc")  # the kernel pairs: a program's tile is one group's (channels x positions) or positions x groups

# GPU: tiles of up to 2048 values (at most 16 channels), and chunks enough for ~8 programs per SM of an H200 (132 SMs).
# The interpreter is slow per program (a reduction costs milliseconds): tiles of 128 values, at most 4 channels, and 2
# chunks, so irregular test shapes still span several tiles both ways and several chunks
BLOCK, BLOCK_C, TARGET_PROGRAMS, MAX_CHUNKS = 2048, 16, 1024, 256
INTERPRET_BLOCK, INTERPRET_BLOCK_C, INTERPRET_CHUNKS = 128, 4, 2
# the channels-last pair: blocks of whole groups ~64 channels wide (a 128-byte run of bfloat16 per position), tiles of
# 4096 values; at most 4096 partials (groups x chunks) per block, each apply program's combine. Interpreter: 8 channels
WIDTH, BLOCK_NHWC, MAX_PARTIALS = 64, 4096, 4096
INTERPRET_WIDTH = 8


@triton.jit
def _stats_kernel(
    x_ptr, part_ptr,
    G, CG: tl.constexpr, S, NSB, T, TPC, PC,  # groups, channels a group, positions, tiles a channel block / a group / a chunk, scratch chunks
    stride_xn, stride_xc, stride_xs,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)  # n * G + g
    chunk = tl.program_id(1)
    x_ptr += (row // G).to(tl.int64) * stride_xn + ((row % G) * CG).to(tl.int64) * stride_xc
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    t0 = chunk * TPC
    t1 = tl.minimum(t0 + TPC, T)
    # the shift k: the chunk's first value (near the mean, so the shifted sums below do not cancel)
    shift = tl.load(x_ptr + ((t0 // NSB) * BLOCK_C).to(tl.int64) * stride_xc + ((t0 % NSB) * BLOCK_S).to(tl.int64) * stride_xs)
    shift = shift.to(tl.float32)

    acc_n = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)  # values counted (tiles at the group's edges are partial)
    acc_1 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)  # sum(x - k)
    acc_2 = tl.zeros([BLOCK_C, BLOCK_S], dtype=tl.float32)  # sum((x - k)^2)
    for t in range(t0, t1):
        c = (t // NSB) * BLOCK_C + offs_c  # [BLOCK_C] channels of the group
        s = (t % NSB) * BLOCK_S + offs_s  # [BLOCK_S] positions
        mask = (c < CG)[:, None] & (s < S)[None, :]
        v = tl.load(x_ptr + c.to(tl.int64)[:, None] * stride_xc + s.to(tl.int64)[None, :] * stride_xs, mask=mask, other=0.0)
        d = tl.where(mask, v.to(tl.float32) - shift, 0.0)
        acc_n += mask.to(tl.float32)
        acc_1 += d
        acc_2 += d * d
    n = tl.sum(tl.sum(acc_n, axis=1), axis=0)
    s1 = tl.sum(tl.sum(acc_1, axis=1), axis=0)
    s2 = tl.sum(tl.sum(acc_2, axis=1), axis=0)
    p = part_ptr + (row * PC + chunk) * 3
    tl.store(p, n)
    tl.store(p + 1, shift + s1 / n)
    tl.store(p + 2, tl.maximum(s2 - s1 * s1 / n, 0.0))


@triton.jit
def _combine(cnt, means, m2s, eps, AXIS: tl.constexpr):
    # (mean, rstd) of the groups whose chunks' (count, mean, M2) lie along AXIS, by Chan et al. (module docstring), in
    # the same order in every program; a group without values (padding lanes) counts 1, so no 0 / 0
    total = tl.maximum(tl.sum(cnt, axis=AXIS), 1.0)
    mean = tl.sum(cnt * means, axis=AXIS) / total
    dm = means - tl.expand_dims(mean, AXIS)
    rstd = tl.rsqrt(tl.sum(m2s + cnt * dm * dm, axis=AXIS) / total + eps)
    return mean, rstd


@triton.jit
def _apply_kernel(
    x_ptr, w_ptr, b_ptr, part_ptr, out_ptr,
    G, CG: tl.constexpr, S, NSB, T, TPC, PC, CHUNKS, eps,
    stride_xn, stride_xc, stride_xs,
    stride_on, stride_oc, stride_os,
    ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_S: tl.constexpr, CHUNKS_P2: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)

    # the group's statistics from every chunk's (count, mean, M2)
    k = tl.arange(0, CHUNKS_P2)
    p = part_ptr + (row * PC + k) * 3
    kmask = k < CHUNKS
    mean, rstd = _combine(tl.load(p, mask=kmask, other=0.0), tl.load(p + 1, mask=kmask, other=0.0),
                          tl.load(p + 2, mask=kmask, other=0.0), eps, 0)

    n = (row // G).to(tl.int64)
    c0 = (row % G) * CG
    x_ptr += n * stride_xn
    out_ptr += n * stride_on
    offs_c = tl.arange(0, BLOCK_C)
    offs_s = tl.arange(0, BLOCK_S)
    t0 = chunk * TPC
    for t in range(t0, tl.minimum(t0 + TPC, T)):
        cl = (t // NSB) * BLOCK_C + offs_c  # [BLOCK_C] channels of the group
        cmask = cl < CG
        c = (c0 + cl).to(tl.int64)
        s = ((t % NSB) * BLOCK_S + offs_s).to(tl.int64)  # [BLOCK_S]
        mask = cmask[:, None] & (s < S)[None, :]
        v = tl.load(x_ptr + c[:, None] * stride_xc + s[None, :] * stride_xs, mask=mask, other=0.0)
        y = (v.to(tl.float32) - mean) * rstd
        if HAS_W:
            y = y * tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
        if HAS_B:
            y = y + tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)[:, None]
        if ACT == "silu":
            y = y * tl.sigmoid(y)
        tl.store(out_ptr + c[:, None] * stride_oc + s[None, :] * stride_os, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _stats_nhwc_kernel(
    x_ptr, part_ptr,
    C, G, CG: tl.constexpr, GB: tl.constexpr, S, SPC, PC,  # channels, groups, channels a group, groups a block, positions,
    # positions a chunk, the scratch's chunks
    stride_xn, stride_xc, stride_xs,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, GB_P2: tl.constexpr,
):
    n = tl.program_id(0)
    chunk = tl.program_id(1)
    g0 = tl.program_id(2) * GB  # the channel block's first group
    x_ptr += n.to(tl.int64) * stride_xn + (g0 * CG).to(tl.int64) * stride_xc
    cl = tl.arange(0, BLOCK_C)  # [BLOCK_C] the block's channels: GB whole groups
    cmask = (cl < GB * CG) & (g0 * CG + cl < C)
    offs_s = tl.arange(0, BLOCK_S)
    s0 = chunk * SPC
    s_end = tl.minimum(s0 + SPC, S)
    # a shift k per group: its first channel's value at the chunk's first position, broadcast to its channels [BLOCK_C]
    shift = tl.load(x_ptr + s0.to(tl.int64) * stride_xs + ((cl // CG) * CG).to(tl.int64) * stride_xc, mask=cmask, other=0.0)
    shift = shift.to(tl.float32)

    acc_1 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)  # sum(x - k)
    acc_2 = tl.zeros([BLOCK_S, BLOCK_C], dtype=tl.float32)  # sum((x - k)^2)
    for sb in range(s0, s_end, BLOCK_S):
        s = sb + offs_s  # [BLOCK_S] positions
        mask = (s < s_end)[:, None] & cmask[None, :]
        v = tl.load(x_ptr + s.to(tl.int64)[:, None] * stride_xs + cl.to(tl.int64)[None, :] * stride_xc, mask=mask, other=0.0)
        d = tl.where(mask, v.to(tl.float32) - shift[None, :], 0.0)
        acc_1 += d
        acc_2 += d * d
    # channels -> their groups (one shift throughout a group, so the shifted sums just add): [GB_P2, BLOCK_C] one-hot
    gl = tl.arange(0, GB_P2)
    onehot = (cl // CG)[None, :] == gl[:, None]
    s1 = tl.sum(tl.where(onehot, tl.sum(acc_1, axis=0)[None, :], 0.0), axis=1)  # [GB_P2]
    s2 = tl.sum(tl.where(onehot, tl.sum(acc_2, axis=0)[None, :], 0.0), axis=1)
    k = tl.sum(tl.where(onehot & (cl % CG == 0)[None, :], shift[None, :], 0.0), axis=1)
    cnt = ((s_end - s0) * CG).to(tl.float32)
    gmask = (gl < GB) & (g0 + gl < G)
    p = part_ptr + ((n * G + g0 + gl) * PC + chunk) * 3
    tl.store(p, tl.zeros([GB_P2], dtype=tl.float32) + cnt, mask=gmask)
    tl.store(p + 1, k + s1 / cnt, mask=gmask)
    tl.store(p + 2, tl.maximum(s2 - s1 * s1 / cnt, 0.0), mask=gmask)


@triton.jit
def _apply_nhwc_kernel(
    x_ptr, w_ptr, b_ptr, part_ptr, out_ptr,
    C, G, CG: tl.constexpr, GB: tl.constexpr, S, SPC, PC, CHUNKS, eps,
    stride_xn, stride_xc, stride_xs,
    stride_on, stride_oc, stride_os,
    ACT: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr, GB_P2: tl.constexpr, CHUNKS_P2: tl.constexpr,
):
    n = tl.program_id(0)
    chunk = tl.program_id(1)
    g0 = tl.program_id(2) * GB

    # the block's groups' statistics from every chunk's (count, mean, M2): [GB_P2, CHUNKS_P2], combined along the chunks
    gl = tl.arange(0, GB_P2)
    k = tl.arange(0, CHUNKS_P2)
    pmask = ((gl < GB) & (g0 + gl < G))[:, None] & (k < CHUNKS)[None, :]
    p = part_ptr + ((n * G + g0 + gl)[:, None] * PC + k[None, :]) * 3
    mean, rstd = _combine(tl.load(p, mask=pmask, other=0.0), tl.load(p + 1, mask=pmask, other=0.0),
                          tl.load(p + 2, mask=pmask, other=0.0), eps, 1)  # [GB_P2] each

    # groups -> their channels [BLOCK_C]: y = (x - mean) * (rstd * w) + b
    cl = tl.arange(0, BLOCK_C)
    onehot = (cl // CG)[None, :] == gl[:, None]  # [GB_P2, BLOCK_C]
    mean_c = tl.sum(tl.where(onehot, mean[:, None], 0.0), axis=0)
    scale = tl.sum(tl.where(onehot, rstd[:, None], 0.0), axis=0)
    c = (g0 * CG + cl).to(tl.int64)
    cmask = (cl < GB * CG) & (c < C)
    if HAS_W:
        scale = scale * tl.load(w_ptr + c, mask=cmask, other=0.0).to(tl.float32)
    if HAS_B:
        bias = tl.load(b_ptr + c, mask=cmask, other=0.0).to(tl.float32)

    x_ptr += n.to(tl.int64) * stride_xn
    out_ptr += n.to(tl.int64) * stride_on
    offs_s = tl.arange(0, BLOCK_S)
    s0 = chunk * SPC
    s_end = tl.minimum(s0 + SPC, S)
    for sb in range(s0, s_end, BLOCK_S):
        s = (sb + offs_s).to(tl.int64)  # [BLOCK_S]
        mask = (s < s_end)[:, None] & cmask[None, :]
        v = tl.load(x_ptr + s[:, None] * stride_xs + c[None, :] * stride_xc, mask=mask, other=0.0)
        y = (v.to(tl.float32) - mean_c[None, :]) * scale[None, :]
        if HAS_B:
            y = y + bias[None, :]
        if ACT == "silu":
            y = y * tl.sigmoid(y)
        tl.store(out_ptr + s[:, None] * stride_os + c[None, :] * stride_oc, y.to(out_ptr.dtype.element_ty), mask=mask)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _plan(rows: int, cg: int, s: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_C, BLOCK_S, tiles per channel block, tiles per group, tiles per chunk, chunks) for ``rows`` groups of ``cg``
    channels of ``s`` positions: enough chunks to fill the GPU, each a run of whole tiles, none empty."""
    block, cap = (INTERPRET_BLOCK, INTERPRET_BLOCK_C) if INTERPRET else (BLOCK, BLOCK_C)
    block_c = min(triton.next_power_of_2(max(cg, 1)), cap)
    block_s = min(triton.next_power_of_2(max(s, 1)), block // block_c)
    nsb = _cdiv(s, block_s)
    tiles = _cdiv(cg, block_c) * nsb
    want = INTERPRET_CHUNKS if INTERPRET else _cdiv(TARGET_PROGRAMS, max(rows, 1))
    tpc = max(1, _cdiv(tiles, max(1, min(tiles, want, MAX_CHUNKS))))
    return block_c, block_s, nsb, tiles, tpc, max(1, _cdiv(tiles, tpc))  # (an empty input: one chunk, no launch)


def _plan_nhwc(n: int, c: int, groups: int, s: int) -> tuple[int, int, int, int, int]:
    """(groups a channel block, BLOCK_C, BLOCK_S, positions a chunk, chunks) of the channels-last kernels for [n, c, s]:
    blocks of whole groups about WIDTH channels wide, chunks of whole position tiles, enough programs (n x chunks x
    blocks) to fill the GPU while a block's partials (its groups x chunks, which every apply program of it combines)
    stay within MAX_PARTIALS."""
    width, block = (INTERPRET_WIDTH, INTERPRET_BLOCK) if INTERPRET else (WIDTH, BLOCK_NHWC)
    cg = max(c // groups, 1)
    gb = max(1, min(groups, width // cg))
    block_c = triton.next_power_of_2(gb * cg)
    block_s = max(1, min(triton.next_power_of_2(max(s, 1)), block // block_c))
    nsb = _cdiv(s, block_s)
    want = INTERPRET_CHUNKS if INTERPRET else _cdiv(TARGET_PROGRAMS, max(n * _cdiv(groups, gb), 1))
    bpc = max(1, _cdiv(nsb, max(1, min(nsb, want, MAX_PARTIALS // gb))))  # position tiles a chunk (1: an empty input)
    return gb, block_c, block_s, bpc * block_s, max(1, _cdiv(nsb, bpc))


def _dims(shape) -> tuple[int, int, int]:
    """(N, C, S) of an input [N, C, *]."""
    return shape[0], shape[1], math.prod(shape[2:])


def scratch_shape(shape, groups: int) -> tuple[int, int, int]:
    """The float32 scratch [N*G, chunks, 3] that ``group_norm`` needs for an input of ``shape`` [N, C, *], in either
    form: chunks is the larger of the two forms' chunk counts (each form uses the first of them in each row)."""
    n, c, s = _dims(shape)
    return n * groups, max(_plan(n * groups, c // groups, s)[-1], _plan_nhwc(n, c, groups, s)[-1]), 3


def kernel_form(x: torch.Tensor) -> str:
    """The kernel pair ``group_norm`` runs on x by default: "nhwc" where x's channels are adjacent (channel stride 1,
    channels-last memory), else "group"."""
    return "nhwc" if x.dim() >= 2 and x.shape[1] > 1 and x.stride(1) == 1 else "group"


def _check(x, weight, bias, groups, act, out, scratch, form):
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError("group_norm: x must be a tensor [N, C, *]")
    if x.dtype not in DTYPES:
        raise ValueError(f"group_norm: x has dtype {x.dtype}; supported: float16, bfloat16, float32")
    if act not in ACTS:
        raise ValueError(f"group_norm: unknown activation {act!r} (one of {', '.join(ACTS)})")
    if form not in (None, *FORMS):
        raise ValueError(f"group_norm: unknown form {form!r} (one of {', '.join(FORMS)})")
    c = x.shape[1]
    if groups < 1 or c % groups:
        raise ValueError(f"group_norm: {c} channels do not split into {groups} groups")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and (tuple(p.shape) != (c,) or p.dtype != x.dtype or p.device != x.device):
            raise ValueError(f"group_norm: {name} {p.dtype}{tuple(p.shape)} must be {x.dtype}[{c}] on {x.device}")
    if out is not None and (out.shape != x.shape or out.dtype != x.dtype):
        raise ValueError(f"group_norm: out {out.dtype}{tuple(out.shape)} must be {x.dtype}{tuple(x.shape)}")
    want = scratch_shape(tuple(x.shape), groups)
    if scratch is not None and (tuple(scratch.shape) != want or scratch.dtype != torch.float32 or not scratch.is_contiguous()):
        raise ValueError(f"group_norm: scratch {scratch.dtype}{tuple(scratch.shape)} must be contiguous float32{want}")
    if not INTERPRET and x.device.type != "cuda":
        raise ValueError(f"group_norm: x is on {x.device}; the kernels need CUDA tensors (or TRITON_INTERPRET=1 on CPU)")


def group_norm(x, weight=None, bias=None, groups: int = 1, eps: float = 1e-5, act: str = "none", out=None,
               scratch=None, form: str | None = None) -> torch.Tensor:
    """``act(F.group_norm(x, groups, weight, bias, eps))`` in two kernels (see the module docstring).

    x [N, C, *] (float16, bfloat16, float32; any strides whose spatial dims flatten to one: NCHW, channels-last);
    weight, bias [C] in x's dtype or None; act "none" or "silu". ``out`` (x's shape and dtype, its spatial dims
    flattenable by a view, in x's layout or another) may be given, and so may ``scratch``, the contiguous float32
    ``scratch_shape(x.shape, groups)``. ``form``: the kernel pair, "group" or "nhwc" (both right for any strides),
    by default ``kernel_form(x)``."""
    _check(x, weight, bias, groups, act, out, scratch, form)
    n, c, s = _dims(tuple(x.shape))
    if out is None:
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
    if n * c * s == 0:
        return out
    x3 = x.reshape(n, c, s)  # a view unless the spatial dims do not flatten
    try:
        o3 = out.view(n, c, s)
    except RuntimeError as e:
        raise ValueError(f"group_norm: out with strides {out.stride()} cannot be viewed as [{n}, {c}, {s}]") from e
    if scratch is None:
        scratch = torch.empty(scratch_shape(tuple(x.shape), groups), dtype=torch.float32, device=x.device)
    params = (weight if weight is not None else x3, bias if bias is not None else x3, scratch)
    flags = dict(ACT=act, HAS_W=weight is not None, HAS_B=bias is not None)
    launch = _launch_nhwc if (form or kernel_form(x)) == "nhwc" else _launch_group
    launch(x3, o3, params, groups, float(eps), flags)
    return out


def _launch_group(x3, o3, params, groups, eps, flags):
    """The group-tile kernels over a (N*G, chunks) grid."""
    (n, c, s), (w, b, scratch) = x3.shape, params
    rows, cg = n * groups, c // groups
    block_c, block_s, nsb, tiles, tpc, chunks = _plan(rows, cg, s)
    warps = 1 if INTERPRET else (8 if block_c * block_s >= 2048 else 4)
    sizes, tile = (groups, cg, s, nsb, tiles, tpc, scratch.shape[1]), dict(BLOCK_C=block_c, BLOCK_S=block_s, num_warps=warps)
    _stats_kernel[(rows, chunks)](x3, scratch, *sizes, *x3.stride(), **tile)
    _apply_kernel[(rows, chunks)](x3, w, b, scratch, o3, *sizes, chunks, eps, *x3.stride(), *o3.stride(), **flags,
                                  CHUNKS_P2=max(2, triton.next_power_of_2(chunks)), **tile)


def _launch_nhwc(x3, o3, params, groups, eps, flags):
    """The position-tile kernels over a (N, chunks, channel blocks) grid."""
    (n, c, s), (w, b, scratch) = x3.shape, params
    gb, block_c, block_s, spc, chunks = _plan_nhwc(n, c, groups, s)
    grid = (n, chunks, _cdiv(groups, gb))
    warps = 1 if INTERPRET else (8 if block_c * block_s >= 2048 else 4)
    sizes = (c, groups, c // groups, gb, s, spc, scratch.shape[1])
    tile = dict(BLOCK_S=block_s, BLOCK_C=block_c, GB_P2=max(2, triton.next_power_of_2(gb)), num_warps=warps)
    _stats_nhwc_kernel[grid](x3, scratch, *sizes, *x3.stride(), **tile)
    _apply_nhwc_kernel[grid](x3, w, b, scratch, o3, *sizes, chunks, eps, *x3.stride(), *o3.stride(), **flags,
                             CHUNKS_P2=max(2, triton.next_power_of_2(chunks)), **tile)


def reference(x, weight=None, bias=None, groups: int = 1, eps: float = 1e-5, act: str = "none") -> torch.Tensor:
    """The GROUP_NORM op's reference implementation (``OPS["GROUP_NORM"].ref``), in the operands' own dtype."""
    ins = [x] + [p for p in (weight, bias) if p is not None]
    if bias is not None and weight is None:
        ins.insert(1, torch.ones_like(bias))
    return OPS["GROUP_NORM"].ref(ins, dict(groups=groups, eps=eps, act=act))
