"""Flash attention with q, k and v read by the Tensor Memory Accelerator: a candidate beside ``attention.py``'s template.

    out = softmax(q @ k^T * scale + mask) @ v     q [B, Hq, Sq, D], k [B, Hk, Sk, D], v [B, Hk, Sk, Dv]; optionally causal

The same online softmax as ``attention.py`` (one program a BLOCK_M query tile of one (batch, head), walking the keys
BLOCK_N at a time, scores in log2 units); what differs is how the tiles travel. The template loads each tile with
per-thread pointers and masks: at DiT-XL/2's head dim 72 its 64 x 64 tile holds 232-254 registers a thread and its
128-row tiles spill (sm_90, triton 3.6). Here every tile is one TMA load from a host-made descriptor over the [B, H, S,
D] view (4-d, so a fused projection's strided q / k / v need no copy): no address registers, rows past S zero-filled
(120 registers at 64 x 64 and at 128 x 64 on 8 warps, no spills). Measured on an H100 at head dim 72 (bench/attn.py,
bench/NOTES.md session 37; us a call in CUDA graphs, against the template's best and SDPA + the plan's copy): DiT-XL/2
CFG 2 7.1 (9.7 / 12.9), CFG 16 28.6 (40.2 / 42.3), PixArt 512 self 37.0 (55.4 / 42.5), cross 11.0 (13.1 / 20.3),
PixArt 1024 483 (821 / 476); session 38: PixArt 512 cross-attention with a padding mask (24 of 120 tokens) 12.4 (30.3 /
22.2), the Llama-1B prefill's causal GQA at head dim 64 49.1 (SDPA + copy 68.1).

Head dims. A power of two (16..256) is one box. One between powers of two (``attention.split_widths``: 72 = 64 + 16)
is a main box of its power-of-two lanes and a window box of the tail's width from the main box's end (72: lanes
64..79), whose lanes past the head dim TMA zero-fills (the descriptor's last dim is the head dim: a fused projection's
next lanes are not read); of the p v window only the lanes inside the head dim are stored. (Until session 44 the window
ended at the head dim, 56..71, and q's lanes below 64 were zeroed in registers: that select made ptxas serialize every
wgmma of the kernel, "C7515 ... non wgmma instructions defining accumulator registers", each product waited for.)

The key loop. Each key tile's q k^T is issued, waited for, then its softmax and p v; with AHEAD the next tile's q k^T
is issued before this tile's softmax (the first one before the loop), so its products run beside the exps (compiled
for sm_90 at head dim 64: 23-57 of a tile's 34-66 MUFU.EX2 between the next product's issue and its wait; 106 -> 155
registers at 128 x 64 / 8 warps, 154 -> 239 at 64 x 128 / 4, no spills). Offered at one-box head dims without a mask
(``forms``). Measured on an H100 (bench/attn.py, session 45) at the 1B prefill: 49.5 us at 64 x 64 against 51.0
in turn, the best config in turn 49.2. (Session 44's PAD_QK form, q and k as one box of 128 lanes at head dim 72, is
gone: slower at every DiT / PixArt config, 28.0-890 against 27.9-607 us, and with AHEAD its results were wrong on the
GPU, rel err 0.03-0.19, though right under the interpreter.)

Offered for what TMA and this kernel take (``supported``): float16 / bfloat16, causal (SDPA's upper-left ``is_causal``)
and / or a bool or additive mask the same for every query row (a [B, 1, 1, Sk] padding mask, PixArt's cross-attention;
its row read a key tile at a time: 122-128 registers; an [M, N] tile of a mask differing by row took 255 and spilled,
sm_90 SASS), no quantized KV cache, no soft-capping, q / k / v with unit inner strides and 16-byte aligned bases
and strides (no broadcast stride 0), Hopper or newer. The lowering offers it beside the template and SDPA; the tuner
keeps the fastest.
"""
from __future__ import annotations

import functools
import os
from typing import Callable

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from .attention import LOG2E, expanded_mask, masked_scores, online_weights, split_widths
from .tma_gemm import _capability

# triton.jit picks the interpreter from this variable when the kernel below is defined; read it then too
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256  # a TMA box is at most 256 elements a dimension
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)
# (BLOCK_M, BLOCK_N, warps, stages), in the order offered. Measured on an H100 (bench/attn.py, CUDA graphs, head dim 72;
# bench/NOTES.md, session 37): 128 x 64 on 8 warps first at DiT's CFG 16 (28.6 us), PixArt 512 (37.0) and 1024 (483);
# 64 x 128 at DiT's CFG 2 (7.1, 64 x 64 7.6); 64 x 32 second at CFG 16 / PixArt cross; 128 x 128 never first. (A
# 32-row tile, mma.sync instead of wgmma, was 1.5-2.6x slower everywhere: not listed.)
# causal: the grid's slow axis is the query tile, last tile first, so the programs with the most keys (the last rows')
# start in the first wave and the short ones fill the tail (FlashAttention's order); False: tiles in order, a head's
# together. Measured on an H100 (bench/attn.py, session 38) at the Llama-1B prefill (2048 tokens, 32 / 8 heads, d 64):
# 49.1 us against 59.3 in order (64 x 128), cuDNN's + the plan's copy 68.1.
HEAVY_FIRST = True
CONFIGS = [(128, 64, 8, 3), (64, 128, 4, 2), (64, 64, 4, 3), (64, 32, 4, 3), (128, 128, 8, 2)]


@triton.jit
def _scores(q, q2, k_desc, kw_desc, b, hk, n0, MAIN: tl.constexpr, WIN: tl.constexpr, BLOCK_N: tl.constexpr):
    """q k^T of the key tile at n0 (unscaled), the window lanes' product summed in."""
    k = k_desc.load([b, hk, n0, 0]).reshape(BLOCK_N, MAIN)
    s = tl.dot(q, k.T)
    if WIN > 0:
        k2 = kw_desc.load([b, hk, n0, MAIN]).reshape(BLOCK_N, WIN)
        s = tl.dot(q2, k2.T, s)
    return s


@triton.jit
def _consume(s, n0, m0, offs_m, m_i, l_i, acc, acc2, v_desc, vw_desc, b, hk, Sq, Sk, qk_scale, mask_row, stride_mn,
             CAUSAL: tl.constexpr, MASK: tl.constexpr, HEAD_DIM_V: tl.constexpr, MAIN_V: tl.constexpr,
             WIN_V: tl.constexpr, BLOCK_N: tl.constexpr):
    """The key tile at n0 given its scores ``s``: masked, the online softmax's weights, p v into the accumulators."""
    s = s * qk_scale
    offs_n = n0 + tl.arange(0, BLOCK_N)
    if MASK != "none":  # the mask's row for this head, a key tile at a time
        keep = offs_n[None, :] < Sk
        if CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        s = masked_scores(s, keep, mask_row, offs_m, offs_n, Sq, Sk, 0, stride_mn, MASK, False)
    elif CAUSAL:
        if n0 + BLOCK_N > tl.minimum(m0, Sk):  # a tile on the diagonal or past the keys: the triangle and the length
            s = tl.where((offs_n[None, :] <= offs_m[:, None]) & (offs_n[None, :] < Sk), s, float("-inf"))
    elif n0 + BLOCK_N > Sk:  # the last tile of a length not a multiple of BLOCK_N: its zero-filled keys
        s = tl.where(offs_n[None, :] < Sk, s, float("-inf"))
    m_i, alpha, p, l_i = online_weights(s, m_i, l_i)
    v = v_desc.load([b, hk, n0, 0]).reshape(BLOCK_N, MAIN_V)
    pb = p.to(v.dtype)
    acc = tl.dot(pb, v, acc * alpha[:, None])
    if WIN_V > 0:
        v2 = vw_desc.load([b, hk, n0, MAIN_V]).reshape(BLOCK_N, WIN_V)
        acc2 = tl.dot(pb, v2, acc2 * alpha[:, None])
    return m_i, l_i, acc, acc2


@triton.jit
def _tma_attention_kernel(
    q_desc, k_desc, v_desc, qw_desc, kw_desc, vw_desc, out_ptr,  # (qw / kw / vw: the window boxes; unused without one)
    stride_ob, stride_oh, stride_om, stride_od, H, GROUP, Sq, Sk, qk_scale,  # qk_scale = scale * log2(e)
    mask_ptr, stride_mb, stride_mh, stride_mn,  # the mask expanded to [B, H, 1, Sk]: one row a head (MASK "none": unused)
    CAUSAL: tl.constexpr, MASK: tl.constexpr, HEAD_DIM_V: tl.constexpr,
    MAIN: tl.constexpr, WIN: tl.constexpr, MAIN_V: tl.constexpr, WIN_V: tl.constexpr,  # WIN / WIN_V 0: no window
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAVY_FIRST: tl.constexpr, AHEAD: tl.constexpr,
):
    if HEAVY_FIRST:  # causal: the query tiles with the most keys launch first, every head's, then the lighter ones
        pid_m = tl.num_programs(1) - 1 - tl.program_id(1)
        pid_bh = tl.program_id(0)
    else:
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    hk = h // GROUP
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    q = q_desc.load([b, h, m0, 0]).reshape(BLOCK_M, MAIN)
    q2 = q
    if WIN > 0:  # the lanes past MAIN (those past the head dim zero-filled by TMA)
        q2 = qw_desc.load([b, h, m0, MAIN]).reshape(BLOCK_M, WIN)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, MAIN_V], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, WIN_V if WIN_V > 0 else 16], dtype=tl.float32)
    hi = tl.minimum(Sk, m0 + BLOCK_M) if CAUSAL else Sk  # (causal: keys past the tile's last row are never read)
    mask_row = mask_ptr + b.to(tl.int64) * stride_mb + h.to(tl.int64) * stride_mh
    if AHEAD:  # the next key tile's q k^T issued before this tile's softmax, so its products run beside the exps
        tiles = tl.cdiv(hi, BLOCK_N)
        if tiles > 0:
            s = _scores(q, q2, k_desc, kw_desc, b, hk, 0, MAIN, WIN, BLOCK_N)
            for t in range(0, tiles - 1):
                s_next = _scores(q, q2, k_desc, kw_desc, b, hk, (t + 1) * BLOCK_N, MAIN, WIN, BLOCK_N)
                m_i, l_i, acc, acc2 = _consume(s, t * BLOCK_N, m0, offs_m, m_i, l_i, acc, acc2, v_desc, vw_desc, b, hk,
                                               Sq, Sk, qk_scale, mask_row, stride_mn, CAUSAL, MASK, HEAD_DIM_V, MAIN_V,
                                               WIN_V, BLOCK_N)
                s = s_next
            m_i, l_i, acc, acc2 = _consume(s, (tiles - 1) * BLOCK_N, m0, offs_m, m_i, l_i, acc, acc2, v_desc, vw_desc, b,
                                           hk, Sq, Sk, qk_scale, mask_row, stride_mn, CAUSAL, MASK, HEAD_DIM_V, MAIN_V,
                                           WIN_V, BLOCK_N)
    else:
        for n0 in range(0, hi, BLOCK_N):
            s = _scores(q, q2, k_desc, kw_desc, b, hk, n0, MAIN, WIN, BLOCK_N)
            m_i, l_i, acc, acc2 = _consume(s, n0, m0, offs_m, m_i, l_i, acc, acc2, v_desc, vw_desc, b, hk, Sq, Sk,
                                           qk_scale, mask_row, stride_mn, CAUSAL, MASK, HEAD_DIM_V, MAIN_V, WIN_V, BLOCK_N)
    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # no key at all (Sk = 0): zeros, as attention.py gives
    base = out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om
    rows = offs_m[:, None] < Sq
    tl.store(base + tl.arange(0, MAIN_V)[None, :] * stride_od, (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=rows)
    if WIN_V > 0:
        lanes_v = MAIN_V + tl.arange(0, WIN_V)
        tl.store(base + lanes_v[None, :] * stride_od, (acc2 / l_i[:, None]).to(out_ptr.dtype.element_ty),
                 mask=rows & (lanes_v[None, :] < HEAD_DIM_V))


def _boxes(d: int) -> tuple[int, int] | None:
    """(main lanes, window lanes; 0: none) of a head dim, or None where this kernel does not take it."""
    if d > MAX_HEAD_DIM or d < 16:
        return None
    if d & (d - 1) == 0:
        return d, 0
    return split_widths(d)


def forms(q, v, mask=None) -> list[dict]:
    """The kernel's loop forms worth timing for these operands, as config keys to add to each config: ``{}`` (q k^T
    issued, waited for, then the softmax) and ``AHEAD`` at one-box head dims without a mask (the next tile's q k^T runs
    beside this tile's exps). Compiled for sm_90 (triton 3.6): with a window box (head dim 72) or a mask's row loads,
    AHEAD's next product is waited for before the exps, so it is not offered there."""
    (_, win), (_, win_v) = _boxes(q.shape[-1]), _boxes(v.shape[-1])
    return [{}] if win or win_v or mask is not None else [{}, {"AHEAD": True}]


def supported(q, k, v, mask=None, k_scale=None, v_scale=None, softcap=None) -> str | None:
    """None where ``attention`` takes these operands, else why not (one line)."""
    if k_scale is not None or v_scale is not None or softcap:
        return "a quantized KV cache or soft-capping (the template's and SDPA's)"
    if q.dtype not in DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        return f"dtype {q.dtype} (float16 / bfloat16 only)"
    if not (q.dim() == k.dim() == v.dim() == 4):
        return "q, k, v must be 4-d [B, H, S, D]"
    if q.shape[-1] != k.shape[-1] or k.shape[:-1] != v.shape[:-1] or q.shape[0] != k.shape[0] or q.shape[1] % k.shape[1]:
        return f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}"
    if _boxes(q.shape[-1]) is None or _boxes(v.shape[-1]) is None:
        return f"head dims {q.shape[-1]} / {v.shape[-1]}"
    try:
        mask4 = expanded_mask(mask, q, tuple(q.shape[:-1]) + k.shape[-2:-1])
    except ValueError as e:
        return str(e).removeprefix("attention: ")
    if mask4 is not None and mask4.stride(2) != 0 and q.shape[2] > 1:
        return "a mask that differs between query rows (the template's and SDPA's: its [M, N] tiles spill this kernel)"
    size = q.element_size()
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.stride(-1) != 1 or any(s <= 0 or s * size % 16 for s in t.stride()[:-1]) or t.data_ptr() % 16:
            return f"{name}'s strides {tuple(t.stride())} / base: TMA wants a unit inner stride, 16-byte aligned others"
    if not INTERPRET and (q.device.type != "cuda" or _capability(q.device) < (9, 0)):
        return "TMA needs a Hopper (sm_90) or newer GPU"
    return None


def attention(q, k, v, causal: bool = False, scale: float | None = None, out: torch.Tensor | None = None,
              config: dict | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``softmax(q @ k^T * scale + mask) @ v`` (causal: query i attends keys j <= i), q [B, Hq, Sq, D], k [B, Hk, Sk, D],
    v [B, Hk, Sk, Dv], Hq a multiple of Hk (grouped query heads); ``mask`` bool (True = attend) or a bias of q's dtype
    broadcasting to [B, Hq, Sq, Sk] (both it and ``causal`` apply; a row with nothing attended gives zeros, as
    attention.py's); ``out`` [B, Hq, Sq, Dv] given or made. ``config``: BLOCK_M, BLOCK_N, num_warps, num_stages
    (``configs``), optionally AHEAD (``forms``). Raises ValueError where ``supported`` says no."""
    if out is None:  # (the launcher checks the operands)
        out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device)
    launcher(q, k, v, causal, scale, out, config, mask)()
    return out


def launcher(q, k, v, causal: bool, scale: float | None, out: torch.Tensor, config: dict | None = None,
             mask: torch.Tensor | None = None) -> Callable[[], None]:
    """``attention`` into ``out`` as a call with no arguments: the operands checked and their descriptors made once (a
    plan's buffers stay where they are)."""
    why = supported(q, k, v, mask)
    if why is not None:
        raise ValueError(f"attention_tma: {why}")
    (bq, hq, sq, d), (hk, sk, dv) = q.shape, v.shape[1:]
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (bq, hq, sq, dv) or out.dtype != q.dtype:
        got = f"{out.dtype}{list(out.shape)}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"attention_tma: out {got} must be {q.dtype}{[bq, hq, sq, dv]}")
    if out.numel() == 0:
        return lambda: None
    c = dict(config or (INTERPRET_CONFIG if INTERPRET else configs()[0]))
    (main, win), (main_v, win_v) = _boxes(d), _boxes(dv)

    def desc(t, rows, lanes):
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, lanes])
    boxes = [desc(q, c["BLOCK_M"], main), desc(k, c["BLOCK_N"], main), desc(v, c["BLOCK_N"], main_v),
             desc(q, c["BLOCK_M"], win or main), desc(k, c["BLOCK_N"], win or main), desc(v, c["BLOCK_N"], win_v or main_v)]
    qk_scale = (d ** -0.5 if scale is None else float(scale)) * LOG2E
    mask4 = expanded_mask(mask, q, (bq, hq, sq, sk))
    heavy_first = bool(causal) and HEAVY_FIRST
    grid = (bq * hq, triton.cdiv(sq, c["BLOCK_M"])) if heavy_first else (triton.cdiv(sq, c["BLOCK_M"]), bq * hq)
    kind = "none" if mask4 is None else "bool" if mask4.dtype == torch.uint8 else "bias"
    mask_args = (q, 0, 0, 0) if mask4 is None else (mask4, mask4.stride(0), mask4.stride(1), mask4.stride(3))
    return functools.partial(
        _tma_attention_kernel[grid], *boxes, out, *out.stride(), hq, hq // hk, sq, sk,
        qk_scale, *mask_args, CAUSAL=bool(causal), MASK=kind, HEAD_DIM_V=dv, MAIN=main, WIN=win, MAIN_V=main_v,
        WIN_V=win_v, BLOCK_M=c["BLOCK_M"], BLOCK_N=c["BLOCK_N"], HEAVY_FIRST=heavy_first, AHEAD=bool(c.get("AHEAD")),
        num_warps=c["num_warps"],
        num_stages=c["num_stages"])


def configs() -> list[dict]:
    """The launch configurations worth timing, as plain dicts, the best guess first."""
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s) for m, n, w, s in CONFIGS]
