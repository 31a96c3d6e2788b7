"""What every aten handler module uses: the handler key of an FX call target, its arguments by schema name,
the dtype torch promotes operands to, and building the kiln nodes of an elementwise op the way torch
computes it. A handler is ``fn(cx, node, args, kwargs)`` with ``cx`` the importer (:mod:`.importer`)."""
from __future__ import annotations

import sympy
import torch

from ..graph import Node
from ..lowering import Unsupported
from ..types import dtype_name, torch_dtype


def handler_key(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target._schema.name.split("::")
        return f"{ns}.{name}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"hop.{target.name()}"
    mod = getattr(target, "__module__", None) or ""
    return f"{mod.lstrip('_')}.{getattr(target, '__name__', str(target))}".lstrip(".")


# in-place ops imported as their functional op where the importer follows the write (importer._functional: an
# input's or a fresh tensor's last write): aten.copy_ -> aten.copy, ...
INPLACE_AS = {"aten.copy_": "aten.copy", "aten.add_": "aten.add", "aten.sub_": "aten.sub", "aten.mul_": "aten.mul",
              "aten.div_": "aten.div"}


def functional_key(target) -> str:
    """``handler_key``, an ``INPLACE_AS`` op's as its functional op's: the handler that imports it, and what it reads
    to tell its ops apart."""
    key = handler_key(target)
    return INPLACE_AS.get(key, key)


def bind(node, args, kwargs) -> dict:
    """The call's arguments by schema name, defaults filled in."""
    out = {}
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(args) and not a.kwarg_only:
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            out[a.name] = None
    return out


def overload(node) -> str:
    return node.target._overloadname


def axis(a: int, rank: int) -> int:
    return a % rank if rank else 0


def expected(cx, node):
    t = cx.meta_type(node)
    if t is None:
        raise Unsupported("no recorded tensor type")
    return t


def cast(cx, x: Node, dtype: str) -> Node:
    return x if x.dtype == dtype else cx.add("CAST", [x], dtype=dtype)


def as_node(cx, v) -> Node:
    if isinstance(v, Node):
        return v
    if isinstance(v, (bool, int, float, sympy.Expr)):
        return cx.const(v)
    raise Unsupported(f"operand {v!r}")


def promoted(operands) -> str:
    """torch's promotion of the operands (python scalars are weak, 0-d tensors rank below others)."""
    acc = None
    for o in operands:
        if isinstance(o, Node):
            p = torch.ones(() if not o.shape else (1,), dtype=torch_dtype(o.dtype))
        else:
            p = 1 if isinstance(o, sympy.Expr) else o
        if acc is None:
            acc = p
            continue
        dt = torch.result_type(acc, p)
        rank = max(acc.dim() if isinstance(acc, torch.Tensor) else -1, p.dim() if isinstance(p, torch.Tensor) else -1)
        acc = torch.ones(() if rank <= 0 else (1,), dtype=dt) if rank >= 0 else torch.tensor(0, dtype=dt).item()
    if isinstance(acc, torch.Tensor):
        return dtype_name(acc.dtype)
    return dtype_name(torch.result_type(torch.tensor(0), acc)) if not isinstance(acc, bool) else "bool"


def elementwise(cx, node, op: str, *operands, promote=True) -> Node:
    """``op`` over operands promoted the way torch promotes them; the result has the recorded dtype."""
    if promote:
        dtype = promoted(operands)
        ins = [cast(cx, o, dtype) if isinstance(o, Node) else o for o in operands]
    else:
        ins = list(operands)
    out = cx.add(op, [as_node(cx, o) for o in ins])
    want = expected(cx, node).dtype
    return cast(cx, out, want)
