"""Split-KV (FlashDecoding) attention for LLM decode: a few query rows against a long KV cache.

    out = softmax(q @ k^T * scale, masked) @ v        q [B, Hq, Sq, D] (Sq = 1..16), k, v [B, Hk, S, D]

A decode step has one query row per head (a few with speculative tokens), so ``attention``'s grid of
query tiles x heads is B * Hq programs: 32 for a batch-1 Llama step, a quarter of an H100. Here the key
sequence is cut into ``splits`` chunks and two kernels run:

  partial  grid (B * Hk, splits). One program takes one kv head, ALL G = Hq / Hk query heads of its group
           and all Sq rows: a [G * Sq, D] query tile, so every K / V tile it loads serves the whole group
           (Llama's 32 / 8 heads read the cache once, not four times). It walks its chunk BLOCK_N keys at
           a time with the online softmax of ``attention.py`` and writes the unnormalised float32 partials
           acc [B, Hq, Sq, splits, D], m and l [B, Hq, Sq, splits] to scratch; m is kept in log2 units
           (scale * log2(e) folded into one multiplier, ``exp2`` instead of ``exp``).
  reduce   grid (B * Hq * Sq,). M = max_s m_s, L = sum_s l_s * 2^(m_s - M), out = sum_s acc_s * 2^(m_s - M) / L.
With one split the partial kernel stores acc / l itself (what the reduce makes of one split, bit for bit): one
launch. The kernels plan offers that form ("kiln-decode-whole") beside the split ones where the cache is short.
Given counters (int32, one per (b, kv head), planned zero and left zero), several splits reduce in one launch too:
each program counts itself in after storing its partials, and the last of a kv head's splits reduces that group's
rows with the reduce kernel's code ("kiln-decode-last" in the plan).

With ``rope`` (``ROPE``) the kernel also does the layer's work before it (``rope_kv.py``'s, bit for bit): q is read unroped
and roped in registers, and each new token's key (roped) and value are written into the caches at its slot by the one
program of its (b, kv head) whose chunk holds that slot, before that program reads its chunk (a CTA barrier orders the
stores before its own loads; no other program reads the slot in this launch). So RoPE, the cache writes, the splits and
their reduction are one launch a layer. With ``rope``'s norms (Qwen3's q_norm / k_norm, ``rope_kv.py``'s ``norms``) q and
the new keys are first RMS-normalised over each head, as that kernel does (to its float32 rounding: the row's squares
summed in another order).

A quantized KV cache (``ir/kv_quant.py``: int8 or float8 e4m3 codes, one float32 scale per (row, kv head, slot))
is read as codes plus scales, each K / V tile dequantized in registers as ATTENTION's reference does,
``(codes.float32 * scale).to(q.dtype)``: the cache's bytes are read once, nothing dequantized reaches memory.

Only the keys that can be attended are read. The cache holds S = max_seq slots, but a generator at step t has
written t of them: each program first scans its group's mask rows (SCAN_M x SCAN_N bytes a step, a small fraction
of the K / V bytes) for n = 1 + the last key any of its G * Sq rows attends (no mask: n = S), and the splits cut
n, not S:  chunk = ceil(ceil(n / splits) / BLOCK_N) * BLOCK_N,  keys [split * chunk, min((split + 1) * chunk, n)).
The length must be read on the device, from the mask: a decode step replays from a CUDA graph, whose launches (grid,
arguments) were fixed at capture while the mask changes every step. So the grid keeps the ``splits`` programs
planned from S; a split past n runs no key step and stores the empty partial. Every program of one (b, kv head)
finds the same n, so the counters and the one-split store need nothing more. A 4096-slot cache 200 tokens in reads
200 slots of K / V a step, not 4096 (keys before n stay masked by the mask: left padding).

Masked keys (the bool mask is False, True = attend) contribute nothing. A chunk whose keys are all masked
for a row, or that lies past n, leaves m = -inf, l = 0, acc = 0 and weighs nothing in the reduce; a row with
EVERY key masked (or S = 0) gives zeros, not NaN, the convention of ``attention.py`` (L = 0 is replaced by 1).

Head dims 1..256 (64, 72, 96, 128, 256 in practice): BLOCK_D is the next power of two >= D (at least 16,
the smallest ``tl.dot`` depth), the padding lanes masked to zero: D = 72 runs as 128 wide. The group tile
is padded the same way: BLOCK_M = next power of two >= G * Sq, at least 16 (G * Sq <= 128).

Round trips. At batch 1 the kernel moves a few KB, so its chain of dependent loads after its PDL wait counts; the code
is ordered so that loads which do not depend on each other leave together (read in the SASS: Triton for sm_90, ptxas,
cuobjdump): q, its rope operands and the first new key and value before the length scan (whose cross-warp reductions
are barriers nothing after them is hoisted over); the scan in one tile without a loop where S fits it; each key tile's
mask loaded a tile ahead, beside its K / V (in the loop it came after the pipeline's wait for them); the last program's
partials, m, l and acc, in one load (``_reduce_rows``, one pass). In the plan's form (EARLY, one key tile a split) ~5
trips after the wait where there were 8. Measured on the H200 (bench/NOTES.md, session 33; 1B, 384 slots): alone 9.57 ->
8.58 us cold, 5.79 -> 5.63 warm; in the decode step (everything in L2) ~unchanged, ~5.4 us a layer after the qkv GEMV
ends: there the kernel's own work (its reductions' barriers on 16 x 32 tiles) and its wait's release cost more.

The scratch is allocated per call with ``torch.empty``; under CUDA graph capture that memory comes from
the graph's pool, so a captured decode step replays without allocating.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import pdl
from . import rope_kv as trk
from .attention import check_operands, online_softmax_step, softcapped
from .pdl import gdc
from .skinny import scratch_view

# triton.jit picks the interpreter from this variable when the kernels below are defined; read it then too
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_ROWS = 128  # G * Sq: the group tile's rows; a taller query belongs to ``attention``
LOG2E = 1.4426950408889634
H100_SMS = 132
CHUNK_ALIGN = 64  # GPU chunks are whole multiples of this: every tuned BLOCK_N divides it
REDUCE_BLOCK_S = 16  # splits the reduce loads per step
REDUCE_TILE = 8192  # float32 partials the last program's reduce holds at once: [rows, REDUCE_BLOCK_S, BLOCK_D]
# mask bytes a program loads per step of its length scan ([SCAN_M rows, SCAN_N keys]): a decode step's mask rows
# (Sq = 1, broadcast over the heads) scan 4096 keys a step, 32 a thread; the interpreter scans 45 keys in steps of 16
SCAN_TILE = 64 if INTERPRET else 4096

# the interpreter is slow per program and per key step: small key tiles, so a 45-key test cache already
# spans three chunks and a partial one
INTERPRET_CONFIG = dict(BLOCK_N=16)


@triton.jit
def _decode_partial_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, ks_ptr, vs_ptr, acc_ptr, m_ptr, l_ptr,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ksb, stride_ksh, stride_ksn, stride_vsb, stride_vsh, stride_vsn,  # the scales [B, Hk, S] of quantized k / v
    Hq, Hk, GROUP, Sq, S, SPLITS, HEAD_DIM, qk_scale,  # qk_scale = scale * log2(e)
    out_ptr, stride_ob, stride_oh, stride_om, stride_od,  # DIRECT / REDUCE_LAST: the output [B, Hq, Sq, D]
    cnt_ptr,  # REDUCE_LAST: int32 counters, one per (b, kv head), zero before and after each call
    # ROPE: q is this step's unroped q; its k / v [B, Hk, Sq, D] are roped and written into the caches at ``slots`` here
    cos_ptr, sin_ptr, stride_cb, stride_ct, stride_cd,  # [B or 1, 1, Sq, D], one set of strides for both
    kn_ptr, stride_knb, stride_knh, stride_knt, stride_knd, vn_ptr, stride_vnb, stride_vnh, stride_vnt, stride_vnd,
    slots_ptr,
    qw_ptr, kw_ptr, eps_q, eps_k,  # ROPE with NORM_Q / NORM_K: q's / the new keys' RMSNORM over each head first
    HAS_MASK: tl.constexpr, K_SCALED: tl.constexpr, V_SCALED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SCAN_M: tl.constexpr = 16, SCAN_N: tl.constexpr = 16,  # HAS_MASK: the mask tile [SCAN_M rows, SCAN_N keys] scanned
    SCAN_ONCE: tl.constexpr = False,  # HAS_MASK: S <= SCAN_N, the scan one tile
    DIRECT: tl.constexpr = False,  # one split: the normalised output stored here, no partials and no reduce launch
    REDUCE_LAST: tl.constexpr = False,  # the last program of a (b, kv head) to finish reduces its group's rows
    BLOCK_S: tl.constexpr = 16,  # REDUCE_LAST: the splits the reduce loads per step (as _decode_reduce_kernel's)
    REDUCE_ROWS: tl.constexpr = 1,  # REDUCE_LAST: the rows it reduces at once (``_reduce_tile``)
    ROPE: tl.constexpr = False,  # RoPE of q and k and the cache writes of k and v first (``rope=``)
    NORM_Q: tl.constexpr = False, WEIGHT_Q: tl.constexpr = False,  # (ROPE) q RMS-normalised first (with a weight)
    NORM_K: tl.constexpr = False, WEIGHT_K: tl.constexpr = False,
    EARLY: tl.constexpr = False,  # (ROPE) the mask scan and the first K / V tile before the PDL wait (``early=``)
    PDL: tl.constexpr = False,  # launched with programmatic dependent launch (pdl.py)
    SOFTCAP: tl.constexpr = 0.0,  # the scaled scores t soft-capped to c * tanh(t / c) (Gemma 2; 0: as they are)
):
    gdc(PDL and not EARLY)
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // Hk).to(tl.int64)  # int64 base offsets: B * H * S * D may pass 2**31
    hk = (pid_bh % Hk).to(tl.int64)
    # row r of the group tile is query head hk * G + r // Sq, query row r % Sq
    rows = tl.arange(0, BLOCK_M)
    valid_r = rows < GROUP * Sq
    h = hk * GROUP + rows // Sq  # [BLOCK_M]
    i = rows % Sq
    offs_d = tl.arange(0, BLOCK_D)
    valid_d = offs_d < HEAD_DIM
    k_base = k_ptr + b * stride_kb + hk * stride_kh
    v_base = v_ptr + b * stride_vb + hk * stride_vh
    ks_base = ks_ptr + b * stride_ksb + hk * stride_ksh
    vs_base = vs_ptr + b * stride_vsb + hk * stride_vsh
    mask_rows = mask_ptr + b * stride_mb + h * stride_mh + i * stride_mm  # [BLOCK_M] row starts

    mask_group = mask_ptr + b * stride_mb + hk * GROUP * stride_mh  # the group's first mask row
    c_b = b * stride_cb
    kn_b = kn_ptr + b * stride_knb + hk * stride_knh
    vn_b = vn_ptr + b * stride_vnb + hk * stride_vnh
    # the keys 0 .. n_keys - 1 that any row of the group may attend, cut into SPLITS chunks of whole BLOCK_N steps;
    # the keys past n_keys are never read (a split past them runs no step and stores the empty partial).
    # EARLY: the length and the chunk's first K / V tile while the previous kernel may still run (its keys were written
    # by earlier steps; this step's, written below, are patched in). Else placeholders, never read
    if EARLY:
        n_keys, chunk = _keys_and_chunk(mask_group, stride_mh, stride_mm, stride_mn, GROUP, Sq, S, SPLITS, HAS_MASK, SCAN_M,
                                        SCAN_N, SCAN_ONCE, BLOCK_N)
        offs_n0 = split * chunk + tl.arange(0, BLOCK_N)
        valid_n0 = offs_n0 < tl.minimum(split * chunk + chunk, n_keys)
        kt0, v0 = _kv_tiles(k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_n0, valid_n0, offs_d, valid_d)
        keep0 = _keep(mask_rows, offs_n0, valid_n0, valid_r, stride_mn, HAS_MASK)  # (the mask: no kernel writes it)
        gdc(PDL)

    # q (roped) and this step's first new key and value (roped, not yet stored) before the length scan: the scan's
    # reductions synchronise the warps, so their loads leave with the scan's, one round trip from L2 after the wait
    q_rows = q_ptr + b * stride_qb + h[:, None] * stride_qh + i[:, None] * stride_qm  # [BLOCK_M, 1]
    q = tl.load(q_rows + offs_d[None, :] * stride_qd, mask=valid_r[:, None] & valid_d[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    if ROPE:  # as kernels/rope_kv.py computes it: float32, rounded once to q's dtype
        c_rows = c_b + i[:, None] * stride_ct
        q = _roped(q, q_rows, stride_qd, cos_ptr + c_rows, sin_ptr + c_rows, stride_cd, offs_d[None, :], HEAD_DIM,
                   valid_r[:, None] & valid_d[None, :], qw_ptr, eps_q, NORM_Q, WEIGHT_Q, 1).to(q.dtype)
        slot_0, k_0, v_0 = _new_key(cos_ptr + c_b, sin_ptr + c_b, stride_ct, stride_cd, kn_b, stride_knt, stride_knd, vn_b,
                                    stride_vnt, stride_vnd, slots_ptr, 0, Sq, HEAD_DIM, offs_d, valid_d, kw_ptr, eps_k,
                                    NORM_K, WEIGHT_K)
    if not EARLY:
        n_keys, chunk = _keys_and_chunk(mask_group, stride_mh, stride_mm, stride_mn, GROUP, Sq, S, SPLITS, HAS_MASK, SCAN_M,
                                        SCAN_N, SCAN_ONCE, BLOCK_N)
        offs_n0 = split * chunk + tl.arange(0, BLOCK_N)
        kt0 = tl.zeros([BLOCK_D, BLOCK_N], dtype=k_ptr.dtype.element_ty)
        v0 = tl.zeros([BLOCK_N, BLOCK_D], dtype=v_ptr.dtype.element_ty)
    lo = split * chunk
    hi = tl.minimum(lo + chunk, n_keys)
    if ROPE:
        kt0, v0 = _store_new_key(k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, slot_0, k_0, v_0, split, chunk,
                                 SPLITS, offs_d, valid_d, kt0, v0, offs_n0)
        for t in range(1, Sq):  # the other new keys (speculative rows), each loaded and stored in turn
            slot_t, k_t, v_t = _new_key(cos_ptr + c_b, sin_ptr + c_b, stride_ct, stride_cd, kn_b, stride_knt, stride_knd,
                                        vn_b, stride_vnt, stride_vnd, slots_ptr, t, Sq, HEAD_DIM, offs_d, valid_d, kw_ptr,
                                        eps_k, NORM_K, WEIGHT_K)
            kt0, v0 = _store_new_key(k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, slot_t, k_t, v_t, split,
                                     chunk, SPLITS, offs_d, valid_d, kt0, v0, offs_n0)
        tl.debug_barrier()  # the program's stores before its own loads of the chunk (no other program reads the slots)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    start = lo
    if EARLY:  # (an empty chunk's tile is all masked: it leaves m, l and acc as they are)
        m_i, l_i, acc = _kv_step(q, kt0, v0, keep0, qk_scale, m_i, l_i, acc, DOT_PRECISION, SOFTCAP)
        start = lo + BLOCK_N
    offs_n = start + tl.arange(0, BLOCK_N)
    keep_next = _keep(mask_rows, offs_n, offs_n < hi, valid_r, stride_mn, HAS_MASK)
    for start_n in range(start, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        valid_n = offs_n < hi
        kt, v = _kv_tiles(k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_n, valid_n, offs_d, valid_d)
        keep = keep_next
        keep_next = _keep(mask_rows, offs_n + BLOCK_N, offs_n + BLOCK_N < hi, valid_r, stride_mn, HAS_MASK)
        if K_SCALED:  # codes -> float32 * the key's scale -> q's dtype, in registers
            ks = tl.load(ks_base + offs_n * stride_ksn, mask=valid_n, other=0.0)
            kt = (kt.to(tl.float32) * ks[None, :]).to(q.dtype)
        if V_SCALED:
            vs = tl.load(vs_base + offs_n * stride_vsn, mask=valid_n, other=0.0)
            v = (v.to(tl.float32) * vs[:, None]).to(q.dtype)
        m_i, l_i, acc = _kv_step(q, kt, v, keep, qk_scale, m_i, l_i, acc, DOT_PRECISION, SOFTCAP)

    if DIRECT:  # what the reduce makes of one split (weight exp2(0) = 1): acc / l, l = 0 (all masked) read as 1
        l_i = tl.where(l_i == 0.0, 1.0, l_i)
        tl.store(out_ptr + b * stride_ob + h[:, None] * stride_oh + i[:, None] * stride_om + offs_d[None, :] * stride_od,
                 (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=valid_r[:, None] & valid_d[None, :])
    else:
        # scratch index of (b, h, i, split): m / l [B, Hq, Sq, SPLITS], acc [B, Hq, Sq, SPLITS, HEAD_DIM]
        part = ((b * Hq + h) * Sq + i) * SPLITS + split
        tl.store(m_ptr + part, m_i, mask=valid_r)
        tl.store(l_ptr + part, l_i, mask=valid_r)
        tl.store(acc_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], acc, mask=valid_r[:, None] & valid_d[None, :])
        if REDUCE_LAST:
            # every warp's partials stored before the count goes up (the scalar atomic is one thread's); acq_rel:
            # releases this program's partials and acquires the others' for the last to arrive, which reduces the
            # group's G * Sq rows as the reduce kernel would, then sets the counter back to 0 for the next call
            tl.debug_barrier()
            arrived = tl.atomic_add(cnt_ptr + pid_bh, 1, sem="acq_rel")
            if arrived == tl.num_programs(1) - 1:
                for r0 in range(0, GROUP * Sq, REDUCE_ROWS):  # REDUCE_ROWS of the group's rows at once
                    r = r0 + tl.arange(0, REDUCE_ROWS)
                    _reduce_rows(acc_ptr, m_ptr, l_ptr, out_ptr, (b * Hq + hk * GROUP + r // Sq) * Sq + r % Sq,
                                 r < GROUP * Sq, stride_ob, stride_oh, stride_om, stride_od, Hq, Sq, SPLITS, HEAD_DIM,
                                 BLOCK_S, BLOCK_D)
                tl.store(cnt_ptr + pid_bh, 0)


@triton.jit
def _roped(x, src, stride_x, cos, sin, stride_c, offs, HEAD_DIM, mask, w_ptr, eps, NORM: tl.constexpr,
           WEIGHT: tl.constexpr, AXIS: tl.constexpr):
    # RoPE of the head-dim lanes ``offs`` of x (loaded from src + offs * stride_x) in float32: x cos - x[+D/2] sin in the
    # first half, x cos + x[-D/2] sin in the second, the expressions of rope_kv.py's, so the same bits once rounded.
    # NORM: x (whole heads along AXIS, masked lanes 0) RMS-normalised first, times the weight, rounded to x's dtype
    half = HEAD_DIM // 2
    low = offs < half
    partner = tl.where(low, offs + half, offs - half)
    xp = tl.load(src + partner * stride_x, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(cos + offs * stride_c, mask=mask, other=0.0).to(tl.float32)
    s = tl.load(sin + offs * stride_c, mask=mask, other=0.0).to(tl.float32)
    xf = x.to(tl.float32)
    if NORM:
        rstd = tl.rsqrt(tl.sum(xf * xf, axis=AXIS, keep_dims=True) / HEAD_DIM + eps)
        xf, xp = xf * rstd, xp * rstd
        if WEIGHT:
            xf = xf * tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            xp = xp * tl.load(w_ptr + partner, mask=mask, other=0.0).to(tl.float32)
        xf, xp = xf.to(x.dtype).to(tl.float32), xp.to(x.dtype).to(tl.float32)
    return tl.where(low, xf * c - xp * s, xf * c + xp * s)


@triton.jit
def _kv_tiles(k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_n, valid_n, offs_d, valid_d):
    # the k^T tile [BLOCK_D, BLOCK_N] and the v tile [BLOCK_N, BLOCK_D] of keys offs_n: padded head lanes and keys past
    # the chunk load 0 and add nothing to the dots
    kt = tl.load(k_base + offs_d[:, None] * stride_kd + offs_n[None, :] * stride_kn,
                 mask=valid_d[:, None] & valid_n[None, :], other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=valid_n[:, None] & valid_d[None, :], other=0.0)
    return kt, v


@triton.jit
def _keep(mask_rows, offs_n, valid_n, valid_r, stride_mn, HAS_MASK: tl.constexpr):
    # which of the keys offs_n each row attends [BLOCK_M, BLOCK_N] (padding rows none): the mask's tile. The callers
    # load it a tile ahead, beside the K / V tiles (in the loop it would come after the pipeline's wait for them: a
    # round trip more)
    keep = valid_r[:, None] & valid_n[None, :]
    if HAS_MASK:
        keep = keep & (tl.load(mask_rows[:, None] + offs_n[None, :] * stride_mn, mask=keep, other=0) != 0)
    return keep


@triton.jit
def _kv_step(q, kt, v, keep, qk_scale, m_i, l_i, acc, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr):
    # one key tile of the group's online softmax (scores in log2 units, soft-capped, masked keys -inf)
    s = softcapped(tl.dot(q, kt.to(q.dtype), input_precision=DOT_PRECISION) * qk_scale, SOFTCAP)  # [BLOCK_M, BLOCK_N]
    s = tl.where(keep, s, float("-inf"))
    return online_softmax_step(s, v.to(q.dtype), m_i, l_i, acc, DOT_PRECISION)


@triton.jit
def _new_key(cos_b, sin_b, stride_ct, stride_cd, kn, stride_knt, stride_knd, vn, stride_vnt, stride_vnd, slots_ptr, t, Sq,
             HEAD_DIM, offs_d, valid_d, kw_ptr, eps_k, NORM_K: tl.constexpr, WEIGHT_K: tl.constexpr):
    # new key t (< Sq: the host launches nothing for Sq = 0) of one (b, kv head): its slot, the key roped (float32) and
    # the value, loaded by every program of the group (a few hundred bytes from L2)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    src = kn + t * stride_knt
    k = tl.load(src + offs_d * stride_knd, mask=valid_d, other=0.0)
    k = _roped(k, src, stride_knd, cos_b + t * stride_ct, sin_b + t * stride_ct, stride_cd, offs_d, HEAD_DIM, valid_d,
               kw_ptr, eps_k, NORM_K, WEIGHT_K, 0)
    v = tl.load(vn + t * stride_vnt + offs_d * stride_vnd, mask=valid_d, other=0.0)
    return slot, k, v


@triton.jit
def _store_new_key(k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, slot, k, v, split, chunk, SPLITS, offs_d,
                   valid_d, kt0, v0, offs_n0):
    # one new key and value stored at their slot by the program whose chunk of keys holds it, so that no other program
    # of this launch reads it (a slot past the attended keys, read by none, goes to the chunk it would fall in, or the
    # last); the caller's barrier then makes the stores visible to the program's own loads. Returns the chunk's first
    # K / V tiles (keys offs_n0, loaded before: EARLY) with the key and value in their slot's column
    if tl.minimum(slot // tl.maximum(chunk, 1), SPLITS - 1) == split:
        tl.store(k_base + slot * stride_kn + offs_d * stride_kd, k.to(k_base.dtype.element_ty), mask=valid_d)
        tl.store(v_base + slot * stride_vn + offs_d * stride_vd, v.to(v_base.dtype.element_ty), mask=valid_d)
        kt0 = tl.where((offs_n0 == slot)[None, :], k.to(kt0.dtype)[:, None], kt0)
        v0 = tl.where((offs_n0 == slot)[:, None], v.to(v0.dtype)[None, :], v0)
    return kt0, v0


@triton.jit
def _keys_and_chunk(mask_group, stride_mh, stride_mm, stride_mn, GROUP, Sq, S, SPLITS, HAS_MASK: tl.constexpr,
                    SCAN_M: tl.constexpr, SCAN_N: tl.constexpr, SCAN_ONCE: tl.constexpr, BLOCK_N: tl.constexpr):
    # n_keys, 1 + the last key any of the group's rows attends (the mask scanned: ``_attended_length``; else all S), and
    # the chunk of them a split takes: whole BLOCK_N steps
    n_keys = S
    if HAS_MASK:
        n_keys = _attended_length(mask_group, stride_mh, stride_mm, stride_mn, GROUP, Sq, S, SCAN_M, SCAN_N, SCAN_ONCE)
    return n_keys, tl.cdiv(tl.cdiv(n_keys, SPLITS), BLOCK_N) * BLOCK_N


@triton.jit
def _attended_length(mask_group, stride_mh, stride_mm, stride_mn, GROUP, Sq, S, SCAN_M: tl.constexpr, SCAN_N: tl.constexpr,
                     SCAN_ONCE: tl.constexpr = False):
    # 1 + the last key any of the group's G * Sq rows attends (0: none). mask_group: the group's first row [S]. The host
    # makes SCAN_M cover the rows that may differ: all G * Sq, or the first Sq of a mask broadcast over the heads
    rows = tl.arange(0, SCAN_M)
    scanned = rows < GROUP * Sq
    row_ptrs = mask_group + (rows // Sq) * stride_mh + (rows % Sq) * stride_mm  # [SCAN_M]
    offs = tl.arange(0, SCAN_N)
    if SCAN_ONCE:  # S <= SCAN_N: one tile, no loop (whose control flow would keep later loads behind this one's)
        attend = tl.load(row_ptrs[:, None] + offs[None, :] * stride_mn, mask=scanned[:, None] & (offs < S)[None, :],
                         other=0) != 0
        return tl.max(tl.max(tl.where(attend, offs[None, :] + 1, 0), 0), 0)
    n_keys = tl.zeros([SCAN_N], dtype=tl.int32)  # per key lane: 1 + the last attended key seen there
    for start in range(0, S, SCAN_N):
        offs_n = start + offs
        attend = tl.load(row_ptrs[:, None] + offs_n[None, :] * stride_mn,
                         mask=scanned[:, None] & (offs_n < S)[None, :], other=0) != 0  # [SCAN_M, SCAN_N]
        n_keys = tl.maximum(n_keys, tl.max(tl.where(attend, offs_n[None, :] + 1, 0), 0))
    return tl.max(n_keys, 0)


@triton.jit
def _reduce_rows(acc_ptr, m_ptr, l_ptr, out_ptr, rows, live_r, stride_ob, stride_oh, stride_om, stride_od, Hq, Sq, SPLITS,
                 HEAD_DIM, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # the output rows ``rows`` [R] = (b * Hq + h) * Sq + i (those with ``live_r``) from their SPLITS partials, all R at
    # once: a [R, BLOCK_S, BLOCK_D] tile of partials a step, summed over the splits. Each row's sums run in the same
    # order whatever R is, so the reduce kernel (a row a program) and the last program of a split (its group's rows)
    # store the same bits. The loads bypass L1 (.cg): the partials were written by other programs (other SMs)
    i = rows % Sq
    h = (rows // Sq) % Hq
    b = rows // (Sq * Hq)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    valid_d = offs_d < HEAD_DIM
    base = rows * SPLITS  # [R]

    # one pass: each step's m, l and acc loaded together (one round trip from L2 a step; the two-pass form before session
    # 33 read the m's first, then the l's and acc's they selected: two), merged into running ones as the online softmax
    # does. A split past the attended keys (m = -inf, l = 0, acc = 0) weighs exp2(-inf) = 0 and adds zeros. At most
    # BLOCK_S splits (the 1B's 12 at a short cache) are one step, the two-pass form's sums bit for bit (the running terms
    # start at -inf / 0); more (32 at 4096 slots) merge step by step
    m_run = tl.full([rows.shape[0]], float("-inf"), dtype=tl.float32)
    l_run = tl.zeros([rows.shape[0]], dtype=tl.float32)
    acc = tl.zeros([rows.shape[0], BLOCK_D], dtype=tl.float32)
    for s0 in range(0, SPLITS, BLOCK_S):
        offs = s0 + offs_s
        part = base[:, None] + offs[None, :]  # [R, BLOCK_S]
        live = live_r[:, None] & (offs < SPLITS)[None, :]
        m_s = tl.load(m_ptr + part, mask=live, other=float("-inf"), cache_modifier=".cg")
        l_s = tl.load(l_ptr + part, mask=live, other=0.0, cache_modifier=".cg")
        a = tl.load(acc_ptr + part[:, :, None] * HEAD_DIM + offs_d[None, None, :],
                    mask=live[:, :, None] & valid_d[None, None, :], other=0.0, cache_modifier=".cg")  # [R, BLOCK_S, BLOCK_D]
        m_new = tl.maximum(m_run, tl.max(m_s, 1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # every key so far masked: all weights 0
        alpha = tl.math.exp2(m_run - m_ref)
        w = tl.math.exp2(m_s - m_ref[:, None])
        l_run = l_run * alpha + tl.sum(l_s * w, 1)
        acc = acc * alpha[:, None] + tl.sum(a * w[:, :, None], 1)
        m_run = m_new
    big_l = tl.where(l_run == 0.0, 1.0, l_run)  # fully masked row: acc is 0, the output row is 0
    tl.store(out_ptr + (b * stride_ob + h * stride_oh + i * stride_om)[:, None] + offs_d[None, :] * stride_od,
             (acc / big_l[:, None]).to(out_ptr.dtype.element_ty), mask=live_r[:, None] & valid_d[None, :])


@triton.jit
def _decode_reduce_kernel(
    acc_ptr, m_ptr, l_ptr, out_ptr,
    stride_ob, stride_oh, stride_om, stride_od,
    Hq, Sq, SPLITS, HEAD_DIM,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
    PDL: tl.constexpr = False,
):
    gdc(PDL)
    rows = tl.program_id(0).to(tl.int64) + tl.arange(0, 1)  # one row a program
    _reduce_rows(acc_ptr, m_ptr, l_ptr, out_ptr, rows, rows >= 0, stride_ob, stride_oh, stride_om, stride_od,
                 Hq, Sq, SPLITS, HEAD_DIM, BLOCK_S, BLOCK_D)


def _config(bn, warps, stages):
    return triton.Config(dict(BLOCK_N=bn), num_warps=warps, num_stages=stages)


# H100, memory bound: a program streams its chunk of K / V once; a few stages keep loads in flight, 8 warps
# suit the wide (D = 128 / 256, G * Sq = 64+) tiles, 2 the batch-1 step's short chunks (fewer warps for the reductions
# to cross: lower_attention.DECODE_CONFIGS). Every BLOCK_N divides CHUNK_ALIGN.
CONFIGS = [
    _config(64, 4, 2),
    _config(64, 4, 3),
    _config(32, 4, 3),
    _config(32, 2, 3),
    _config(64, 8, 3),
]


@functools.cache
def _tuned():
    # built on first GPU use: an Autotuner asks for the active driver, which the CPU interpreter lacks.
    # Benchmarking reruns only the partial kernel, which writes nothing but scratch.
    return triton.autotune(CONFIGS, key=["S", "SPLITS", "GROUP", "Sq", "HEAD_DIM", "HAS_MASK", "K_SCALED", "V_SCALED", "ROPE", "EARLY"])(
        _decode_partial_kernel)


def configs() -> list[dict]:
    """The launch configurations the autotuner tries for the partial kernel, as plain dicts."""
    return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in CONFIGS]


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return H100_SMS  # the interpreter: plan as the H100 would
    return torch.cuda.get_device_properties(device).multi_processor_count


def default_splits(B: int, Hk: int, S: int, block_n: int, sms: int = H100_SMS) -> int:
    """How many chunks to cut S keys into: B * Hk * splits close to 2 programs per SM, each chunk a whole number
    (>= 1) of BLOCK_N steps. At most cdiv(2 * sms, B * Hk) chunks of equal step counts, so rounding may land a
    little under (Llama-3.2-1B, batch 1, 4096 keys: 8 kv heads x 32 chunks of 128 = 256 programs, not 264).
    Big batches get 1: they fill the GPU already and need no reduce."""
    blocks = max(1, triton.cdiv(S, block_n))  # BLOCK_N steps in the cache
    want = triton.cdiv(2 * sms, B * Hk)
    per = triton.cdiv(blocks, min(want, blocks))  # steps per chunk
    return triton.cdiv(blocks, per)


def _chunking(S: int, splits: int, block_n: int) -> tuple[int, int]:
    """``(splits, chunk)`` of all S keys: chunks round up to whole BLOCK_N steps, so fewer may be needed (S = 45,
    BLOCK_N = 16, splits = 4 runs 3 chunks of 16). The grid launches that many splits; each program cuts the
    attended length the same way on the device (the module docstring)."""
    chunk = triton.cdiv(triton.cdiv(S, splits), block_n) * block_n
    return triton.cdiv(S, chunk), chunk


def _scan_tile(mask4: torch.Tensor | None, group: int, sq: int) -> dict:
    """The mask tile the length scan loads: rows of one group that may differ (Sq when the mask is broadcast over
    the heads, else G * Sq), as many keys as keep it SCAN_TILE bytes."""
    if mask4 is None:
        return {}
    rows = triton.next_power_of_2(sq if mask4.stride(1) == 0 else group * sq)
    keys = max(16, SCAN_TILE // rows)
    return dict(SCAN_M=rows, SCAN_N=keys, SCAN_ONCE=mask4.shape[-1] <= keys)


def _check(q, k, v, mask, scale, gqa, out, config, splits, k_scale, v_scale):
    """Validate the operands; returns the group size and the mask expanded (stride 0, no copy) to the scores
    [B, Hq, Sq, S] as uint8, or None."""
    check_operands("decode_attention", q, k, v, mask, out, k_scale, v_scale)
    if not (q.dim() == k.dim() == v.dim() == 4):
        raise ValueError(f"decode_attention: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} must all be "
                         f"4-d (q [B, Hq, Sq, D], k / v [B, Hk, S, D])")
    if k.shape != v.shape:
        raise ValueError(f"decode_attention: k {tuple(k.shape)} and v {tuple(v.shape)} must have one shape")
    (bq, hq, sq, d), (bk, hk, sk, dk) = q.shape, k.shape
    if dk != d:
        raise ValueError(f"decode_attention: q {tuple(q.shape)} and k {tuple(k.shape)} differ in head dim")
    if bk != bq:
        raise ValueError(f"decode_attention: k {tuple(k.shape)} has batch {bk}, q {tuple(q.shape)} has {bq}")
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"decode_attention: head dim {d} must lie in 1..{MAX_HEAD_DIM}")
    if gqa:
        if hk == 0 or hq % hk:
            raise ValueError(f"decode_attention: {hq} query heads do not group over {hk} kv heads")
    elif hq != hk:
        raise ValueError(f"decode_attention: q has {hq} heads, k / v have {hk}; pass gqa=True for grouped-query attention")
    group = hq // hk if hk else 1
    if group * sq > MAX_ROWS:
        raise ValueError(f"decode_attention: {group} heads per group x {sq} query rows = {group * sq} rows exceed "
                         f"{MAX_ROWS}; use attention() for long queries")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale)):
        raise ValueError(f"decode_attention: scale must be a finite number or None, got {scale!r}")
    if splits is not None and not (isinstance(splits, int) and splits >= 1):
        raise ValueError(f"decode_attention: splits must be a positive int or None, got {splits!r}")
    if config is not None:
        bn = config.get("BLOCK_N") if isinstance(config, dict) else None
        if not (isinstance(bn, int) and bn >= 16 and bn & (bn - 1) == 0):
            raise ValueError(f"decode_attention: config {config!r} needs BLOCK_N, a power of two >= 16")
    scores = (bq, hq, sq, sk)
    if mask is not None:
        if mask.dtype != torch.bool:
            raise ValueError(f"decode_attention: mask dtype {mask.dtype} must be bool (True = attend)")
        try:
            fits = mask.dim() <= 4 and tuple(torch.broadcast_shapes(mask.shape, scores)) == scores
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"decode_attention: mask {tuple(mask.shape)} does not broadcast to the scores {scores}")
        mask = mask.expand(scores).view(torch.uint8)  # same bytes; a uint8 pointer is the portable way to pass bools
    if out is not None and tuple(out.shape) != tuple(q.shape):
        raise ValueError(f"decode_attention: out {tuple(out.shape)} must have q's shape {tuple(q.shape)}")
    if INTERPRET:
        if q.dtype == torch.bfloat16:
            raise ValueError("decode_attention: the Triton interpreter computes tl.dot on bfloat16 wrongly; "
                             "use float16/float32 on CPU")
    elif q.device.type != "cuda":
        raise ValueError(f"decode_attention: q is on {q.device}; the kernels need CUDA tensors "
                         f"(or TRITON_INTERPRET=1 on CPU)")
    return group, mask


def decode_attention(q, k, v, mask=None, scale=None, gqa=False, out=None, config: dict | None = None,
                     splits: int | None = None, k_scale=None, v_scale=None, direct: bool = True,
                     counters: torch.Tensor | None = None, rope: tuple | None = None, early: bool = False,
                     softcap: float | None = None) -> torch.Tensor:
    """``softmax(q @ k^T * scale, mask) @ v`` for a few query rows over a long cache, split along the keys
    (see the module docstring).

    q [B, Hq, Sq, D]; k, v [B, Hk, S, D]. ``gqa``: Hq = G * Hk, query head h reads kv head h // G; without it
    Hq == Hk. ``mask``: bool (True = attend) broadcastable to [B, Hq, Sq, S], typically [B, 1, Sq, S]; None
    attends everything; rows with no key attended give zeros. ``scale`` None: 1 / sqrt(D). float16 /
    bfloat16 / float32, float32 accumulation; the output has q's dtype and shape (``out`` may be given, any
    strides; it must not overlap q, k or v). ``config``: one launch configuration of the partial kernel
    (BLOCK_N, num_warps, num_stages; see ``configs``) run without the autotuner. ``splits``: how many key
    chunks (None: ``default_splits``); chunks round up to whole BLOCK_N steps, so fewer may run; they cut the keys up
    to the last one the mask attends, the rest never read. ``k_scale`` / ``v_scale``: float32 [B, Hk, S] scales of
    a quantized k / v (int8 or float8_e4m3fn codes, ``ir/kv_quant.py``), each tile dequantized in registers. Where
    one split runs, the partial kernel stores the output itself: one launch, the same bits as partial + reduce
    (``direct`` False: the two launches anyway, for tests). ``counters``: a
    contiguous int32 / uint8 tensor of at least ``counter_bytes`` bytes, zero, that the call leaves zero: several
    splits then reduce in one launch too (the last program of each kv head's splits reduces its rows). ``rope``:
    (k_new, v_new, cos, sin, slots[, norms]), this step's keys and values [B, Hk, Sq, D], cos / sin [B or 1, 1, Sq, D],
    the cache slots [Sq] and ``rope_kv``'s norms (q's and k's RMSNORM over each head first): q is taken unroped and
    roped here, k_new roped and written with v_new into k / v at the slots first (``kernels/rope_kv.py``'s work, the
    same bits without norms, in this launch; 16-bit caches only). ``early`` (with ``rope``):
    under PDL, each program scans the mask and loads its chunk's first K / V tile before it waits for the previous
    kernel (the new keys patched into that tile in registers): only where nothing in the same CUDA graph writes the mask
    or the caches before this launch (a decode step's mask is its input; its caches are written here). The same bits.
    ``softcap`` c: the scaled scores t soft-capped to c * tanh(t / c) before the mask (Gemma 2; None: as they are).
    """
    group, mask4 = _check(q, k, v, mask, scale, gqa, out, config, splits, k_scale, v_scale)
    (bq, hq, sq, d), (hk, sk) = q.shape, k.shape[1:3]
    if out is None:
        out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    if sk == 0:
        return out.zero_()  # no keys: every row fully masked

    c = dict(config) if config is not None else dict(INTERPRET_CONFIG) if INTERPRET else None
    block_n = c["BLOCK_N"] if c is not None else CHUNK_ALIGN
    n_split, _ = _chunking(sk, splits or default_splits(bq, hk, sk, block_n, _sm_count(q.device)), block_n)
    one = direct and n_split == 1
    # the partials, flat (one split: never touched, one element each so that every pointer argument is a real one)
    acc = torch.empty(1 if one else bq * hq * sq * n_split * d, dtype=torch.float32, device=q.device)
    m = torch.empty(1 if one else bq * hq * sq * n_split, dtype=torch.float32, device=q.device)
    l_ = torch.empty_like(m)

    qk_scale = (1.0 / math.sqrt(d) if scale is None else float(scale)) * LOG2E
    block_d = max(16, triton.next_power_of_2(d))
    args = (q, k, v, mask4 if mask4 is not None else q, k_scale if k_scale is not None else acc,
            v_scale if v_scale is not None else acc, acc, m, l_,
            *q.stride(), *k.stride(), *v.stride(), *(mask4.stride() if mask4 is not None else (0, 0, 0, 0)),
            *(k_scale.stride() if k_scale is not None else (0, 0, 0)), *(v_scale.stride() if v_scale is not None else (0, 0, 0)),
            hq, hk, group, sq, sk, n_split, d, qk_scale, out, *out.stride())
    args_rope, meta_rope = _rope_args(rope, q, k, v, k_scale, v_scale)
    if early and rope is None:
        raise ValueError("decode_attention: early= loads the cache before the previous kernel ends, so the attention "
                         "must write this step's keys itself (rope=)")
    meta = dict(HAS_MASK=mask4 is not None, **_scan_tile(mask4, group, sq), K_SCALED=k_scale is not None, V_SCALED=v_scale is not None,
                DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
                BLOCK_M=max(16, triton.next_power_of_2(group * sq)), BLOCK_D=block_d, DIRECT=one, ROPE=rope is not None,
                EARLY=early, SOFTCAP=float(softcap or 0.0), **meta_rope, **pdl.kwargs(q))
    last = counters is not None and not one
    block_s = min(REDUCE_BLOCK_S, triton.next_power_of_2(n_split))
    if last:
        meta.update(REDUCE_LAST=True, BLOCK_S=block_s, REDUCE_ROWS=_reduce_tile(group * sq, block_s, block_d))
    args += (scratch_view("decode_attention", "counters", counters, bq * hk, torch.int32, q.device) if last else m, *args_rope)
    grid = (bq * hk, n_split)
    if c is not None:
        _decode_partial_kernel[grid](*args, **meta, **c)
    else:
        _tuned()[grid](*args, **meta)
    if one or last:
        return out
    _decode_reduce_kernel[(bq * hq * sq,)](acc, m, l_, out, *out.stride(), hq, sq, n_split, d,
                                           BLOCK_S=block_s, BLOCK_D=block_d,
                                           **pdl.kwargs(q))
    return out


def _rope_args(rope: tuple | None, q, k, v, k_scale, v_scale) -> tuple:
    """The partial kernel's RoPE arguments (cos, sin, their strides, k_new and v_new with theirs, slots) for
    ``decode_attention(..., rope=)``, checked; placeholders (never read) without it."""
    if rope is None:
        return (q, q, 0, 0, 0, q, 0, 0, 0, 0, q, 0, 0, 0, 0, q, q, q, 0.0, 0.0), {}
    if k_scale is not None or v_scale is not None:
        raise ValueError("decode_attention: rope= writes this step's keys and values into a 16-bit cache; a quantized "
                         "cache is written with its codes and scales (ir/kv_quant.py) before the attention")
    if not (isinstance(rope, (tuple, list)) and len(rope) in (5, 6)):
        raise ValueError("decode_attention: rope must be (k_new, v_new, cos, sin, slots[, norms])")
    k_new, v_new, cos, sin, slots = rope[:5]
    nq, nk = (rope[5] if len(rope) == 6 else None) or (None, None)
    reason = trk.check(q, k_new, v_new, cos, sin, slots, q, k, v, (nq, nk))
    if reason:
        raise ValueError(f"decode_attention: rope: {reason}")
    cb = cos.stride(0) if cos.shape[0] > 1 else 0
    nargs, meta = trk.norm_args((nq, nk), q)
    return (cos, sin, cb, cos.stride(2), cos.stride(3), k_new, *k_new.stride(), v_new, *v_new.stride(), slots, *nargs), meta


def _reduce_tile(rows: int, block_s: int, block_d: int) -> int:
    """How many of a group's ``rows`` the last program reduces at once: all of them (a power of two), as long as the
    [rows, BLOCK_S, BLOCK_D] float32 tile of partials stays within REDUCE_TILE elements (a few dozen registers a thread).
    One row at a time put G * Sq dependent reductions on the step's critical path: the last program of a kv head
    finishes after every other, and at batch 16 that form ran 3.4% slower in the step than partial + reduce (session 19)."""
    r = triton.next_power_of_2(rows)
    while r > 1 and r * block_s * block_d > REDUCE_TILE:
        r //= 2
    return r


def counter_bytes(batch: int, kv_heads: int) -> int:
    """Bytes of the int32 counters ``decode_attention(..., counters=)`` needs: one per (batch row, kv head)."""
    return 4 * batch * kv_heads


def reference(q, k, v, mask=None, scale=None, gqa=False, k_scale=None, v_scale=None) -> torch.Tensor:
    """torch SDPA in float32 (float64 for float64 operands), rows with no key attended set to 0 (the kernels'
    convention; torch versions differ there); quantized k / v dequantized in that dtype. Returns the wide dtype."""
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    k = k.to(wide) * k_scale.to(wide)[..., None] if k_scale is not None else k
    v = v.to(wide) * v_scale.to(wide)[..., None] if v_scale is not None else v
    q, k, v = q.to(wide), k.to(wide), v.to(wide)
    if gqa and q.shape[1] != k.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if mask is not None:
        out = torch.where(mask.any(-1, keepdim=True), out, 0.0)
    elif k.shape[2] == 0:
        out = torch.zeros_like(out)
    return out
