"""Horizontal GEMM fusion: every GEMM that reads one input becomes one wider GEMM and a split.

    LINEAR(x, W1[, b1]), ..., LINEAR(x, Wn[, bn])
        ->  y = LINEAR(x, concat(W1, ..., Wn), concat(b1, ..., bn));  SLICE(y, -1, o_i, o_i + out_i)  for each i

Covers Q/K/V, gate/up, and in DiT the per-block timestep-MLP first layers and (after CSE) the adaLN
projections of every block. One function for any N >= 2.
"""
from __future__ import annotations

import torch

from ..ir.graph import Graph, Node
from ..ir.ops import SOURCE_OPS
from .report import PassStats


def fuse_horizontal_gemm(graph: Graph) -> PassStats:
    """LINEAR(x, W_i[, b_i]) for i = 1..N (N >= 2, same x)  ->  SLICE_i(LINEAR(x, [W_1; ...; W_N], [b_1; ...; b_N]))

    - Weights and biases must be stored WEIGHT nodes: they are concatenated at compile time along
      out-features, in graph order (q, k, v; gate before up: a later epilogue pass recognises
      ``silu(slice0) * slice1``).
    - ``MATMUL(x, W)`` with ``W`` a 2-d WEIGHT ``[in, out]`` joins as ``LINEAR(x, W^T)`` (transposed here).
    - Mixed bias: a GEMM without a bias gets a zero bias when any GEMM of its group has one
      (one GEMM instead of two; the extra adds are free in the epilogue).
    - Output widths may differ; there is no cap on the merged width (DiT-XL/2's 28 adaLN
      projections make one GEMM of width 28 * 6 * 1152).
    - Cycles: the merged GEMM reads only ``x`` and WEIGHT nodes, and ``x`` precedes every member, so
      merging cannot close a cycle. GEMMs that read different nodes are never merged, even when one
      input is computed from another GEMM's output. The reachability guard below re-checks this
      and declines any member the merged GEMM's inputs would depend on.
    - Dtypes: LINEAR / MATMUL operands share one dtype (ops.py), so GEMMs on one input node already agree.
    """
    stats = PassStats()
    order = {n: i for i, n in enumerate(graph.nodes)}
    by_input: dict[Node, list[Node]] = {}
    for n in graph.nodes:
        if _is_gemm(n):
            by_input.setdefault(n.inputs[0], []).append(n)

    for x, gemms in by_input.items():
        group = []
        for g in gemms:
            why = _why_not(graph, g)
            if why is None:
                group.append(g)
            elif len(gemms) > 1:
                stats.decline(why, g, input=x.name)
        if len(group) == 1:
            why = "single consumer: only one GEMM reads this input" if len(gemms) == 1 else "no other GEMM on this input can join it"
            stats.decline(why, group[0], input=x.name)
        if len(group) < 2:
            continue
        group = _without_cycles(x, group, stats)
        if len(group) < 2:
            continue
        group.sort(key=order.__getitem__)
        _merge(graph, x, group)
        stats.rewritten += 1
    if stats.rewritten:
        graph.remove_dead()
        graph.toposort()
    return stats


# ----------------------------------------------------------------------------- pattern / guard


def _is_gemm(n: Node) -> bool:
    """``LINEAR(x, w[, b])`` or ``MATMUL(x, w)`` with a 2-d right operand: ``x @ w`` over the last dim of x."""
    return n.op == "LINEAR" or (n.op == "MATMUL" and len(n.inputs[1].shape) == 2)


def _why_not(graph: Graph, n: Node) -> str | None:
    """The reason ``n`` cannot join a horizontal GEMM, or None."""
    w = n.inputs[1]
    if w.op != "WEIGHT":
        return f"weight is computed ({w.op}), not a stored WEIGHT: cannot concatenate at compile time"
    if any(i.op == "WEIGHT" and i.attrs["name"] not in graph.weights for i in n.inputs[1:]):
        return "weight has no stored tensor"
    if len(n.inputs) == 3 and n.inputs[2].op != "WEIGHT":
        return f"bias is computed ({n.inputs[2].op}), not a stored WEIGHT"
    return None


def _without_cycles(x: Node, group: list[Node], stats: PassStats) -> list[Node]:
    """Drop every member that the merged GEMM's inputs (x, weights, biases) depend on (transitively):
    merging it would make the merged GEMM read its own output."""
    members = set(group)
    hit: set[Node] = set()
    seen: set[Node] = set()
    stack = [x] + [i for g in group for i in g.inputs[1:]]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n in members:
            hit.add(n)
        if n.op not in SOURCE_OPS:
            stack.extend(n.inputs)
    for g in hit:
        stats.decline("would create a cycle: the merged GEMM's inputs depend on this GEMM", g, input=x.name)
    return [g for g in group if g not in hit]


# ----------------------------------------------------------------------------- builder


def _merge(graph: Graph, x: Node, group: list[Node]) -> Node:
    ws = [_out_in(graph, g) for g in group]  # each [out_i, in]
    weight = graph.add_weight(_fresh(graph, _fused_name([g.inputs[1].attrs["name"] for g in group])), torch.cat(ws, 0))
    inputs = [x, weight]
    if any(len(g.inputs) == 3 for g in group):
        bs = [graph.weights[g.inputs[2].attrs["name"]] if len(g.inputs) == 3 else w.new_zeros(w.shape[0]) for g, w in zip(group, ws)]
        inputs.append(graph.add_weight(_fresh(graph, _bias_name(weight.attrs["name"])), torch.cat(bs, 0)))
    fused = graph.add("LINEAR", inputs, name=f"{group[0].name}_hgemm{len(group)}", loc=group[0].loc)
    axis, start, parts = len(fused.shape) - 1, 0, []
    for g, w in zip(group, ws):
        part = graph.add("SLICE", [fused], name=g.name, loc=g.loc, axis=axis, start=start, end=start + w.shape[0])
        graph.replace_all_uses(g, part)
        # a MATMUL's weight is [in, out]: its part of the merged weight is that weight transposed ("^T")
        parts.append((g.inputs[1].attrs["name"] + ("" if g.op == "LINEAR" else "^T"), start, start + w.shape[0]))
        start += w.shape[0]
    graph.weight_parts[weight.attrs["name"]] = tuple(parts)
    return fused


def _out_in(graph: Graph, g: Node) -> torch.Tensor:
    """The stored weight of ``g`` as ``[out, in]`` (MATMUL's ``[in, out]`` transposed at compile time)."""
    w = graph.weights[g.inputs[1].attrs["name"]]
    return w if g.op == "LINEAR" else w.t().contiguous()


def _fused_name(names: list[str]) -> str:
    """``a.q_proj.weight, a.k_proj.weight, a.v_proj.weight -> a.q_proj+k_proj+v_proj.weight``; many
    names: ``blocks.0.norm1.linear..27.norm1.linear(28).weight`` style, first..last(N)."""
    parts = [n.split(".") for n in names]
    pre = 0
    while all(len(p) > pre + 1 for p in parts) and len({p[pre] for p in parts}) == 1:
        pre += 1
    suf = 0
    while all(len(p) > pre + suf + 1 for p in parts) and len({p[-1 - suf] for p in parts}) == 1:
        suf += 1
    mids = [".".join(p[pre:len(p) - suf]) for p in parts]
    mid = "+".join(mids) if len(mids) <= 4 else f"{mids[0]}..{mids[-1]}({len(mids)})"
    p0 = parts[0]
    return ".".join(p0[:pre] + [mid] + p0[len(p0) - suf:]) if suf else ".".join(p0[:pre] + [mid])


def _bias_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight") + ".bias" if weight_name.endswith(".weight") else weight_name + ".bias"


def _fresh(graph: Graph, name: str) -> str:
    """``name``, or ``name_2``, ... when a weight of that name exists (add_weight would return it)."""
    taken = set(graph.weights) | {n.attrs["name"] for n in graph.nodes if n.op == "WEIGHT"}
    out, k = name, 2
    while out in taken:
        out, k = f"{name}_{k}", k + 1
    return out
