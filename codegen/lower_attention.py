"""The candidate implementations of an ATTENTION and of a rope_kv group (``lower.py`` has the other kernel groups'):
``(what, candidates)`` as there, each candidate a closure running the group once into the plan's buffers.

    ATTENTION  SDPA; kiln's flash kernel, and its TMA-fed form where it takes the operands (``attention_tma.py``); the
               split-KV decode kernel for few query rows over long keys (two launches, the last program of each kv
               head's splits reducing them, or one split). On a quantized KV cache both
               kernels dequantize in registers; SDPA, offered there only for many query rows (prefill), reads a planned
               scratch the cache is dequantized into first (``attention_scratch``)
    rope_kv    ROPE(q), ROPE(k) and the KV-cache writes of k and v: kiln's one-launch kernel (``kernels/rope_kv.py``);
               the two RoPE pointwise kernels then two ``index_copy_`` (roped k through a planned scratch)

A decode attention right after its rope_kv group may take that group's work over (``RopeStep``): every candidate then
runs the rope_kv call first, and the split-KV kernel also ropes q and writes the new keys itself, in its own launch
("kiln-rope-decode", "-last", "-whole"). The plan drops the rope_kv call: the tuner chose between the two launches and
one, both timed with the rope work in. Where the attention's mask is a step input (``RopeStep.early``), the fused kernel
also scans it and loads its first K / V tile before its PDL wait (``decode_attention(..., early=True)``), overlapping
them with the kernel before; a timing alone cannot see that overlap, so it is a policy (``EARLY_KV``), not a candidate.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

from ..ir.ops import attention_operands, index_copy, sdpa_mask
from .kernels import attention as ta
from .kernels import attention_tma as tta
from .kernels import decode_attention as td
from .kernels import gemm as tg
from .kernels import rope_kv as trk
from .lower import config_name, triton_ok
from .tuning import OutputCheck, launches, timed_as, with_launches

TRITON_ATTENTION_CONFIGS = 3
# the attention candidates' generation (a decision measured between older ones is measured again): 2 since q k^T over a head dim
# like 72 runs as 64 + 16 lanes (attention.split_widths), 3 configurations are tried and 64-row query tiles come first
# where 128-row ones leave SMs idle; 3 since the TMA-fed kernel is offered (TMA_ATTENTION_CONFIGS); 4 since it takes a
# padding mask and launches a causal attention's heaviest query tiles first (attention_tma.HEAVY_FIRST); 5 since its
# window lanes start at the main box's end (its products no longer serialized by ptxas at head dim 72) and it also
# tries its other loop forms; 6 since those are AHEAD alone (attention_tma.forms: the next key tile's q k^T before this
# tile's softmax; session 44's PAD_QK gave wrong results with AHEAD on the GPU)
ATTENTION_CANDIDATES = 6
# the TMA-fed kernel's configurations offered (attention_tma.configs' first; 0: not offered), where it takes the operands
# (``attention_tma.supported``: a 16-bit cache-less q / k / v, causal and / or a mask the same for every query row) and
# the queries are not decode's. Its GPU tests passed on an H100 (sessions 37-38, every config at the DiT / PixArt /
# Llama-prefill shapes, PixArt's padding mask) and it ran 1.4-1.7x the template's speed at head dim 72, 1.15-1.85x
# SDPA's + the copy but at PixArt 1024 (a tie; bench/NOTES.md); the first three cover every best.
TMA_ATTENTION_CONFIGS = 3
# the decode attention candidates' generation (in a decode attention's what; a decision measured between older ones is
# measured again): 2 since "kiln-decode-whole" exists, 3 since the kernel reads only the keys the mask attends, 4 since
# a decode decision charges each launch past a candidate's first (tuning.EXTRA_LAUNCH_MS), 5 since it is timed at the
# cache's every key too, and cold (``attention``), 6 since the last program reduces its group's rows at once and a rope_kv
# call may run in the attention's launch (``RopeStep``), 7 since a 2-warp configuration is tried too (DECODE_CONFIGS)
DECODE_CANDIDATES = 7
# the split-KV decode kernel's configurations tried (decode_attention.CONFIGS' first): the fourth, 32 keys a step on 2
# warps, measured alone on an H100 (1B, 384 slots, bench/NOTES.md, session 33) 8.80 / 4.99 us cold / warm against 8.93 /
# 5.22 for the 4-warp one the tuner has taken since session 23 (its reductions cross fewer warps); 1 warp 13.4 / 7.2
DECODE_CONFIGS = 4
# the longest cache "kiln-decode-whole" (one split, a program per kv head) is offered on: a handful of programs streaming
# the whole context alone. (The tuner times a decode attention at its prompt's keys and at the whole cache,
# ``attention``; past this length the one split does not win, and its compile is saved.) 256: at a 384-slot cache the
# tuner still took it at batch 16, timed within ~1 us of the split kernel, and the split kernel's step ran 1.7-2% faster
# (bench/NOTES.md, sessions 17-18: one process A / B); the one split's step grows with the keys past ~200
WHOLE_MAX_KEYS = 256
# (One split of one key tile of every key, a program per kv head loading all its keys at once, was tried and taken out:
# 10.1-13.6 us cold at the 1B's 384 keys against 8.9-9.7 for the forms above, never chosen; bench/NOTES.md, session 32)
# (a plan that gives counters adds "kiln-decode-last": its what says so, apart from a call without them)
# the rope-fused decode attention's mask scan and first K / V tile before its PDL wait, where the plan allows it
# (module docstring). Measured on the H200 against EARLY_KV = 0, one process (bench/NOTES.md, session 19): the 1B's
# bf16 decode 1,092 -> 1,134 tok/s at batch 1 and 14,275 -> 14,679 at batch 16, w4a16 at batch 1 1,465 -> 1,508
EARLY_KV = True


@dataclass
class RopeStep:
    """The rope_kv group a decode ATTENTION takes over: ``operands`` (q unroped, k, v, cos, sin, slots: the attention's
    cache writes), ``call`` the group's chosen implementation; ``fused``: the roped q is read by the attention alone, so
    kiln's split-KV kernel may rope it in registers and never store it; ``early``: the attention's mask is a step input
    (or none), which that kernel may read before the kernel before it ends. (The attention's tuning key describes the
    rope work, not the choice for it: while a plan's decisions are surveyed, that choice is provisional.)"""
    operands: tuple
    call: Callable[[], object]
    fused: bool
    early: bool = False
    norms: list | None = None  # the group's per-head RMSNORMs of q and k (``rope_kv``'s ``norms``; q, k: their inputs)


def _decode_fits(q, k, v, mask, causal: bool, gqa: bool, device: torch.device) -> bool:
    """Few query rows over a long key sequence (LLM decode) that the split-KV kernel handles: one program per
    kv head and key chunk; every loaded K / V tile serves the whole query group."""
    return (q.dim() == 4 and k.dim() == 4 and not causal and k.shape == v.shape and q.shape[0] == k.shape[0]
            and (mask is None or mask.dtype == torch.bool)
            and (q.shape[1] // max(k.shape[1], 1)) * q.shape[2] <= td.MAX_ROWS and q.shape[-1] <= td.MAX_HEAD_DIM
            and (gqa or q.shape[1] == k.shape[1]) and triton_ok(td.DTYPES, q.dtype, device, td.INTERPRET))


def _group_rows(q_shape: tuple, k_shape: tuple, attrs: dict) -> int:
    """The query rows one kv head serves (the split-KV kernel's group tile): Sq, times the group size with GQA."""
    return q_shape[-2] * (q_shape[-3] // k_shape[-3] if len(q_shape) >= 3 and attrs["gqa"] else 1)


def attention_scratch(q_shape: tuple, k_shape: tuple, v_shape: tuple, attrs: dict, dtype: torch.dtype,
                      device: torch.device) -> tuple | None:
    """The scratch (elements of q's dtype) that SDPA reads an ATTENTION's quantized k / v from, dequantized first;
    None when SDPA is not offered on them: no scales, or a decode shape (few query rows per kv head) that kiln's
    kernels serve reading the codes alone, where the scratch would cost a full-precision copy of the cache."""
    scaled = [s for s, on in ((k_shape, attrs.get("k_scale")), (v_shape, attrs.get("v_scale"))) if on]
    if not scaled:
        return None
    rows = _group_rows(q_shape, k_shape, attrs)
    if rows <= td.MAX_ROWS and triton_ok(ta.DTYPES, dtype, device, ta.INTERPRET):
        return None
    return (sum(math.prod(s) for s in scaled),)


def _dequantized(k, v, ks, vs, scratch: torch.Tensor | None):
    """(k, v as SDPA reads them, the call that dequantizes the quantized ones into ``scratch``)."""
    if scratch is None:
        return k, v, lambda: None
    pairs, at = [], 0
    for codes, scale in ((k, ks), (v, vs)):
        if scale is not None:
            pairs.append((codes, scale, scratch[at:at + codes.numel()].view(codes.shape)))
            at += codes.numel()

    def dequantize():  # = kv_quant.dequantize_kv: float32 product (codes exact in q's dtype) rounded once to q's dtype
        for codes, scale, buf in pairs:
            buf.copy_(codes)
            buf.mul_(scale.unsqueeze(-1))
    it = iter(p[2] for p in pairs)
    return next(it) if ks is not None else k, next(it) if vs is not None else v, dequantize


def attention_counter_bytes(q_shape: tuple, k_shape: tuple, attrs: dict, dtype: torch.dtype, device: torch.device) -> int:
    """Bytes of the counters the one-launch split-KV candidates ("kiln-decode-last") of an ATTENTION need: 0 unless it
    is a decode shape kiln's kernel takes. State like the skinny GEMMs' counters: zero when planned, left zero."""
    rows = _group_rows(q_shape, k_shape, attrs)
    if len(q_shape) != 4 or len(k_shape) != 4 or attrs["causal"] or rows > td.MAX_ROWS or q_shape[0] != k_shape[0] \
            or not triton_ok(td.DTYPES, dtype, device, td.INTERPRET):
        return 0
    return td.counter_bytes(k_shape[0], k_shape[1])


def output_check(args: list, attrs: dict, out: torch.Tensor, what: dict, keep: set,
                 counters: torch.Tensor | None = None) -> OutputCheck | None:
    """What an ATTENTION decision's candidates read and write, for the tuner's comparison of their outputs against the
    first's (SDPA's, or the template's where SDPA is not offered: ``tuning.OutputCheck``): q, k and v (none of ``keep``,
    the stored tensors and the caller's inputs: a KV cache) filled with random values, ``out``, the split-KV counters
    zeroed. None where a rope_kv group's work runs in the candidates (they write the KV cache too) or k / v are a
    quantized cache's codes."""
    q, k, v, mask, ks, vs = attention_operands(args, attrs)
    if "rope" in what or ks is not None or vs is not None:
        return None
    return OutputCheck(tuple(t for t in (q, k, v) if id(t) not in keep), out, () if counters is None else (counters,))


def causal_mask(mask: torch.Tensor, sq: int, sk: int) -> bool:
    """Whether an ATTENTION's ``mask`` (bool: True attends; float: a bias added to the scores) allows exactly what
    ``causal`` does for ``sq`` queries and ``sk`` keys (the upper-left-aligned triangle, ATTENTION's definition) in
    every row it broadcasts to: bool True on and below the diagonal and False above it, or a float 0 there and -inf
    (or the dtype's lowest value, whose exp is 0 as -inf's) above. No row of that triangle is fully masked, so the
    two compute the same softmax."""
    if mask.dim() < 2 or tuple(mask.shape[-2:]) != (sq, sk):
        return False
    keep = torch.ones(sq, sk, dtype=torch.bool, device=mask.device).tril()
    if mask.dtype == torch.bool:
        return bool(torch.equal(mask, keep.expand_as(mask)))
    if not mask.is_floating_point():
        return False
    zero, low = mask == 0, (mask == float("-inf")) | (mask == torch.finfo(mask.dtype).min)
    return bool(torch.equal(zero, keep.expand_as(mask)) and torch.equal(low, ~keep.expand_as(mask)))


def attention(args: list, attrs: dict, out: torch.Tensor, scratch: torch.Tensor | None, device: torch.device,
              counters: torch.Tensor | None = None, rope: RopeStep | None = None) -> tuple[dict, dict]:
    """An ATTENTION's candidates. ``scratch``: the ``attention_scratch`` buffer (None where it has none); ``counters``:
    the ``attention_counter_bytes`` buffer (None: no one-launch split-KV candidates). A decode attention over a bool
    mask is timed at two lengths (``tuning.timed_as``): the keys its example mask attends (a decode plan is tuned at its
    first step: the prompt's) and every key of the cache, its last step's; and cold (``"cache": "cold"``: after L2 is
    flushed, as the step reads it). The kernels read only the attended keys, so the first length alone, L2-warm,
    favoured few programs ("kiln-decode-whole": the 1B's step at batch 1 0.95 -> 1.03 ms from its first to its last
    slot of 384, where the split kernel's stays ~0.98; bench/NOTES.md, session 17). ``rope``: the rope_kv group before
    it, which every candidate then runs (module docstring)."""
    q, k, v, mask, ks, vs = attention_operands(args, attrs)
    decode = _decode_fits(q, k, v, mask, attrs["causal"], _enable_gqa(q, k, attrs["gqa"]), device)

    def over(m):  # the candidates over the mask m
        return _with_rope(rope, _attention_candidates(q, k, v, m, ks, vs, attrs, out, scratch, device, counters, decode),
                          k, v, m, attrs, out, counters, decode)
    candidates = over(mask)
    if decode and mask is not None:
        full = over(torch.ones_like(mask))
        for name, fn in candidates.items():
            timed_as(fn, partial(_in_turn, fn, full[name]), runs=2)
    what = {"op": "ATTENTION", "kiln": ATTENTION_CANDIDATES, "q": list(q.shape), "k": list(k.shape), "v": list(v.shape), "dtype": str(q.dtype),
            "strides": [list(t.stride()) for t in (q, k, v)], "causal": attrs["causal"], "scale": attrs["scale"],
            "gqa": attrs["gqa"], "mask": None if mask is None else [list(mask.shape), str(mask.dtype)]}
    if attrs.get("softcap"):
        what["softcap"] = attrs["softcap"]
    if any(name.startswith("kiln-tma") for name in candidates):
        what["tma"] = True  # (offered where the operands' bases and strides suit TMA: not in every plan of this shape)
    if decode:
        what["decode"] = DECODE_CANDIDATES
        what["cache"] = "cold"  # (timed after L2 is flushed: tuning.py)
        if counters is not None:
            what["one_launch"] = True
    if ks is not None or vs is not None:
        what["codes"] = [str(t.dtype) if s is not None else None for t, s in ((k, ks), (v, vs))]
    if rope is not None:
        what["rope"] = [rope.fused, list(rope.operands[0].shape), [list(t.stride()) for t in rope.operands[:5]]]
        if rope.norms is not None:
            what["rope"].append(_norms_key(rope.norms))
    return what, candidates


def _with_rope(rope: RopeStep | None, candidates: dict, kc, vc, mask, attrs: dict, out, counters, decode: bool) -> dict:
    """``candidates`` each after the rope_kv call (one launch more), and kiln's split-KV kernel doing that work itself
    where ``rope.fused`` (module docstring). ``candidates`` unchanged without ``rope``."""
    if rope is None:
        return candidates
    first = {name: _first(rope.call, fn) for name, fn in candidates.items()}
    if not (decode and rope.fused and trk.check(*rope.operands, rope.operands[0], kc, vc, rope.norms) is None):
        return first
    q, k, v, cos, sin, slots = rope.operands
    run = partial(td.decode_attention, q, kc, vc, mask, attrs["scale"], _enable_gqa(q, kc, attrs["gqa"]), out=out,
                  rope=(k, v, cos, sin, slots, rope.norms), early=bool(rope.early and EARLY_KV), softcap=attrs.get("softcap"))
    return first | _split_kv_candidates("kiln-rope-decode", run, kc.shape[2], counters, q.device)


def _first(call: Callable[[], object], fn: Callable[[], object]) -> Callable[[], object]:
    """``call`` then ``fn``, marked as both their launches and as running ``call`` first (``runs_first``)."""
    both = with_launches(partial(_in_turn, call, fn), launches(call) + launches(fn))
    both.runs_first = call
    return both


def runs_first(fn: Callable[[], object]) -> bool:
    """Whether an ATTENTION candidate runs the rope_kv call it took over first (False: none, or it does that work)."""
    return getattr(fn, "runs_first", None) is not None


def _enable_gqa(q: torch.Tensor, k: torch.Tensor, gqa: bool) -> bool:
    # SDPA's enable_gqa: grouped query heads, more of them than kv heads
    return bool(gqa and q.dim() >= 3 and q.shape[-3] != k.shape[-3])


def _in_turn(*fns) -> None:
    for fn in fns:
        fn()


def _attention_candidates(q, k, v, mask, ks, vs, attrs: dict, out: torch.Tensor, scratch: torch.Tensor | None,
                          device: torch.device, counters: torch.Tensor | None, decode: bool) -> dict:
    """``attention``'s candidates over ``mask`` (module docstring: SDPA, kiln's flash kernel, the split-KV kernel)."""
    causal, scale, gqa, softcap = attrs["causal"], attrs["scale"], attrs["gqa"], attrs.get("softcap")
    attn_mask, sdpa_causal = sdpa_mask(q, k, mask, causal)  # built once per plan, not per call
    enable_gqa = _enable_gqa(q, k, gqa)
    kd, vd, dequantize = _dequantized(k, v, ks, vs, scratch)

    def sdpa():
        dequantize()
        out.copy_(F.scaled_dot_product_attention(q, kd, vd, attn_mask=attn_mask, is_causal=sdpa_causal, scale=scale,
                                                 enable_gqa=enable_gqa))

    # (SDPA has no soft-capping: kiln's kernels only, where the scores are soft-capped)
    candidates = {"sdpa": with_launches(sdpa, 2)} if ((ks is None and vs is None) or scratch is not None) and not softcap else {}
    if triton_ok(ta.DTYPES, q.dtype, device, ta.INTERPRET):
        if device.type == "cuda":
            heads = math.prod(q.shape[:-2])
            cfgs = ta.configs(q.shape[-2], heads, torch.cuda.get_device_properties(device).multi_processor_count)
        else:
            cfgs = [ta.INTERPRET_CONFIG]
        for c in cfgs[:TRITON_ATTENTION_CONFIGS]:
            candidates[config_name("kiln", c)] = (
                lambda c=c: ta.attention(q, k, v, mask, causal, scale, gqa, out=out, config=c, k_scale=ks, v_scale=vs,
                                         softcap=softcap))
    if (TMA_ATTENTION_CONFIGS and q.dim() == 4 and q.shape[-2] > ta.SHORT_Q and out.dim() == 4
            and (q.shape[1] == k.shape[1] or enable_gqa) and tta.supported(q, k, v, mask, ks, vs, softcap) is None):
        cfgs = tta.configs() if device.type == "cuda" else [tta.INTERPRET_CONFIG]
        forms = tta.forms(q, v, mask) if device.type == "cuda" else [{}]
        for c in cfgs[:TMA_ATTENTION_CONFIGS]:
            for own in (dict(c, **form) for form in forms):
                candidates[config_name("kiln-tma", own)] = tta.launcher(q, k, v, causal, scale, out, own, mask)
    if decode:
        run = partial(td.decode_attention, q, k, v, mask, scale, enable_gqa, out=out, k_scale=ks, v_scale=vs, softcap=softcap)
        candidates.update(_split_kv_candidates("kiln-decode", run, k.shape[2], counters, device))
    return candidates


def _split_kv_candidates(prefix: str, run, keys: int, counters: torch.Tensor | None, device: torch.device) -> dict:
    """kiln's split-KV decode kernel as candidates named after ``prefix``: the splits' partials reduced by a second
    launch; with ``counters`` the same splits reduced by the last program of each kv head's (``-last``, one launch); a
    cache of at most WHOLE_MAX_KEYS ``keys`` in one split (``-whole``: fewer programs, one launch, no partials).
    ``run(**kw)``: ``decode_attention`` on the group's operands."""
    cfgs = (td.configs() if device.type == "cuda" else [td.INTERPRET_CONFIG])[:DECODE_CONFIGS]
    candidates = {config_name(prefix, c): with_launches(partial(run, config=c), 2) for c in cfgs}
    if counters is not None:
        candidates.update({config_name(f"{prefix}-last", c): partial(run, config=c, counters=counters) for c in cfgs})
    if keys <= WHOLE_MAX_KEYS:
        candidates[config_name(f"{prefix}-whole", cfgs[0])] = partial(run, config=cfgs[0], splits=1)
    return candidates


def rope_kv(args: list, q_out: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_roped: torch.Tensor,
            ropes: list | None, device: torch.device, norms: list | None = None) -> tuple[dict, dict]:
    """A rope_kv group's candidates. ``args``: q, k, v, cos, sin, slots; ``ropes``: the pointwise kernels of ROPE(q)
    into ``q_out`` and ROPE(k) into the scratch ``k_roped``, which the separate candidate then writes at the slots.
    ``norms``: per q and k, None or (weight or None, eps) of the RMSNORM over each head the group applies before RoPE
    (``schedule.rope_norm``; q and k in ``args`` are then the norms' inputs): the separate candidate is then the torch
    reference (``ropes`` None)."""
    q, k, v, cos, sin, slots = args
    if norms is None:
        rope_q, rope_k = ropes

        def separate():
            rope_q()
            rope_k()
            index_copy(k_cache, 2, slots, k_roped, inplace=True)
            index_copy(v_cache, 2, slots, v, inplace=True)
        candidates = {"separate": with_launches(separate, 4)}
    else:
        candidates = {"separate": with_launches(partial(trk.reference, q, k, v, cos, sin, slots, q_out, k_cache, v_cache, norms), 6)}
    operands = (q, k, v, cos, sin, slots, q_out, k_cache, v_cache)
    if triton_ok(tg.DTYPES, q.dtype, device, tg.INTERPRET) and trk.check(*operands, norms) is None:
        candidates["triton-rope-kv"] = partial(trk.rope_kv, *operands, norms)
    what = {"op": "ROPE_KV", "q": list(q.shape), "k": list(k.shape), "cache": list(k_cache.shape), "dtype": str(q.dtype),
            "strides": [list(t.stride()) for t in (q, k, v, cos)]}
    if norms is not None:
        what["norms"] = _norms_key(norms)
    return what, candidates


def _norms_key(norms: list) -> list:
    """A rope_kv group's norms in a tuning key: per q and k, None or [has a weight, eps]."""
    return [None if n is None else [n[0] is not None, n[1]] for n in norms]
