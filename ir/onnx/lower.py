"""What every ONNX handler module uses: a node's handler key, axes, casts and the operands of an
elementwise op. A handler is ``fn(cx, node, ins, attrs)`` with ``cx`` the importer (:mod:`.importer`),
``ins`` the node's inputs (a Node, a :class:`~.static.Static`, or None for an absent optional input)."""
from __future__ import annotations

from ..graph import Node
from ..lowering import Unsupported
from .static import Static


def key_of(node) -> str:
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"


def axis_of(a: int, rank: int) -> int:
    if not -max(rank, 1) <= a < max(rank, 1):
        raise Unsupported(f"axis {a} out of range for rank {rank}")
    return a % rank if rank else 0


def cast(cx, x, dtype: str) -> Node:
    x = cx.node(x)
    return x if x.dtype == dtype else cx.add("CAST", [x], dtype=dtype)


def operands(cx, values) -> list[Node]:
    """Nodes for an elementwise op's operands. A one-element constant beside a tensor of its dtype
    becomes a CONST scalar (so the graph reads ``x * 0.5``, the form the passes match, not a weight);
    it promotes to that tensor's dtype, as ONNX's same-type operands require."""
    nodes = [v for v in values if isinstance(v, Node)]
    out = []
    for v in values:
        if (isinstance(v, Static) and v.numel == 1 and (v.concrete or v.dtype == "int64")
                and v.dtype in ("float32", "float64", "float16", "bfloat16", "int64", "bool")
                and any(n.dtype == v.dtype and len(n.shape) >= len(v.shape) for n in nodes)):
            out.append(cx.const(v.item()))
        else:
            out.append(cx.node(v))
    return out
