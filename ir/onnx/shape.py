"""ONNX shape arithmetic, layout, gathers and tensor creation -> kiln ops (see :mod:`.ops`).

``Shape`` is always known at import time (its elements are kiln dims), so the shape subgraphs of an
export evaluate here, statically, and the layout ops get plain target shapes.
"""
from __future__ import annotations

import numpy as np
import sympy

from ..graph import Node
from ..lowering import Unsupported
from ..ops import ShapeError, broadcast_shapes
from ..registry import registrar
from ..types import FLOAT_DTYPES, dim, dims_equal, numel
from .lower import axis_of
from .static import STATIC_LIMIT, CannotEval, Static, py_scalar

HANDLERS: dict[str, object] = {}
STATIC_EVAL: dict[str, object] = {}
handles = registrar(HANDLERS)
evaluates = registrar(STATIC_EVAL)

INT64_MAX = 2**63 - 1


def _shape_of(v) -> tuple:
    return tuple(v.shape)


# ----------------------------------------------------------------------------- constants and shapes


@handles("Constant")
def _constant(cx, node, ins, attrs):
    if "value" in attrs:
        v = attrs["value"]
        v.name = node.output[0]
        return v
    for key, dtype in (("value_float", "float32"), ("value_floats", "float32"), ("value_int", "int64"), ("value_ints", "int64")):
        if key in attrs:
            return Static(np.array(attrs[key], dtype=object), dtype)
    raise Unsupported(f"Constant with {', '.join(attrs) or 'no value'}")


@handles("Shape")
def _shape(cx, node, ins, attrs):
    shape = _shape_of(ins[0])
    r = len(shape)
    start, end = attrs.get("start", 0), attrs.get("end", r)
    start, end = (min(max(s + r if s < 0 else s, 0), r) for s in (start, end))
    return Static(np.array(list(shape[start:end]) or [], dtype=object).reshape(-1), "int64")


@handles("Size")
def _size(cx, node, ins, attrs):
    return Static(np.array(numel(_shape_of(ins[0])), dtype=object), "int64")


@evaluates("ConstantOfShape")
def _constant_of_shape_static(cx, node, ins, attrs):
    shape = ins[0].ints()
    fill = attrs.get("value")
    if any(isinstance(d, sympy.Basic) for d in shape) or np.prod(shape) > STATIC_LIMIT:
        raise CannotEval("large or symbolic")
    dtype = fill.dtype if fill is not None else "float32"
    value = fill.item() if fill is not None else 0.0
    return Static(np.full(tuple(shape), value, dtype=object), dtype)


@handles("ConstantOfShape")
def _constant_of_shape(cx, node, ins, attrs):
    shape = tuple(cx.ints(ins[0], "ConstantOfShape shape"))
    fill = attrs.get("value")
    dtype = fill.dtype if fill is not None else "float32"
    return cx.add("FULL", [], shape=shape, value=py_scalar(fill.item() if fill is not None else 0, dtype), dtype=dtype)


def _range_args(cx, ins):
    return [cx.static(v, "Range bound").item() for v in ins]


@evaluates("Range")
def _range_static(cx, node, ins, attrs):
    start, limit, delta = _range_args(cx, ins)
    if any(isinstance(v, sympy.Basic) for v in (start, limit, delta)) or ins[0].dtype in FLOAT_DTYPES:
        raise CannotEval("symbolic or float range")
    values = list(range(start, limit, delta))
    if len(values) > STATIC_LIMIT:
        raise CannotEval("large")
    return Static(np.array(values, dtype=object).reshape(-1), ins[0].dtype)


@handles("Range")
def _range(cx, node, ins, attrs):
    start, limit, delta = _range_args(cx, ins)
    return cx.add("ARANGE", [], start=start, end=limit, step=delta, dtype=ins[0].dtype)


# ----------------------------------------------------------------------------- layout


def reshape_target(in_shape, target, allowzero: bool) -> tuple:
    """ONNX Reshape's target: 0 copies the input dim (unless allowzero), one -1 takes what is left."""
    out = [in_shape[i] if (isinstance(d, int) and d == 0 and not allowzero) else d for i, d in enumerate(target)]
    if sum(1 for d in out if isinstance(d, int) and d == -1) > 1:
        raise Unsupported("Reshape with more than one -1")
    if any(isinstance(d, int) and d == -1 for d in out):
        known = numel([d for d in out if not (isinstance(d, int) and d == -1)])
        rest = sympy.sympify(numel(in_shape)) / sympy.sympify(known)
        rest = sympy.simplify(rest)
        if rest.is_number and not rest.is_Integer:
            raise ShapeError(f"Reshape: cannot view {list(in_shape)} as {list(target)}")
        out = [dim(rest) if isinstance(d, int) and d == -1 else d for d in out]
    return tuple(out)


@evaluates("Reshape")
def _reshape_static(cx, node, ins, attrs):
    x = ins[0]
    target = reshape_target(x.shape, ins[1].ints(), bool(attrs.get("allowzero", 0)))
    if any(isinstance(d, sympy.Basic) for d in target):
        raise CannotEval("symbolic shape")
    return Static(x.value.reshape(target), x.dtype)


def to_shape(cx, x, shape) -> Node:
    x = cx.node(x)
    shape = tuple(shape)
    if len(shape) == len(x.shape) and all(dims_equal(a, b) for a, b in zip(shape, x.shape)):
        return x
    return cx.add("RESHAPE", [x], shape=shape)


@handles("Reshape")
def _reshape(cx, node, ins, attrs):
    x = ins[0]
    target = reshape_target(_shape_of(x), cx.ints(ins[1], "Reshape target shape"), bool(attrs.get("allowzero", 0)))
    return to_shape(cx, x, target)


def _unsqueezed(shape, axes) -> tuple:
    r = len(shape) + len(axes)
    axes = sorted(axis_of(int(a), r) for a in axes)
    out, it = [], iter(shape)
    for i in range(r):
        out.append(1 if i in axes else next(it))
    return tuple(out)


def _squeezed(shape, axes) -> tuple:
    if axes is None:
        return tuple(d for d in shape if not (isinstance(d, int) and d == 1))
    axes = {axis_of(int(a), len(shape)) for a in axes}
    return tuple(d for i, d in enumerate(shape) if i not in axes)


def _axes_input(cx, ins, attrs, what):
    if "axes" in attrs:
        return attrs["axes"]
    return cx.ints(ins[1], what) if len(ins) > 1 and ins[1] is not None else None


def _new_shape(cx, node, ins, attrs) -> tuple:
    shape = _shape_of(ins[0])
    if node.op_type == "Unsqueeze":
        return _unsqueezed(shape, _axes_input(cx, ins, attrs, "Unsqueeze axes"))
    if node.op_type == "Squeeze":
        return _squeezed(shape, _axes_input(cx, ins, attrs, "Squeeze axes"))
    r, ax = len(shape), attrs.get("axis", 1)  # Flatten: axis in [-r, r], the first axis of the second factor
    if not -r <= ax <= r:
        raise Unsupported(f"axis {ax} out of range for rank {r}")
    ax = ax + r if ax < 0 else ax
    return (numel(shape[:ax]), numel(shape[ax:]))


@evaluates("Unsqueeze", "Squeeze", "Flatten")
def _reshape_like_static(cx, node, ins, attrs):
    return Static(ins[0].value.reshape(_new_shape(cx, node, ins, attrs)), ins[0].dtype)


@handles("Unsqueeze", "Squeeze", "Flatten")
def _reshape_like(cx, node, ins, attrs):
    return to_shape(cx, ins[0], _new_shape(cx, node, ins, attrs))


def _perm(attrs, rank):
    perm = attrs.get("perm")
    return tuple(int(p) for p in perm) if perm is not None else tuple(reversed(range(rank)))


@evaluates("Transpose")
def _transpose_static(cx, node, ins, attrs):
    return Static(np.transpose(ins[0].value, _perm(attrs, len(ins[0].shape))), ins[0].dtype)


@handles("Transpose")
def _transpose(cx, node, ins, attrs):
    x = cx.node(ins[0])
    perm = _perm(attrs, len(x.shape))
    return x if perm == tuple(range(len(perm))) else cx.add("PERMUTE", [x], perm=perm)


@evaluates("Concat")
def _concat_static(cx, node, ins, attrs):
    ins = [v for v in ins if v is not None]
    ax = axis_of(attrs["axis"], len(ins[0].shape))
    return Static(np.concatenate([v.value for v in ins], axis=ax), ins[0].dtype)


@handles("Concat")
def _concat(cx, node, ins, attrs):
    ins = [v for v in ins if v is not None and not (len(v.shape) == 1 and v.shape[0] == 0)]
    ax = axis_of(attrs["axis"], len(ins[0].shape))
    return cx.node(ins[0]) if len(ins) == 1 else cx.add("CONCAT", ins, axis=ax)


def _slices(cx, shape, ins):
    """(axis, start, end, step) per sliced axis, bounds resolved the way ONNX clamps them."""
    starts = cx.ints(ins[1], "Slice starts")
    ends = cx.ints(ins[2], "Slice ends")
    axes = cx.ints(ins[3], "Slice axes") if len(ins) > 3 and ins[3] is not None else list(range(len(starts)))
    steps = cx.ints(ins[4], "Slice steps") if len(ins) > 4 and ins[4] is not None else [1] * len(starts)
    out = []
    for s, e, a, st in zip(starts, ends, axes, steps):
        ax = axis_of(int(a), len(shape))
        if not isinstance(st, int) or st < 1:
            raise Unsupported(f"Slice with step {st} (kiln slices forward)")
        size = shape[ax]
        out.append((ax, _bound(s, size), _bound(e, size), st))
    return out


def _bound(b, size):
    if isinstance(b, int):
        if b < 0:
            b = size + b if not isinstance(size, int) else max(size + b, 0)
        elif b >= INT64_MAX // 2 or (isinstance(size, int) and b > size):
            b = size
        return dim(b) if not isinstance(b, int) else b
    if not isinstance(size, int) and (sympy.sympify(b) - size).is_nonnegative:  # seq + 1 past a seq-long dim
        return size
    return b


@evaluates("Slice")
def _slice_static(cx, node, ins, attrs):
    x = ins[0]
    key = [slice(None)] * len(x.shape)
    for ax, s, e, st in _slices(cx, x.shape, ins):
        if not (isinstance(s, int) and isinstance(e, int)):
            raise CannotEval("symbolic bounds")
        key[ax] = slice(s, e, st)
    return Static(x.value[tuple(key)], x.dtype)


@handles("Slice")
def _slice(cx, node, ins, attrs):
    x = cx.node(ins[0])
    for ax, s, e, st in _slices(cx, x.shape, ins):
        if s == 0 and st == 1 and dims_equal(e, x.shape[ax]):
            continue
        x = cx.add("SLICE", [x], axis=ax, start=s, end=e, step=st)
    return x


@handles("Split")
def _split(cx, node, ins, attrs):
    x = cx.node(ins[0])
    ax = axis_of(attrs.get("axis", 0), len(x.shape))
    size = x.shape[ax]
    if len(ins) > 1 and ins[1] is not None:
        sizes = cx.ints(ins[1], "Split sizes")
    elif "split" in attrs:
        sizes = list(attrs["split"])
    else:
        n = attrs.get("num_outputs", len(node.output))
        if isinstance(size, int):
            chunk = -(-size // n)
            sizes = [min(chunk, size - i * chunk) for i in range(n)]
        else:
            sizes = [dim(size / n)] * n
    pieces, start = [], 0
    for n in sizes:
        end = dim(start + n) if not isinstance(start + n, int) else start + n
        pieces.append(cx.add("SLICE", [x], axis=ax, start=start, end=end, step=1))
        start = end
    return pieces


def _expanded(shape, target) -> tuple:
    return broadcast_shapes(tuple(shape), tuple(target))


@evaluates("Expand")
def _expand_static(cx, node, ins, attrs):
    target = _expanded(ins[0].shape, ins[1].ints())
    if any(isinstance(d, sympy.Basic) for d in target) or numel(target) > STATIC_LIMIT:
        raise CannotEval("symbolic or large")
    return Static(np.broadcast_to(ins[0].value, target).copy(), ins[0].dtype)


@handles("Expand")
def _expand(cx, node, ins, attrs):
    x = cx.node(ins[0])
    target = _expanded(x.shape, cx.ints(ins[1], "Expand shape"))
    if len(target) == len(x.shape) and all(dims_equal(a, b) for a, b in zip(target, x.shape)):
        return x
    return cx.add("EXPAND", [x], shape=target)


@handles("Tile")
def _tile(cx, node, ins, attrs):
    """x [.., d, ..] -> [.., 1, d, ..] -> expand [.., r, d, ..] -> [.., r*d, ..]"""
    x = cx.node(ins[0])
    reps = cx.ints(ins[1], "Tile repeats")
    if all(isinstance(r, int) and r == 1 for r in reps):
        return x
    pairs = [(1, d) for d in x.shape]
    y = cx.add("RESHAPE", [x], shape=tuple(v for p in pairs for v in p))
    y = cx.add("EXPAND", [y], shape=tuple(v for r, d in zip(reps, x.shape) for v in (r, d)))
    return cx.add("RESHAPE", [y], shape=tuple(dim(r * d) if not isinstance(r * d, int) else r * d for r, d in zip(reps, x.shape)))


@handles("Pad")
def _pad(cx, node, ins, attrs):
    if attrs.get("mode", "constant") != "constant":
        raise Unsupported(f"padding mode {attrs['mode']!r}")
    x = cx.node(ins[0])
    r = len(x.shape)
    pads = cx.ints(ins[1], "Pad pads")
    value = ins[2] if len(ins) > 2 else None
    if value is not None and not (isinstance(value, Static) and value.concrete):
        raise Unsupported("Pad value computed from tensor data")
    axes = cx.ints(ins[3], "Pad axes") if len(ins) > 3 and ins[3] is not None else list(range(r))
    axes = [axis_of(int(a), r) for a in axes]
    n = len(axes)
    per = {a: (pads[i], pads[i + n]) for i, a in enumerate(axes)}
    if any(isinstance(p, int) and p < 0 for pair in per.values() for p in pair):
        raise Unsupported("negative padding")
    first = min((a for a, p in per.items() if p != (0, 0)), default=None)
    if first is None:
        return x
    pairs = tuple(per.get(a, (0, 0)) for a in range(r - 1, first - 1, -1))  # last dim first, like F.pad
    return cx.add("PAD", [x], pads=pairs, value=float(value.item()) if value is not None else 0.0)


# ----------------------------------------------------------------------------- gathers


@evaluates("Gather")
def _gather_static(cx, node, ins, attrs):
    x, idx = ins
    ax = axis_of(attrs.get("axis", 0), len(x.shape))
    size = x.shape[ax]
    flat = [int(i) + size if int(i) < 0 else int(i) for i in idx.value.reshape(-1)] if idx.concrete else None
    if flat is None:
        raise CannotEval("symbolic index")
    out = np.take(x.value, np.array(flat, dtype=np.int64).reshape(idx.shape), axis=ax)
    return Static(out, x.dtype)


@handles("Gather")
def _gather(cx, node, ins, attrs):
    x, idx = ins
    x = cx.node(x)
    ax = axis_of(attrs.get("axis", 0), len(x.shape))
    if isinstance(idx, Static) and idx.numel == 1 and idx.concrete:  # x[..., i, ...]: a slice
        i = int(idx.item())
        if i < 0:
            i = dim(x.shape[ax] + i) if not isinstance(x.shape[ax], int) else x.shape[ax] + i
        s = cx.add("SLICE", [x], axis=ax, start=i, end=dim(i + 1) if not isinstance(i, int) else i + 1)
        return to_shape(cx, s, x.shape[:ax] + tuple(idx.shape) + x.shape[ax + 1:])
    idx = cx.node(idx)
    if ax == 0 and len(x.shape) == 2 and x.op == "WEIGHT":  # a table lookup
        return cx.add("EMBEDDING", [x, idx])
    return cx.add("INDEX", [x, idx], axes=(ax,))


@handles("GatherElements")
def _gather_elements(cx, node, ins, attrs):
    """ONNX counts negative indices from the end, torch.gather refuses them: ``idx < 0 ? idx + size : idx``."""
    x, idx = cx.node(ins[0]), ins[1]
    ax = axis_of(attrs.get("axis", 0), len(x.shape))
    if not (isinstance(idx, Static) and idx.concrete and all(int(i) >= 0 for i in idx.value.flat)):
        idx = cx.node(idx)
        wrapped = cx.add("ADD", [idx, cx.const(x.shape[ax])])
        idx = cx.add("WHERE", [cx.add("LT", [idx, cx.const(0)]), wrapped, idx])
    return cx.add("GATHER", [x, idx], axis=ax)


@handles("GatherND")
def _gather_nd(cx, node, ins, attrs):
    """data[idx[..., 0], idx[..., 1], ...]: the last dim of the indices splits into one INDEX tensor per axis."""
    if attrs.get("batch_dims", 0):
        raise Unsupported("GatherND with batch_dims")
    x, idx = cx.node(ins[0]), cx.node(ins[1])
    k = idx.shape[-1]
    if not isinstance(k, int) or not 1 <= k <= len(x.shape):
        raise Unsupported(f"GatherND with index depth {k}")
    last = len(idx.shape) - 1
    parts = [to_shape(cx, cx.add("SLICE", [idx], axis=last, start=i, end=i + 1), idx.shape[:-1]) for i in range(k)]
    return cx.add("INDEX", [x] + parts, axes=tuple(range(k)))


@handles("Trilu")
def _trilu(cx, node, ins, attrs):
    k = int(cx.static(ins[1], "Trilu k").item()) if len(ins) > 1 and ins[1] is not None else 0
    return cx.add("TRIU" if attrs.get("upper", 1) else "TRIL", [ins[0]], diagonal=k)
