"""aten gathers, views / layout changes and tensor creation -> kiln ops (see :mod:`.aten`)."""
from __future__ import annotations

import sympy

from ..einsum import lower_einsum
from ..graph import Node
from ..lowering import Unsupported
from ..registry import registrar
from ..types import FLOAT_DTYPES, dim, dims_equal, numel
from .lower import axis, bind, cast, expected, handler_key, overload

HANDLERS: dict[str, object] = {}
handles = registrar(HANDLERS)


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
    return cx.add("INDEX", [x, index], axes=(axis(d, len(x.shape)),))


@handles("aten.index_copy", "aten.index_copy_")
def _index_copy(cx, node, args, kwargs):
    x, d, index, src = args[0], args[1], args[2], args[3]
    return cx.add("INDEX_COPY", [x, index, src], axis=axis(d, len(x.shape)))


@handles("aten.gather")
def _gather(cx, node, args, kwargs):
    x, d, index = args[0], args[1], args[2]
    return cx.add("GATHER", [x, index], axis=axis(d, len(x.shape)))


@handles("aten.select")
def _select(cx, node, args, kwargs):
    x, d, i = args[0], axis(args[1], len(args[0].shape)), args[2]
    if isinstance(i, int) and i < 0:
        i = dim(x.shape[d] + i)
    s = cx.add("SLICE", [x], axis=d, start=i, end=dim(i + 1), step=1)
    return cx.add("RESHAPE", [s], shape=expected(cx, node).shape)


# ----------------------------------------------------------------------------- layout


_RESHAPES = ("aten.view", "aten.reshape", "aten._unsafe_view", "aten.view_copy", "aten.flatten", "aten.unflatten",
             "aten.squeeze", "aten.unsqueeze", "aten._reshape_alias", "aten.reshape_as")


@handles(*_RESHAPES, "aten.expand", "aten.expand_as", "aten.expand_copy")
def _to_recorded_shape(cx, node, args, kwargs):
    """views and expands: the target shape is the one torch.export recorded (no -1 to resolve)."""
    x = args[0]
    shape = expected(cx, node).shape
    if tuple(x.shape) == tuple(shape):
        return x
    return cx.add("RESHAPE" if handler_key(node.target) in _RESHAPES else "EXPAND", [x], shape=shape)


@handles("aten.permute")
def _permute(cx, node, args, kwargs):
    x = args[0]
    perm = tuple(axis(p, len(x.shape)) for p in args[1])
    return x if perm == tuple(range(len(perm))) else cx.add("PERMUTE", [x], perm=perm)


@handles("aten.transpose", "aten.swapaxes", "aten.swapdims")
def _transpose(cx, node, args, kwargs):
    x = args[0]
    r = len(x.shape)
    d0, d1 = axis(args[1], r), axis(args[2], r)
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
    src, dst = [axis(s, r) for s in src], [axis(d, r) for d in dst]
    rest = iter(p for p in range(r) if p not in src)
    perm = [None] * r
    for s, d in zip(src, dst):
        perm[d] = s
    perm = tuple(p if p is not None else next(rest) for p in perm)
    return cx.add("PERMUTE", [x], perm=perm)


@handles("aten.repeat", "aten.tile")
def _repeat(cx, node, args, kwargs):
    x, reps = args[0], list(args[1])
    reps = [1] * (len(x.shape) - len(reps)) + reps  # tile takes fewer repeats than dims
    shape = (1,) * (len(reps) - len(x.shape)) + tuple(x.shape)
    inter = tuple(v for d in shape for v in (1, d))
    y = cx.add("RESHAPE", [x], shape=inter)
    y = cx.add("EXPAND", [y], shape=tuple(v for r, d in zip(reps, shape) for v in (r, d)))
    return cx.add("RESHAPE", [y], shape=expected(cx, node).shape)


@handles("aten.repeat_interleave")
def _repeat_interleave(cx, node, args, kwargs):
    """x.repeat_interleave(r, d): [.., n, ..] -> [.., n, 1, ..] -> expand to [.., n, r, ..] -> [.., n*r, ..]"""
    a = bind(node, args, kwargs)
    if overload(node) != "self_int":
        raise Unsupported("repeat_interleave with a tensor of repeats (data-dependent shape)")
    x, r = a["self"], a["repeats"]
    if a["dim"] is None:
        x, d = cx.add("RESHAPE", [x], shape=(dim(numel(x.shape)),)), 0
    else:
        d = axis(a["dim"], len(x.shape))
    shape = tuple(x.shape)
    y = cx.add("RESHAPE", [x], shape=shape[: d + 1] + (1,) + shape[d + 1:])
    y = cx.add("EXPAND", [y], shape=shape[: d + 1] + (r,) + shape[d + 1:])
    return cx.add("RESHAPE", [y], shape=expected(cx, node).shape)


_UPSAMPLE_NEAREST = tuple(f"aten.{kind}{n}d" for kind in ("upsample_nearest", "_upsample_nearest_exact") for n in (1, 2, 3))


@handles(*_UPSAMPLE_NEAREST)
def _upsample_nearest(cx, node, args, kwargs):
    """Nearest upsampling by whole factors f: [N, C, H, W] -> RESHAPE [N, C, H, 1, W, 1] -> EXPAND [N, C, H, fh, W, fw]
    -> RESHAPE [N, C, H*fh, W*fw]. Output i reads input i // f, which is what both torch modes pick for an output f
    times the input: 'nearest' floor(i / f) (its 2x case is exactly i >> 1) and 'nearest-exact' floor((i + 0.5) / f).
    Exact, no new op, and it stays standard ONNX; on the kernels backend it costs one strided copy, as a kernel would."""
    a = bind(node, args, kwargs)
    x = a.get("input", a.get("self"))
    want = expected(cx, node).shape
    factors = []
    for d_in, d_out in zip(x.shape[2:], want[2:]):
        f = sympy.simplify(sympy.sympify(d_out) / d_in)
        if not (f.is_Integer and f >= 1):
            raise Unsupported(f"nearest resampling from {d_in} to {d_out} (kiln lowers upsampling by whole factors)")
        factors.append(int(f))
    # given scales decide torch's source index (floor(i / scale)): one that is not the size ratio picks other pixels
    scales = a.get("scale_factors") or [a[k] for k in ("scales_d", "scales", "scales_h", "scales_w") if k in a]
    if any(s is not None and float(s) != f for s, f in zip(scales, factors)):
        raise Unsupported(f"nearest upsampling with scales {scales} that differ from the size ratios {factors}")
    if all(f == 1 for f in factors):
        return x
    lead, spatial = tuple(x.shape[:2]), tuple(x.shape[2:])
    y = cx.add("RESHAPE", [x], shape=lead + tuple(v for d in spatial for v in (d, 1)))
    y = cx.add("EXPAND", [y], shape=lead + tuple(v for d, f in zip(spatial, factors) for v in (d, f)))
    return cx.add("RESHAPE", [y], shape=want)


@handles("aten.slice", "aten.narrow", "aten.slice_copy")
def _slice(cx, node, args, kwargs):
    x = args[0]
    if handler_key(node.target) == "aten.narrow":
        d, start = args[1], args[2]  # the length comes from the recorded shape below
        step = 1
    else:
        a = bind(node, args, kwargs)
        d, start, step = a["dim"], a["start"], a["step"] or 1
    d = axis(d, len(x.shape))
    size = x.shape[d]
    start = _slice_start(start, size)
    n = expected(cx, node).shape[d]  # torch's clamping decided the length; keep it
    end = dim(start + (n - 1) * step + 1) if not (isinstance(n, int) and n == 0) else start
    if start == 0 and step == 1 and (end == size or (not isinstance(end, int) and dim(end - size) == 0)):
        return x
    out = cx.add("SLICE", [x], axis=d, start=start, end=end, step=step)
    return out


def _slice_start(start, size):
    """A slice's start as torch resolves it: None is 0, negative counts from the end, clamped to the size."""
    start = 0 if start is None else start
    if isinstance(start, int) and start < 0:
        start = dim(size + start) if not isinstance(size, int) else max(size + start, 0)
    if isinstance(start, int) and isinstance(size, int):
        start = min(start, size)
    return start


@handles("aten.slice_scatter", "aten.select_scatter")
def _slice_scatter(cx, node, args, kwargs):
    """``y = x.clone(); y[:, a:b] = src`` once functionalised: CONCAT(x[:, :a], src, x[:, b:])."""
    a = bind(node, args, kwargs)
    x, src = a["self"], cast(cx, a["src"], a["self"].dtype)
    d = axis(a["dim"], len(x.shape))
    size = x.shape[d]
    if handler_key(node.target) == "aten.select_scatter":
        start = _slice_start(a["index"], size)
        src = cx.add("RESHAPE", [src], shape=tuple(1 if k == d else n for k, n in enumerate(x.shape)))
    else:
        if (a["step"] or 1) != 1:
            raise Unsupported("slice assignment with a step")
        start = _slice_start(a["start"], size)
    end = dim(start + src.shape[d])
    parts = [cx.add("SLICE", [x], axis=d, start=0, end=start)] if start != 0 else []
    parts.append(src)
    if not dims_equal(end, size):
        parts.append(cx.add("SLICE", [x], axis=d, start=end, end=size))
    return parts[0] if len(parts) == 1 else cx.add("CONCAT", parts, axis=d)


@handles("aten.split", "aten.split_with_sizes", "aten.chunk", "aten.tensor_split", "aten.unsafe_split")
def _split(cx, node, args, kwargs):
    x = args[0]
    d = kwargs.get("dim", args[2] if len(args) > 2 else 0)
    d = axis(d, len(x.shape))
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
    d = axis(args[1] if len(args) > 1 else kwargs.get("dim", 0), len(x.shape))
    shape = tuple(s for i, s in enumerate(x.shape) if i != d)
    if not isinstance(x.shape[d], int):
        raise Unsupported("unbind along a symbolic dim")
    return [cx.add("RESHAPE", [cx.add("SLICE", [x], axis=d, start=i, end=i + 1)], shape=shape) for i in range(x.shape[d])]


@handles("aten.cat", "aten.concat", "aten.concatenate")
def _cat(cx, node, args, kwargs):
    ts = [t for t in args[0] if not (len(t.shape) == 1 and t.shape[0] == 0)]  # legacy empty 1-d tensors
    want = expected(cx, node)
    d = axis(args[1] if len(args) > 1 else kwargs.get("dim", 0), len(want.shape))
    ts = [cast(cx, t, want.dtype) for t in ts]
    return ts[0] if len(ts) == 1 else cx.add("CONCAT", ts, axis=d)


@handles("aten.stack")
def _stack(cx, node, args, kwargs):
    want = expected(cx, node)
    d = axis(args[1] if len(args) > 1 else kwargs.get("dim", 0), len(want.shape))
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
    x, d = a["self"], axis(a["dim"], len(a["self"].shape))
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
    return lower_einsum(cx, args[0], list(args[1]), expected(cx, node))


# ----------------------------------------------------------------------------- creation


@handles("aten.arange")
def _arange(cx, node, args, kwargs):
    want = expected(cx, node)
    ov = overload(node)
    if ov == "default":
        start, end, step = 0, args[0], 1
    elif ov == "start":
        start, end, step = args[0], args[1], 1
    else:
        start, end, step = args[0], args[1], args[2] if len(args) > 2 else kwargs.get("step", 1)
    return cx.add("ARANGE", [], start=start, end=end, step=step, dtype=want.dtype)


@handles("aten.eye")
def _eye(cx, node, args, kwargs):
    want = expected(cx, node)
    n, m = want.shape
    rows = cx.add("RESHAPE", [cx.add("ARANGE", [], end=n)], shape=(n, 1))
    return cast(cx, cx.add("EQ", [rows, cx.add("ARANGE", [], end=m)]), want.dtype)


@handles("aten.full", "aten.zeros", "aten.ones", "aten.empty", "aten.new_full", "aten.new_zeros",
         "aten.new_ones", "aten.new_empty", "aten.full_like", "aten.zeros_like", "aten.ones_like",
         "aten.empty_like", "aten.scalar_tensor", "aten.empty_strided", "aten.new_empty_strided",
         "aten.fill", "aten.zero")
def _full(cx, node, args, kwargs):
    want = expected(cx, node)
    key = handler_key(node.target)
    if key in ("aten.full", "aten.new_full", "aten.full_like", "aten.fill"):
        value = args[1] if key != "aten.new_full" else args[2]
        value = kwargs.get("fill_value", value)
    elif key == "aten.scalar_tensor":
        value = args[0]
    elif "ones" in key:
        value = 1
    else:
        value = 0  # zeros, zero_, and empty: a defined value costs nothing and hides no bugs
    if isinstance(value, Node):  # fill_ with a 0-d tensor
        return cx.add("EXPAND", [cast(cx, value, want.dtype)], shape=want.shape)
    if want.dtype == "bool":
        value = bool(value)
    elif want.dtype in FLOAT_DTYPES and not isinstance(value, sympy.Expr):
        value = float(value)
    elif isinstance(value, float):
        value = int(value)
    return cx.add("FULL", [], shape=want.shape, value=value, dtype=want.dtype)
