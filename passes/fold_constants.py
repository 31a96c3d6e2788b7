"""Constant folding and removal of no-op layout / cast nodes.

Two rewrites, in one pass:

(a) weight-only subgraphs are evaluated once, at compile time, with each op's reference implementation:
    ``f(w1, ..., wk, consts)  ->  WEIGHT("w1.f")`` (e.g. ``PERMUTE(w)``, ``CAST(w)``, ``CONCAT(wq, wk, wv)``,
    ``1 + w``, the sinusoidal ``exp(arange(n) * c / d)`` table). A value that is rank 0 and of a CONST's dtype
    becomes a ``CONST`` instead. Nothing with a symbolic size or attribute is folded, and nothing that would
    make (or pass through) a tensor much larger than the weights it comes from.

(b) no-ops and chains:
    ``CAST(x: t, t) -> x``, ``RESHAPE(x: s, s) -> x``, ``PERMUTE(x, identity) -> x``, ``EXPAND(x: s, s) -> x``,
    ``SLICE(x, 0:size:1) -> x``, ``RESHAPE(RESHAPE(x, s1), s2) -> RESHAPE(x, s2)``,
    ``PERMUTE(PERMUTE(x, p), q) -> PERMUTE(x, p∘q)``, ``EXPAND(EXPAND(x, s1), s2) -> EXPAND(x, s2)``,
    ``CAST(CAST(x: a, b), c) -> CAST(x, c)`` only where ``a -> b`` is exact (f32 -> f64 -> f32 is x;
    f32 -> bf16 -> f32 stays).
"""
from __future__ import annotations

import re
from collections import deque

import torch

from ..ir.graph import Graph, Node, dims_equal_shapes
from ..ir.interpret import eval_node
from ..ir.ops import OPS, const_type
from ..ir.types import ITEMSIZE, dims_equal, dtype_name, has_symbols, is_static
from .report import PassStats

# a fold may produce (or pass through) a tensor this much larger than the weights it reads, or up to FOLD_MIN_BYTES
FOLD_GROWTH = 2
FOLD_MIN_BYTES = 1 << 20

# dtype -> the dtypes that hold every one of its values exactly (so a cast through them loses nothing)
_EXACT = {
    "bool": {"uint8", "int8", "int16", "int32", "int64", "float16", "bfloat16", "float32", "float64"},
    "uint8": {"int16", "int32", "int64", "float16", "bfloat16", "float32", "float64"},
    "int8": {"int16", "int32", "int64", "float16", "bfloat16", "float32", "float64"},
    "int16": {"int32", "int64", "float32", "float64"},
    "int32": {"int64", "float64"},
    "float16": {"float32", "float64"},
    "bfloat16": {"float32", "float64"},
    "float32": {"float64"},
}


def fold_constants(graph: Graph) -> PassStats:
    """Fold weight-only subgraphs into new weights, then drop no-op casts / reshapes / permutes / expands /
    slices and collapse chains of them. ``rewritten`` counts folded subgraphs plus removed or merged nodes."""
    stats = PassStats()
    _simplify_layout(graph, stats)
    _fold(graph, stats)
    graph.remove_dead()
    graph.toposort()
    return stats


# ----------------------------------------------------------------------------- (b) no-ops and chains


def _simplify_layout(graph: Graph, stats: PassStats) -> None:
    for node in list(graph.nodes):
        if not node.users and node not in graph.outputs:
            continue  # dead already, or merged away below
        new = _simpler(graph, node)
        if new is not None and new is not node:
            graph.replace_all_uses(node, new)
            stats.rewritten += 1


def _simpler(graph: Graph, node: Node) -> Node | None:
    """A node computing the same value as ``node`` more simply (possibly its input), or None."""
    if node.op not in ("CAST", "RESHAPE", "PERMUTE", "EXPAND", "SLICE"):
        return None
    x = node.inputs[0]
    a = node.attrs
    if node.op == "SLICE":
        whole = a["start"] == 0 and a["step"] == 1 and dims_equal(a["end"], x.shape[a["axis"]])
        return x if whole else None
    if _same_type(x, node) and (node.op != "PERMUTE" or a["perm"] == tuple(range(len(x.shape)))):
        return x  # CAST to its own dtype, RESHAPE / EXPAND to its own shape, identity PERMUTE
    if x.op != node.op:
        return None
    inner = x.inputs[0]
    if node.op == "RESHAPE":
        return inner if _same_type(inner, node) else _add_like(graph, node, inner, shape=a["shape"])
    if node.op == "EXPAND":  # x broadcasts to s1, s1 to s2: x broadcasts to s2
        return inner if _same_type(inner, node) else _add_like(graph, node, inner, shape=a["shape"])
    if node.op == "PERMUTE":  # y[i] = x[q[i]] = inner[p[q[i]]]
        perm = tuple(x.attrs["perm"][j] for j in a["perm"])
        return inner if perm == tuple(range(len(perm))) else _add_like(graph, node, inner, perm=perm)
    # CAST(CAST(inner: t0, t1), t2): exact only when t0 -> t1 keeps every value
    if x.attrs["dtype"] not in _EXACT.get(inner.dtype, ()):
        return None
    return inner if inner.dtype == a["dtype"] else _add_like(graph, node, inner, dtype=a["dtype"])


def _same_type(x: Node, y: Node) -> bool:
    return x.dtype == y.dtype and dims_equal_shapes(x.shape, y.shape)


def _add_like(graph: Graph, node: Node, x: Node, **attrs) -> Node:
    return graph.add(node.op, (x,), name=node.name, loc=node.loc, **attrs)


# ----------------------------------------------------------------------------- (a) weight-only subgraphs


def _fold(graph: Graph, stats: PassStats) -> None:
    const = {n for n in graph.nodes if _is_constant(n)}
    for n in graph.nodes:  # topological: inputs are decided first
        if n.op not in ("INPUT", "WEIGHT", "CONST") and all(i in const for i in n.inputs) and _foldable(n):
            const.add(n)
    # roots: constant values read by something that is not constant (or by the outputs)
    roots = [n for n in graph.nodes if n in const and n.op not in ("WEIGHT", "CONST")
             and (n in graph.outputs or any(u not in const for u in n.users))]
    values: dict[Node, torch.Tensor] = {}
    device = graph.weights_device()
    seen: set[Node] = set()
    roots = deque(roots)
    while roots:
        root = roots.popleft()
        if root in seen or root.op in ("WEIGHT", "CONST"):
            continue
        seen.add(root)
        cone, leaf_bytes = _cone(root)
        biggest = max(cone, key=_nbytes)
        limit = max(FOLD_GROWTH * leaf_bytes, FOLD_MIN_BYTES)
        if _nbytes(biggest) > limit:
            stats.decline(f"folding would make a {_nbytes(biggest)}-byte tensor from {leaf_bytes} bytes of weights",
                          root, at=biggest.name)
            roots.extend(i for i in root.inputs if i in const)  # fold what is below it instead
            continue
        try:  # a copy of its own: a view (or a no-op .to) would share storage with the weight it came from
            value = _evaluate(graph, root, values, device).clone(memory_format=torch.contiguous_format)
        except Exception as e:  # noqa: BLE001 - a reference that cannot run on these values leaves the graph as it is
            stats.decline(f"cannot evaluate at compile time: {type(e).__name__}: {e}", root)
            continue
        graph.replace_all_uses(root, _constant_node(graph, root, value, _derived_name(graph, root, cone)))
        stats.rewritten += 1


def _is_constant(n: Node) -> bool:
    return n.op == "WEIGHT" or (n.op == "CONST" and not has_symbols(n.attrs["value"]))


def _foldable(n: Node) -> bool:
    if OPS[n.op].ref is None or any(has_symbols(v) for v in n.attrs.values()):
        return False
    return all(is_static(d) for d in n.shape)


def _nbytes(n: Node) -> int:
    size = ITEMSIZE[n.dtype]
    for d in n.shape:
        size *= d
    return size


def _cone(root: Node) -> tuple[list[Node], int]:
    """The computed nodes ``root`` is made of (down to WEIGHT / CONST leaves) and the bytes of its weights."""
    cone, leaves, stack, seen = [], set(), [root], set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "WEIGHT":
            leaves.add(n)
        elif n.op != "CONST":
            cone.append(n)
            stack.extend(n.inputs)
    return cone, sum(_nbytes(w) for w in leaves)


def _evaluate(graph: Graph, node: Node, values: dict, device: torch.device) -> torch.Tensor:
    """The value of a node of a folded cone, made on ``device`` (the weights': a cone of no weight too)."""
    if node not in values:
        if node.op == "WEIGHT":
            return graph.weights[node.attrs["name"]]
        args = [_evaluate(graph, i, values, device) for i in node.inputs]
        with torch.no_grad():
            values[node] = eval_node(node, args, {}, node.attrs, device)
    return values[node]


def _constant_node(graph: Graph, root: Node, value: torch.Tensor, name: str) -> Node:
    if tuple(value.shape) != tuple(root.shape) or dtype_name(value.dtype) != root.dtype:
        raise AssertionError(f"folding %{root.name}: reference gave {value.dtype}{list(value.shape)}, node says {root.type}")
    if not root.shape and root.dtype in ("float64", "int64", "bool"):
        py = value.item()
        if const_type(py).dtype == root.dtype:
            return graph.const(py, name=root.name)
    node = graph.add_weight(name, value)
    node.loc = root.loc
    return node


def _derived_name(graph: Graph, root: Node, cone: list[Node]) -> str:
    """``lm_head.weight.permute``, ``model.layers.0.self_attn.concat``: the weights it reads (their common
    dotted prefix when several) and the op that made it; with no weight, the module it was computed in
    (``transformer_blocks.0.norm1.emb.time_proj.reshape``), else ``const.<node>``."""
    names = sorted({i.attrs["name"] for n in cone for i in n.inputs if i.op == "WEIGHT"})
    module = re.search(r"\[([\w.]+)\]$", root.loc or "")
    if not names:
        base = f"{module.group(1)}.{root.op.lower()}" if module else f"const.{root.name}"
    elif len(names) == 1:
        base = f"{names[0]}.{root.op.lower()}"
    else:
        parts = [p.split(".") for p in names]
        common = []
        for segs in zip(*parts):
            if len(set(segs)) != 1:
                break
            common.append(segs[0])
        base = f"{'.'.join(common) or names[0]}.{root.op.lower()}"
    taken = set(graph.weights) | {n.attrs["name"] for n in graph.nodes if n.op == "WEIGHT"}
    name, k = base, 1
    while name in taken:
        name, k = f"{base}_{k}", k + 1
    return name
