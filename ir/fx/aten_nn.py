"""aten reductions, norms, linear algebra and attention -> kiln ops (see :mod:`.aten`)."""
from __future__ import annotations

import torch

from ..lowering import Unsupported
from ..registry import registrar
from ..types import FLOAT_DTYPES, dim, dtype_name, is_static, numel, torch_dtype
from .lower import axis, bind, cast, elementwise, expected, handler_key, overload

HANDLERS: dict[str, object] = {}
handles = registrar(HANDLERS)


# ----------------------------------------------------------------------------- reductions


def _axes(a, rank):
    d = a.get("dim")
    if d is None or d == []:
        return tuple(range(rank))
    d = [d] if isinstance(d, int) else d
    return tuple(sorted(axis(x, rank) for x in d))


def _reduce(cx, node, op, x, axes, keepdim):
    out = cx.add(op, [x], axes=axes, keepdim=keepdim)
    return cast(cx, out, expected(cx, node).dtype)


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
    ax = (axis(a["dim"], len(x.shape)),)
    values = cx.add("MAX" if is_max else "MIN", [x], axes=ax, keepdim=a["keepdim"])
    index = cx.add("ARGMAX" if is_max else "ARGMIN", [x], axes=ax, keepdim=a["keepdim"])
    return [values, index]


@handles("aten.argmax", "aten.argmin")
def _argmax(cx, node, args, kwargs):
    a = bind(node, args, kwargs)
    x = a["self"]
    op = "ARGMAX" if handler_key(node.target) == "aten.argmax" else "ARGMIN"
    if a["dim"] is None:
        flat = cx.add("RESHAPE", [x], shape=(dim(numel(x.shape)),))
        out = cx.add(op, [flat], axes=(0,))
        return cx.add("RESHAPE", [out], shape=(1,) * len(x.shape)) if a["keepdim"] else out
    return cx.add(op, [x], axes=(axis(a["dim"], len(x.shape)),), keepdim=a["keepdim"])



@handles("aten.var", "aten.std", "aten.var_mean", "aten.std_mean")
def _var(cx, node, args, kwargs):
    """var = sum((x - mean(x))^2) / (n - correction); std = sqrt(var); *_mean also return the mean."""
    a = bind(node, args, kwargs)
    x = a["self"]
    acc = cast(cx, x, "float32") if x.dtype in ("float16", "bfloat16") else x  # like torch's opmath
    axes = _axes({"dim": a.get("dim")}, len(x.shape))
    correction = a.get("correction")
    if correction is None:
        correction = 0 if a.get("unbiased") is False else 1
    keepdim = bool(a.get("keepdim") or False)
    d = cx.add("SUB", [acc, cx.add("MEAN", [acc], axes=axes, keepdim=True)])
    n = numel(x.shape[i] for i in axes) - correction
    y = cx.add("DIV", [cx.add("SUM", [cx.add("MUL", [d, d])], axes=axes, keepdim=keepdim), cx.const(n)])
    key = handler_key(node.target)
    if key.startswith("aten.std"):
        y = cx.add("SQRT", [y])
    if key.endswith("_mean"):
        return [cast(cx, y, x.dtype), cast(cx, cx.add("MEAN", [acc], axes=axes, keepdim=keepdim), x.dtype)]
    return cast(cx, y, x.dtype)


@handles("aten.linalg_vector_norm")
def _vector_norm(cx, node, args, kwargs):
    a = bind(node, args, kwargs)
    x = a["self"] if a["dtype"] is None else cast(cx, a["self"], dtype_name(a["dtype"]))
    if a["ord"] != 2:
        raise Unsupported(f"vector norm of order {a['ord']} (kiln lowers the 2-norm)")
    axes = _axes({"dim": a["dim"]}, len(x.shape))
    return cx.add("SQRT", [cx.add("SUM", [cx.add("MUL", [x, x])], axes=axes, keepdim=bool(a["keepdim"]))])


@handles("aten.cumsum")
def _cumsum(cx, node, args, kwargs):
    a = bind(node, args, kwargs)
    x = a["self"]
    if a.get("dtype") is not None:
        x = cast(cx, x, dtype_name(a["dtype"]))
    return cast(cx, cx.add("CUMSUM", [x], axis=axis(a["dim"], len(x.shape))), expected(cx, node).dtype)


@handles("aten.softmax", "aten._softmax", "aten.log_softmax", "aten._log_softmax")
def _softmax(cx, node, args, kwargs):
    x, d = args[0], args[1]
    want = expected(cx, node).dtype
    if want != x.dtype and want in FLOAT_DTYPES:
        x = cast(cx, x, want)  # dtype= / half_to_float: computed in the wider type, like torch
    op = "LOG_SOFTMAX" if "log" in handler_key(node.target) else "SOFTMAX"
    return cx.add(op, [x], axis=axis(d, len(x.shape)))


# ----------------------------------------------------------------------------- norms, linear algebra


def _norm_params(cx, x, shape, w, b):
    """The weight and bias a norm has, in its trailing-optional input order (a bias alone gets a weight of ones)."""
    if b is not None and w is None:
        w = cx.add("FULL", [], shape=shape, value=1.0, dtype=x.dtype)
    return [p for p in (w, b) if p is not None]


@handles("aten.layer_norm", "aten.native_layer_norm")
def _layer_norm(cx, node, args, kwargs):
    a = bind(node, args, kwargs)
    x = a["input"]
    k = len(a["normalized_shape"])
    out = cx.add("LAYERNORM", [x] + _norm_params(cx, x, x.shape[-k:], a["weight"], a["bias"]), eps=float(a["eps"]), dims=k)
    return out if handler_key(node.target) == "aten.layer_norm" else [out, None, None]


@handles("aten.group_norm", "aten.native_group_norm")
def _group_norm(cx, node, args, kwargs):
    a = bind(node, args, kwargs)
    x = a["input"]
    plain = handler_key(node.target) == "aten.group_norm"
    params = _norm_params(cx, x, (x.shape[1],), a["weight"], a["bias"])
    out = cx.add("GROUP_NORM", [x] + params, groups=a["num_groups"] if plain else a["group"], eps=float(a["eps"]))
    return out if plain else [out, None, None]


@handles("aten.rms_norm")
def _rms_norm(cx, node, args, kwargs):
    # torch's composite rms_norm: computed in float32 for half types, weight applied before the downcast
    a = bind(node, args, kwargs)
    x, w = a["input"], a["weight"]
    k = len(a["normalized_shape"])
    acc = cast(cx, x, "float32") if x.dtype in ("float16", "bfloat16") else x
    eps = a["eps"] if a["eps"] is not None else torch.finfo(torch_dtype(acc.dtype)).eps  # of the compute type
    axes = tuple(range(len(x.shape) - k, len(x.shape)))
    ms = cx.add("MEAN", [cx.add("MUL", [acc, acc])], axes=axes, keepdim=True)
    y = cx.add("MUL", [acc, cx.add("RSQRT", [cx.add("ADD", [ms, cx.const(float(eps))])])])
    if w is not None:
        y = cx.add("MUL", [y, cast(cx, w, y.dtype)])
    return cast(cx, y, expected(cx, node).dtype)


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


@handles("aten.outer", "aten.ger")
def _outer(cx, node, args, kwargs):
    a, b = args[0], args[1]
    return elementwise(cx, node, "MUL", cx.add("RESHAPE", [a], shape=(a.shape[0], 1)), b)


@handles("aten.t", "aten.numpy_T")
def _t(cx, node, args, kwargs):
    x = args[0]
    return x if len(x.shape) < 2 else cx.add("PERMUTE", [x], perm=tuple(reversed(range(len(x.shape)))))


def _pair(v):
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return tuple(v * 2) if len(v) == 1 else tuple(v)


@handles("aten.conv1d", "aten.conv2d", "aten.convolution", "aten._convolution")
def _conv(cx, node, args, kwargs):
    """2-d convolutions are CONV2D; a 1-d one is a CONV2D over [N, C, 1, L] (x and w given a unit height)."""
    a = bind(node, args, kwargs)
    x, w, b = a["input"], a["weight"], a["bias"]
    key = handler_key(node.target)
    unbatched = key in ("aten.conv1d", "aten.conv2d") and len(x.shape) == len(w.shape) - 1  # [C, H, W] / [C, L]
    if unbatched:
        x = cx.add("RESHAPE", [x], shape=(1,) + tuple(x.shape))
    if a.get("transposed"):
        raise Unsupported("transposed convolution")
    if len(x.shape) not in (3, 4) or len(w.shape) != len(x.shape):
        raise Unsupported(f"{len(x.shape) - 2}-d convolution (kiln has 1-d and 2-d ones)")
    one_d = len(x.shape) == 3
    pad, stride, dilation = a["padding"], _pair(a["stride"]), _pair(a["dilation"])
    if one_d:  # the 1-d settings as the width's, the unit height's as 1 / 0
        x = cx.add("RESHAPE", [x], shape=tuple(x.shape[:2]) + (1, x.shape[2]))
        w = cx.add("RESHAPE", [w], shape=tuple(w.shape[:2]) + (1, w.shape[2]))
        stride, dilation = (1, stride[0]), (1, dilation[0])
        pad = pad if isinstance(pad, str) else (0, _pair(pad)[0])
    if isinstance(pad, str):
        if pad == "valid":
            pad = (0, 0)
        else:
            total = [(kk - 1) * dd for kk, dd in zip(w.shape[2:], dilation)]
            pad = tuple(t // 2 for t in total)
            if any(t % 2 for t in total):  # torch pads the odd element at the end, explicitly
                x = cx.add("PAD", [x], pads=tuple((p, t - p) for p, t in zip(reversed(pad), reversed(total))))
                pad = (0, 0)
    y = cx.add("CONV2D", [x, w] + ([b] if b is not None else []), stride=stride,
               padding=_pair(pad), dilation=dilation, groups=a["groups"])
    return cx.add("RESHAPE", [y], shape=expected(cx, node).shape) if unbatched or one_d else y


@handles("aten.adaptive_avg_pool1d", "aten.adaptive_avg_pool2d", "aten._adaptive_avg_pool2d")
def _adaptive_avg_pool(cx, node, args, kwargs):
    """Average pooling to an output size that divides the input's (1: a mean; a pooler's usual case): each pooled
    axis of size L split into [O, L / O], the means taken over the L / O parts."""
    a = bind(node, args, kwargs)
    x = a["self"]
    n = 1 if handler_key(node.target) == "aten.adaptive_avg_pool1d" else 2
    outs = list(a["output_size"]) if isinstance(a["output_size"], (list, tuple)) else [a["output_size"]]
    outs = outs * n if len(outs) == 1 else outs
    lead, pooled = list(x.shape[:-n]), list(x.shape[-n:])
    shape, axes = list(lead), []
    for size, out in zip(pooled, outs):
        out = size if out is None else out
        if out == 1 or (is_static(size) and out == size):
            shape.append(size)
            if out == 1 and not (is_static(size) and size == 1):
                axes.append(len(shape) - 1)
        elif is_static(size) and size % out == 0:
            shape += [out, size // out]
            axes.append(len(shape) - 1)
        else:
            raise Unsupported(f"adaptive average pooling from {size} to {out} (kiln pools to sizes that divide the input's)")
    if not axes:
        return x
    y = cx.add("RESHAPE", [x], shape=tuple(shape)) if len(shape) != len(x.shape) else x
    y = cx.add("MEAN", [y], axes=tuple(axes), keepdim=True)
    return cx.add("RESHAPE", [y], shape=expected(cx, node).shape) if len(shape) != len(x.shape) else y


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
