"""Flash attention: kiln's ``ATTENTION`` op as one Triton template.

    out = softmax(q @ k^T * scale + bias, -1) @ v        q [B, Hq, Sq, D], k [B, Hk, Sk, D], v [B, Hk, Sk, Dv]

One program owns BLOCK_M query rows of one (batch, head) and walks the keys BLOCK_N at a time with an
online softmax (running row max m, running denominator l, float32 accumulator rescaled as m grows), so
the [Sq, Sk] score matrix never reaches memory. Scores are kept in log2 units (scale * log2(e) folded
into one multiplier, ``exp2`` instead of ``exp``), as in the Triton fused-attention tutorial.

Variants are constexpr switches of the ONE kernel below:
  CAUSAL   the upper-left-aligned triangle of torch SDPA's ``is_causal``: query i attends keys j <= i.
           Key blocks wholly above the diagonal are never loaded; blocks wholly below it skip the
           triangle test (the loop runs in two ranges, the tutorial's split).
  MASK     "none" | "bool" (True = attend) | "bias" (added to the scaled scores; -inf = masked). The
           mask may be anything that broadcasts to [B, Hq, Sq, Sk]: the launcher expands it (stride 0
           on broadcast dims, no copy), so a [B, 1, 1, Sk] padding mask costs one row of memory.
  GQA      query head h reads kv head h // (Hq // Hk); a kv head count of 1 also broadcasts (stride 0).
  K_SCALED / V_SCALED  k / v is a quantized KV cache (``ir/kv_quant.py``: int8 / float8 e4m3 codes, a float32
           scale per vector [B, Hk, Sk]); each tile is dequantized in registers as ATTENTION's reference does,
           ``(codes.float32 * scale).to(q.dtype)``.

Head dims. BLOCK_D is the next power of two >= D (at least 16, the smallest ``tl.dot`` depth), with
the padding lanes masked to zero. D <= 256; v may have its own Dv. SPLIT: q k^T over a head dim between powers
of two runs as a power-of-two part and a tail of 16 or 32 lanes (``split_widths``), two dots: D = 72 (DiT-XL,
PixArt) as 64 + 16 lanes, where the padded tile is 128. p v keeps one tile padded to BLOCK_DV unless SPLIT_V: split
the same way with masked tail lanes (64..79 of 72) it came out wrong (64 + 16) or faulted (64 + 32) under triton 3.6 on
the H200 (session 10), correct under the interpreter. SPLIT_V instead reads v's tail as a window of BLOCK_DVT lanes
ending at the head dim (D = 72: lanes 56..71), every lane of it a real one (no head-dim mask), into a second
accumulator; the store writes from it only the lanes past the main tile (64..71). It compiled right on an H100 (triton
3.6, session 37: every config at DiT / PixArt shapes against float32) and ran 8-35% faster than the padded p v at every
shape (bench/attn.py); on by default (``SPLIT_V``, ``attention``'s split_v).

Fully masked rows (every key masked by the bool mask, -inf bias, or Sk = 0) give ZEROS, not NaN: the
running max stays -inf, p = exp2(s - 0) = 0 and l = 0 is replaced by 1 at the end. torch 2.13's SDPA
returns zeros for such rows on the CPU as well (bool and -inf float masks alike); older torch
versions and some fused GPU backends return NaN there, so tests compare only non-degenerate masks
against SDPA and check the zero rows on their own.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from ...ir.ops import OPS

# triton.jit picks the interpreter from this variable when the kernel below is defined; read it then too
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CODE_DTYPES = (torch.int8, torch.float8_e4m3fn)  # a quantized KV cache's codes (ir/kv_quant.py)
SPLIT_V = True  # p v over a head dim like 72 as two tiles by default (module docstring; ``attention``'s split_v)
MAX_HEAD_DIM = 256  # q / k / v tiles of wider heads do not fit the H100's shared memory at useful block sizes
LOG2E = 1.4426950408889634

# the interpreter is slow per program and per key step: one small config; the test shapes still span
# several query and key tiles, so the boundary masks and the causal split are exercised
INTERPRET_CONFIG = dict(BLOCK_M=16, BLOCK_N=16)


@triton.jit
def _attention_inner(
    acc, acc2, l_i, m_i, q, q2,  # acc [BLOCK_M, BLOCK_DV] fp32, l_i / m_i [BLOCK_M] fp32 (log2 units), q [BLOCK_M, BLOCK_D]
    # (SPLIT_V: acc2 [BLOCK_M, BLOCK_DVT] the lanes of v's tail window)
    k_base, v_base, mask_base, ks_base, vs_base,  # (SPLIT: q2 q's tail lanes [BLOCK_M, BLOCK_DT])
    offs_m, lo, hi, Sq, Sk, HEAD_DIM, HEAD_DIM_V, qk_scale,
    stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_ksn, stride_vsn,
    APPLY_CAUSAL: tl.constexpr, MASK: tl.constexpr, K_SCALED: tl.constexpr, V_SCALED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_DT: tl.constexpr, SOFTCAP: tl.constexpr, SPLIT_V: tl.constexpr, BLOCK_DVT: tl.constexpr,
):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_t = BLOCK_D + tl.arange(0, BLOCK_DT)  # SPLIT: the tail lanes of q and k
    offs_vt = HEAD_DIM_V - BLOCK_DVT + tl.arange(0, BLOCK_DVT)  # SPLIT_V: v's tail window, every lane a real one
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid_n = offs_n < Sk
        if K_SCALED:
            k_scale = tl.load(ks_base + offs_n * stride_ksn, mask=valid_n, other=0.0)
        # k^T tile [BLOCK_D, BLOCK_N]: padded head lanes load 0 and add nothing to the dot
        kt = tl.load(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                     mask=(offs_d[:, None] < HEAD_DIM) & valid_n[None, :], other=0.0)
        if K_SCALED:  # codes -> float32 * the key's scale -> q's dtype, in registers
            kt = (kt.to(tl.float32) * k_scale[None, :]).to(q.dtype)
        s = tl.dot(q, kt, input_precision=DOT_PRECISION)
        if SPLIT:
            kt2 = tl.load(k_base + offs_t[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                          mask=(offs_t[:, None] < HEAD_DIM) & valid_n[None, :], other=0.0)
            if K_SCALED:
                kt2 = (kt2.to(tl.float32) * k_scale[None, :]).to(q.dtype)
            s = tl.dot(q2, kt2, s, input_precision=DOT_PRECISION)
        s = softcapped(s * qk_scale, SOFTCAP)  # [BLOCK_M, BLOCK_N], log2 units
        keep = valid_n[None, :]
        if APPLY_CAUSAL:
            keep = keep & (offs_n[None, :] <= offs_m[:, None])
        s = masked_scores(s, keep, mask_base, offs_m, offs_n, Sq, Sk, stride_mm, stride_mn, MASK)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=valid_n[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)  # [BLOCK_N, BLOCK_DV]
        if V_SCALED:
            v_scale = tl.load(vs_base + offs_n * stride_vsn, mask=valid_n, other=0.0)
            v = (v.to(tl.float32) * v_scale[:, None]).to(q.dtype)
        if SPLIT_V:
            v2 = tl.load(v_base + offs_n[:, None] * stride_vn + offs_vt[None, :] * stride_vd, mask=valid_n[:, None],
                         other=0.0)  # [BLOCK_N, BLOCK_DVT]
            if V_SCALED:
                v2 = (v2.to(tl.float32) * v_scale[:, None]).to(q.dtype)
            m_i, alpha, p, l_i = online_weights(s, m_i, l_i)  # (online_softmax_step's, with two accumulators)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
            acc2 = tl.dot(p.to(v.dtype), v2, acc2 * alpha[:, None], input_precision=DOT_PRECISION)
        else:
            m_i, l_i, acc = online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION)
    return acc, acc2, l_i, m_i


@triton.jit
def softcapped(s, SOFTCAP: tl.constexpr):
    """Scores ``s`` in log2 units (t * log2(e)) soft-capped, c * tanh(t / c) (Gemma 2's attention; SOFTCAP = c, 0: as
    they are), tanh(x) as 2 * sigmoid(2 x) - 1. Shared with decode_attention.py."""
    if SOFTCAP > 0:
        cap = SOFTCAP * 1.4426950408889634  # c in log2 units
        s = (2.0 * tl.sigmoid(2.0 * (s / cap)) - 1.0) * cap
    return s


@triton.jit
def masked_scores(s, keep, mask_base, offs_m, offs_n, Sq, Sk, stride_mm, stride_mn, MASK: tl.constexpr,
                  MASK_ROWS: tl.constexpr = True):
    """Scores ``s`` [M, N] (log2 units) with the user's mask applied and -inf where ``keep`` [M, N] is False. MASK
    "bool": the mask's False masks too; "bias": the bias (natural units) added. MASK_ROWS False: the mask is the same
    for every query row (stride_mm 0, a [B, 1, 1, Sk] padding mask): one row of it loaded, [1, N], not an [M, N] tile of
    pointers (which costs the TMA kernel ~130 registers a thread and spills). Shared with attention_tma.py."""
    if MASK != "none":
        if MASK_ROWS:
            m_ptrs = mask_base + offs_m[:, None] * stride_mm + offs_n[None, :] * stride_mn
            m_in = (offs_m[:, None] < Sq) & (offs_n[None, :] < Sk)
        else:
            m_ptrs = (mask_base + offs_n * stride_mn)[None, :]
            m_in = (offs_n < Sk)[None, :]
        if MASK == "bool":
            keep = keep & (tl.load(m_ptrs, mask=m_in, other=0) != 0)
        else:  # (a finite bias stays finite in log2 units: HF's dtype-minimum padding bias would overflow to -inf,
            # and a row masked by it all would give zeros where the formula averages v; -inf stays -inf)
            bias = tl.load(m_ptrs, mask=m_in, other=0.0).to(tl.float32)
            s += tl.where(bias == float("-inf"), bias, tl.maximum(bias, -2.35e38) * 1.4426950408889634)
    return tl.where(keep, s, float("-inf"))


@triton.jit
def online_weights(s, m_i, l_i):
    """The online softmax's weights for one key tile: scores ``s`` [M, N] in log2 units (-inf where not attended), the
    running max ``m_i`` and sum ``l_i`` [M]; returns the new max, the factor ``alpha`` [M] the accumulator is rescaled
    by, the tile's weights ``p`` [M, N] and the new sum. Shared with attention_tma.py."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # a row with nothing attended so far has m_new = -inf: subtract 0 instead, so p = 0 and alpha = 0, no NaN
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_sub)
    p = tl.math.exp2(s - m_sub[:, None])
    return m_new, alpha, p, l_i * alpha + tl.sum(p, 1)


@triton.jit
def online_softmax_step(s, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """One key tile of the online softmax: scores ``s`` [M, N] in log2 units (-inf where not attended), values
    ``v`` [N, D]; returns the running max, sum and float32 accumulator. Shared with decode_attention.py."""
    m_new, alpha, p, l_i = online_weights(s, m_i, l_i)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _attention_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, out_ptr, ks_ptr, vs_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_ksb, stride_ksh, stride_ksn, stride_vsb, stride_vsh, stride_vsn,  # the scales [B, Hk, Sk] of quantized k / v
    H, GROUP,  # query heads; query heads per kv head
    Sq, Sk, HEAD_DIM, HEAD_DIM_V, qk_scale,  # qk_scale = scale * log2(e)
    CAUSAL: tl.constexpr, MASK: tl.constexpr, K_SCALED: tl.constexpr, V_SCALED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    SPLIT: tl.constexpr, BLOCK_DT: tl.constexpr, SOFTCAP: tl.constexpr = 0.0,
    SPLIT_V: tl.constexpr = False, BLOCK_DVT: tl.constexpr = 16,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64 base offsets: B * H * S * D may pass 2**31
    h = (pid_bh % H).to(tl.int64)
    hk = h // GROUP
    q_base = q_ptr + b * stride_qb + h * stride_qh
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    mask_base = mask_ptr + b * stride_mb + h * stride_mh
    ks_base = ks_ptr + b * stride_ksb + hk * stride_ksh
    vs_base = vs_ptr + b * stride_vsb + hk * stride_vsh
    out_base = out_ptr + b * stride_ob + h * stride_oh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    offs_t = BLOCK_D + tl.arange(0, BLOCK_DT)
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < Sq) & (offs_d[None, :] < HEAD_DIM), other=0.0)  # [BLOCK_M, BLOCK_D]
    if SPLIT:  # the tail lanes [BLOCK_M, BLOCK_DT]
        q2 = tl.load(q_base + offs_m[:, None] * stride_qm + offs_t[None, :] * stride_qd,
                     mask=(offs_m[:, None] < Sq) & (offs_t[None, :] < HEAD_DIM), other=0.0)
    else:
        q2 = tl.zeros([BLOCK_M, BLOCK_DT], dtype=q.dtype)  # (unused)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_DVT], dtype=tl.float32)  # (SPLIT_V only)
    if CAUSAL:
        # keys past this block's last row are masked for every row: never loaded. Key blocks ending before
        # its first row are fully visible: no triangle test. Only the blocks between (the diagonal) pay it.
        hi = tl.minimum(Sk, start_m + BLOCK_M)
        diag = tl.minimum((start_m // BLOCK_N) * BLOCK_N, hi)
        acc, acc2, l_i, m_i = _attention_inner(
            acc, acc2, l_i, m_i, q, q2, k_base, v_base, mask_base, ks_base, vs_base, offs_m, 0, diag, Sq, Sk, HEAD_DIM, HEAD_DIM_V,
            qk_scale, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_ksn, stride_vsn,
            False, MASK, K_SCALED, V_SCALED, DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV, SPLIT, BLOCK_DT, SOFTCAP, SPLIT_V,
            BLOCK_DVT)
        acc, acc2, l_i, m_i = _attention_inner(
            acc, acc2, l_i, m_i, q, q2, k_base, v_base, mask_base, ks_base, vs_base, offs_m, diag, hi, Sq, Sk, HEAD_DIM, HEAD_DIM_V,
            qk_scale, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_ksn, stride_vsn,
            True, MASK, K_SCALED, V_SCALED, DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV, SPLIT, BLOCK_DT, SOFTCAP, SPLIT_V,
            BLOCK_DVT)
    else:
        acc, acc2, l_i, m_i = _attention_inner(
            acc, acc2, l_i, m_i, q, q2, k_base, v_base, mask_base, ks_base, vs_base, offs_m, 0, Sk, Sq, Sk, HEAD_DIM, HEAD_DIM_V,
            qk_scale, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn, stride_ksn, stride_vsn,
            False, MASK, K_SCALED, V_SCALED, DOT_PRECISION, BLOCK_N, BLOCK_D, BLOCK_DV, SPLIT, BLOCK_DT, SOFTCAP, SPLIT_V,
            BLOCK_DVT)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)  # fully masked rows: acc is 0, the output row is 0 (module docstring)
    out = acc / l_i[:, None]
    tl.store(out_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < Sq) & (offs_dv[None, :] < HEAD_DIM_V))
    if SPLIT_V:  # the window's lanes past the main tile
        offs_vt = HEAD_DIM_V - BLOCK_DVT + tl.arange(0, BLOCK_DVT)
        tl.store(out_base + offs_m[:, None] * stride_om + offs_vt[None, :] * stride_od,
                 (acc2 / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < Sq) & (offs_vt[None, :] >= BLOCK_DV))


def _config(bm, bn, warps, stages):
    return triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=warps, num_stages=stages)


# H100 (sm_90, mma.sync). Prefill / DiT: the tutorial's 128 x 64 tile with 4 or 8 warps, plus smaller tiles
# for short sequences (DiT-XL/2 at batch 1 has 16 heads x 2 query blocks of 128: too few programs for 132
# SMs) and for D = 256, whose 128-row q tile with 3 stages overflows shared memory (such configs fail to
# compile and the autotuner drops them). Short query (decode / chunked prefill): thin row tiles.
LONG_Q_CONFIGS = [
    _config(128, 64, 4, 3),
    _config(128, 64, 8, 3),
    _config(128, 32, 4, 3),
    _config(128, 128, 8, 2),
    _config(64, 64, 4, 3),
    _config(64, 128, 4, 2),
    _config(64, 32, 4, 2),
]
SHORT_Q_CONFIGS = [
    _config(16, 64, 4, 3),
    _config(32, 64, 4, 3),
    _config(64, 64, 4, 3),
    _config(16, 128, 4, 2),
]
SHORT_Q = 64  # Sq at or below this uses SHORT_Q_CONFIGS


@functools.cache
def _tuned(short_q: bool):
    # built on first GPU use: an Autotuner asks for the active driver, which the CPU interpreter lacks.
    # The key names the constexpr switches too, so a causal and a masked call never share a tuning entry.
    return triton.autotune(SHORT_Q_CONFIGS if short_q else LONG_Q_CONFIGS,
                           key=["Sq", "Sk", "HEAD_DIM", "HEAD_DIM_V", "CAUSAL", "MASK", "K_SCALED", "V_SCALED",
                                "SPLIT", "SPLIT_V"])(_attention_kernel)


def configs(sq: int, heads: int | None = None, sms: int | None = None) -> list[dict]:
    """The launch configurations the autotuner would try for ``sq`` query rows, as plain dicts, best guess first.
    ``heads`` (batch x query heads) and ``sms`` (the device's multiprocessors) given: where 128-row query tiles
    would leave SMs idle (DiT-XL/2 at the CFG batch of 2: 2 x 16 heads x 2 tiles = 64 programs for 132 SMs), the
    64-row tiles come first."""
    cfgs = SHORT_Q_CONFIGS if sq <= SHORT_Q else LONG_Q_CONFIGS
    if sq > SHORT_Q and heads is not None and sms is not None and triton.cdiv(sq, 128) * heads < sms:
        cfgs = sorted(cfgs, key=lambda c: c.kwargs["BLOCK_M"] != 64)  # (stable: the list's order otherwise)
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in cfgs]


def split_widths(d: int) -> tuple[int, int] | None:
    """(power-of-two lanes, tail lanes) of a q / k head dim run as two tiles (SPLIT), or None where one padded tile
    of the next power of two is no wider: D = 72 -> (64, 16), 96 -> (64, 32), 40 -> (32, 16); 64 or 24 -> None."""
    if d <= 16 or d & (d - 1) == 0:
        return None
    main = 1 << (d.bit_length() - 1)
    tail = max(16, triton.next_power_of_2(d - main))
    return (main, tail) if main + tail < triton.next_power_of_2(d) else None


def _as_4d(t: torch.Tensor) -> torch.Tensor:
    return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape)) if t.dim() < 4 else t


def check_operands(fn: str, q, k, v, mask, out, k_scale=None, v_scale=None) -> None:
    """What every attention kernel asks of its operands: tensors, a supported dtype shared by q, k, v and out (a k or
    v with a scale: int8 / float8 codes and float32 scales of its shape but the last dim), one device (``fn`` names the
    kernel in the message)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{fn}: {name} must be a tensor, got {type(t).__name__}")
    if q.dtype not in DTYPES:
        raise ValueError(f"{fn}: q has dtype {q.dtype}; supported: float16, bfloat16, float32")
    for name, t, s in (("k", k, k_scale), ("v", v, v_scale), ("out", out, None)):
        if t is not None and s is None and t.dtype != q.dtype:
            raise ValueError(f"{fn}: {name} has dtype {t.dtype}, q has {q.dtype} (q, k, v, out share one dtype)")
        if s is not None and (t.dtype not in CODE_DTYPES or s.dtype != torch.float32 or s.shape != t.shape[:-1]):
            raise ValueError(f"{fn}: a quantized {name} is int8 / float8_e4m3fn codes with float32 scales of its shape but the "
                             f"last dim; got {t.dtype}{list(t.shape)} and {s.dtype}{list(s.shape)}")
    for name, t in (("k", k), ("v", v), ("mask", mask), ("out", out), ("k_scale", k_scale), ("v_scale", v_scale)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{fn}: {name} is on {t.device}, q is on {q.device}")


def _check(q, k, v, mask, causal, scale, gqa, out, k_scale=None, v_scale=None):
    """Validate the operands; returns ``(q, k, v, mask, group, scales)`` with q, k, v, mask 4-D, k / v / mask expanded
    (stride 0, no copy) to q's batch, the kv heads and the scores [B, Hq, Sq, Sk], the scales [B, Hk, Sk] as k / v."""
    check_operands("attention", q, k, v, mask, out, k_scale, v_scale)
    if not (2 <= q.dim() <= 4 and k.dim() == q.dim() and v.dim() == q.dim()):
        raise ValueError(f"attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must share a rank "
                         f"of 2 to 4 ([B, H, S, D], [H, S, D] or [S, D])")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in head dim")
    if k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"attention: k {tuple(k.shape)} and v {tuple(v.shape)} differ before the head dim")
    if not (1 <= q.shape[-1] <= MAX_HEAD_DIM and 1 <= v.shape[-1] <= MAX_HEAD_DIM):
        raise ValueError(f"attention: head dims {q.shape[-1]} (q, k) and {v.shape[-1]} (v) must lie in 1..{MAX_HEAD_DIM}")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"attention: scale must be a finite number or None, got {scale!r}")
    q4, k4, v4 = _as_4d(q), _as_4d(k), _as_4d(v)
    (bq, hq, sq, _), (bk, hk, sk, _) = q4.shape, k4.shape
    if bk not in (bq, 1):
        raise ValueError(f"attention: k {tuple(k.shape)} has batch {bk}, q {tuple(q.shape)} has {bq}")
    group = 1
    if hk != hq and hk != 1:
        if not gqa:
            raise ValueError(f"attention: q has {hq} heads, k / v have {hk}; pass gqa=True for grouped-query attention")
        if hq % hk:
            raise ValueError(f"attention: {hq} query heads do not group over {hk} kv heads")
        group = hq // hk
    hk_expanded = hk if group > 1 else hq  # one kv head, or as many as q: expand (stride 0 when hk == 1)
    k4, v4 = k4.expand(bq, hk_expanded, sk, -1), v4.expand(bq, hk_expanded, sk, -1)
    scales = [None if t is None else t.reshape((1,) * (3 - t.dim()) + tuple(t.shape)).expand(bq, hk_expanded, sk)
              for t in (k_scale, v_scale)]
    mask = expanded_mask(mask, q, (bq, hq, sq, sk))
    if out is not None and tuple(out.shape) != tuple(q.shape[:-1]) + (v.shape[-1],):
        raise ValueError(f"attention: out {tuple(out.shape)} must have the output shape "
                         f"{tuple(q.shape[:-1]) + (v.shape[-1],)}")
    if INTERPRET:
        if q.dtype == torch.bfloat16:
            raise ValueError("attention: the Triton interpreter computes tl.dot on bfloat16 wrongly; use float16/float32 on CPU")
    elif q.device.type != "cuda":
        raise ValueError(f"attention: q is on {q.device}; the kernel needs CUDA tensors (or TRITON_INTERPRET=1 on CPU)")
    return q4, k4, v4, mask, group, scales


def expanded_mask(mask, q, scores: tuple) -> torch.Tensor | None:
    """``mask`` (bool or a bias of q's dtype) checked and expanded to the 4-d ``scores`` [B, Hq, Sq, Sk] (stride 0 on
    broadcast dims, no copy), bool viewed as uint8 (the portable way to pass bools); ValueError if it does not fit."""
    if mask is None:
        return None
    if mask.dtype != torch.bool and mask.dtype != q.dtype:
        raise ValueError(f"attention: mask dtype {mask.dtype} must be bool or q's {q.dtype}")
    try:
        fits = mask.dim() <= q.dim() and tuple(torch.broadcast_shapes(mask.shape, scores)) == scores
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"attention: mask {tuple(mask.shape)} does not broadcast to the scores "
                         f"{tuple(q.shape[:-1]) + scores[-1:]}")
    mask = mask.expand(scores)
    return mask.view(torch.uint8) if mask.dtype == torch.bool else mask


def attention(q, k, v, mask=None, causal=False, scale=None, gqa=False, out=None, config: dict | None = None,
              k_scale=None, v_scale=None, split_d: bool = True, softcap: float | None = None,
              split_v: bool | None = None) -> torch.Tensor:
    """``softmax(q @ k^T * scale + mask) @ v`` in one kernel (see the module docstring).

    q [B, Hq, Sq, D]; k [B, Hk, Sk, D]; v [B, Hk, Sk, Dv] (ranks 2 and 3 drop leading dims; k / v may
    have batch 1, or one head, broadcast). ``mask``: bool (True = attend) or a bias of q's dtype,
    broadcastable to [B, Hq, Sq, Sk]. ``causal``: query i attends keys j <= i (SDPA's ``is_causal``);
    with a mask too, both apply. ``scale`` None: 1 / sqrt(D). ``gqa``: Hq = G * Hk, query head h reads
    kv head h // G. float16 / bfloat16 / float32; float32 accumulation; the output has q's dtype and
    shape [B, Hq, Sq, Dv] (``out`` may be given; it must not overlap q, k or v). ``config``: one launch
    configuration (BLOCK_M, BLOCK_N, num_warps, num_stages; see ``configs``) run without the autotuner. ``k_scale`` /
    ``v_scale``: float32 scales (k's / v's shape but the last dim) of a quantized k / v (int8 or float8_e4m3fn codes,
    ``ir/kv_quant.py``), each tile dequantized in registers. ``split_d`` False: q k^T over a head dim like 72 runs
    padded to the next power of two, not as two tiles (``split_widths``); ``split_v`` (None: ``SPLIT_V`` where
    ``split_d``) likewise p v over such a v head dim, its tail a window of real lanes. ``softcap`` c: the scaled scores t
    soft-capped to c * tanh(t / c) before the mask (Gemma 2; None: as they are).
    """
    q4, k4, v4, mask4, group, (ks, vs) = _check(q, k, v, mask, causal, scale, gqa, out, k_scale, v_scale)
    (bq, hq, sq, d), (sk, dv) = q4.shape, v4.shape[-2:]
    if out is None:
        out = torch.empty(tuple(q.shape[:-1]) + (dv,), dtype=q.dtype, device=q.device)
    out4 = _as_4d(out)
    if out.numel() == 0:
        return out
    qk_scale = (1.0 / math.sqrt(d) if scale is None else float(scale)) * LOG2E
    mask_strides = mask4.stride() if mask4 is not None else (0, 0, 0, 0)
    args = (q4, k4, v4, mask4 if mask4 is not None else q4, out4, ks if ks is not None else q4, vs if vs is not None else q4,
            *q4.stride(), *k4.stride(), *v4.stride(), *mask_strides, *out4.stride(),
            *(ks.stride() if ks is not None else (0, 0, 0)), *(vs.stride() if vs is not None else (0, 0, 0)),
            hq, group, sq, sk, d, dv, qk_scale)
    kind = "none" if mask4 is None else "bool" if mask4.dtype == torch.uint8 else "bias"
    meta = dict(CAUSAL=bool(causal), MASK=kind, K_SCALED=ks is not None, V_SCALED=vs is not None,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_DV=max(16, triton.next_power_of_2(dv)),
                SPLIT=False, BLOCK_DT=16, SOFTCAP=float(softcap or 0.0))
    split = split_widths(d) if split_d else None
    if split is not None:
        meta.update(SPLIT=True, BLOCK_D=split[0], BLOCK_DT=split[1])
    split_v = split_widths(dv) if (SPLIT_V and split_d if split_v is None else split_v) else None
    if split_v is not None:
        meta.update(SPLIT_V=True, BLOCK_DV=split_v[0], BLOCK_DVT=split_v[1])
    if INTERPRET or config is not None:
        c = dict(config or INTERPRET_CONFIG)
        _attention_kernel[(triton.cdiv(sq, c["BLOCK_M"]), bq * hq)](*args, **meta, **c)
    else:
        grid = lambda c: (triton.cdiv(sq, c["BLOCK_M"]), bq * hq)  # noqa: E731
        _tuned(sq <= SHORT_Q)[grid](*args, **meta)
    return out


def reference(q, k, v, mask=None, causal=False, scale=None, gqa=False, k_scale=None, v_scale=None,
              softcap: float | None = None) -> torch.Tensor:
    """The ATTENTION op's reference implementation (``OPS["ATTENTION"].ref``), in the operands' own dtype."""
    ins = [q, k, v] + [t for t in (mask, k_scale, v_scale) if t is not None]
    return OPS["ATTENTION"].ref(ins, dict(causal=causal, scale=scale, gqa=gqa, k_scale=k_scale is not None,
                                          v_scale=v_scale is not None, softcap=softcap))
