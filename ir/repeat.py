"""A graph captured with a few layers of a model whose layers are one program on other weights, made as deep as the model
by repeating its last captured layer in the IR (no capture of the rest).

The graph holds captured layers ..., a, b (b the last), then a tail. ``owners`` says which weights and inputs belong to
which layer and in which role (``{graph name: (layer, role)}``: ``lifted_tensor_12 -> (1, "self_attn.q_proj.weight")``,
``k_cache_1 -> (1, "k_cache")``). Then:

- x_a, a's residual output: of the nodes every path from a's weights and inputs to the graph's outputs passes through
  (their common post-dominators; outputs that are updated inputs do not count), the last that does not depend on b's
  weights and inputs; x_b: the node as far along b's common post-dominators;
- b's block: what x_b and b's updated inputs need that x_a does not (ancestors of {x_b, U_b} minus ancestors of x_a);
- the check: b's block is a's, node for node (op, attrs, type; an input of b is a's input at the same place when it is
  shared, the same role's weight or input of a when it is b's own, and x_a where a reads its own residual input x_prev),
  i.e. x_b = f(x_a, W_b) and x_a = f(x_prev, W_a) for one f; the tail reads nothing of b's block but x_b;
- the repeat: x_k = f(x_{k-1}, W_k) for each new layer k: its inputs after b's inputs, its weights after b's weights, its
  nodes after b's, its updated inputs after b's among the outputs, so the graph is the one a capture of every layer
  imports (torch.export traces layer by layer); the tail then reads the last x.

Weights are named as torch.export names the constants it lifts, ``<prefix><N>`` numbered in first-use order: a new layer's
weight takes b's number plus P per layer (P: the numbers between a layer's weights and the next one's), the weights after
b's move up by P per new layer. A check that fails raises :class:`RepeatError` with the reason (the caller captures every
layer instead).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import networkx as nx
import torch

from .graph import Graph, Node, dims_equal_shapes

_SOURCES = ("INPUT", "WEIGHT", "CONST")


class RepeatError(ValueError):
    """The graph is not what repeating a layer assumes (the reason says which check failed)."""


@dataclass
class NewLayer:
    """A layer to add: its weights and its inputs' names, by the roles ``owners`` gives the captured layers'."""
    weights: dict[str, torch.Tensor]
    inputs: dict[str, str]


@dataclass
class _Layer:
    """A captured layer's anchors by role (its WEIGHT and INPUT nodes), its updated inputs' new values by role, and its
    residual output x."""
    weights: dict[str, Node]
    inputs: dict[str, Node]
    updates: dict[str, Node]
    x: Node | None = None

    def role_of(self) -> dict[Node, tuple[str, str]]:
        return {**{n: ("weights", r) for r, n in self.weights.items()}, **{n: ("inputs", r) for r, n in self.inputs.items()}}


def repeat_layers(graph: Graph, owners: dict[str, tuple[int, str]], new: list[NewLayer]) -> Graph:
    """``graph`` with the ``new`` layers after its last captured layer (see the module docstring); ``graph`` is left as it
    was. Raises :class:`RepeatError` when a check fails."""
    last = max((layer for layer, _ in owners.values()), default=-1)
    if last < 1:
        raise RepeatError("fewer than two captured layers")
    a, b = (_anchors(graph, owners, k) for k in (last - 1, last))
    if a.weights.keys() != b.weights.keys() or a.inputs.keys() != b.inputs.keys() or a.updates.keys() != b.updates.keys():
        raise RepeatError(f"layers {last - 1} and {last} have different weights or inputs")
    for k, layer in enumerate(new):
        if not b.weights.keys() <= layer.weights.keys() or layer.inputs.keys() != b.inputs.keys():
            raise RepeatError(f"new layer {k}'s weights or inputs are not the captured layers' roles")
        for role, t in layer.weights.items():
            w = b.weights[role]
            if tuple(t.shape) != w.shape or str(t.dtype).removeprefix("torch.") != w.dtype:
                raise RepeatError(f"new layer {k}'s {role} is {t.dtype}{list(t.shape)}, the captured one {w.dtype}{list(w.shape)}")
    dag = nx.DiGraph((i, n) for n in graph.nodes for i in n.inputs)
    dag.add_nodes_from(graph.nodes)
    _residual_outs(graph, dag, a, b)
    block = _block(graph, dag, a, b)
    _check_same_program(block, a, b)
    _check_tail(graph, block, b)
    return _splice(graph, block, a, b, new, _weight_names(graph, a, b, len(new)))


def _anchors(graph: Graph, owners: dict, layer: int) -> _Layer:
    weights = {owners[n.attrs["name"]][1]: n for n in graph.nodes
               if n.op == "WEIGHT" and owners.get(n.attrs["name"], (None,))[0] == layer}
    inputs = {owners[n.attrs["name"]][1]: n for n in graph.inputs if owners.get(n.attrs["name"], (None,))[0] == layer}
    by_input = {i.attrs["name"]: r for r, i in inputs.items()}
    updates = {by_input[graph.updates[name]]: o for o, name in zip(graph.outputs, graph.output_names)
               if graph.updates.get(name) in by_input}
    if not weights:
        raise RepeatError(f"layer {layer} has no weight in the graph")
    return _Layer(weights, inputs, updates)


def _post_dominators(graph: Graph, dag: nx.DiGraph) -> dict:
    """Each node's immediate post-dominator towards the graph's outputs (those that are updated inputs do not count: a
    layer's cache writes are outputs of their own), the outputs joined in one sink, ``_SINK``."""
    rev = dag.reverse(copy=True)
    rev.add_edges_from((_SINK, o) for o, name in zip(graph.outputs, graph.output_names) if name not in graph.updates)
    return nx.immediate_dominators(rev, _SINK)


_SINK = "sink"  # (the one node of the reversed graph that is no Node)


def _residual_outs(graph: Graph, dag: nx.DiGraph, a: _Layer, b: _Layer) -> None:
    """x_a: along the post-dominators of a's weights and inputs from their nearest common one, the last node that does not
    depend on b's (the residual stream where b begins); x_b: as many steps along b's."""
    idom = _post_dominators(graph, dag)
    chain_a, chain_b = _chain(idom, a), _chain(idom, b)
    later = set()
    for n in [*b.weights.values(), *b.inputs.values()]:
        later |= nx.descendants(dag, n)
    steps = next((k for k, n in enumerate(chain_a) if n in later), 0) - 1
    if steps < 0 or steps >= len(chain_b):
        raise RepeatError("no node of the graph ends one layer where the next begins")
    a.x, b.x = chain_a[steps], chain_b[steps]


def _chain(idom: dict, layer: _Layer) -> list[Node]:
    """The post-dominators of the layer's weights and inputs, from their nearest common one towards the outputs."""
    common: list | None = None
    for n in [*layer.weights.values(), *layer.inputs.values()]:
        if n not in idom:
            raise RepeatError(f"%{n.name} reaches no output of the graph")
        chain = []
        while idom.get(n, n) is not n and idom[n] is not _SINK:
            n = idom[n]
            chain.append(n)
        on = set(chain)
        common = chain if common is None else [m for m in common if m in on]
    if not common:
        raise RepeatError("the layer's weights reach the outputs through no single node (no residual output)")
    return common


def _block(graph: Graph, dag: nx.DiGraph, a: _Layer, b: _Layer) -> list[Node]:
    """The nodes layer b computes, in graph order: ancestors of x_b and b's updates that x_a does not need."""
    before = nx.ancestors(dag, a.x) | {a.x}
    need = {b.x, *b.updates.values()}
    for n in list(need):
        need |= nx.ancestors(dag, n)
    own = b.role_of()
    for n in need - before:
        if n.op in ("INPUT", "WEIGHT") and n not in own:
            raise RepeatError(f"layer b reads %{n.name}, which is none of its own weights or inputs nor read before it")
    return [n for n in graph.nodes if n in need and n not in before and n.op not in _SOURCES]


def _check_same_program(block: list[Node], a: _Layer, b: _Layer) -> None:
    """Walk b's block from its outputs (x_b, its updates) beside a's, pairing nodes; any difference is a RepeatError."""
    inside, own = set(block), b.role_of()
    anchors_a = {"weights": a.weights, "inputs": a.inputs}
    pairs = {}  # b node -> a node
    x_prev = []
    stack = [(b.x, a.x), *((u, a.updates[r]) for r, u in b.updates.items())]
    while stack:
        nb, na = stack.pop()
        if nb in pairs:
            if pairs[nb] is not na:
                raise RepeatError(f"%{nb.name} pairs with both %{pairs[nb].name} and %{na.name}")
            continue
        if (nb.op, nb.attrs, nb.dtype, len(nb.inputs)) != (na.op, na.attrs, na.dtype, len(na.inputs)) \
                or not dims_equal_shapes(nb.shape, na.shape):
            raise RepeatError(f"the layers differ: {nb!r} vs {na!r}")
        pairs[nb] = na
        for ib, ia in zip(nb.inputs, na.inputs):
            if ib in inside:
                stack.append((ib, ia))
            elif ib is a.x:
                x_prev.append(ia)
            elif ib in own:
                kind, role = own[ib]
                if anchors_a[kind][role] is not ia:
                    raise RepeatError(f"%{nb.name} reads {role} of its layer where %{na.name} reads %{ia.name}")
            elif ib is not ia:
                raise RepeatError(f"%{nb.name} reads %{ib.name} where %{na.name} reads %{ia.name}")
    if len(pairs) != len(inside) or len(set(pairs.values())) != len(pairs) or len(set(x_prev)) != 1:
        raise RepeatError("layer b's block does not pair one to one with layer a's, through one residual input")
    a_block = set(pairs.values())
    shared = {i for n in block for i in n.inputs if i not in inside and i is not a.x and i not in own}
    if shared & a_block:
        raise RepeatError("layer b reads a value computed inside layer a (other than its residual output)")


def _check_tail(graph: Graph, block: list[Node], b: _Layer) -> None:
    """Nothing after b reads b's block but x_b; no output is a value inside it but x_b and b's updates."""
    inside = set(block)
    for n in block:
        if n is not b.x and any(u not in inside for u in n.users):
            raise RepeatError(f"%{n.name}, inside the last captured layer, is read after it")
    allowed = {b.x, *b.updates.values()}
    if any(o in inside and o not in allowed for o in graph.outputs):
        raise RepeatError("an output of the graph is a value inside the last captured layer")


_NUMBERED = re.compile(r"^(.*?)(\d+)$")


def _weight_names(graph: Graph, a: _Layer, b: _Layer, count: int) -> dict:
    """{(k, role): name} of each new layer's weights (k = 1.. after b), and {old name: name} of the weights that move up."""
    def number(node):
        m = _NUMBERED.match(node.attrs["name"])
        if m is None:
            raise RepeatError(f"weight name {node.attrs['name']!r} is not <prefix><number>")
        return m.group(1), int(m.group(2))

    prefixes = {number(n)[0] for n in [*a.weights.values(), *b.weights.values()]}
    steps = {number(b.weights[r])[1] - number(a.weights[r])[1] for r in b.weights}
    if len(prefixes) != 1 or len(steps) != 1 or min(steps) <= 0:
        raise RepeatError("the layers' weights are not numbered one layer after the other")
    (prefix,), (step,) = prefixes, steps
    top = max(number(n)[1] for n in b.weights.values())
    names = {(k, r): f"{prefix}{number(n)[1] + k * step}" for k in range(1, count + 1) for r, n in b.weights.items()}
    for n in graph.nodes:
        if n.op == "WEIGHT" and _NUMBERED.match(n.attrs["name"]) and n not in b.role_of():
            p, i = number(n)
            if p == prefix and i > top:
                names[n.attrs["name"]] = f"{prefix}{i + count * step}"
    taken = list(names.values()) + [n.attrs["name"] for n in graph.nodes if n.op == "WEIGHT" and n.attrs["name"] not in names]
    if len(set(taken)) != len(taken):
        raise RepeatError("renumbered weight names collide")
    return names


def _splice(graph: Graph, block: list[Node], a: _Layer, b: _Layer, new: list[NewLayer], names: dict) -> Graph:
    """A new graph: ``graph``'s nodes in order, each new layer's inputs after b's last input, its weights after b's last
    weight and its nodes after b's last node (x_b); the tail reads the last layer's x."""
    if [n for n in graph.nodes if n.op == "INPUT"] != graph.inputs:
        raise RepeatError("the graph's inputs are not in the order of its INPUT nodes")
    g = Graph()
    g.symbols = dict(graph.symbols)
    env: dict[Node, Node] = {}
    last_input = max(b.inputs.values(), key=graph.inputs.index, default=None)
    last_weight = max(b.weights.values(), key=graph.nodes.index)
    layers: list[dict[Node, Node]] = [{} for _ in new]  # per new layer: b's node -> the new layer's
    for n in graph.nodes:
        env[n] = _copy(g, n, env, graph, names.get(n.attrs["name"]) if n.op == "WEIGHT" else None)
        if n is last_input:
            for k, layer in enumerate(new):
                layers[k].update({i: g.add_input(layer.inputs[r], i.shape, i.dtype) for r, i in b.inputs.items()})
        if n is last_weight:
            for k, layer in enumerate(new):
                layers[k].update({w: g.add_weight(names[(k + 1, r)], layer.weights[r]) for r, w in b.weights.items()})
        if n is b.x:
            for k in range(len(new)):
                local = {**env, **layers[k], a.x: env[b.x] if k == 0 else layers[k - 1][b.x]}
                for m in block:
                    local[m] = _copy(g, m, local, graph)
                layers[k] = local
            if new:
                env[b.x] = layers[-1][b.x]
    _set_outputs(g, graph, env, b, new, layers)
    g.verify()
    return g


def _copy(g: Graph, n: Node, env: dict, src: Graph, weight_name: str | None = None) -> Node:
    """``n`` of ``src`` appended to ``g``, reading ``env``'s nodes, named as an import names it there (op, then _1, _2...)."""
    if n.op == "INPUT":
        return g.add_input(n.attrs["name"], n.shape, n.dtype)
    if n.op == "WEIGHT":
        return g.add_weight(weight_name or n.attrs["name"], src.weights[n.attrs["name"]])
    if n.op == "CONST":
        return g.const(n.attrs["value"], name=_BASE.sub("", n.name))
    return g.add(n.op, [env[i] for i in n.inputs], name=_BASE.sub("", n.name), loc=n.loc, **n.attrs)


def _set_outputs(g: Graph, graph: Graph, env: dict, b: _Layer, new: list[NewLayer], layers: list[dict]) -> None:
    """``graph``'s outputs through ``env``, each new layer's updated inputs after b's (named as b's are, for the new input)."""
    outs, out_names = [], []
    g.updates = dict(graph.updates)
    last = max((graph.outputs.index(u) for u in b.updates.values()), default=None)
    for k, (o, name) in enumerate(zip(graph.outputs, graph.output_names)):
        outs.append(env[o])
        out_names.append(name)
        if k != last:
            continue
        for layer, local in zip(new, layers):
            for r, u in b.updates.items():
                old = b.inputs[r].attrs["name"]
                new_name = layer.inputs[r] + graph.output_names[graph.outputs.index(u)].removeprefix(old)
                outs.append(local[u])
                out_names.append(new_name)
                g.updates[new_name] = layer.inputs[r]
    g.set_outputs(outs, out_names)


_BASE = re.compile(r"_\d+$")
