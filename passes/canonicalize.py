"""Canonicalisation: what an exporter spells differently is rewritten to the form the captured graph has,
so the fusions after it see one form.

    MATMUL(x, W) + b                                     ->  LINEAR(x, W^T, b)     (W a 2-d weight [in, out], b [out])
    MATMUL(x, W)                                         ->  LINEAR(x, W^T)
    x * sigmoid(x)                                       ->  SILU(x)
    reshape(transpose(reshape(x, [N, S, D])), [*L, D, S]) ->  transpose(reshape(x, [*L, S, D]))

ONNX has no linear layer: both torch exporters write ``x @ W`` with the weight stored ``[in, out]``;
``W^T`` is computed here, once, at compile time (one transposed copy per weight, shared by its readers).
ONNX has no SiLU before opset 24, so ``F.silu`` arrives as ``x * Sigmoid(x)``. The dynamo exporter
transposes the (repeated) keys of SDPA as a 3-d batch: ``[B, H, S, D] -> [B*H, S, D] -> [B*H, D, S] ->
[B, H, D, S]``, which is ``k^T`` on ``[B, H, S, D]`` (the explicit-attention pattern's ``PERMUTE(k)``).
"""
from __future__ import annotations

import torch

from ..ir.graph import Graph, Node, dims_equal_shapes
from ..ir.types import FLOAT_DTYPES, TType, dims_equal, numel, shape_str
from .pattern import A, Match, O, Rule, V, rewrite, type_reason
from .report import PassStats


# ----------------------------------------------------------------------------- x @ W  ->  LINEAR(x, W^T)

def _is_weight(n: Node) -> bool:
    return n.op == "WEIGHT"


MATMUL_WEIGHT = O.MATMUL(V("x"), V("w", where=_is_weight))
MATMUL_WEIGHT_BIAS = MATMUL_WEIGHT + V("b", where=_is_weight)


def _linear_guard(m: Match) -> str | None:
    w = m["w"]
    if len(w.shape) != 2:
        return f"the weight {w.attrs['name']} {shape_str(w.shape)} is not 2-d"
    b = [m["b"].type] if "b" in m else []
    return type_reason("LINEAR", [m["x"].type, TType(w.shape[::-1], w.dtype)] + b, m.root)


def _transposed(graph: Graph, w: Node) -> Node:
    """The WEIGHT ``W^T`` ([out, in]) for the stored ``W`` ([in, out]); made once, found again by name."""
    t = graph.weights[w.attrs["name"]].t().contiguous()
    name, k = w.attrs["name"] + ".T", 2
    while name in graph.weights and not torch.equal(graph.weights[name], t):  # a name taken by another tensor
        name, k = f"{w.attrs['name']}.T_{k}", k + 1
    return graph.add_weight(name, t)


def _linear_build(g: Graph, m: Match) -> Node:
    return g.add("LINEAR", [m["x"], _transposed(g, m["w"])] + ([m["b"]] if "b" in m else []), loc=m.root.loc)


# ----------------------------------------------------------------------------- x * sigmoid(x)  ->  SILU(x)

SIGMOID_GATE = V("x") * O.SIGMOID(V("x"))


def _silu_guard(m: Match) -> str | None:
    x = m["x"]
    if x.dtype not in FLOAT_DTYPES:
        return f"x is {x.dtype}"
    return type_reason("SILU", [x.type], m.root)


# ----------------------------------------------------------------------------- the 3-d batched transpose

FLAT_T = O.RESHAPE(O.PERMUTE(O.RESHAPE(V("x"), shape=A("flat")), perm=(0, 2, 1)), shape=A("unflat"))


def _flat_t_guard(m: Match) -> str | None:
    x, flat, unflat = m["x"].shape, m["flat"], m["unflat"]
    if len(x) < 3 or len(unflat) < 3:
        return f"x {shape_str(x)} -> {shape_str(unflat)}: no leading dims to flatten"
    if not dims_equal_shapes(flat[1:], x[-2:]) or not dims_equal(flat[0], numel(x[:-2])):
        return f"[{shape_str(x)} -> {shape_str(flat)}] does not flatten only the leading dims"
    if not dims_equal_shapes(unflat[-2:], (flat[2], flat[1])) or not dims_equal(numel(unflat[:-2]), flat[0]):
        return f"[{shape_str(flat)}]^T -> {shape_str(unflat)} does not unflatten only the leading dims"
    return None


def _flat_t_build(g: Graph, m: Match) -> Node:
    x, unflat = m["x"], m["unflat"]
    lead = unflat[:-2]
    if not dims_equal_shapes(lead, x.shape[:-2]):  # [B, Hk, n, S, D] -> [B, Hk*n, S, D] (repeat_kv's last reshape)
        x = g.add("RESHAPE", [x], shape=tuple(lead) + tuple(x.shape[-2:]), loc=m.root.loc)
    r = len(lead) + 2
    return g.add("PERMUTE", [x], perm=tuple(range(r - 2)) + (r - 1, r - 2), loc=m.root.loc)


RULES = [
    Rule("matmul_weight_bias", MATMUL_WEIGHT_BIAS, _linear_build, _linear_guard),  # before the bare matmul: it takes the bias too
    Rule("matmul_weight", MATMUL_WEIGHT, _linear_build, _linear_guard),
    Rule("silu", SIGMOID_GATE, lambda g, m: g.add("SILU", [m["x"]], loc=m.root.loc), _silu_guard),
    Rule("batched_transpose", FLAT_T, _flat_t_build, _flat_t_guard),
]


def canonicalize(graph: Graph) -> PassStats:
    """``MATMUL(x, W) [+ b] -> LINEAR(x, W^T[, b])``; ``x * sigmoid(x) -> SILU(x)``; the 3-d batched transpose of
    a rank-r tensor -> one PERMUTE (see the module docstring)."""
    return rewrite(graph, RULES)
