"""Evaluating IR nodes with their reference implementations: ONE ``eval_node`` that every executor of
reference ops uses, and the reference interpreter built on it.

The interpreter is the oracle for passes and kernels. ``compute_dtype=torch.float64`` runs every
floating-point value in float64 (weights, inputs, casts), which is how pass tests compare graphs before
and after. Storage-only dtypes (float8 codes of a quantized KV cache) stay what they are, like int8 codes.
"""
from __future__ import annotations

import itertools

import torch

from .bind import bind_inputs
from .graph import Graph, Node
from .ops import OPS, const_tensor
from .types import FLOAT_DTYPES, dtype_name, eval_attr, has_symbols


def node_attrs(node: Node, bindings: dict[str, int]) -> dict:
    """The node's attributes with every symbolic dim replaced by its value under ``bindings``."""
    return {k: eval_attr(v, bindings) if has_symbols(v) else v for k, v in node.attrs.items()}


def eval_node(node: Node, args: list, bindings: dict[str, int], attrs: dict | None = None,
              device: torch.device | str | None = None) -> torch.Tensor:
    """The value of ``node`` (not an INPUT or WEIGHT) for the values ``args`` of its inputs: its op's
    reference implementation, or a CONST's tensor; a node without inputs makes its tensor on ``device``
    (default the CPU). ``attrs``: the evaluated attributes, when the caller has them already (default:
    ``node_attrs(node, bindings)``)."""
    attrs = node_attrs(node, bindings) if attrs is None else attrs
    t = const_tensor(attrs["value"]) if node.op == "CONST" else OPS[node.op].ref(args, attrs)
    # a node without inputs (CONST, ARANGE, FULL) makes its tensor on the CPU; the rest follow their inputs
    return t if device is None or node.inputs else t.to(device)


def eval_nodes(nodes, env: dict, bindings: dict[str, int], weights: dict | None = None,
               device: torch.device | str | None = None) -> dict:
    """Evaluate ``nodes`` in order into ``env`` (node -> tensor), which must hold every other value they read;
    WEIGHT nodes read ``weights``, INPUT nodes are skipped (bound by the caller), constants are made on
    ``device``. Returns ``env``."""
    for n in nodes:
        if n.op == "WEIGHT":
            env[n] = weights[n.attrs["name"]]
        elif n.op != "INPUT":
            env[n] = eval_node(n, [env[i] for i in n.inputs], bindings, device=device)
    return env


def data_device(inputs: list, weights: dict) -> torch.device | None:
    """Where a run's constants are made: the first tensor input's device, else the weights' (None: no tensor)."""
    return next((t.device for t in itertools.chain(inputs, weights.values()) if isinstance(t, torch.Tensor)), None)


def interpret(graph: Graph, inputs: list, *, compute_dtype: torch.dtype | None = None,
              weights: dict | None = None) -> list[torch.Tensor]:
    bindings = bind_inputs(graph, inputs, check_dtype=compute_dtype is None)
    weights = graph.weights if weights is None else weights

    def up(t: torch.Tensor) -> torch.Tensor:
        return t.to(compute_dtype) if compute_dtype is not None and dtype_name(t.dtype) in FLOAT_DTYPES else t

    device = data_device(inputs, weights)
    env: dict = {}
    for node, t in zip(graph.inputs, inputs):
        env[node] = up(t)
    for node in graph.nodes:
        if node.op == "INPUT":
            continue
        if node.op == "WEIGHT":
            env[node] = up(weights[node.attrs["name"]])
            continue
        attrs = node_attrs(node, bindings)
        if compute_dtype is not None and attrs.get("dtype") in FLOAT_DTYPES:
            attrs["dtype"] = str(compute_dtype).removeprefix("torch.")
        env[node] = eval_node(node, [env[i] for i in node.inputs], bindings, attrs, device)
    return [env[o] for o in graph.outputs]
