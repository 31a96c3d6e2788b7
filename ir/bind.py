"""Checking a call's tensors against a graph's inputs and binding the symbolic dims."""
from __future__ import annotations

import torch

from ..errors import InputError
from .graph import Graph
from .types import dtype_name, eval_dim, shape_str


def bind_inputs(graph: Graph, tensors: list, *, check_dtype: bool = True) -> dict[str, int]:
    """Symbol values for this call. Raises :class:`InputError` naming the input, the dim, its value
    and the allowed value or range when a tensor does not fit."""
    if len(tensors) != len(graph.inputs):
        raise InputError(f"expected {len(graph.inputs)} input tensors "
                         f"({', '.join(i.attrs['name'] for i in graph.inputs)}), got {len(tensors)}")
    bindings: dict[str, int] = {}
    where: dict[str, str] = {}
    derived = []
    for node, t in zip(graph.inputs, tensors):
        name = node.attrs["name"]
        if not isinstance(t, torch.Tensor):
            raise InputError(f"input {name!r} must be a tensor, got {type(t).__name__}")
        if t.dim() != len(node.shape):
            raise InputError(f"input {name!r} has rank {t.dim()} (shape {list(t.shape)}), expected rank "
                             f"{len(node.shape)} (shape {shape_str(node.shape)})")
        if check_dtype and dtype_name(t.dtype) != node.dtype:
            raise InputError(f"input {name!r} has dtype {dtype_name(t.dtype)}, expected {node.dtype}",
                             hint=f"convert it with .to(torch.{node.dtype})")
        for i, (d, v) in enumerate(zip(node.shape, t.shape)):
            if isinstance(d, int):
                if d != v:
                    raise InputError(f"input {name!r}: dim {i} is {v}, but this graph was compiled for {d}",
                                     hint="declare the dim dynamic when compiling (dynamic={...: {%d: 'name'}})" % i)
            elif d.is_Symbol:
                lo, hi = graph.symbols[d.name]
                if not lo <= v <= hi:
                    raise InputError(f"input {name!r}: dim {i} ({d.name}) is {v}, outside the allowed range [{lo}, {hi}]")
                if d.name in bindings and bindings[d.name] != v:
                    raise InputError(f"input {name!r}: dim {i} ({d.name}) is {v}, but {where[d.name]} gave "
                                     f"{d.name} = {bindings[d.name]}; they must be equal")
                bindings[d.name] = v
                where[d.name] = f"input {name!r} dim {i}"
            else:
                derived.append((name, i, d, v))
    for name, i, d, v in derived:
        try:
            want = eval_dim(d, bindings)
        except KeyError:
            raise InputError(f"input {name!r}: dim {i} is {d}, which no other input determines") from None
        if want != v:
            raise InputError(f"input {name!r}: dim {i} is {v}, expected {d} = {want}")
    return bindings
