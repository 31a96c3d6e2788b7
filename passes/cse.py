"""Structural common-subexpression elimination.

    WEIGHT(a), WEIGHT(b) with equal contents (dtype, shape, bytes)  ->  WEIGHT(a)
    CONST(v), CONST(v) (same dtype)                                  ->  CONST(v)
    op(x, y; attrs), op(x, y; attrs)                                 ->  op(x, y; attrs)
    op(x, y; attrs), op(y, x; attrs) for op in COMMUTATIVE           ->  op(x, y; attrs)

Weights are merged first, then nodes in topological order, so whole repeated subgraphs collapse:
diffusers' DiT recomputes the sinusoidal timestep projection in every block, and converted DiT checkpoints
hold a copy of the one timestep / class embedder in every block; after this pass both are computed once.
INPUT nodes never merge.
"""
from __future__ import annotations

import hashlib
import math

import torch

from ..ir.graph import Graph, Node
from ..ir.ops import COMMUTATIVE
from .report import PassStats

_SAMPLE_BYTES = 4096  # bytes read per weight for the cheap first look, before hashing all of it


def cse(graph: Graph) -> PassStats:
    """Merge equal weights (by content), equal constants and structurally equal nodes. ``rewritten`` counts
    the nodes removed; ``notes`` says which weights were merged into which."""
    stats = PassStats()
    _merge_weights(graph, stats)
    seen: dict[tuple, Node] = {}
    for node in list(graph.nodes):  # topological: a node's inputs are already merged when it is reached
        if node.op in ("INPUT", "WEIGHT"):
            continue
        key = _key(node)
        first = seen.setdefault(key, node)
        if first is not node:
            graph.replace_all_uses(node, first)
            stats.rewritten += 1
    graph.remove_dead()
    return stats


# ----------------------------------------------------------------------------- weights by content


def _merge_weights(graph: Graph, stats: PassStats) -> None:
    """Every weight whose tensor equals an earlier one's is replaced by that earlier one."""
    buckets: dict[tuple, list[Node]] = {}
    for n in graph.nodes:
        if n.op == "WEIGHT":
            t = graph.weights[n.attrs["name"]]
            buckets.setdefault((t.dtype, tuple(t.shape)), []).append(n)
    for group in buckets.values():
        if len(group) < 2:
            continue
        for candidates in _split(graph, group, _sample).values():
            if len(candidates) < 2:
                continue
            for same in _split(graph, candidates, _sha256).values():
                _merge_group(graph, same, stats)


def _merge_group(graph: Graph, nodes: list[Node], stats: PassStats) -> None:
    # hashes matched: torch.equal confirms (and keeps apart what only collides); NaNs never compare equal
    while len(nodes) > 1:
        first, rest = nodes[0], nodes[1:]
        want = graph.weights[first.attrs["name"]]
        merged = [n for n in rest if torch.equal(graph.weights[n.attrs["name"]], want)]
        for n in merged:
            graph.replace_all_uses(n, first)
        if merged:
            stats.rewritten += len(merged)
            names = [n.attrs["name"] for n in merged]
            shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
            stats.notes.append(f"weight {first.attrs['name']} has the contents of {len(names)} other(s), merged: {shown}")
        nodes = [n for n in rest if n not in merged]


def _split(graph: Graph, nodes: list[Node], digest) -> dict[bytes, list[Node]]:
    out: dict[bytes, list[Node]] = {}
    for n in nodes:
        out.setdefault(digest(graph.weights[n.attrs["name"]]), []).append(n)
    return out


def _raw(t: torch.Tensor) -> torch.Tensor:
    """The bytes of ``t``, on its device."""
    return t.detach().contiguous().reshape(-1).view(torch.uint8)


def _sample(t: torch.Tensor) -> bytes:
    # taken on the weight's device: only the sample is copied to the host (a 1B model's weights are 2.5 GB, and
    # copying each whole to the host cost a cold GPU compile ~1 s)
    raw = _raw(t)
    step = max(1, raw.numel() // _SAMPLE_BYTES)
    return torch.cat([raw[::step][:_SAMPLE_BYTES], raw[-64:]]).cpu().numpy().tobytes()


def _sha256(t: torch.Tensor) -> bytes:
    return hashlib.sha256(_raw(t).cpu().numpy()).digest()


# ----------------------------------------------------------------------------- structural keys


def _key(node: Node) -> tuple:
    ins = tuple(node.inputs)
    if node.op in COMMUTATIVE and len(ins) == 2:
        ins = tuple(sorted(ins, key=lambda n: n.id))
    return (node.op, node.dtype, ins, tuple(sorted((k, _typed(v)) for k, v in node.attrs.items())))


def _typed(v):
    """An attribute value as a key that keeps apart what python calls equal: 1, 1.0 and True; 0.0 and -0.0;
    and lets NaN equal NaN."""
    if isinstance(v, tuple):
        return ("tuple",) + tuple(_typed(x) for x in v)
    if isinstance(v, float):
        return ("float", "nan" if math.isnan(v) else repr(v))
    if isinstance(v, (bool, int, str, type(None))):
        return (type(v).__name__, v)
    return (type(v).__name__, str(v))  # sympy dims: their canonical printed form
