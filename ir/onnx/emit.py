"""kiln ops -> standard ONNX ops, one emitter per op family (see :mod:`.export`).

An emitter gets the exporter, the kiln node and the base name for its values, and returns the ONNX
value holding the node's result. Operands come from ``ex.arg(node, dtype)``, cast to the dtype the
op computes in (ONNX wants one type where kiln promotes like torch). An op missing here is exported
as a ``kiln``-domain node, so a new op needs no code here unless it has a standard equivalent.
"""
from __future__ import annotations

import math

from onnx import TensorProto, helper

from ..graph import Node
from ..ops import attention_operands, result_dtype
from ..registry import registrar
from ..types import FLOAT_DTYPES, TType, dims_equal
from .static import KILN_TO_ONNX

EMITTERS: dict[str, object] = {}


emits = registrar(EMITTERS)


def promoted(n: Node) -> str:
    """The dtype a comparison computes in: torch's promotion of its operands (CONST scalars weak)."""
    types = [TType(i.shape, i.dtype) for i in n.inputs]
    return result_dtype("ADD", types, {}, lambda t, _: t[0] + t[1]) if len(types) == 2 else types[0].dtype


# ----------------------------------------------------------------------------- elementwise

UNARY = {"NEG": "Neg", "ABS": "Abs", "EXP": "Exp", "LOG": "Log", "SQRT": "Sqrt", "RECIPROCAL": "Reciprocal",
         "SIN": "Sin", "COS": "Cos", "TANH": "Tanh", "SIGMOID": "Sigmoid", "ERF": "Erf", "RELU": "Relu",
         "FLOOR": "Floor", "CEIL": "Ceil"}


@emits(*UNARY)
def _unary(ex, n, base):
    if n.op in ("FLOOR", "CEIL") and n.dtype not in FLOAT_DTYPES:
        return ex.arg(n.inputs[0], n.dtype)  # torch rounds integers to themselves
    return ex.emit(UNARY[n.op], [ex.arg(n.inputs[0], n.dtype)], base)


@emits("NOT")
def _not(ex, n, base):
    return ex.emit("Not", [ex.arg(n.inputs[0], "bool")], base)


@emits("ISNAN")
def _isnan(ex, n, base):
    x = n.inputs[0]
    if x.dtype not in FLOAT_DTYPES:  # never NaN: not (x == x) is all False
        xv = ex.arg(x)
        return ex.emit("Not", [ex.emit("Equal", [xv, xv], base + "_eq")], base)
    return ex.emit("IsNaN", [ex.arg(x)], base)


@emits("RSQRT")
def _rsqrt(ex, n, base):
    return ex.emit("Reciprocal", [ex.emit("Sqrt", [ex.arg(n.inputs[0], n.dtype)], base + "_sqrt")], base)


@emits("SILU")
def _silu(ex, n, base):
    x = ex.arg(n.inputs[0], n.dtype)
    return ex.emit("Mul", [x, ex.emit("Sigmoid", [x], base + "_sigmoid")], base)


@emits("GELU")
def _gelu(ex, n, base):
    """0.5 x (1 + erf(x / sqrt 2)); tanh form: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))"""
    x, dt = ex.arg(n.inputs[0], n.dtype), n.dtype
    if n.attrs["approximate"] == "tanh":
        cube = ex.emit("Mul", [ex.emit("Mul", [x, x], base + "_sq"), x], base + "_cube")
        inner = ex.emit("Add", [x, ex.emit("Mul", [cube, ex.scalar(0.044715, dt)], base + "_c")], base + "_inner")
        t = ex.emit("Tanh", [ex.emit("Mul", [inner, ex.scalar(math.sqrt(2 / math.pi), dt)], base + "_s")], base + "_tanh")
    else:
        t = ex.emit("Erf", [ex.emit("Div", [x, ex.scalar(math.sqrt(2.0), dt)], base + "_s")], base + "_erf")
    half = ex.emit("Mul", [x, ex.scalar(0.5, dt)], base + "_half")
    return ex.emit("Mul", [half, ex.emit("Add", [t, ex.scalar(1.0, dt)], base + "_1p")], base)


BINARY = {"ADD": "Add", "SUB": "Sub", "MUL": "Mul", "POW": "Pow", "MAXIMUM": "Max", "MINIMUM": "Min"}
COMPARE = {"EQ": "Equal", "LT": "Less", "LE": "LessOrEqual", "GT": "Greater", "GE": "GreaterOrEqual"}


@emits(*BINARY)
def _binary(ex, n, base):
    return ex.emit(BINARY[n.op], [ex.arg(i, n.dtype) for i in n.inputs], base)


@emits(*COMPARE, "NE")
def _compare(ex, n, base):
    dt = promoted(n)
    ins = [ex.arg(i, dt) for i in n.inputs]
    if n.op == "NE":
        return ex.emit("Not", [ex.emit("Equal", ins, base + "_eq")], base)
    return ex.emit(COMPARE[n.op], ins, base)


@emits("AND", "OR", "XOR")
def _logical(ex, n, base):
    if n.dtype == "bool":
        return ex.emit(n.op.capitalize(), [ex.arg(i, "bool") for i in n.inputs], base)
    return ex.emit("Bitwise" + n.op.capitalize(), [ex.arg(i, n.dtype) for i in n.inputs], base)


@emits("DIV")
def _div(ex, n, base):
    dt, mode = n.dtype, n.attrs["rounding"]
    a, b = (ex.arg(i, dt) for i in n.inputs)
    if dt not in FLOAT_DTYPES:
        return ex.emit("Div", [a, b], base) if mode != "floor" else ex._floordiv(a, b)  # integer Div truncates
    if mode is None:
        return ex.emit("Div", [a, b], base)
    q = ex.emit("Div", [a, b], base + "_q")
    if mode == "floor":
        return ex.emit("Floor", [q], base)
    neg = ex.emit("Less", [q, ex.scalar(0.0, dt)], base + "_neg")
    return ex.emit("Where", [neg, ex.emit("Ceil", [q], base + "_ceil"), ex.emit("Floor", [q], base + "_floor")], base)


@emits("MOD")
def _mod(ex, n, base):
    """torch.remainder: the sign of the divisor (ONNX Mod fmod=0 on integers; a - floor(a / b) * b on floats)."""
    dt = n.dtype
    a, b = (ex.arg(i, dt) for i in n.inputs)
    if dt not in FLOAT_DTYPES:
        return ex.emit("Mod", [a, b], base)
    q = ex.emit("Floor", [ex.emit("Div", [a, b], base + "_q")], base + "_floor")
    return ex.emit("Sub", [a, ex.emit("Mul", [q, b], base + "_qb")], base)


@emits("WHERE")
def _where(ex, n, base):
    c, x, y = n.inputs
    return ex.emit("Where", [ex.arg(c, "bool"), ex.arg(x, n.dtype), ex.arg(y, n.dtype)], base)


@emits("CAST")
def _cast(ex, n, base):
    return ex.emit("Cast", [ex.arg(n.inputs[0])], base, to=KILN_TO_ONNX[n.dtype])


@emits("CLAMP")
def _clamp(ex, n, base):
    lo, hi = n.attrs["min"], n.attrs["max"]
    ins = [ex.arg(n.inputs[0], n.dtype), ex.scalar(lo, n.dtype) if lo is not None else "",
           ex.scalar(hi, n.dtype) if hi is not None else ""]
    return ex.emit("Clip", ins, base)


# ----------------------------------------------------------------------------- reductions

REDUCE = {"SUM": "ReduceSum", "MEAN": "ReduceMean", "MAX": "ReduceMax", "MIN": "ReduceMin", "PROD": "ReduceProd"}


def _axes(ex, axes) -> str:
    return ex.constant(list(axes), "int64", (len(axes),))


@emits(*REDUCE)
def _reduce(ex, n, base):
    return ex.emit(REDUCE[n.op], [ex.arg(n.inputs[0], n.dtype), _axes(ex, n.attrs["axes"])], base,
                   keepdims=int(n.attrs["keepdim"]))


@emits("ANY", "ALL")
def _any_all(ex, n, base):
    x = ex.arg(n.inputs[0], "int32")
    r = ex.emit("ReduceMax" if n.op == "ANY" else "ReduceMin", [x, _axes(ex, n.attrs["axes"])], base + "_r",
                keepdims=int(n.attrs["keepdim"]))
    return ex.emit("Cast", [r], base, to=TensorProto.BOOL)


@emits("ARGMAX", "ARGMIN")
def _argmax(ex, n, base):
    return ex.emit("ArgMax" if n.op == "ARGMAX" else "ArgMin", [ex.arg(n.inputs[0])], base, axis=n.attrs["axes"][0],
                   keepdims=int(n.attrs["keepdim"]))


@emits("CUMSUM")
def _cumsum(ex, n, base):
    return ex.emit("CumSum", [ex.arg(n.inputs[0], n.dtype), ex.constant(n.attrs["axis"], "int64")], base)


@emits("SOFTMAX", "LOG_SOFTMAX")
def _softmax(ex, n, base):
    return ex.emit("Softmax" if n.op == "SOFTMAX" else "LogSoftmax", [ex.arg(n.inputs[0], n.dtype)], base, axis=n.attrs["axis"])


# ----------------------------------------------------------------------------- norms, linear algebra


def _norm_input(ex, n, base) -> tuple:
    """The value normalised (x, or x + residual) and the parameter nodes."""
    ins = list(n.inputs)
    if not n.attrs.get("residual"):
        return ex.arg(ins[0]), ins[0].dtype, ins[1:]
    x, r = ins[0], ins[-1]
    dt = result_dtype("ADD", [x.type, r.type], {}, lambda t, _: t[0] + t[1])
    return ex.emit("Add", [ex.arg(x, dt), ex.arg(r, dt)], base + "_sum"), dt, ins[1:-1]


@emits("LAYERNORM")
def _layernorm(ex, n, base):
    x, dt, params = _norm_input(ex, n, base)
    k = n.attrs["dims"]
    shape = n.shape[-k:]
    scale = ex.arg(params[0], dt) if params else ex.emit("ConstantOfShape", [ex.shape(shape)], base + "_ones",
                                                         value=_fill(1.0, dt))
    ins = [x, scale] + ([ex.arg(params[1], dt)] if len(params) > 1 else [])
    y = ex.emit("LayerNormalization", ins, base if dt == n.dtype else base + "_ln", axis=-k, epsilon=n.attrs["eps"])
    return ex.cast(y, dt, n.dtype) if dt != n.dtype else y


@emits("RMSNORM")
def _rmsnorm(ex, n, base):
    """y = x * 1/sqrt(mean(x^2) + eps), in float32 for half inputs, back to x's dtype, then * w."""
    x, dt, params = _norm_input(ex, n, base)
    acc_dt = "float32" if dt in ("float16", "bfloat16") else dt
    acc = ex.cast(x, dt, acc_dt)
    k = n.attrs["dims"]
    axes = _axes(ex, list(range(len(n.shape) - k, len(n.shape))))
    ms = ex.emit("ReduceMean", [ex.emit("Mul", [acc, acc], base + "_sq"), axes], base + "_ms", keepdims=1)
    inv = ex.emit("Reciprocal", [ex.emit("Sqrt", [ex.emit("Add", [ms, ex.scalar(n.attrs["eps"], acc_dt)], base + "_eps")],
                                         base + "_rms")], base + "_inv")
    y = ex.cast(ex.emit("Mul", [acc, inv], base + "_norm"), acc_dt, dt)
    if not params:
        return ex.cast(y, dt, n.dtype)
    return ex.emit("Mul", [ex.cast(y, dt, n.dtype), ex.arg(params[0], n.dtype)], base)


def _fill(value, dtype: str):
    return helper.make_tensor("value", KILN_TO_ONNX[dtype], [1], [value])


@emits("LINEAR")
def _linear(ex, n, base):
    x, w = ex.arg(n.inputs[0]), ex.arg(n.inputs[1])
    wt = ex.emit("Transpose", [w], base + "_wT", perm=[1, 0])
    if len(n.inputs) == 2:
        return ex.emit("MatMul", [x, wt], base)
    return ex.emit("Add", [ex.emit("MatMul", [x, wt], base + "_mm"), ex.arg(n.inputs[2])], base)


@emits("MATMUL")
def _matmul(ex, n, base):
    return ex.emit("MatMul", [ex.arg(i) for i in n.inputs], base)


@emits("CONV2D")
def _conv(ex, n, base):
    a = n.attrs
    (ph, pw) = a["padding"]
    return ex.emit("Conv", [ex.arg(i) for i in n.inputs], base, strides=list(a["stride"]), pads=[ph, pw, ph, pw],
                   dilations=list(a["dilation"]), group=a["groups"])


@emits("ATTENTION")
def _attention(ex, n, base):
    """softmax(q @ k^T * scale + mask) @ v (the scaled scores soft-capped first: c * tanh(s / c)); GQA repeats each kv
    head; causal keeps j <= i; quantized k / v dequantized first (codes as float32 * their scale, cast to q's dtype)."""
    q, k, v, mask, k_scale, v_scale = attention_operands(n.inputs, n.attrs)
    dt = q.dtype
    kn, vn = (ex.arg(t) if s is None else _dequantized(ex, t, s, dt, base + suffix)
              for t, s, suffix in ((k, k_scale, "_k"), (v, v_scale, "_v")))
    if n.attrs["gqa"] and not _same(q.shape[-3], k.shape[-3]):
        rep = q.shape[-3] // k.shape[-3]
        kn, vn = (_repeat_heads(ex, t, node.shape, rep, base + suffix) for t, node, suffix in ((kn, k, "_k"), (vn, v, "_v")))
    r = len(q.shape)
    kt = ex.emit("Transpose", [kn], base + "_kT", perm=list(range(r - 2)) + [r - 1, r - 2])
    scale = n.attrs["scale"] if n.attrs["scale"] is not None else 1.0 / math.sqrt(q.shape[-1])
    s = ex.emit("Mul", [ex.emit("MatMul", [ex.arg(q), kt], base + "_qk"), ex.scalar(scale, dt)], base + "_scores")
    if n.attrs.get("softcap"):  # c * tanh(s / c), before the mask
        c = ex.scalar(n.attrs["softcap"], dt)
        s = ex.emit("Mul", [ex.emit("Tanh", [ex.emit("Div", [s, c], base + "_capped_in")], base + "_tanh"), c], base + "_capped")
    if mask is not None:
        if mask.dtype == "bool":
            s = ex.emit("Where", [ex.arg(mask), s, ex.scalar(float("-inf"), dt)], base + "_masked")
        else:
            s = ex.emit("Add", [s, ex.arg(mask, dt)], base + "_masked")
    if n.attrs["causal"]:
        rows = ex.emit("Unsqueeze", [ex.emit("Range", [ex.scalar(0, "int64"), ex.scalar(q.shape[-2], "int64"), ex.scalar(1, "int64")],
                                             base + "_i"), ex.constant([1], "int64")], base + "_rows")
        cols = ex.emit("Range", [ex.scalar(0, "int64"), ex.scalar(k.shape[-2], "int64"), ex.scalar(1, "int64")], base + "_j")
        keep = ex.emit("LessOrEqual", [cols, rows], base + "_causal")
        s = ex.emit("Where", [keep, s, ex.scalar(float("-inf"), dt)], base + "_causal_scores")
    p = ex.emit("Softmax", [s], base + "_p", axis=-1)
    return ex.emit("MatMul", [p, vn], base)


def _dequantized(ex, codes: Node, scale: Node, dtype: str, base: str) -> str:
    """kv_quant.dequantize_kv: codes [.., S, D] as float32 times scale [.., S] (unsqueezed), cast to ``dtype``."""
    s = ex.emit("Unsqueeze", [ex.arg(scale), ex.constant([len(scale.shape)], "int64")], base + "_scale")
    return ex.cast(ex.emit("Mul", [ex.arg(codes, "float32"), s], base + "_dequantized"), "float32", dtype)


def _same(a, b) -> bool:
    return dims_equal(a, b)


def _repeat_heads(ex, t: str, shape, rep: int, base: str) -> str:
    """[..., H, S, D] -> [..., H * rep, S, D], each head repeated rep times in place (repeat_interleave)."""
    lead, h, s, d = shape[:-3], shape[-3], shape[-2], shape[-1]
    u = ex.emit("Unsqueeze", [t, ex.constant([len(shape) - 2], "int64")], base + "_u")
    e = ex.emit("Expand", [u, ex.shape(tuple(lead) + (h, rep, s, d))], base + "_rep")
    return ex.emit("Reshape", [e, ex.shape(tuple(lead) + (h * rep, s, d))], base + "_heads")


# ----------------------------------------------------------------------------- gathers and layout


@emits("EMBEDDING")
def _embedding(ex, n, base):
    return ex.emit("Gather", [ex.arg(n.inputs[0]), ex.arg(n.inputs[1])], base, axis=0)


@emits("INDEX")
def _index(ex, n, base):
    """x[i0, i1, ...] on axes a0 < a1 < ...: one axis is a Gather; several are a GatherND on the indices
    broadcast and stacked, with the indexed axes moved to the front."""
    x, idx = n.inputs[0], n.inputs[1:]
    axes = n.attrs["axes"]
    if len(idx) == 1:
        return ex.emit("Gather", [ex.arg(x), ex.arg(idx[0], "int64")], base, axis=axes[0])
    ins = [ex.arg(i, "int64") for i in idx]
    zero = ex.emit("Mul", [ins[0], ex.scalar(0, "int64")], base + "_z")
    for i in ins[1:]:
        zero = ex.emit("Add", [zero, ex.emit("Mul", [i, ex.scalar(0, "int64")], base + "_zi")], base + "_z")
    last = ex.constant([-1], "int64")
    stacked = ex.emit("Concat", [ex.emit("Unsqueeze", [ex.emit("Add", [i, zero], base + "_b"), last], base + "_u") for i in ins],
                      base + "_nd", axis=-1)
    r = len(x.shape)
    rest = [a for a in range(r) if a not in axes]
    xv = ex.arg(x)
    if list(axes) != list(range(len(axes))):
        xv = ex.emit("Transpose", [xv], base + "_front", perm=list(axes) + rest)
    adjacent = list(axes) == list(range(axes[0], axes[-1] + 1))
    if not adjacent or axes[0] == 0:
        return ex.emit("GatherND", [xv, stacked], base)
    y = ex.emit("GatherND", [xv, stacked], base + "_g")  # [B..., x.shape[:a0], x.shape[a_end+1:]]: put B after the prefix
    nb = len(n.shape) - len(rest)
    a0 = axes[0]
    perm = list(range(nb, nb + a0)) + list(range(nb)) + list(range(nb + a0, nb + len(rest)))
    return ex.emit("Transpose", [y], base, perm=perm)


@emits("GATHER")
def _gather(ex, n, base):
    return ex.emit("GatherElements", [ex.arg(n.inputs[0]), ex.arg(n.inputs[1], "int64")], base, axis=n.attrs["axis"])


@emits("RESHAPE")
def _reshape(ex, n, base):
    shape = n.attrs["shape"]
    zero = any(isinstance(d, int) and d == 0 for d in shape)
    return ex.emit("Reshape", [ex.arg(n.inputs[0]), ex.shape(shape)], base, allowzero=1 if zero else None)


@emits("PERMUTE")
def _permute(ex, n, base):
    return ex.emit("Transpose", [ex.arg(n.inputs[0])], base, perm=list(n.attrs["perm"]))


@emits("EXPAND")
def _expand(ex, n, base):
    return ex.emit("Expand", [ex.arg(n.inputs[0]), ex.shape(n.attrs["shape"])], base)


@emits("SLICE")
def _slice(ex, n, base):
    a = n.attrs
    return ex.emit("Slice", [ex.arg(n.inputs[0]), ex.size(a["start"]), ex.size(a["end"]), ex.constant([a["axis"]], "int64"),
                             ex.constant([a["step"]], "int64")], base)


@emits("CONCAT")
def _concat(ex, n, base):
    return ex.emit("Concat", [ex.arg(i, n.dtype) for i in n.inputs], base, axis=n.attrs["axis"])


@emits("PAD")
def _pad(ex, n, base):
    r = len(n.shape)
    pairs = list(n.attrs["pads"]) + [(0, 0)] * (r - len(n.attrs["pads"]))
    per_dim = list(reversed(pairs))  # kiln lists the last dim first, ONNX the first
    pads = ex.shape([p[0] for p in per_dim] + [p[1] for p in per_dim])
    return ex.emit("Pad", [ex.arg(n.inputs[0]), pads, ex.scalar(n.attrs["value"], n.dtype)], base)


@emits("TRIU", "TRIL")
def _tri(ex, n, base):
    return ex.emit("Trilu", [ex.arg(n.inputs[0]), ex.scalar(n.attrs["diagonal"], "int64")], base, upper=int(n.op == "TRIU"))


# ----------------------------------------------------------------------------- creation


@emits("ARANGE")
def _arange(ex, n, base):
    a, dt = n.attrs, n.dtype
    return ex.emit("Range", [ex.scalar(a["start"], dt), ex.scalar(a["end"], dt), ex.scalar(a["step"], dt)], base)


@emits("FULL")
def _full(ex, n, base):
    value, dt = n.attrs["value"], n.dtype
    if isinstance(value, (bool, int, float)):
        return ex.emit("ConstantOfShape", [ex.shape(n.attrs["shape"])], base, value=_fill(value, dt))
    return ex.emit("Expand", [ex.scalar(value, dt), ex.shape(n.attrs["shape"])], base)
