"""Attention fusion: the explicit attention formula, repeat_kv before an ATTENTION, a dequantized KV cache read
by an ATTENTION, and rotate-half RoPE, each to one op.

    softmax(q @ k^T * scale + mask) @ v       ->  ATTENTION(q, k, v, mask, scale)
    softmax(tanh(q @ k^T * scale / c) * c + mask) @ v
                                              ->  ATTENTION(q, k, v, mask, scale, softcap=c)   (Gemma 2)
    where(isnan(p), 0, p) @ v,  p as above    ->  ATTENTION(q, k, v, mask, scale)
    ATTENTION(q, repeat_kv(k), repeat_kv(v))  ->  ATTENTION(q, k, v, gqa=True)
    ATTENTION(q, CAST(kc) * ks[.., None], CAST(vc) * vs[.., None])
                                              ->  ATTENTION(q, kc, vc, ks, vs, k_scale=True, v_scale=True)
    x * cos + cat(-x2, x1) * sin              ->  ROPE(x, cos, sin)        (x1, x2: the halves of x's last dim)

``F.scaled_dot_product_attention`` is imported as ATTENTION already; the first rule covers HF's
``attn_implementation="eager"`` and hand-written attention; its second line is SDPA as both torch ONNX
exporters write it, with ``sqrt(scale)`` on q and on k^T (the scale is their product) and a NaN guard
that zeroes the rows of queries whose keys are all masked, which is what SDPA (ATTENTION's reference)
returns for them. The guard also zeroes rows made NaN by non-finite scores (an inf or NaN in q or k), where
SDPA gives NaN: the fused graph differs from the exported one only on such inputs. The attention rules compose: the explicit
form first becomes an ATTENTION on the repeated k / v, which the second rule then un-repeats.
A mask computed in the graph (HF's causal mask from ARANGE / LE comparisons) stays a mask input:
``causal`` is not inferred from it (correct either way; a kernel that wants the flag must look at it).

The dequantization rule takes ``kv_quant.dequantize_kv`` as a quantized-cache step writes it (int8 / float8 codes
cast to float32, times a float32 scale per vector, cast to the queries' dtype) for k, v or both: the kernels then
read the codes and dequantize each tile in registers instead of a dequantized cache materialised every step.
"""
from __future__ import annotations

import math

import torch

from ..ir.graph import Graph, Node
from ..ir.kv_quant import CODE_DTYPES
from ..ir.ops import attention_operands
from ..ir.types import FLOAT_DTYPES, TType, dims_equal, shape_str, torch_dtype
from .pattern import A, C, Match, O, Rule, V, any_of, maybe_cast, rewrite, type_reason
from .report import PassStats


def _number(node: Node) -> float | None:
    """The value of a scalar numeric CONST, else None."""
    v = node.attrs.get("value") if node.op == "CONST" else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else None


def _swap_last_two(perm: tuple) -> tuple:
    return perm[:-2] + (perm[-1], perm[-2])


def _eps(dtype: str) -> float:
    return torch.finfo(torch_dtype(dtype)).eps


# ----------------------------------------------------------------------------- explicit attention

K_T = O.PERMUTE(V("k"), perm=A("perm"))
# q @ k^T: [.., Sq, Sk]; a constant factor on q, on k^T or on both (SDPA exported to ONNX: sqrt(scale) on each)
SCORES = O.MATMUL(any_of(V("q") * C("q_scale"), V("q")), any_of(K_T * C("k_scale"), K_T))
SCALED = any_of(SCORES * V("scale"), SCORES / V("divisor"), SCORES)
CAPPED = any_of(O.TANH(SCALED / C("cap")) * C("cap"), SCALED)  # Gemma 2's soft-capped scores, c * tanh(s / c)
MASKED = any_of(CAPPED + V("bias"),                    # an additive float mask
                O.WHERE(V("keep"), CAPPED, C("fill")),  # torch.where(keep, s, -inf)
                O.WHERE(V("drop"), C("fill"), CAPPED),  # s.masked_fill(drop, -inf)
                CAPPED)
PROBS = maybe_cast(O.SOFTMAX(maybe_cast(MASKED, "upcast"), axis=A("axis")), "downcast")
# SDPA exported to ONNX: where(isnan(p), 0, p), the zero rows torch's SDPA gives where every key is masked
GUARDED = O.WHERE(O.ISNAN(V("nan_tested")), C("nan_fill"), PROBS)
EXPLICIT = O.MATMUL(any_of(GUARDED, PROBS), V("v"))


def _scale(m: Match) -> tuple[float | None, str | None]:
    """The product of the constant factors on the scores, or the reason there is none."""
    scale = float(m.get("q_scale", 1.0)) * float(m.get("k_scale", 1.0))
    for key in ("scale", "divisor"):
        if key in m:
            v = _number(m[key])
            if v is None:
                n = m[key]
                return None, f"the scale {n.name} ({n.op} {n.dtype}{shape_str(n.shape)}) is not a constant"
            if v == 0 and key == "divisor":
                return None, "the scores are divided by 0"
            scale = scale * v if key == "scale" else scale / v
    return scale, None


def _mask_type(m: Match, q: Node) -> tuple[TType | None, str | None]:
    """The type of the ATTENTION mask the match gives (None when unmasked), or the reason there is none."""
    if "bias" in m:
        b = m["bias"]
        return (b.type, None) if b.dtype == q.dtype else (None, f"the additive mask is {b.dtype}, the scores {q.dtype}")
    if "keep" not in m and "drop" not in m:
        return None, None
    cond, fill = m.get("keep", m.get("drop")), m["fill"]
    if cond.dtype != "bool":
        return None, f"the where condition is {cond.dtype}, not bool"
    # setting a score to the fill equals adding it as a bias only where exp(fill - max) underflows to 0
    if fill != -math.inf and fill > torch.finfo(torch_dtype(q.dtype)).min:
        return None, f"masked scores are set to {fill}, neither -inf nor the {q.dtype} minimum"
    return (cond.type if fill == -math.inf else TType(cond.shape, q.dtype)), None


def _nan_guard_reason(m: Match) -> str | None:
    """Why ``where(isnan(a), fill, p)`` before ``@ v`` is not SDPA's zero rows for fully masked queries."""
    where = m.root.inputs[0]
    if m["nan_tested"] is not where.inputs[2]:
        return f"the NaN guard tests {m['nan_tested'].name} but passes {where.inputs[2].name} through"
    if m["nan_fill"] != 0:
        return f"NaN probabilities are set to {m['nan_fill']}; SDPA gives 0 where every key is masked"
    return None


def _explicit_guard(m: Match) -> str | None:
    if "nan_fill" in m and (why := _nan_guard_reason(m)):
        return why
    softmax = next(n for n in m.interior if n.op == "SOFTMAX")
    rank = len(softmax.shape)
    if m["axis"] != rank - 1:
        return f"softmax over axis {m['axis']} of the rank-{rank} scores, not the last (the keys)"
    q, k, v = m["q"], m["k"], m["v"]
    if len(m["perm"]) < 2:
        return f"k^T {k.name} has rank {len(m['perm'])}"
    if q.dtype not in FLOAT_DTYPES:
        return f"the queries are {q.dtype}"
    up = m.get("upcast")
    if up is not None and (up not in FLOAT_DTYPES or _eps(up) > _eps(q.dtype)):
        return f"softmax computed in {up}, less precise than the {q.dtype} scores"
    scale, why = _scale(m)
    if why:
        return why
    if "cap" in m and not (math.isfinite(m["cap"]) and m["cap"] > 0):
        return f"the scores are soft-capped by {m['cap']}, not a positive number"
    mask, why = _mask_type(m, q)
    if why:
        return why
    k_type = TType(tuple(k.shape[i] for i in _swap_last_two(m["perm"])), k.dtype)  # k as [.., Sk, D]
    return type_reason("ATTENTION", [q.type, k_type, v.type] + ([mask] if mask else []), m.root, scale=scale,
                       softcap=m.get("cap"))


def _explicit_build(g: Graph, m: Match) -> Node:
    loc = m.root.loc
    q, k, v = m["q"], m["k"], m["v"]
    perm = _swap_last_two(m["perm"])
    if perm != tuple(range(len(perm))):  # k^T came from another layout (e.g. [B, S, H, D] -> [B, H, D, S])
        k = g.add("PERMUTE", [k], perm=perm, loc=loc)
    mask = []
    if "bias" in m:
        mask = [m["bias"]]
    elif "keep" in m or "drop" in m:
        cond = m.get("keep", m.get("drop"))
        if "drop" in m:  # masked_fill(drop, ..) keeps where NOT drop
            cond = cond.inputs[0] if cond.op == "NOT" else g.add("NOT", [cond], loc=loc)
        if m["fill"] == -math.inf:
            mask = [cond]
        else:  # the dtype's minimum: an additive bias, which masks every row that keeps a key the same way
            bias = g.add("WHERE", [cond, g.const(0.0), g.const(float(m["fill"]))], loc=loc)
            mask = [g.add("CAST", [bias], dtype=q.dtype, loc=loc)]
    return g.add("ATTENTION", [q, k, v] + mask, causal=False, scale=_scale(m)[0], gqa=False, loc=loc,
                 softcap=None if "cap" not in m else float(m["cap"]))


# ----------------------------------------------------------------------------- GQA: repeat_kv before ATTENTION


def repeat_kv(name: str):
    """HF's repeat_kv, [.., H, S, D] -> [.., H, 1, S, D] -> [.., H, n, S, D] -> [.., H * n, S, D]."""
    return O.RESHAPE(O.EXPAND(O.RESHAPE(V(name), shape=A(name + "_1")), shape=A(name + "_n")), shape=A(name + "_hn"))


REPEATED = any_of(*(O.ATTENTION(V("q"), repeat_kv("k"), repeat_kv("v"), *mask, causal=A("causal"), scale=A("scale"), gqa=False,
                                k_scale=False, v_scale=False, softcap=A("softcap"))
                    for mask in ((V("mask"),), ())))


def _repeats(m: Match, name: str) -> int | str:
    """How often ``name``'s heads are repeated (each head n times in a row), or why it is not repeat_kv."""
    x = m[name].shape
    if len(x) < 3:
        return f"{name} has rank {len(x)}"
    lead, h, tail = x[:-3], x[-3], x[-2:]
    n = m[name + "_n"][-3] if len(m[name + "_n"]) == len(x) + 1 else None
    want = (lead + (h, 1) + tail, lead + (h, n) + tail, lead + (h * n if isinstance(n, int) else None,) + tail)
    got = (m[name + "_1"], m[name + "_n"], m[name + "_hn"])
    if not isinstance(n, int) or not all(len(a) == len(b) and all(map(dims_equal, a, b)) for a, b in zip(want, got)):
        return f"the reshape / expand / reshape of {name} {shape_str(x)} ({' -> '.join(map(shape_str, got))}) is not repeat_kv"
    return n


def _repeated_guard(m: Match) -> str | None:
    nk, nv = _repeats(m, "k"), _repeats(m, "v")
    for n in (nk, nv):
        if isinstance(n, str):
            return n
    if nk != nv or m["k"].shape[-3] != m["v"].shape[-3]:
        return f"k repeats {m['k'].shape[-3]} heads x{nk}, v {m['v'].shape[-3]} heads x{nv}"
    ins = [m[n].type for n in ("q", "k", "v", "mask") if n in m]
    return type_reason("ATTENTION", ins, m.root, causal=m["causal"], scale=m["scale"], gqa=nk > 1, softcap=m["softcap"])


def _repeated_build(g: Graph, m: Match) -> Node:
    ins = [m[n] for n in ("q", "k", "v", "mask") if n in m]
    return g.add("ATTENTION", ins, causal=m["causal"], scale=m["scale"], gqa=_repeats(m, "k") > 1, loc=m.root.loc,
                 softcap=m["softcap"])


# ----------------------------------------------------------------------------- a dequantized KV cache


def dequantized(name: str):
    """``dequantize_kv(codes, scale, dtype)`` as captured: CAST(codes) * scale[.., None], then maybe a cast to
    the queries' dtype (none when they are float32)."""
    return maybe_cast(O.CAST(V(name + "_codes"), dtype=A(name + "_wide")) * V(name + "_scale"), name + "_cast")


# k and v, k alone, v alone (a cache quantizing one of them); with and without a mask
DEQUANTIZED = any_of(*(O.ATTENTION(V("q"), dequantized("k") if "k" in which else V("k"), dequantized("v") if "v" in which else V("v"),
                                   *mask, causal=A("causal"), scale=A("scale"), gqa=A("gqa"), k_scale=False, v_scale=False,
                                   softcap=A("softcap"))
                       for which in ("kv", "k", "v") for mask in ((V("mask"),), ())))


def _dequantized_reason(m: Match, name: str) -> str | None:
    """Why ``name``'s operand is not dequantize_kv of a quantized cache, or None."""
    codes, scale = m[name + "_codes"], m[name + "_scale"]
    if codes.dtype not in CODE_DTYPES:
        return f"{name} is a cast of {codes.dtype} {codes.name}, not of quantized codes ({', '.join(sorted(CODE_DTYPES))})"
    if m[name + "_wide"] != "float32" or scale.dtype != "float32":
        return f"{name}'s codes are dequantized in {m[name + '_wide']} with a {scale.dtype} scale, not in float32"
    per_vector = codes.shape[:-1] + (1,)
    if len(scale.shape) != len(per_vector) or not all(map(dims_equal, scale.shape, per_vector)):
        return f"the {name} scale {shape_str(scale.shape)} is not one per vector of the codes {shape_str(codes.shape)}"
    return None


def _dequantized_inputs(m: Match) -> tuple[list, dict]:
    """The fused ATTENTION's operands (the scales still [.., S, 1]) and its scale attributes."""
    scaled = {f"{n}_scale": f"{n}_codes" in m for n in "kv"}
    ins = [m["q"]] + [m[f"{n}_codes"] if scaled[f"{n}_scale"] else m[n] for n in "kv"] + ([m["mask"]] if "mask" in m else [])
    return ins + [m[f"{n}_scale"] for n in "kv" if scaled[f"{n}_scale"]], scaled


def _dequantized_guard(m: Match) -> str | None:
    for name in "kv":
        if f"{name}_codes" in m and (why := _dequantized_reason(m, name)):
            return why
    ins, scaled = _dequantized_inputs(m)
    types = [t.type for t in ins[:len(ins) - sum(scaled.values())]]
    types += [TType(t.shape[:-1], t.dtype) for t in ins[len(types):]]
    return type_reason("ATTENTION", types, m.root, causal=m["causal"], scale=m["scale"], gqa=m["gqa"], softcap=m["softcap"],
                       **scaled)


def _per_vector(g: Graph, scale: Node, loc) -> Node:
    """A [.., S, 1] scale as [.., S]: the RESHAPE that added the 1 undone, or a new one."""
    if scale.op == "RESHAPE" and len(scale.inputs[0].shape) == len(scale.shape) - 1 and \
            all(map(dims_equal, scale.inputs[0].shape, scale.shape[:-1])):
        return scale.inputs[0]
    return g.add("RESHAPE", [scale], shape=scale.shape[:-1], loc=loc)


def _dequantized_build(g: Graph, m: Match) -> Node:
    ins, scaled = _dequantized_inputs(m)
    n = len(ins) - sum(scaled.values())
    ins = ins[:n] + [_per_vector(g, s, m.root.loc) for s in ins[n:]]
    return g.add("ATTENTION", ins, causal=m["causal"], scale=m["scale"], gqa=m["gqa"], loc=m.root.loc, softcap=m["softcap"],
                 **scaled)


# ----------------------------------------------------------------------------- RoPE


def half(name: str):
    """A slice of x (the halves of its last dim, says the guard)."""
    return O.SLICE(V("x"), axis=A(name + "_axis"), start=A(name + "_start"), end=A(name + "_end"), step=1)


# rotate_half(x) = cat(-x2, x1); the other concat order is matched only to be declined with its reason
ROTATED = any_of(O.CONCAT(-half("neg"), half("pos"), axis=A("axis")), O.CONCAT(half("pos"), -half("neg"), axis=A("axis")))
ROPE = V("x") * V("cos") + ROTATED * V("sin")


def _rope_guard(m: Match) -> str | None:
    x = m["x"]
    rank, d = len(x.shape), x.shape[-1] if x.shape else None
    if m["neg_axis"] != rank - 1 or m["pos_axis"] != rank - 1 or m["axis"] != rank - 1:
        return f"the slices (axes {m['neg_axis']}, {m['pos_axis']}) or their concat (axis {m['axis']}) are not on the last axis of x"
    if not isinstance(d, int) or d % 2:
        return f"the last dim of x {shape_str(x.shape)} is not even"
    h = d // 2
    ranges = {k: (m[k + "_start"], m[k + "_end"]) for k in ("neg", "pos")}
    if sorted(ranges.values()) != [(0, h), (h, d)]:
        (a, b), (c, e) = ranges["neg"], ranges["pos"]
        return f"slices [{a}:{b}] and [{c}:{e}] are not the halves of the last dim {d}"
    concat = next(n for n in m.interior if n.op == "CONCAT")
    parts = [("-" if p.op == "NEG" else "") + ("x1" if (p.inputs[0] if p.op == "NEG" else p).attrs["start"] == 0 else "x2")
             for p in concat.inputs]
    if parts != ["-x2", "x1"]:
        return f"cat({', '.join(parts)}) is not rotate_half(x) = cat(-x2, x1)"
    return type_reason("ROPE", [x.type, m["cos"].type, m["sin"].type], m.root)


def _rope_build(g: Graph, m: Match) -> Node:
    return g.add("ROPE", [m["x"], m["cos"], m["sin"]], loc=m.root.loc)


RULES = [
    Rule("explicit_attention", EXPLICIT, _explicit_build, _explicit_guard),
    Rule("gqa_attention", REPEATED, _repeated_build, _repeated_guard),
    Rule("dequantized_kv", DEQUANTIZED, _dequantized_build, _dequantized_guard),
    Rule("rope", ROPE, _rope_build, _rope_guard),
]


def fuse_attention(graph: Graph) -> PassStats:
    """``softmax(q @ k^T * scale + mask) @ v -> ATTENTION``; ``ATTENTION(q, repeat_kv(k), repeat_kv(v))
    -> ATTENTION(q, k, v, gqa=True)``; ``ATTENTION(q, CAST(kc) * ks[.., None], CAST(vc) * vs[.., None]) ->
    ATTENTION(q, kc, vc, ks, vs, k_scale=True, v_scale=True)``; ``x * cos + rotate_half(x) * sin -> ROPE(x, cos, sin)``."""
    stats = rewrite(graph, RULES)
    masked = sum(1 for n in graph.nodes if n.op == "ATTENTION" and attention_operands(n.inputs, n.attrs)[3] is not None
                 and not n.attrs["causal"])
    if masked:
        stats.notes.append(f"{masked} ATTENTION read a mask input: causal is not inferred from a mask computed in the graph")
    return stats
