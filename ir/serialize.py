"""IR <-> JSON. Plain data only: no pickle, nothing executable.

Dims are ints or expression strings (``"2*seq"``); attribute values are JSON scalars and lists,
with two tagged forms: ``{"dim": "seq - 1"}`` for a symbolic attribute and ``{"float": "-inf"}``
for a non-finite float. Weights are not part of the JSON (they live in safetensors); the JSON
records each weight's shape and dtype so a mismatch is caught on load.
"""
from __future__ import annotations

import math

import sympy

from .graph import Graph, GraphError, Node
from .ops import OPS
from .types import TType, dim_from_json, dim_to_json

GRAPH_FORMAT_VERSION = 1


def _attr_to_json(v):
    if isinstance(v, sympy.Expr):
        return {"dim": str(v)}
    if isinstance(v, float) and not math.isfinite(v):
        return {"float": str(v)}
    if isinstance(v, tuple):
        return [_attr_to_json(x) for x in v]
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"attribute value {v!r} ({type(v).__name__}) cannot be stored")


def _attr_from_json(v):
    if isinstance(v, dict):
        if "dim" in v:
            return dim_from_json(v["dim"])
        if "float" in v:
            return float(v["float"])
        raise ValueError(f"unknown tagged attribute {v}")
    if isinstance(v, list):
        return tuple(_attr_from_json(x) for x in v)
    return v


def graph_to_json(graph: Graph) -> dict:
    return {
        "format": "kiln.graph",
        "version": GRAPH_FORMAT_VERSION,
        "symbols": {k: list(v) for k, v in graph.symbols.items()},
        "weights": {k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                    for k, t in graph.weights.items()},
        "nodes": [
            {"name": n.name, "op": n.op, "inputs": [i.name for i in n.inputs],
             "attrs": {k: _attr_to_json(v) for k, v in n.attrs.items()},
             "shape": [dim_to_json(d) for d in n.shape], "dtype": n.dtype, **({"loc": n.loc} if n.loc else {})}
            for n in graph.nodes
        ],
        "inputs": [n.name for n in graph.inputs],
        "outputs": [{"name": k, "node": o.name} for k, o in zip(graph.output_names, graph.outputs)],
        **({"updates": dict(graph.updates)} if graph.updates else {}),
    }


def graph_from_json(data: dict, weights: dict | None = None) -> Graph:
    """Rebuild a graph; ``weights`` (name -> tensor) are attached and checked against the JSON.
    Raises :class:`GraphError` saying what is wrong with the data."""
    if data.get("format") != "kiln.graph":
        raise GraphError("not a kiln graph (missing format tag)")
    if data.get("version", 0) > GRAPH_FORMAT_VERSION:
        raise GraphError(f"graph format version {data.get('version')} is newer than this kiln reads ({GRAPH_FORMAT_VERSION})")
    g = Graph()
    g.symbols = {k: (int(v[0]), int(v[1])) for k, v in data["symbols"].items()}
    by_name: dict[str, Node] = {}
    try:
        for nd in data["nodes"]:
            op = nd["op"]
            if op not in OPS:
                raise GraphError(f"node {nd['name']}: unknown op {op!r}")
            inputs = tuple(by_name[i] for i in nd["inputs"])
            attrs = {k: _attr_from_json(v) for k, v in nd["attrs"].items()}
            ttype = TType(tuple(dim_from_json(d) for d in nd["shape"]), nd["dtype"])
            node = Node(op, inputs, attrs, ttype, nd["name"], nd.get("loc"))
            g._names.add(node.name)
            g._append(node)
            by_name[node.name] = node
            if op == "INPUT":
                g.inputs.append(node)
            elif op == "WEIGHT":
                g._weight_nodes[attrs["name"]] = node
        g.inputs = [by_name[n] for n in data["inputs"]]
        g.set_outputs([by_name[o["node"]] for o in data["outputs"]], [o["name"] for o in data["outputs"]])
        g.updates = {str(k): str(v) for k, v in (data.get("updates") or {}).items()}
    except KeyError as e:
        raise GraphError(f"graph refers to an undefined node {e}") from None
    if weights is not None:
        for name, meta in data["weights"].items():
            t = weights.get(name)
            if t is None:
                raise GraphError(f"weight {name!r} is missing")
            if list(t.shape) != meta["shape"] or str(t.dtype).removeprefix("torch.") != meta["dtype"]:
                raise GraphError(f"weight {name!r} is {t.dtype}{list(t.shape)}, the graph expects {meta['dtype']}{meta['shape']}")
            g.weights[name] = t
        g.verify()
    return g
