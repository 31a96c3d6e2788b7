"""Lowering of aten calls (as torch.export records them) onto the kiln op set.

One handler per aten op family; a handler gets the importer, the FX node and the arguments with
every FX node already replaced by its kiln value (a Node, a python scalar, a symbolic dim or a list),
and returns the kiln value. Sizes come from the shapes torch.export recorded wherever they are the
ground truth (views, expands, splits), so no handler re-derives torch's ``-1`` or clamping rules.
A handler raises :class:`Unsupported` for a call it cannot lower; the importer reports them all.
"""
from __future__ import annotations

import sympy
import torch

from .from_fx import Importer, Unsupported
from .graph import Node
from .ops import slice_len
from .types import FLOAT_DTYPES, dim, dtype_name, torch_dtype

HANDLERS: dict[str, object] = {}


def handler_key(target) -> str:
    if isinstance(target, torch._ops.OpOverload):
        ns, name = target._schema.name.split("::")
        return f"{ns}.{name}"
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"hop.{target.name()}"
    mod = getattr(target, "__module__", None) or ""
    return f"{mod.lstrip('_')}.{getattr(target, '__name__', str(target))}".lstrip(".")


def handles(*names):
    def deco(fn):
        for n in names:
            HANDLERS[n] = fn
        return fn
    return deco


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


def _axis(a: int, rank: int) -> int:
    return a % rank if rank else 0


def _expected(cx: Importer, node):
    t = cx.meta_type(node)
    if t is None:
        raise Unsupported("no recorded tensor type")
    return t


def cast(cx: Importer, x: Node, dtype: str) -> Node:
    return x if x.dtype == dtype else cx.add("CAST", [x], dtype=dtype)


def as_node(cx: Importer, v) -> Node:
    if isinstance(v, Node):
        return v
    if isinstance(v, (bool, int, float, sympy.Expr)):
        return cx.const(v)
    raise Unsupported(f"operand {v!r}")


# ----------------------------------------------------------------------------- elementwise


def _promoted(operands) -> str:
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


def elementwise(cx: Importer, node, op: str, *operands, promote=True) -> Node:
    """``op`` over operands promoted the way torch promotes them; the result has the recorded dtype."""
    if promote:
        dtype = _promoted(operands)
        ins = [cast(cx, o, dtype) if isinstance(o, Node) else o for o in operands]
    else:
        ins = list(operands)
    out = cx.add(op, [as_node(cx, o) for o in ins])
    want = _expected(cx, node).dtype
    return cast(cx, out, want)


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
    op = _BINARY[handler_key(node.target)]
    a = bind(node, args, kwargs)
    x, y = a["self"], a.get("other", a.get("exponent"))
    alpha = a.get("alpha", 1)
    if alpha is not None and alpha != 1:
        y = elementwise(cx, node, "MUL", y, alpha) if isinstance(y, Node) else y * alpha
    if op == "DIV":
        mode = a.get("rounding_mode")
        if mode is not None:
            dtype = _promoted([x, y])
            n = cx.add("DIV", [as_node(cx, cast(cx, x, dtype) if isinstance(x, Node) else x),
                               as_node(cx, cast(cx, y, dtype) if isinstance(y, Node) else y)], rounding=mode)
            return cast(cx, n, _expected(cx, node).dtype)
    return elementwise(cx, node, op, x, y)


@handles("aten.rsub")
def _rsub(cx, node, args, kwargs):
    a = bind(node, args, kwargs)
    y = a["self"] if a["alpha"] == 1 else elementwise(cx, node, "MUL", a["self"], a["alpha"])
    return elementwise(cx, node, "SUB", a["other"], y)


@handles("aten.floor_divide")
def _floor_divide(cx, node, args, kwargs):
    x, y = args[0], args[1]
    dtype = _promoted([x, y])
    n = cx.add("DIV", [as_node(cx, cast(cx, x, dtype) if isinstance(x, Node) else x), as_node(cx, y)], rounding="floor")
    return cast(cx, n, _expected(cx, node).dtype)


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
    dtype = _expected(cx, node).dtype
    x = cast(cx, x, dtype) if isinstance(x, Node) else x
    y = cast(cx, y, dtype) if isinstance(y, Node) else y
    if not isinstance(x, Node) and not isinstance(y, Node):
        x = cx.add("FULL", [], shape=(), value=x, dtype=dtype)
    return cast(cx, cx.add("WHERE", [cast(cx, cond, "bool"), as_node(cx, x), as_node(cx, y)]), dtype)


@handles("aten.masked_fill")
def _masked_fill(cx, node, args, kwargs):
    x, mask, value = args[0], args[1], args[2]
    value = cast(cx, value, x.dtype) if isinstance(value, Node) else value
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
    return cast(cx, args[0], _expected(cx, node).dtype)


@handles("aten.alias", "aten.clone", "aten.contiguous", "aten.detach", "aten.lift_fresh_copy",
         "aten.dropout", "aten.feature_dropout", "aten.alpha_dropout", "aten.copy")
def _identity(cx, node, args, kwargs):
    if handler_key(node.target).endswith("dropout") and (args[2] if len(args) > 2 else kwargs.get("train")):
        raise Unsupported("dropout in training mode (call model.eval() first)")
    src = args[1] if handler_key(node.target) == "aten.copy" else args[0]
    return cast(cx, src, _expected(cx, node).dtype)


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


# ----------------------------------------------------------------------------- reductions


def _axes(a, rank):
    d = a.get("dim")
    if d is None or d == []:
        return tuple(range(rank))
    d = [d] if isinstance(d, int) else d
    return tuple(sorted(_axis(x, rank) for x in d))


def _reduce(cx, node, op, x, axes, keepdim):
    out = cx.add(op, [x], axes=axes, keepdim=keepdim)
    return cast(cx, out, _expected(cx, node).dtype)


@handles("aten.sum", "aten.mean", "aten.prod", "aten.amax", "aten.amin", "aten.any", "aten.all")
def _reduction(cx, node, args, kwargs):
    a = bind(node, args, kwargs)
    x = a["self"]
    if a.get("dtype") is not None:
        x = cast(cx, x, dtype_name(a["dtype"]))
    op = {"sum": "SUM", "mean": "MEAN", "prod": "PROD", "amax": "MAX", "amin": "MIN", "any": "ANY",
          "all": "ALL"}[handler_key(node.target)[5:]]
    axes = _axes({"dim": a.get("dim", a.get("dims"))}, len(x.shape))
    return _reduce(cx, node, op, x, axes, bool(a.get("keepdim") or False))


@handles("aten.max", "aten.min")
def _max_min(cx, node, args, kwargs):
    is_max = handler_key(node.target) == "aten.max"
    ov = overload(node)
    if ov in ("other", "out"):
        return elementwise(cx, node, "MAXIMUM" if is_max else "MINIMUM", args[0], args[1])
    x = args[0]
    if ov == "default":
        return cx.add("MAX" if is_max else "MIN", [x], axes=tuple(range(len(x.shape))))
    a = bind(node, args, kwargs)
    ax = (_axis(a["dim"], len(x.shape)),)
    values = cx.add("MAX" if is_max else "MIN", [x], axes=ax, keepdim=a["keepdim"])
    index = cx.add("ARGMAX" if is_max else "ARGMIN", [x], axes=ax, keepdim=a["keepdim"])
    return [values, index]


@handles("aten.argmax", "aten.argmin")
def _argmax(cx, node, args, kwargs):
    a = bind(node, args, kwargs)
    x = a["self"]
    op = "ARGMAX" if handler_key(node.target) == "aten.argmax" else "ARGMIN"
    if a["dim"] is None:
        flat = cx.add("RESHAPE", [x], shape=(dim(_numel(x.shape)),))
        out = cx.add(op, [flat], axes=(0,))
        return cx.add("RESHAPE", [out], shape=(1,) * len(x.shape)) if a["keepdim"] else out
    return cx.add(op, [x], axes=(_axis(a["dim"], len(x.shape)),), keepdim=a["keepdim"])


def _numel(shape):
    n = 1
    for d in shape:
        n = n * d
    return n


@handles("aten.cumsum")
def _cumsum(cx, node, args, kwargs):
    a = bind(node, args, kwargs)
    x = a["self"]
    if a.get("dtype") is not None:
        x = cast(cx, x, dtype_name(a["dtype"]))
    return cast(cx, cx.add("CUMSUM", [x], axis=_axis(a["dim"], len(x.shape))), _expected(cx, node).dtype)


@handles("aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax")
def _softmax(cx, node, args, kwargs):
    x, d = args[0], args[1]
    want = _expected(cx, node).dtype
    if want != x.dtype and want in FLOAT_DTYPES:
        x = cast(cx, x, want)  # dtype= / half_to_float: computed in the wider type, like torch
    op = "LOG_SOFTMAX" if "log" in handler_key(node.target) else "SOFTMAX"
    return cx.add(op, [x], axis=_axis(d, len(x.shape)))


# ----------------------------------------------------------------------------- norms, linear algebra


def _norm_params(cx, x, k, w, b):
    shape = x.shape[-k:]
    if b is not None and w is None:
        w = cx.add("FULL", [], shape=shape, value=1.0, dtype=x.dtype)
    return [p for p in (w, b) if p is not None]


@handles("aten.layer_norm", "aten.native_layer_norm")
def _layer_norm(cx, node, args, kwargs):
    a = bind(node, args, kwargs)
    x = a["input"]
    k = len(a["normalized_shape"])
    out = cx.add("LAYERNORM", [x] + _norm_params(cx, x, k, a["weight"], a["bias"]), eps=float(a["eps"]), dims=k)
    return out if handler_key(node.target) == "aten.layer_norm" else [out, None, None]


@handles("aten.rms_norm")
def _rms_norm(cx, node, args, kwargs):
    # torch's composite rms_norm: computed in float32 for half types, weight applied before the downcast
    a = bind(node, args, kwargs)
    x, w = a["input"], a["weight"]
    k = len(a["normalized_shape"])
    eps = a["eps"] if a["eps"] is not None else torch.finfo(torch_dtype(x.dtype)).eps
    acc = cast(cx, x, "float32") if x.dtype in ("float16", "bfloat16") else x
    axes = tuple(range(len(x.shape) - k, len(x.shape)))
    ms = cx.add("MEAN", [cx.add("MUL", [acc, acc])], axes=axes, keepdim=True)
    y = cx.add("MUL", [acc, cx.add("RSQRT", [cx.add("ADD", [ms, cx.const(float(eps))])])])
    if w is not None:
        y = cx.add("MUL", [y, cast(cx, w, y.dtype)])
    return cast(cx, y, _expected(cx, node).dtype)


@handles("aten.linear")
def _linear(cx, node, args, kwargs):
    a = bind(node, args, kwargs)
    ins = [a["input"], a["weight"]] + ([a["bias"]] if a["bias"] is not None else [])
    return cx.add("LINEAR", ins)


@handles("aten.matmul", "aten.mm", "aten.bmm")
def _matmul(cx, node, args, kwargs):
    return cx.add("MATMUL", [args[0], args[1]])


@handles("aten.addmm", "aten.baddbmm", "aten.addbmm")
def _addmm(cx, node, args, kwargs):
    a = bind(node, args, kwargs)
    key = handler_key(node.target)
    m1, m2 = (a["mat1"], a["mat2"]) if key == "aten.addmm" else (a["batch1"], a["batch2"])
    prod = cx.add("MATMUL", [m1, m2])
    if key == "aten.addbmm":
        prod = cx.add("SUM", [prod], axes=(0,))
    if a["alpha"] != 1:
        prod = cx.add("MUL", [prod, cx.const(a["alpha"])])
    bias = a["self"]
    if a["beta"] == 0:
        return prod
    if a["beta"] != 1:
        bias = cx.add("MUL", [bias, cx.const(a["beta"])])
    return cx.add("ADD", [prod, bias])


@handles("aten.t", "aten.numpy_T")
def _t(cx, node, args, kwargs):
    x = args[0]
    return x if len(x.shape) < 2 else cx.add("PERMUTE", [x], perm=tuple(reversed(range(len(x.shape)))))


def _pair(v):
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return tuple(v * 2) if len(v) == 1 else tuple(v)


@handles("aten.conv2d", "aten.convolution", "aten._convolution")
def _conv(cx, node, args, kwargs):
    a = bind(node, args, kwargs)
    x, w, b = a["input"], a["weight"], a["bias"]
    if len(x.shape) != 4:
        raise Unsupported(f"{len(x.shape) - 2}-d convolution (kiln has CONV2D)")
    if a.get("transposed"):
        raise Unsupported("transposed convolution")
    pad = a["padding"]
    if isinstance(pad, str):
        if pad == "valid":
            pad = (0, 0)
        else:
            k, d = w.shape[2:], _pair(a["dilation"])
            if any((kk - 1) * dd % 2 for kk, dd in zip(k, d)):
                raise Unsupported("padding='same' with an even kernel")
            pad = tuple((kk - 1) * dd // 2 for kk, dd in zip(k, d))
    return cx.add("CONV2D", [x, w] + ([b] if b is not None else []), stride=_pair(a["stride"]),
                  padding=_pair(pad), dilation=_pair(a["dilation"]), groups=a["groups"])


@handles("aten.scaled_dot_product_attention")
def _sdpa(cx, node, args, kwargs):
    a = bind(node, args, kwargs)
    if a["dropout_p"]:
        raise Unsupported("attention dropout (call model.eval() first)")
    return _attention(cx, a["query"], a["key"], a["value"], a["attn_mask"], a["is_causal"], a["scale"], a.get("enable_gqa", False))


def _attention(cx, q, k, v, mask, causal, scale, gqa):
    ins = [q, k, v]
    if mask is not None:
        ins.append(mask if mask.dtype == "bool" else cast(cx, mask, q.dtype))
    gqa = bool(gqa) and len(q.shape) >= 3 and q.shape[-3] != k.shape[-3]
    return cx.add("ATTENTION", ins, causal=bool(causal), scale=None if scale is None else float(scale), gqa=gqa)


@handles("aten._scaled_dot_product_flash_attention_for_cpu", "aten._scaled_dot_product_flash_attention",
         "aten._scaled_dot_product_efficient_attention")
def _sdpa_variants(cx, node, args, kwargs):
    a = bind(node, args, kwargs)
    if a.get("dropout_p"):
        raise Unsupported("attention dropout")
    mask = a.get("attn_mask", a.get("attn_bias"))
    out = _attention(cx, a["query"], a["key"], a["value"], mask, a["is_causal"], a.get("scale"), False)
    return [out] + [None] * 8


# ----------------------------------------------------------------------------- gathers


@handles("aten.embedding")
def _embedding(cx, node, args, kwargs):
    return cx.add("EMBEDDING", [args[0], args[1]])


@handles("aten.index", "aten._unsafe_index")
def _index(cx, node, args, kwargs):
    x, indices = args[0], args[1]
    axes, idx = [], []
    for i, t in enumerate(indices):
        if t is None:
            continue
        if t.dtype == "bool":
            raise Unsupported("boolean-mask indexing (data-dependent shape)")
        axes.append(i)
        idx.append(t)
    return cx.add("INDEX", [x] + idx, axes=tuple(axes))


@handles("aten.index_select")
def _index_select(cx, node, args, kwargs):
    x, d, index = args[0], args[1], args[2]
    return cx.add("INDEX", [x, index], axes=(_axis(d, len(x.shape)),))


@handles("aten.gather")
def _gather(cx, node, args, kwargs):
    x, d, index = args[0], args[1], args[2]
    return cx.add("GATHER", [x, index], axis=_axis(d, len(x.shape)))


@handles("aten.select")
def _select(cx, node, args, kwargs):
    x, d, i = args[0], _axis(args[1], len(args[0].shape)), args[2]
    if isinstance(i, int) and i < 0:
        i = dim(x.shape[d] + i)
    s = cx.add("SLICE", [x], axis=d, start=i, end=dim(i + 1), step=1)
    return cx.add("RESHAPE", [s], shape=_expected(cx, node).shape)


# ----------------------------------------------------------------------------- layout


_RESHAPES = ("aten.view", "aten.reshape", "aten._unsafe_view", "aten.view_copy", "aten.flatten", "aten.unflatten",
             "aten.squeeze", "aten.unsqueeze", "aten._reshape_alias", "aten.reshape_as")


@handles(*_RESHAPES, "aten.expand", "aten.expand_as", "aten.expand_copy")
def _to_recorded_shape(cx, node, args, kwargs):
    """views and expands: the target shape is the one torch.export recorded (no -1 to resolve)."""
    x = args[0]
    shape = _expected(cx, node).shape
    if tuple(x.shape) == tuple(shape):
        return x
    return cx.add("RESHAPE" if handler_key(node.target) in _RESHAPES else "EXPAND", [x], shape=shape)


@handles("aten.permute")
def _permute(cx, node, args, kwargs):
    x = args[0]
    perm = tuple(_axis(p, len(x.shape)) for p in args[1])
    return x if perm == tuple(range(len(perm))) else cx.add("PERMUTE", [x], perm=perm)


@handles("aten.transpose", "aten.swapaxes", "aten.swapdims")
def _transpose(cx, node, args, kwargs):
    x = args[0]
    r = len(x.shape)
    d0, d1 = _axis(args[1], r), _axis(args[2], r)
    if d0 == d1:
        return x
    perm = list(range(r))
    perm[d0], perm[d1] = d1, d0
    return cx.add("PERMUTE", [x], perm=tuple(perm))


@handles("aten.movedim")
def _movedim(cx, node, args, kwargs):
    x = args[0]
    r = len(x.shape)
    src = [args[1]] if isinstance(args[1], int) else list(args[1])
    dst = [args[2]] if isinstance(args[2], int) else list(args[2])
    src, dst = [_axis(s, r) for s in src], [_axis(d, r) for d in dst]
    rest = iter(p for p in range(r) if p not in src)
    perm = [None] * r
    for s, d in zip(src, dst):
        perm[d] = s
    perm = tuple(p if p is not None else next(rest) for p in perm)
    return cx.add("PERMUTE", [x], perm=perm)


@handles("aten.repeat")
def _repeat(cx, node, args, kwargs):
    x, reps = args[0], list(args[1])
    shape = (1,) * (len(reps) - len(x.shape)) + tuple(x.shape)
    inter = tuple(v for d in shape for v in (1, d))
    y = cx.add("RESHAPE", [x], shape=inter)
    y = cx.add("EXPAND", [y], shape=tuple(v for r, d in zip(reps, shape) for v in (r, d)))
    return cx.add("RESHAPE", [y], shape=_expected(cx, node).shape)


@handles("aten.slice", "aten.narrow", "aten.slice_copy")
def _slice(cx, node, args, kwargs):
    x = args[0]
    if handler_key(node.target) == "aten.narrow":
        d, start, length = args[1], args[2], args[3]
        step = 1
    else:
        a = bind(node, args, kwargs)
        d, start, step = a["dim"], a["start"], a["step"] or 1
    d = _axis(d, len(x.shape))
    size = x.shape[d]
    start = 0 if start is None else start
    if isinstance(start, int) and start < 0:
        start = dim(size + start) if not isinstance(size, int) else max(size + start, 0)
    if isinstance(start, int) and isinstance(size, int):
        start = min(start, size)
    n = _expected(cx, node).shape[d]  # torch's clamping decided the length; keep it
    end = dim(start + (n - 1) * step + 1) if not (isinstance(n, int) and n == 0) else start
    if start == 0 and step == 1 and (end == size or (not isinstance(end, int) and dim(end - size) == 0)):
        return x
    out = cx.add("SLICE", [x], axis=d, start=start, end=end, step=step)
    return out


@handles("aten.split", "aten.split_with_sizes", "aten.chunk", "aten.tensor_split", "aten.unsafe_split")
def _split(cx, node, args, kwargs):
    x = args[0]
    d = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    d = _axis(d, len(x.shape))
    pieces, start = [], 0
    for t in node.meta["val"]:
        n = cx.sym_expr(t.shape[d])
        end = dim(start + n) if not isinstance(start + n, int) else start + n
        pieces.append(cx.add("SLICE", [x], axis=d, start=start, end=end, step=1))
        start = end
    return pieces


@handles("aten.unbind")
def _unbind(cx, node, args, kwargs):
    x = args[0]
    d = _axis(args[1] if len(args) > 1 else kwargs.get("dim", 0), len(x.shape))
    shape = tuple(s for i, s in enumerate(x.shape) if i != d)
    if not isinstance(x.shape[d], int):
        raise Unsupported("unbind along a symbolic dim")
    return [cx.add("RESHAPE", [cx.add("SLICE", [x], axis=d, start=i, end=i + 1)], shape=shape) for i in range(x.shape[d])]


@handles("aten.cat", "aten.concat", "aten.concatenate")
def _cat(cx, node, args, kwargs):
    ts = [t for t in args[0] if not (len(t.shape) == 1 and t.shape[0] == 0)]  # legacy empty 1-d tensors
    want = _expected(cx, node)
    d = _axis(args[1] if len(args) > 1 else kwargs.get("dim", 0), len(want.shape))
    ts = [cast(cx, t, want.dtype) for t in ts]
    return ts[0] if len(ts) == 1 else cx.add("CONCAT", ts, axis=d)


@handles("aten.stack")
def _stack(cx, node, args, kwargs):
    want = _expected(cx, node)
    d = _axis(args[1] if len(args) > 1 else kwargs.get("dim", 0), len(want.shape))
    ts = []
    for t in args[0]:
        shape = tuple(t.shape[:d]) + (1,) + tuple(t.shape[d:])
        ts.append(cx.add("RESHAPE", [cast(cx, t, want.dtype)], shape=shape))
    return ts[0] if len(ts) == 1 else cx.add("CONCAT", ts, axis=d)


@handles("aten.constant_pad_nd", "aten.pad")
def _pad(cx, node, args, kwargs):
    x, pad = args[0], list(args[1])
    mode = kwargs.get("mode", args[2] if len(args) > 2 and isinstance(args[2], str) else "constant")
    if mode != "constant":
        raise Unsupported(f"padding mode {mode!r}")
    value = kwargs.get("value", args[-1] if len(args) > 2 and not isinstance(args[-1], str) else 0.0)
    if any(isinstance(p, int) and p < 0 for p in pad):
        raise Unsupported("negative padding")
    pairs = tuple((pad[i], pad[i + 1]) for i in range(0, len(pad), 2))
    return cx.add("PAD", [x], pads=pairs, value=float(value or 0.0))


@handles("aten.triu", "aten.tril")
def _tri(cx, node, args, kwargs):
    op = "TRIU" if handler_key(node.target) == "aten.triu" else "TRIL"
    return cx.add(op, [args[0]], diagonal=args[1] if len(args) > 1 else kwargs.get("diagonal", 0))


@handles("aten.diff")
def _diff(cx, node, args, kwargs):
    a = bind(node, args, kwargs)
    x, d = a["self"], _axis(a["dim"], len(a["self"].shape))
    parts = [p for p in (a["prepend"], x, a["append"]) if p is not None]
    y = parts[0] if len(parts) == 1 else cx.add("CONCAT", [cast(cx, p, x.dtype) for p in parts], axis=d)
    for _ in range(a["n"]):
        size = y.shape[d]
        hi = cx.add("SLICE", [y], axis=d, start=1, end=size)
        lo = cx.add("SLICE", [y], axis=d, start=0, end=dim(size - 1) if not isinstance(size, int) else size - 1)
        y = cx.add("XOR" if y.dtype == "bool" else "SUB", [hi, lo])
    return y


@handles("aten.einsum")
def _einsum(cx, node, args, kwargs):
    from .einsum import lower_einsum

    return lower_einsum(cx, args[0], list(args[1]), _expected(cx, node))


# ----------------------------------------------------------------------------- creation


@handles("aten.arange")
def _arange(cx, node, args, kwargs):
    want = _expected(cx, node)
    ov = overload(node)
    if ov == "default":
        start, end, step = 0, args[0], 1
    elif ov == "start":
        start, end, step = args[0], args[1], 1
    else:
        start, end, step = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("step", 1)
    return cx.add("ARANGE", [], start=start, end=end, step=step, dtype=want.dtype)


@handles("aten.full", "aten.zeros", "aten.ones", "aten.empty", "aten.new_full", "aten.new_zeros",
         "aten.new_ones", "aten.new_empty", "aten.full_like", "aten.zeros_like", "aten.ones_like",
         "aten.empty_like", "aten.scalar_tensor", "aten.empty_strided", "aten.new_empty_strided")
def _full(cx, node, args, kwargs):
    want = _expected(cx, node)
    key = handler_key(node.target)
    if key in ("aten.full", "aten.new_full", "aten.full_like"):
        value = args[1] if key != "aten.new_full" else args[2]
        value = kwargs.get("fill_value", value)
    elif key == "aten.scalar_tensor":
        value = args[0]
    elif "ones" in key:
        value = 1
    else:
        value = 0  # zeros, and empty: a defined value costs nothing and hides no bugs
    if isinstance(value, Node):
        raise Unsupported("fill value from a tensor")
    if want.dtype == "bool":
        value = bool(value)
    elif want.dtype in FLOAT_DTYPES and not isinstance(value, sympy.Expr):
        value = float(value)
    elif isinstance(value, float):
        value = int(value)
    return cx.add("FULL", [], shape=want.shape, value=value, dtype=want.dtype)


