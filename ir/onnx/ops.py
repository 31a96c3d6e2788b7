"""ONNX elementwise ops, reductions, norms, linear algebra -> kiln ops (see :mod:`.importer`; shapes and layout are in :mod:`.shape`).

A handler gets the importer, the NodeProto, its inputs (a Node, a :class:`Static`, or None for an
absent optional input) and its attributes, and returns the value (a list for several outputs).
``STATIC_EVAL`` handlers compute a node whose inputs are all small statics at import time; they
raise :class:`CannotEval` to leave it to the graph.
"""
from __future__ import annotations

import math
import operator

import numpy as np
import sympy

from ..einsum import lower_einsum
from ..graph import Node
from ..lowering import Unsupported
from ..registry import registrar
from ..types import FLOAT_DTYPES, dim
from .lower import axis_of, cast, operands
from .static import CannotEval, Static, kiln_dtype, py_scalar

HANDLERS: dict[str, object] = {}
STATIC_EVAL: dict[str, object] = {}
handles = registrar(HANDLERS)
evaluates = registrar(STATIC_EVAL)


# ----------------------------------------------------------------------------- static evaluation


def _elementwise_static(fn, ins: list[Static], dtype: str) -> Static:
    f = np.frompyfunc(fn, len(ins), 1)
    return Static(np.asarray(f(*(s.value for s in ins)), dtype=object), dtype)


def _int_div(a, b):
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        a, b = sympy.sympify(a), sympy.sympify(b)
        if a.is_nonnegative and b.is_positive:
            return dim(sympy.floor(a / b))
        raise CannotEval(f"{a} / {b}")
    if b == 0:
        raise CannotEval("division by zero")
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b > 0) else -q


def _compare(op):
    def fn(a, b):
        r = op(sympy.sympify(a), sympy.sympify(b)) if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic) else op(a, b)
        if r in (True, False) or r is sympy.true or r is sympy.false:
            return bool(r)
        raise CannotEval(f"cannot decide {a} vs {b}")
    return fn


def _eq(a, b):
    if isinstance(a, sympy.Basic) or isinstance(b, sympy.Basic):
        d = sympy.simplify(sympy.sympify(a) - sympy.sympify(b))
        if d == 0:
            return True
        if d.is_nonzero:
            return False
        raise CannotEval(f"cannot decide {a} == {b}")
    return a == b


def _max(*xs):
    return dim(sympy.Max(*xs)) if any(isinstance(x, sympy.Basic) for x in xs) else max(xs)


def _min(*xs):
    return dim(sympy.Min(*xs)) if any(isinstance(x, sympy.Basic) for x in xs) else min(xs)


def _concrete(fn):
    def f(*xs):
        if any(isinstance(x, sympy.Basic) for x in xs):
            raise CannotEval("symbolic operand")
        return fn(*xs)
    return f


# kiln op, python function for static evaluation (None: never static), result bool?
BINARY = {
    "Add": ("ADD", operator.add, False), "Sub": ("SUB", operator.sub, False), "Mul": ("MUL", operator.mul, False),
    "Div": ("DIV", None, False), "Pow": ("POW", _concrete(operator.pow), False), "Mod": ("MOD", None, False),
    "Equal": ("EQ", _eq, True), "Less": ("LT", _compare(operator.lt), True), "Greater": ("GT", _compare(operator.gt), True),
    "LessOrEqual": ("LE", _compare(operator.le), True), "GreaterOrEqual": ("GE", _compare(operator.ge), True),
    "And": ("AND", _concrete(lambda a, b: a and b), True), "Or": ("OR", _concrete(lambda a, b: a or b), True),
    "Xor": ("XOR", _concrete(lambda a, b: a != b), True),
    "BitwiseAnd": ("AND", _concrete(operator.and_), False), "BitwiseOr": ("OR", _concrete(operator.or_), False),
    "BitwiseXor": ("XOR", _concrete(operator.xor), False),
}
UNARY = {
    "Neg": ("NEG", operator.neg), "Abs": ("ABS", _concrete(abs)), "Exp": ("EXP", None), "Log": ("LOG", None),
    "Sqrt": ("SQRT", _concrete(math.sqrt)), "Reciprocal": ("RECIPROCAL", None), "Sin": ("SIN", None), "Cos": ("COS", None),
    "Tanh": ("TANH", None), "Sigmoid": ("SIGMOID", None), "Erf": ("ERF", None), "Relu": ("RELU", None),
    "Floor": ("FLOOR", lambda x: dim(sympy.floor(x)) if isinstance(x, sympy.Basic) else math.floor(x)),
    "Ceil": ("CEIL", lambda x: dim(sympy.ceiling(x)) if isinstance(x, sympy.Basic) else math.ceil(x)),
    "Not": ("NOT", _concrete(operator.not_)), "IsNaN": ("ISNAN", None),
}


@evaluates(*BINARY)
def _binary_static(cx, node, ins, attrs):
    op, fn, boolean = BINARY[node.op_type]
    a, b = ins
    if node.op_type == "Div":
        fn = _int_div if a.dtype not in FLOAT_DTYPES else _concrete(operator.truediv)
    if node.op_type == "Mod":
        if attrs.get("fmod", 0) or a.dtype in FLOAT_DTYPES:
            raise CannotEval("float modulo")
        fn = lambda x, y: dim(sympy.Mod(x, y)) if isinstance(x, sympy.Basic) or isinstance(y, sympy.Basic) else x % y  # noqa: E731
    if fn is None:
        raise CannotEval(node.op_type)
    return _elementwise_static(fn, [a, b], "bool" if boolean else a.dtype)


@evaluates(*UNARY)
def _unary_static(cx, node, ins, attrs):
    fn = UNARY[node.op_type][1]
    if fn is None or (ins[0].dtype == "bool") != (node.op_type == "Not"):
        raise CannotEval(node.op_type)
    return _elementwise_static(fn, ins, ins[0].dtype)


@evaluates("Max", "Min", "Sum")
def _variadic_static(cx, node, ins, attrs):
    fn = {"Max": _max, "Min": _min, "Sum": lambda *xs: sum(xs)}[node.op_type]
    return _elementwise_static(fn, ins, ins[0].dtype)


@evaluates("Where")
def _where_static(cx, node, ins, attrs):
    return _elementwise_static(lambda c, x, y: x if c else y, ins, ins[1].dtype)


@evaluates("Cast", "CastLike")
def _cast_static(cx, node, ins, attrs):
    dtype = kiln_dtype(attrs["to"]) if node.op_type == "Cast" else ins[1].dtype
    src = ins[0]
    if dtype == "bfloat16" or src.dtype == "bfloat16":
        raise CannotEval("bfloat16")

    def conv(v):
        if isinstance(v, sympy.Basic):
            if dtype in FLOAT_DTYPES or dtype in ("int64", "int32"):
                return v
            raise CannotEval(f"cast {v} to {dtype}")
        if dtype == "bool":
            return bool(v)
        if dtype not in FLOAT_DTYPES:
            if isinstance(v, float) and not math.isfinite(v):
                raise CannotEval("non-finite to int")
            return int(v)  # truncation toward zero, like ONNX Cast
        return float(v)
    return _elementwise_static(conv, [src], dtype)


@evaluates("Identity")
def _identity_static(cx, node, ins, attrs):
    return ins[0]


# ----------------------------------------------------------------------------- elementwise


def _elementwise(cx, op: str, values, dtype: str, **attrs) -> Node:
    out = cx.add(op, operands(cx, values), **attrs)
    return cast(cx, out, dtype)


@handles(*BINARY)
def _binary(cx, node, ins, attrs):
    op, _, boolean = BINARY[node.op_type]
    a, b = ins
    dtype = "bool" if boolean else a.dtype
    if node.op_type in ("And", "Or", "Xor") and a.dtype != "bool":
        raise Unsupported(f"logical {node.op_type} of {a.dtype}")
    if node.op_type == "Div" and a.dtype not in FLOAT_DTYPES:
        return _elementwise(cx, "DIV", [a, b], dtype, rounding="trunc")  # ONNX integer division truncates
    if node.op_type == "Mod" and (attrs.get("fmod", 0) or a.dtype in FLOAT_DTYPES):
        raise Unsupported("fmod (C-style remainder); kiln's MOD is the Python / torch.remainder one")
    if node.op_type == "Pow":
        return cast(cx, cx.add("POW", operands(cx, [a, b])), a.dtype)  # the exponent may have another type
    return _elementwise(cx, op, [a, b], dtype)


@handles(*UNARY)
def _unary(cx, node, ins, attrs):
    return cx.add(UNARY[node.op_type][0], [ins[0]])


@handles("Identity")
def _identity(cx, node, ins, attrs):
    return ins[0]


@handles("Dropout")
def _dropout(cx, node, ins, attrs):
    """Inference: the identity, and a mask of all True."""
    training = ins[2] if len(ins) > 2 else None
    if training is not None and (not isinstance(training, Static) or bool(training.item())):
        raise Unsupported("dropout in training mode")
    mask = cx.add("FULL", [], shape=ins[0].shape, value=True, dtype="bool") if len(node.output) > 1 and node.output[1] else None
    return [ins[0], mask]


@handles("Cast", "CastLike")
def _cast(cx, node, ins, attrs):
    dtype = kiln_dtype(attrs["to"]) if node.op_type == "Cast" else ins[1].dtype
    return cast(cx, ins[0], dtype)


@handles("Where")
def _where(cx, node, ins, attrs):
    cond, x, y = ins
    return _elementwise(cx, "WHERE", [cond, x, y], x.dtype)


@handles("Max", "Min", "Sum")
def _variadic(cx, node, ins, attrs):
    op = {"Max": "MAXIMUM", "Min": "MINIMUM", "Sum": "ADD"}[node.op_type]
    acc = ins[0]
    for v in ins[1:]:
        acc = _elementwise(cx, op, [acc, v], ins[0].dtype)
    return cx.node(acc)


@handles("Clip")
def _clip(cx, node, ins, attrs):
    x = ins[0]
    lo = ins[1] if len(ins) > 1 else None
    hi = ins[2] if len(ins) > 2 else None
    if all(v is None or (isinstance(v, Static) and v.concrete) for v in (lo, hi)):
        val = [None if v is None else py_scalar(v.item(), x.dtype) for v in (lo, hi)]
        return cx.add("CLAMP", [x], min=val[0], max=val[1]) if val != [None, None] else x
    if lo is not None:
        x = _elementwise(cx, "MAXIMUM", [x, lo], x.dtype)
    if hi is not None:
        x = _elementwise(cx, "MINIMUM", [x, hi], x.dtype)
    return x


@handles("Gelu")
def _gelu(cx, node, ins, attrs):
    return cx.add("GELU", [ins[0]], approximate=attrs.get("approximate", "none"))


@handles("LeakyRelu")
def _leaky_relu(cx, node, ins, attrs):
    x = cx.node(ins[0])
    neg = cx.add("MUL", [x, cx.const(float(attrs.get("alpha", 0.01)))])
    return cx.add("WHERE", [cx.add("LT", [x, cx.const(0.0)]), neg, x])


# ----------------------------------------------------------------------------- reductions


def _reduce_axes(cx, node, ins, attrs, rank: int):
    axes = attrs.get("axes")
    if axes is None and len(ins) > 1 and ins[1] is not None:
        axes = cx.ints(ins[1], "reduction axes")
    if not axes:
        return None if attrs.get("noop_with_empty_axes", 0) else tuple(range(rank))
    return tuple(sorted({axis_of(int(a), rank) for a in axes}))


REDUCE = {"ReduceSum": "SUM", "ReduceMean": "MEAN", "ReduceMax": "MAX", "ReduceMin": "MIN", "ReduceProd": "PROD"}


@evaluates(*REDUCE)
def _reduce_static(cx, node, ins, attrs):
    x = ins[0]
    axes = _reduce_axes(cx, node, ins, attrs, len(x.shape))
    if axes is None or node.op_type == "ReduceMean":
        raise CannotEval("not a static reduction")
    fn = {"ReduceSum": lambda v: sum(v), "ReduceProd": math.prod, "ReduceMax": lambda v: _max(*v),
          "ReduceMin": lambda v: _min(*v)}[node.op_type]
    arr = x.value
    keep = bool(attrs.get("keepdims", 1))
    moved = np.moveaxis(arr, axes, tuple(range(len(axes)))).reshape((-1,) + tuple(d for i, d in enumerate(arr.shape) if i not in axes))
    out = np.empty(moved.shape[1:], dtype=object)
    for idx in np.ndindex(*out.shape):
        out[idx] = fn(list(moved[(slice(None),) + idx]))
    if keep:
        out = out.reshape(tuple(1 if i in axes else d for i, d in enumerate(arr.shape)))
    return Static(out, x.dtype)


@handles(*REDUCE)
def _reduce(cx, node, ins, attrs):
    x = cx.node(ins[0])
    axes = _reduce_axes(cx, node, ins, attrs, len(x.shape))
    if axes is None:
        return x
    if not x.shape:
        return x
    return cx.add(REDUCE[node.op_type], [x], axes=axes, keepdim=bool(attrs.get("keepdims", 1)))


@handles("ArgMax", "ArgMin")
def _argmax(cx, node, ins, attrs):
    if attrs.get("select_last_index", 0):
        raise Unsupported("select_last_index=1")
    x = cx.node(ins[0])
    op = "ARGMAX" if node.op_type == "ArgMax" else "ARGMIN"
    return cx.add(op, [x], axes=(axis_of(attrs.get("axis", 0), len(x.shape)),), keepdim=bool(attrs.get("keepdims", 1)))


@handles("Softmax", "LogSoftmax")
def _softmax(cx, node, ins, attrs):
    x = cx.node(ins[0])
    op = "SOFTMAX" if node.op_type == "Softmax" else "LOG_SOFTMAX"
    return cx.add(op, [x], axis=axis_of(attrs.get("axis", -1), len(x.shape)))


@handles("CumSum")
def _cumsum(cx, node, ins, attrs):
    if attrs.get("exclusive", 0) or attrs.get("reverse", 0):
        raise Unsupported("exclusive / reverse cumulative sum")
    x = cx.node(ins[0])
    (ax,) = cx.ints(ins[1], "CumSum axis")
    return cast(cx, cx.add("CUMSUM", [x], axis=axis_of(int(ax), len(x.shape))), x.dtype)


# ----------------------------------------------------------------------------- norms, linear algebra


def _norm_param(cx, p, shape):
    """A Scale / B of a normalisation as the [*normalized dims] tensor kiln's norms take."""
    p = cx.node(p)
    if tuple(p.shape) == tuple(shape):
        return p
    if len(p.shape) > len(shape) and all(d == 1 for d in p.shape[: len(p.shape) - len(shape)]):
        return cx.add("RESHAPE", [p], shape=shape)
    return cx.add("EXPAND", [p], shape=shape)


@handles("LayerNormalization", "RMSNormalization")
def _norm(cx, node, ins, attrs):
    x = cx.node(ins[0])
    r = len(x.shape)
    k = r - axis_of(attrs.get("axis", -1), r)
    shape = x.shape[r - k:]
    params = [_norm_param(cx, p, shape) for p in ins[1:3] if p is not None]
    eps = float(attrs.get("epsilon", 1e-5))
    if node.op_type == "RMSNormalization":
        return [cx.add("RMSNORM", [x] + params[:1], eps=eps, dims=k)]
    y = cx.add("LAYERNORM", [x] + params, eps=eps, dims=k)
    return [y] + (_norm_stats(cx, x, k, eps, attrs) if len(node.output) > 1 else [])


def _norm_stats(cx, x: Node, k: int, eps: float, attrs) -> list[Node]:
    """LayerNormalization's Mean and InvStdDev outputs: mean(x) and 1 / sqrt(mean((x - mean(x))^2) + eps) over
    the last k dims, kept as size-1 dims, in the stash type."""
    xs = cast(cx, x, kiln_dtype(attrs.get("stash_type", 1)))
    axes = tuple(range(len(x.shape) - k, len(x.shape)))
    mean = cx.add("MEAN", [xs], axes=axes, keepdim=True)
    centered = cx.add("SUB", [xs, mean])
    var = cx.add("MEAN", [cx.add("MUL", [centered, centered])], axes=axes, keepdim=True)
    return [mean, cx.add("RSQRT", [cx.add("ADD", [var, cx.const(eps)])])]


@handles("MatMul")
def _matmul(cx, node, ins, attrs):
    return cx.add("MATMUL", [ins[0], ins[1]])


@handles("Gemm")
def _gemm(cx, node, ins, attrs):
    """alpha * A' @ B' + beta * C; ``x @ W^T + b`` (transB=1, alpha = beta = 1) is kiln's LINEAR."""
    a, b = cx.node(ins[0]), cx.node(ins[1])
    c = ins[2] if len(ins) > 2 else None
    alpha, beta = float(attrs.get("alpha", 1.0)), float(attrs.get("beta", 1.0))
    if attrs.get("transA", 0):
        a = cx.add("PERMUTE", [a], perm=(1, 0))
    c_node = cx.node(c) if c is not None and beta != 0 else None
    if attrs.get("transB", 0) and alpha == 1.0 and beta == 1.0 and (c_node is None or len(c_node.shape) == 1):
        return cx.add("LINEAR", [a, b] + ([c_node] if c_node is not None else []))
    if attrs.get("transB", 0):
        b = cx.add("PERMUTE", [b], perm=(1, 0))
    y = cx.add("MATMUL", [a, b])
    if alpha != 1.0:
        y = cx.add("MUL", [y, cx.const(alpha)])
    if c_node is not None:
        y = cx.add("ADD", [y, c_node if beta == 1.0 else cx.add("MUL", [c_node, cx.const(beta)])])
    return y


@handles("Conv")
def _conv(cx, node, ins, attrs):
    """2-d Conv is CONV2D; a 1-d one a CONV2D over [N, C, 1, L] (x and w given a unit height)."""
    x, w = cx.node(ins[0]), cx.node(ins[1])
    b = ins[2] if len(ins) > 2 else None
    if len(x.shape) not in (3, 4):
        raise Unsupported(f"{len(x.shape) - 2}-d convolution (kiln has 1-d and 2-d ones)")
    if attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise Unsupported(f"auto_pad={attrs['auto_pad']}")
    one_d, n = len(x.shape) == 3, len(x.shape) - 2
    stride, dilation = tuple(attrs.get("strides", (1,) * n)), tuple(attrs.get("dilations", (1,) * n))
    pads = list(attrs.get("pads", [0] * (2 * n)))  # [begin..., end...]
    if one_d:
        x = cx.add("RESHAPE", [x], shape=tuple(x.shape[:2]) + (1, x.shape[2]))
        w = cx.add("RESHAPE", [w], shape=tuple(w.shape[:2]) + (1, w.shape[2]))
        stride, dilation, pads = (1,) + stride, (1,) + dilation, [0, pads[0], 0, pads[1]]
    top, left, bottom, right = pads
    if (top, left) != (bottom, right):
        x = cx.add("PAD", [x], pads=((left, right), (top, bottom)))
        top = left = 0
    y = cx.add("CONV2D", [x, w] + ([b] if b is not None else []), stride=stride,
               padding=(top, left), dilation=dilation, groups=attrs.get("group", 1))
    if one_d:
        y = cx.add("RESHAPE", [y], shape=(y.shape[0], y.shape[1], y.shape[3]))
    return y


@handles("GlobalAveragePool")
def _global_average_pool(cx, node, ins, attrs):
    x = cx.node(ins[0])
    return cx.add("MEAN", [x], axes=tuple(range(2, len(x.shape))), keepdim=True)


@handles("Einsum")
def _einsum(cx, node, ins, attrs):
    return lower_einsum(cx, attrs["equation"], [cx.node(i) for i in ins], None)

