"""Lowering of aten calls (as torch.export records them) onto the kiln op set: elementwise ops, casts,
identities, symbolic scalars. Reductions, norms, linear algebra and attention are in :mod:`.aten_nn`;
gathers, layout and creation in :mod:`.aten_shape`.

One handler per aten op family; a handler gets the importer, the FX node and the arguments with
every FX node already replaced by its kiln value (a Node, a python scalar, a symbolic dim or a list),
and returns the kiln value. Sizes come from the shapes torch.export recorded wherever they are the
ground truth (views, expands, splits), so no handler re-derives torch's ``-1`` or clamping rules.
A handler raises :class:`Unsupported` for a call it cannot lower; the importer reports them all.
"""
from __future__ import annotations

import torch

from ..graph import Node, dims_equal_shapes
from ..lowering import Unsupported
from ..registry import registrar
from ..types import FLOAT_DTYPES
from .lower import as_node, bind, cast, elementwise, expected, functional_key, handler_key, promoted

HANDLERS: dict[str, object] = {}
handles = registrar(HANDLERS)


_UNARY = {
    "aten.neg": "NEG", "aten.abs": "ABS", "aten.exp": "EXP", "aten.log": "LOG", "aten.sqrt": "SQRT",
    "aten.rsqrt": "RSQRT", "aten.reciprocal": "RECIPROCAL", "aten.sin": "SIN", "aten.cos": "COS",
    "aten.tanh": "TANH", "aten.sigmoid": "SIGMOID", "aten.erf": "ERF", "aten.relu": "RELU",
    "aten.silu": "SILU", "aten.floor": "FLOOR", "aten.ceil": "CEIL", "aten.logical_not": "NOT",
    "aten.isnan": "ISNAN",
}


@handles(*_UNARY)
def _unary(cx, node, args, kwargs):
    return elementwise(cx, node, _UNARY[handler_key(node.target)], args[0], promote=False)


@handles("aten.isinf", "aten.isposinf", "aten.isneginf", "aten.isfinite")
def _isinf(cx, node, args, kwargs):
    """|x| == inf, x == +inf, x == -inf; isfinite as x - x == 0 (NaN for inf and NaN). Integers are finite."""
    x, key = args[0], handler_key(node.target)
    if x.dtype not in FLOAT_DTYPES:
        return elementwise(cx, node, "EQ" if key == "aten.isfinite" else "NE", x, x, promote=False)
    if key == "aten.isfinite":
        return elementwise(cx, node, "EQ", cx.add("SUB", [x, x]), 0.0)
    inf = float("-inf") if key == "aten.isneginf" else float("inf")
    return elementwise(cx, node, "EQ", cx.add("ABS", [x]) if key == "aten.isinf" else x, inf)


@handles("aten.bitwise_not")
def _bitwise_not(cx, node, args, kwargs):
    if args[0].dtype != "bool":
        raise Unsupported("bitwise_not of integers")
    return cx.add("NOT", [args[0]])


@handles("aten.gelu")
def _gelu(cx, node, args, kwargs):
    a = bind(node, args, kwargs)
    return cx.add("GELU", [a["self"]], approximate=a["approximate"])


_BINARY = {
    "aten.add": "ADD", "aten.sub": "SUB", "aten.mul": "MUL", "aten.div": "DIV", "aten.true_divide": "DIV",
    "aten.pow": "POW", "aten.maximum": "MAXIMUM", "aten.minimum": "MINIMUM", "aten.remainder": "MOD",
    "aten.eq": "EQ", "aten.ne": "NE", "aten.lt": "LT", "aten.le": "LE", "aten.gt": "GT", "aten.ge": "GE",
    "aten.bitwise_and": "AND", "aten.bitwise_or": "OR", "aten.bitwise_xor": "XOR",
    "aten.__and__": "AND", "aten.__or__": "OR", "aten.__xor__": "XOR",
}


@handles(*_BINARY)
def _binary(cx, node, args, kwargs):
    op = _BINARY[functional_key(node.target)]  # (aten.add_ too: a last write the importer follows)
    a = bind(node, args, kwargs)
    x, y = a["self"], a.get("other", a.get("exponent"))
    alpha = a.get("alpha", 1)
    if alpha is not None and alpha != 1:
        y = elementwise(cx, node, "MUL", y, alpha) if isinstance(y, Node) else y * alpha
    if op == "DIV":
        mode = a.get("rounding_mode")
        if mode is not None:
            dtype = promoted([x, y])
            n = cx.add("DIV", [as_node(cx, cast(cx, x, dtype) if isinstance(x, Node) else x),
                               as_node(cx, cast(cx, y, dtype) if isinstance(y, Node) else y)], rounding=mode)
            return cast(cx, n, expected(cx, node).dtype)
    return elementwise(cx, node, op, x, y)


@handles("aten.rsub")
def _rsub(cx, node, args, kwargs):
    a = bind(node, args, kwargs)
    y = a["self"] if a["alpha"] == 1 else elementwise(cx, node, "MUL", a["self"], a["alpha"])
    return elementwise(cx, node, "SUB", a["other"], y)


@handles("aten.floor_divide")
def _floor_divide(cx, node, args, kwargs):
    x, y = args[0], args[1]
    dtype = promoted([x, y])
    n = cx.add("DIV", [as_node(cx, cast(cx, x, dtype) if isinstance(x, Node) else x), as_node(cx, y)], rounding="floor")
    return cast(cx, n, expected(cx, node).dtype)


@handles("aten.logical_and", "aten.logical_or", "aten.logical_xor")
def _logical(cx, node, args, kwargs):
    op = {"logical_and": "AND", "logical_or": "OR", "logical_xor": "XOR"}[handler_key(node.target)[5:]]
    x, y = (cast(cx, as_node(cx, v), "bool") for v in args[:2])
    return cx.add(op, [x, y])


@handles("aten.where")
def _where(cx, node, args, kwargs):
    if len(args) + len(kwargs) < 3:
        raise Unsupported("where(condition) with one argument (data-dependent shape)")
    cond, x, y = args[0], args[1], args[2]
    dtype = expected(cx, node).dtype
    x = cast(cx, x, dtype) if isinstance(x, Node) else x
    y = cast(cx, y, dtype) if isinstance(y, Node) else y
    if not isinstance(x, Node) and not isinstance(y, Node):
        x = cx.add("FULL", [], shape=(), value=x, dtype=dtype)
    return cast(cx, cx.add("WHERE", [cast(cx, cond, "bool"), as_node(cx, x), as_node(cx, y)]), dtype)


@handles("aten.masked_fill")
def _masked_fill(cx, node, args, kwargs):
    x, mask, value = args[0], args[1], args[2]
    if isinstance(value, Node):
        value = cast(cx, value, x.dtype)
    elif x.dtype == "bool":
        value = bool(value)
    elif x.dtype not in FLOAT_DTYPES:
        value = int(value)  # torch converts the fill value to the tensor's dtype: no promotion
    return cx.add("WHERE", [cast(cx, mask, "bool"), as_node(cx, value), x])


@handles("aten.clamp", "aten.clamp_min", "aten.clamp_max")
def _clamp(cx, node, args, kwargs):
    a = bind(node, args, kwargs)
    x, lo, hi = a["self"], a.get("min"), a.get("max")
    if isinstance(lo, Node) or isinstance(hi, Node):
        if lo is not None:
            x = elementwise(cx, node, "MAXIMUM", x, lo)
        if hi is not None:
            x = elementwise(cx, node, "MINIMUM", x, hi)
        return x
    return cx.add("CLAMP", [x], min=lo, max=hi)


@handles("aten.square")
def _square(cx, node, args, kwargs):
    return elementwise(cx, node, "MUL", args[0], args[0])


# ----------------------------------------------------------------------------- casts and identities


@handles("aten._to_copy", "aten.to", "aten.type_as", "aten._to_dtype")
def _to(cx, node, args, kwargs):
    return cast(cx, args[0], expected(cx, node).dtype)


@handles("aten.promote_types")
def _promote_types(cx, node, args, kwargs):
    # torch.promote_types on two dtypes (a value, not a tensor: what a cast after it reads from its own record)
    a, b = bind(node, args, kwargs).values()
    if not (isinstance(a, torch.dtype) and isinstance(b, torch.dtype)):
        raise Unsupported(f"promote_types of {a!r} and {b!r}")
    return torch.promote_types(a, b)


@handles("aten.alias", "aten.clone", "aten.contiguous", "aten.detach", "aten.lift_fresh_copy",
         "aten.dropout", "aten.feature_dropout", "aten.alpha_dropout", "aten.copy")
def _identity(cx, node, args, kwargs):
    if handler_key(node.target).endswith("dropout") and (args[2] if len(args) > 2 else kwargs.get("train")):
        raise Unsupported("dropout in training mode (call model.eval() first)")
    src = args[1] if functional_key(node.target) == "aten.copy" else args[0]
    want = expected(cx, node)
    out = cast(cx, src, want.dtype)
    return out if dims_equal_shapes(out.shape, want.shape) else cx.add("EXPAND", [out], shape=want.shape)  # copy_ broadcasts


@handles("aten.native_dropout")
def _native_dropout(cx, node, args, kwargs):
    if args[2]:  # what F.dropout(training=True) becomes once functionalised
        raise Unsupported("dropout in training mode (call model.eval() first)")
    return [args[0], None]


@handles("aten._assert_tensor_metadata", "aten._assert_scalar", "aten.sym_constrain_range",
         "aten.sym_constrain_range_for_size", "aten._assert_async", "aten._functional_assert_async",
         "aten._functional_assert_scalar")
def _assert(cx, node, args, kwargs):
    return None  # kiln checks input ranges itself; these carry no values


# ----------------------------------------------------------------------------- symbolic scalars


@handles("aten.sym_size", "aten.sym_numel", "aten.sym_stride", "aten.sym_storage_offset",
         "operator.add", "operator.sub", "operator.mul", "operator.floordiv", "operator.truediv",
         "operator.mod", "operator.neg", "operator.pow", "operator.eq", "operator.ne", "operator.lt",
         "operator.le", "operator.gt", "operator.ge", "operator.and_", "operator.or_",
         "torch.sym_max", "torch.sym_min", "torch.sym_float", "torch.sym_int", "torch.sym_not",
         "torch.sym_sum", "math.floor", "math.ceil", "torch.sym_ite")
def _symbolic(cx, node, args, kwargs):
    return cx.sym_expr(node.meta["val"])


@handles("operator.getitem")
def _getitem(cx, node, args, kwargs):
    seq, i = args
    if not isinstance(seq, (list, tuple)):
        raise Unsupported(f"getitem on {type(seq).__name__}")
    v = seq[i]
    if v is None:
        raise Unsupported(f"output {i} of {node.args[0].target} (only the main output is supported)")
    return v

