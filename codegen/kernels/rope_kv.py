"""RoPE of q and k and the KV-cache write of k and v, as one kernel: a Llama layer's decode work between the QKV
GEMM and attention.

    q_out                   = q * cos + rotate_half(q) * sin                    q [B, H, T, D]
    k_cache[b, kvh, slot_t] = k * cos + rotate_half(k) * sin                    k [B, KV, T, D]
    v_cache[b, kvh, slot_t] = v                                                 v [B, KV, T, D]

with rotate_half(x) = concat(-x[D/2:], x[:D/2]), cos / sin [B, 1, T, D] (shared by every head) and the cache slots
``slots`` [T]. kiln's ops are ROPE(q), ROPE(k) and two INDEX_COPY(cache, 2, slots, .) along the slot axis: four launches
that each move a few KB at decode, so their time is launch latency. Here one program owns one (row b, token t, head)
of the H + KV heads: a q head ropes its D values into q_out; a kv head ropes k into k_cache and copies v into
v_cache at slot ``slots[t]``. Each half of the head dimension is loaded once: out[:D/2] = x1 cos1 - x2 sin1 and
out[D/2:] = x2 cos2 + x1 sin2 (x1, x2 the two halves).

Every tensor is addressed through its strides: q / k / v are views into the fused QKV GEMM's output, cos / sin
broadcast over the heads with stride 0. The products are computed in float32 and rounded once to the output's dtype.

``norms`` (Qwen3's and Gemma 3's q_norm / k_norm, ``schedule.rope_norm``): q and / or k are first RMS-normalised over
each head's D values (times a [D] weight, if any), in float32 and rounded to their dtype as the RMSNORM kernel would
store them (Gemma 3's float32 weight: exactly its form, one rounding after the weight); then roped as above. One launch
where the step had three.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ...ir.ops import index_copy, rmsnorm_ref
from ...ir.ops_fused import rotate_half
from . import pdl
from .pdl import gdc


@triton.jit
def _rope_row(src, stride_s, dst, stride_d, cos1, cos2, sin1, sin2, offs, mask, HALF, w_ptr, eps,
              NORM: tl.constexpr, WEIGHT: tl.constexpr):
    # one head's D values: dst[:D/2] = x1 cos1 - x2 sin1, dst[D/2:] = x2 cos2 + x1 sin2, rounded once to dst's dtype
    x1 = tl.load(src + offs * stride_s, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + (offs + HALF) * stride_s, mask=mask, other=0.0).to(tl.float32)
    if NORM:  # RMSNORM over the head first (masked lanes are 0), rounded to the dtype its kernel would store
        rstd = tl.rsqrt((tl.sum(x1 * x1, axis=0) + tl.sum(x2 * x2, axis=0)) / (2 * HALF) + eps)
        x1, x2 = x1 * rstd, x2 * rstd
        if WEIGHT:
            x1 = x1 * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            x2 = x2 * tl.load(w_ptr + offs + HALF, mask=mask, other=0.0).to(tl.float32)
        x1 = x1.to(dst.dtype.element_ty).to(tl.float32)
        x2 = x2.to(dst.dtype.element_ty).to(tl.float32)
    tl.store(dst + offs * stride_d, (x1 * cos1 - x2 * sin1).to(dst.dtype.element_ty), mask=mask)
    tl.store(dst + (offs + HALF) * stride_d, (x2 * cos2 + x1 * sin2).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, slots_ptr, qo_ptr, kc_ptr, vc_ptr, qw_ptr, kw_ptr,
    T, H, HALF, eps_q, eps_k,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_cb, stride_ct, stride_cd,  # cos and sin share their strides
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_kcb, stride_kch, stride_kcs, stride_kcd,
    stride_vcb, stride_vch, stride_vcs, stride_vcd,
    BLOCK_HALF: tl.constexpr,
    NORM_Q: tl.constexpr = False, WEIGHT_Q: tl.constexpr = False,  # q RMS-normalised first (with a weight)
    NORM_K: tl.constexpr = False, WEIGHT_K: tl.constexpr = False,
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (pdl.py)
):
    gdc(PDL)
    # grid (B * T, H + KV): program (b * T + t, head); heads [0, H) are q's, [H, H + KV) k's and v's
    bt = tl.program_id(0)
    head = tl.program_id(1)
    b = bt // T
    t = bt % T
    offs = tl.arange(0, BLOCK_HALF)
    mask = offs < HALF
    c_row = b * stride_cb + t * stride_ct
    cos1 = tl.load(cos_ptr + c_row + offs * stride_cd, mask=mask, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + c_row + (offs + HALF) * stride_cd, mask=mask, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + c_row + offs * stride_cd, mask=mask, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + c_row + (offs + HALF) * stride_cd, mask=mask, other=0.0).to(tl.float32)
    if head < H:
        _rope_row(q_ptr + b * stride_qb + head * stride_qh + t * stride_qt, stride_qd,
                  qo_ptr + b * stride_ob + head * stride_oh + t * stride_ot, stride_od, cos1, cos2, sin1, sin2, offs, mask, HALF,
                  qw_ptr, eps_q, NORM_Q, WEIGHT_Q)
    else:
        kvh = head - H
        slot = tl.load(slots_ptr + t)
        _rope_row(k_ptr + b * stride_kb + kvh * stride_kh + t * stride_kt, stride_kd,
                  kc_ptr + b * stride_kcb + kvh * stride_kch + slot * stride_kcs, stride_kcd, cos1, cos2, sin1, sin2, offs, mask, HALF,
                  kw_ptr, eps_k, NORM_K, WEIGHT_K)
        # v: a plain copy of both halves
        src = v_ptr + b * stride_vb + kvh * stride_vh + t * stride_vt
        dst = vc_ptr + b * stride_vcb + kvh * stride_vch + slot * stride_vcs
        v1 = tl.load(src + offs * stride_vd, mask=mask, other=0.0)
        v2 = tl.load(src + (offs + HALF) * stride_vd, mask=mask, other=0.0)
        tl.store(dst + offs * stride_vcd, v1.to(vc_ptr.dtype.element_ty), mask=mask)
        tl.store(dst + (offs + HALF) * stride_vcd, v2.to(vc_ptr.dtype.element_ty), mask=mask)


def check(q, k, v, cos, sin, slots, q_out, k_cache, v_cache, norms=None) -> str | None:
    """Why ``rope_kv`` cannot take these operands (None: it can). Shapes as in the module docstring; ``norms``: per q
    and k, None or (weight [D] or None, eps)."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q_out.shape != q.shape:
        return f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)}, q_out {list(q_out.shape)}: want 4-d, v and k alike"
    B, H, T, D = q.shape
    if k.shape[0] != B or k.shape[2] != T or k.shape[3] != D or D % 2:
        return f"k {list(k.shape)} does not match q {list(q.shape)} (or head_dim is odd)"
    if cos.shape != sin.shape or cos.dim() != 4 or cos.shape[1] != 1 or cos.shape[0] not in (1, B) or tuple(cos.shape[2:]) != (T, D):
        return f"cos / sin {list(cos.shape)}, {list(sin.shape)}: want [B or 1, 1, T, D] = [{B}, 1, {T}, {D}]"
    if cos.stride() != sin.stride():
        return "cos and sin have different strides"
    want = (B, k.shape[1], D)
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or (c.shape[0], c.shape[1], c.shape[3]) != want:
            return f"{name} {list(c.shape)}: want [{B}, {k.shape[1]}, S, {D}]"
    if slots.shape != (T,) or slots.dtype not in (torch.int32, torch.int64):
        return f"slots {list(slots.shape)} {slots.dtype}: want [{T}] int32 / int64"
    if len({q.device, k.device, v.device, cos.device, slots.device, q_out.device, k_cache.device, v_cache.device}) != 1:
        return "operands on different devices"
    for name, n in zip("qk", norms or ()):
        w = None if n is None else n[0]
        if w is not None and (w.shape != (D,) or w.stride() != (1,) or w.device != q.device):
            return f"{name}'s norm weight {list(w.shape)} on {w.device}: want [{D}], contiguous, on {q.device}"
    return None


def rope_kv(q, k, v, cos, sin, slots, q_out, k_cache, v_cache, norms=None) -> None:
    """q_out = ROPE(q, cos, sin); k_cache[:, :, slots] = ROPE(k, cos, sin); v_cache[:, :, slots] = v (in place, one
    launch). q [B, H, T, D], k / v [B, KV, T, D], cos / sin [B or 1, 1, T, D], slots [T], caches [B, KV, S, D].
    ``norms``: per q and k, None or (weight [D] or None, eps): RMSNORM over each head before RoPE."""
    reason = check(q, k, v, cos, sin, slots, q_out, k_cache, v_cache, norms)
    if reason:
        raise ValueError(f"rope_kv: {reason}")
    B, H, T, D = q.shape
    if B * T == 0:
        return
    cb = cos.stride(0) if cos.shape[0] > 1 else 0
    nargs, nmeta = norm_args(norms, q)
    _rope_kv_kernel[(B * T, H + k.shape[1])](
        q, k, v, cos, sin, slots, q_out, k_cache, v_cache, *nargs[:2],
        T, H, D // 2, *nargs[2:],
        *q.stride(), *k.stride(), *v.stride(),
        cb, cos.stride(2), cos.stride(3),
        *q_out.stride(), *k_cache.stride(), *v_cache.stride(),
        BLOCK_HALF=triton.next_power_of_2(D // 2), **nmeta, **pdl.kwargs(q),
    )


def norm_args(norms, placeholder: torch.Tensor) -> tuple[tuple, dict]:
    """The kernels' arguments for ``norms`` (per q and k, None or (weight or None, eps)): (q's weight, k's weight, q's
    eps, k's eps), ``placeholder`` for an absent weight (never read), and the NORM_Q / WEIGHT_Q / NORM_K / WEIGHT_K
    constexprs (this kernel's and ``decode_attention``'s with ``rope=``)."""
    nq, nk = norms or (None, None)
    weights = tuple(n[0] if n is not None and n[0] is not None else placeholder for n in (nq, nk))
    eps = tuple(float(n[1]) if n is not None else 0.0 for n in (nq, nk))
    meta = dict(NORM_Q=nq is not None, WEIGHT_Q=nq is not None and nq[0] is not None, NORM_K=nk is not None,
                WEIGHT_K=nk is not None and nk[0] is not None)
    return (*weights, *eps), meta


def _norm_ref(x: torch.Tensor, norm) -> torch.Tensor:
    """RMSNORM(x, weight) by its reference; a float32 weight on 16-bit x (Gemma 3's form: x cast to float32, normalised,
    weighted, cast back) applied before the one rounding."""
    if norm is None:
        return x
    w, eps = norm
    if w is not None and w.dtype == torch.float32 and x.dtype != torch.float32:
        return (rmsnorm_ref([x.float(), w], {"eps": eps, "dims": 1})).to(x.dtype)
    return rmsnorm_ref([x] + [w for w in (w,) if w is not None], {"eps": eps, "dims": 1})


def reference(q, k, v, cos, sin, slots, q_out, k_cache, v_cache, norms=None) -> None:
    """``rope_kv`` by torch ops (kiln's RMSNORM, ROPE and INDEX_COPY references): what the fused kernel replaces."""
    nq, nk = norms or (None, None)
    q, k = _norm_ref(q, nq), _norm_ref(k, nk)
    q_out.copy_(q * cos + rotate_half(q) * sin)
    index_copy(k_cache, 2, slots, (k * cos + rotate_half(k) * sin).to(k_cache.dtype), inplace=True)
    index_copy(v_cache, 2, slots, v.to(v_cache.dtype), inplace=True)
