"""The reference interpreter: runs a graph node by node with each op's reference implementation.

It is the oracle for passes and kernels. ``compute_dtype=torch.float64`` runs every floating-point
value in float64 (weights, inputs, casts), which is how pass tests compare graphs before and after.
"""
from __future__ import annotations

import torch

from .graph import Graph
from .ops import OPS, const_tensor
from .types import FLOAT_DTYPES, eval_attr, has_symbols


def interpret(graph: Graph, inputs: list, *, compute_dtype: torch.dtype | None = None,
              weights: dict | None = None) -> list[torch.Tensor]:
    from ..runtime.inputs import bind_inputs

    bindings = bind_inputs(graph, inputs, check_dtype=compute_dtype is None)
    weights = graph.weights if weights is None else weights

    def up(t: torch.Tensor) -> torch.Tensor:
        return t.to(compute_dtype) if compute_dtype is not None and t.is_floating_point() else t

    env: dict = {}
    for node, t in zip(graph.inputs, inputs):
        env[node] = up(t)
    for node in graph.nodes:
        if node.op == "INPUT":
            continue
        if node.op == "WEIGHT":
            env[node] = up(weights[node.attrs["name"]])
            continue
        attrs = {k: eval_attr(v, bindings) if has_symbols(v) else v for k, v in node.attrs.items()}
        if node.op == "CONST":
            env[node] = const_tensor(attrs["value"])
            continue
        if compute_dtype is not None and attrs.get("dtype") in FLOAT_DTYPES:
            attrs["dtype"] = str(compute_dtype).removeprefix("torch.")
        args = [env[i] for i in node.inputs]
        env[node] = OPS[node.op].ref(args, attrs)
    return [env[o] for o in graph.outputs]
