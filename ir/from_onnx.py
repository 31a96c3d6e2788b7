"""ONNX ``ModelProto`` -> kiln IR.

A model (opset >= 17, as ``torch.onnx.export`` writes it with either exporter) is read with the
``onnx`` package, checked, and lowered node by node by the handlers in :mod:`kiln.ir.onnx_ops` and
:mod:`kiln.ir.onnx_shape`. ``dim_param`` dims become kiln symbols; initializers become weights
(external-data files included).

Values known at import time are :class:`Static`: initializers, ``Constant`` nodes and everything
computed from them and from ``Shape``. Shape subgraphs (``Shape -> Gather -> Unsqueeze -> Concat ->
Reshape``, the TorchScript exporter's staple) are evaluated here, with symbolic dims as sympy
expressions, so a ``Reshape`` gets a target shape like ``(batch, seq, 4, 16)`` and no shape
arithmetic reaches the graph. Every op kiln cannot import is collected and reported in ONE error.
"""
from __future__ import annotations

import math
import os
import re

import numpy as np
import onnx
import sympy
import torch
from onnx import TensorProto, numpy_helper

from ..errors import CaptureError, KilnError, UnsupportedOpsError
from .from_fx import INT_MAX, POISON, Unsupported, _poisoned
from .graph import Graph, Node
from .types import FLOAT_DTYPES, dim, dims_equal, shape_str, sym, torch_dtype

MIN_OPSET = 17
STATIC_LIMIT = 4096  # largest int / bool tensor evaluated at import time (shape arithmetic is tiny)

ONNX_DTYPES = {
    TensorProto.FLOAT: "float32", TensorProto.DOUBLE: "float64", TensorProto.FLOAT16: "float16",
    TensorProto.BFLOAT16: "bfloat16", TensorProto.INT64: "int64", TensorProto.INT32: "int32",
    TensorProto.INT16: "int16", TensorProto.INT8: "int8", TensorProto.UINT8: "uint8", TensorProto.BOOL: "bool",
}
KILN_TO_ONNX = {v: k for k, v in ONNX_DTYPES.items()}
_NP = {"float32": np.float32, "float64": np.float64, "float16": np.float16, "int64": np.int64, "int32": np.int32,
       "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}


def kiln_dtype(elem_type: int) -> str:
    d = ONNX_DTYPES.get(elem_type)
    if d is None:
        raise Unsupported(f"element type {TensorProto.DataType.Name(elem_type)}")
    return d


class CannotEval(Exception):
    """A static evaluation that is not possible (a comparison of symbols sympy cannot decide...):
    the op is lowered into the graph instead."""


def py_scalar(v, dtype: str):
    """``v`` as the python / sympy value an element of ``dtype`` holds (float32 values rounded to float32)."""
    if isinstance(v, sympy.Basic):
        if dtype == "bool":
            raise CannotEval(f"bool of {v}")
        return dim(v) if dtype not in FLOAT_DTYPES else (float(v) if v.is_number else v)
    if dtype == "bool":
        return bool(v)
    if dtype in FLOAT_DTYPES:
        return float(torch.tensor(float(v), dtype=torch_dtype(dtype)).item()) if dtype != "float64" else float(v)
    return int(v)


class Static:
    """A value known at import time: elements are python numbers or sympy dims (``seq``, ``seq + 1``).
    An initializer keeps its name and proto, and is decoded only when it is read."""

    __slots__ = ("_value", "shape", "dtype", "name", "proto", "node")

    def __init__(self, value=None, dtype: str = "int64", name: str | None = None, proto=None):
        self.dtype, self.name, self.proto, self.node = dtype, name, proto, None
        if proto is not None:
            self._value = None
            self.shape = tuple(int(d) for d in proto.dims)
        else:
            arr = np.empty(np.shape(value), dtype=object)
            arr[...] = value if not isinstance(value, np.ndarray) else value.astype(object)
            self._value = np.vectorize(lambda v: py_scalar(v, dtype), otypes=[object])(arr) if arr.size else arr
            self.shape = arr.shape

    @property
    def value(self) -> np.ndarray:
        """The elements as an object array."""
        if self._value is None:
            arr = _to_array(self.proto)
            if arr.dtype.name == "bfloat16":
                arr = arr.astype(np.float32)
            obj = np.empty(arr.shape, dtype=object)
            obj[...] = arr.tolist() if arr.ndim else arr.item()
            self._value = obj
        return self._value

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def concrete(self) -> bool:
        return self.proto is not None or all(not isinstance(v, sympy.Basic) for v in self.value.flat)

    def item(self):
        return self.value.reshape(-1)[0]

    def ints(self) -> list:
        return [int(v) if not isinstance(v, sympy.Basic) else v for v in self.value.reshape(-1)]

    def tensor(self) -> torch.Tensor:
        if self.proto is not None:
            arr = _to_array(self.proto)
            if arr.dtype.name == "bfloat16":
                return torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16)
            return torch.from_numpy(np.array(arr, copy=True))
        if not self.concrete:
            raise CannotEval("symbolic value")
        if self.dtype == "bfloat16":
            return torch.tensor(self.value.tolist(), dtype=torch.float32).reshape(self.shape).to(torch.bfloat16)
        return torch.from_numpy(np.array(self.value.tolist(), dtype=_NP[self.dtype]).reshape(self.shape))

    def __repr__(self) -> str:
        return f"Static({self.name or ''} {self.dtype}{list(self.shape)})"


def _to_array(proto) -> np.ndarray:
    return numpy_helper.to_array(proto)


# ----------------------------------------------------------------------------- loading


def load_model(path: str) -> onnx.ModelProto:
    """Read ``path`` (and its external-data files) into a checked ModelProto; every way a file can be
    broken is one clear :class:`KilnError` naming the file."""
    if not os.path.exists(path):
        raise KilnError(f"{path}: no such file")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as e:  # protobuf's DecodeError and friends
        raise KilnError(f"{path}: not a readable ONNX file: truncated or corrupt (the protobuf does not parse: "
                        f"{type(e).__name__})", hint="export it again; check the download or copy is complete") from None
    _check_header(model, path)
    base = os.path.dirname(os.path.abspath(path))
    for t in _external_tensors(model):
        info = {e.key: e.value for e in t.external_data}
        loc = info.get("location", "")
        file = os.path.join(base, loc)
        if not loc or not os.path.isfile(file):
            raise KilnError(f"{path}: external data file {loc!r} of initializer {t.name!r} is missing (looked in {base})",
                            hint="keep the data file(s) next to the .onnx file, under the name the model records")
        end = int(info.get("offset", 0)) + int(info.get("length", 0))
        if end > os.path.getsize(file):
            raise KilnError(f"{path}: external data file {loc!r} is truncated: initializer {t.name!r} needs bytes up "
                            f"to {end}, the file has {os.path.getsize(file)}")
    try:
        onnx.external_data_helper.load_external_data_for_model(model, base)
    except Exception as e:
        raise KilnError(f"{path}: cannot read its external data: {_first_line(e)}") from None
    _check_model(model if model.ByteSize() < 2**31 - 2**20 else os.path.abspath(path), path)
    return model


def _external_tensors(model):
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [t for t in _get_all_tensors(model) if uses_external_data(t)]


def _check_header(model: onnx.ModelProto, path: str) -> None:
    if not model.HasField("graph") or not model.ir_version:
        raise KilnError(f"{path}: not an ONNX model (no graph or IR version; truncated or corrupt?)")
    opset = default_opset(model)
    if opset is None:
        raise KilnError(f"{path}: the model imports no default ('ai.onnx') opset")
    if opset < MIN_OPSET:
        raise KilnError(f"{path}: opset {opset} is too old; kiln reads ONNX opset {MIN_OPSET} and newer",
                        hint=f"export with torch.onnx.export(..., opset_version={MIN_OPSET}) or newer, or upgrade the "
                             f"file with onnx.version_converter.convert_version(model, {MIN_OPSET})")


def _check_model(model, path: str) -> None:
    """onnx's checker (on the path when the model is past protobuf's 2 GiB)."""
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise KilnError(f"{path}: invalid ONNX model: {_first_line(e)}") from None


def default_opset(model: onnx.ModelProto) -> int | None:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]


# ----------------------------------------------------------------------------- the importer


def attr_values(node: onnx.NodeProto) -> dict:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        if isinstance(v, bytes):
            v = v.decode()
        elif isinstance(v, TensorProto):
            v = Static(dtype=kiln_dtype(v.data_type), proto=v)
        elif isinstance(v, list) and v and isinstance(v[0], bytes):
            v = [x.decode() for x in v]
        out[a.name] = v
    return out


class OnnxImporter:
    """State of one import: the graph being built and the value of every ONNX value name so far."""

    def __init__(self, model: onnx.ModelProto, source: str = "ONNX model", dynamic: dict | None = None,
                 ranges: dict | None = None):
        self.model = model
        self.source = source
        self.opset = default_opset(model)
        self.graph = Graph()
        self.env: dict[str, object] = {}
        self._consts: dict[tuple, Node] = {}
        self._dynamic = dynamic or {}
        self._ranges = dict(ranges or {})
        self.loc: str | None = None

    # ------------------------------------------------------------------ values
    def add(self, op: str, inputs=(), **attrs) -> Node:
        return self.graph.add(op, [self.node(i) for i in inputs], loc=self.loc, **attrs)

    def const(self, value) -> Node:
        key = (type(value).__name__, value) if not (isinstance(value, float) and math.isnan(value)) else ("nan",)
        n = self._consts.get(key)
        if n is None:
            n = self._consts[key] = self.graph.const(value)
        return n

    def node(self, v) -> Node:
        """``v`` as a graph value; a :class:`Static` becomes a WEIGHT (initializers, by name), a FULL (one
        repeated value) or, when symbolic, CONST dims concatenated."""
        if isinstance(v, Node):
            return v
        if not isinstance(v, Static):
            raise Unsupported(f"operand {v!r}")
        if v.node is None:
            v.node = self._materialize(v)
        return v.node

    def _materialize(self, v: Static) -> Node:
        g = self.graph
        if v.proto is not None and v.numel > 1:
            return g.add_weight(v.name, v.tensor())
        if v.concrete:
            flat = v.value.reshape(-1).tolist()
            if flat and all(x == flat[0] for x in flat) and not (isinstance(flat[0], float) and math.isnan(flat[0])):
                return g.add("FULL", [], shape=v.shape, value=py_scalar(flat[0], v.dtype), dtype=v.dtype, loc=self.loc)
            return g.add_weight(self._weight_name(v.name or "constant"), v.tensor())
        parts = [g.add("RESHAPE", [self.const(x)], shape=(1,), loc=self.loc) for x in v.value.reshape(-1).tolist()]
        flat = parts[0] if len(parts) == 1 else g.add("CONCAT", parts, axis=0, loc=self.loc)
        out = g.add("RESHAPE", [flat], shape=v.shape, loc=self.loc) if v.shape != (v.numel,) else flat
        return out if v.dtype == out.dtype else g.add("CAST", [out], dtype=v.dtype, loc=self.loc)

    def _weight_name(self, base: str) -> str:
        name, i = base, 1
        while name in self.graph.weights:
            name, i = f"{base}_{i}", i + 1
        return name

    def static(self, v, what: str) -> Static:
        if isinstance(v, Static):
            return v
        raise Unsupported(f"{what} computed from tensor data (kiln needs it known at import time)")

    def ints(self, v, what: str) -> list:
        """A static 0-d / 1-d int input as a list of ints and symbolic dims."""
        return self.static(v, what).ints()

    # ------------------------------------------------------------------ the model
    def _symbol_for(self, input_name: str, i: int, d) -> object:
        spec = self._dynamic.get(input_name, {}).get(i)
        if d.HasField("dim_value") and spec is None:
            return int(d.dim_value)
        if d.HasField("dim_value"):
            raise KilnError(f"{self.source}: input {input_name!r} dim {i} is fixed to {d.dim_value} in the ONNX file; "
                            "it cannot be made dynamic")
        name = _symbol_name(d.dim_param) if d.dim_param else f"{_symbol_name(input_name)}_{i}"
        if spec is not None:
            new, lo, hi = spec
            self._renamed[name] = new
            self._ranges.setdefault(new, (lo, hi))
            name = new
        name = self._renamed.get(name, name)
        self.graph.symbols.setdefault(name, (1, INT_MAX))
        return sym(name)

    def run(self) -> Graph:
        from .onnx_ops import HANDLERS, STATIC_EVAL, key_of

        g, model = self.graph, self.model
        self._renamed: dict[str, str] = {}
        inits = {t.name: t for t in model.graph.initializer}
        for t in model.graph.initializer:
            try:
                self.env[t.name] = Static(dtype=kiln_dtype(t.data_type), name=t.name, proto=t)
            except Unsupported as e:
                raise KilnError(f"{self.source}: initializer {t.name!r}: {e}") from None
        for name in self._dynamic:
            if name not in {i.name for i in model.graph.input}:
                raise KilnError(f"{self.source}: dynamic= names {name!r}, which is not an input of the model")
        for vi in model.graph.input:
            if vi.name in inits:
                continue  # an initializer listed as an input (old exporters): a weight, not an input
            tt = vi.type.tensor_type
            if not vi.type.HasField("tensor_type") or not tt.HasField("shape"):
                raise KilnError(f"{self.source}: input {vi.name!r} is not a tensor of known rank")
            try:
                dtype = kiln_dtype(tt.elem_type)
            except Unsupported as e:
                raise KilnError(f"{self.source}: input {vi.name!r}: {e}") from None
            shape = tuple(self._symbol_for(vi.name, i, d) for i, d in enumerate(tt.shape.dim))
            self.env[vi.name] = g.add_input(vi.name, shape, dtype)
        for name, rng in self._ranges.items():
            if name not in g.symbols:
                raise KilnError(f"{self.source}: no dynamic dim named {name!r}; its dims are "
                                f"{', '.join(g.symbols) or 'none (every dim is fixed)'}")
            lo, hi = rng
            g.symbols[name] = (max(int(lo), 1), min(int(hi), INT_MAX) if hi is not None else INT_MAX)

        checks = _inferred_types(model)
        unsupported: dict[str, list[str]] = {}
        nodes = list(model.graph.node)
        for k, node in enumerate(nodes):
            if key_of(node) not in HANDLERS:
                unsupported.setdefault(key_of(node), []).append(_where(node, k))
        used = {i for n in nodes for i in n.input} | {o.name for o in model.graph.output}
        for k, node in enumerate(nodes):
            key = key_of(node)
            ins = [self.env.get(i, POISON) if i else None for i in node.input]
            if key not in HANDLERS or _poisoned(ins):
                for o in node.output:
                    self.env[o] = POISON
                continue
            self.loc = _where(node, k)
            try:
                attrs = attr_values(node)
                value = None
                if key in STATIC_EVAL and _evaluable(ins):
                    try:
                        value = STATIC_EVAL[key](self, node, ins, attrs)
                    except CannotEval:
                        value = None
                if value is None:
                    value = HANDLERS[key](self, node, ins, attrs)
            except Unsupported as e:
                unsupported.setdefault(f"{key} ({e})", []).append(self.loc)
                for o in node.output:
                    self.env[o] = POISON
                continue
            except KilnError:
                raise
            except Exception as e:  # a bug or an unexpected input: say where it happened
                if os.environ.get("KILN_DEBUG"):
                    raise
                raise CaptureError(f"cannot import ONNX node {self.loc} ({key}): {type(e).__name__}: {e}",
                                   hint="rerun with KILN_DEBUG=1 for the traceback and report it") from e
            values = value if isinstance(value, list) else [value]
            for i, o in enumerate(node.output):
                v = values[i] if i < len(values) else None
                if v is None and o and o in used:
                    unsupported.setdefault(f"{key} (output {i}, {o!r})", []).append(self.loc)
                    v = POISON
                if o:
                    self._check(o, v, checks)
                    self.env[o] = v
        if unsupported:
            raise UnsupportedOpsError(unsupported, source=self.source)

        outs, names = [], []
        for vo in model.graph.output:
            v = self.env.get(vo.name)
            if v is None:
                raise KilnError(f"{self.source}: graph output {vo.name!r} is not produced by any node")
            outs.append(self.node(v))
            names.append(vo.name)
            self._check_output(vo, outs[-1])
        g.set_outputs(outs, names)
        g.remove_dead()
        g.verify()
        return g

    def _check(self, name: str, v, checks: dict) -> None:
        """A lowered value must have the element type (and fixed dims) ONNX shape inference gave it."""
        t = checks.get(name)
        if t is None or not isinstance(v, (Node, Static)):
            return
        dtype, shape = t
        if dtype is not None and dtype != v.dtype:
            raise CaptureError(f"internal error importing {self.loc}: kiln computed dtype {v.dtype} for {name!r}, "
                               f"ONNX says {dtype}", hint="please report this with KILN_DEBUG=1 output")
        if shape is not None and not _shapes_agree(v.shape, shape):
            raise CaptureError(f"internal error importing {self.loc}: kiln computed shape {shape_str(v.shape)} for "
                               f"{name!r}, ONNX says {shape_str(shape)}", hint="please report this")

    def _check_output(self, vo, n: Node) -> None:
        tt = vo.type.tensor_type
        if tt.elem_type and ONNX_DTYPES.get(tt.elem_type) != n.dtype:
            raise CaptureError(f"{self.source}: output {vo.name!r} is {n.dtype}, the model declares "
                               f"{TensorProto.DataType.Name(tt.elem_type)}")
        if tt.HasField("shape"):
            want = [d.dim_value if d.HasField("dim_value") else (sym(self._renamed.get(d.dim_param, d.dim_param))
                    if d.dim_param and self._renamed.get(d.dim_param, d.dim_param) in self.graph.symbols else None)
                    for d in tt.shape.dim]
            if len(want) != len(n.shape) or any(w is not None and not dims_equal(w, d) for w, d in zip(want, n.shape)):
                raise CaptureError(f"{self.source}: output {vo.name!r} has shape {shape_str(n.shape)}, the model declares "
                                   f"{shape_str(['?' if w is None else w for w in want])}")


def _where(node: onnx.NodeProto, k: int) -> str:
    return node.name or f"<node {k}: {node.op_type} -> {', '.join(node.output)}>"


def _evaluable(ins) -> bool:
    """Statically evaluable: every input static, and each either int / bool of at most STATIC_LIMIT
    elements or a single element (float tensors stay weights, for the passes to fold)."""
    present = [v for v in ins if v is not None]
    return bool(present) and all(isinstance(v, Static) and (v.numel <= 1 or (v.dtype not in FLOAT_DTYPES and v.numel <= STATIC_LIMIT))
                                 for v in present)


def _shapes_agree(got, want) -> bool:
    return len(got) == len(want) and all(w is None or not isinstance(d, int) or d == w for d, w in zip(got, want))


def _inferred_types(model: onnx.ModelProto) -> dict:
    """value name -> (dtype, dims with None where unknown / symbolic) from ONNX shape inference."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model)
    except Exception:  # over 2 GB, or an op the inference does not know: skip the cross-check
        return {}
    out = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.output):
        tt = vi.type.tensor_type
        if not vi.type.HasField("tensor_type") or not tt.elem_type:
            continue
        dtype = ONNX_DTYPES.get(tt.elem_type)
        shape = tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim) if tt.HasField("shape") else None
        out[vi.name] = (dtype, shape)
    return out


def _symbol_name(name: str) -> str:
    """A dim_param as a symbol name that survives the IR's JSON (an identifier, not a sympy function)."""
    s = re.sub(r"\W", "_", name)
    s = s if s and not s[0].isdigit() else f"d_{s}"
    return s + "_" if s in ("floor", "ceiling", "Max", "Min", "Mod") else s


def _dim_specs(dynamic: dict | None) -> tuple[dict, dict]:
    """kiln's ``dynamic=`` as ({input: {dim: (name, min, max)}}, {dim name: (min, max)}): per input like the
    PyTorch path (``{"input_ids": {1: ("seq", 1, 2048)}}``), or a range by dim name (``{"seq": (1, 2048)}``)."""
    per_input: dict = {}
    ranges: dict = {}
    for key, per in (dynamic or {}).items():
        if isinstance(per, tuple) and len(per) == 2:
            ranges[key] = per
            continue
        if not isinstance(per, dict):
            raise KilnError("dynamic= for an ONNX model takes {input name: {dim index: name | (name, min, max) | kiln.Dim}} "
                            "or {dim name: (min, max)}")
        for i, d in per.items():
            if isinstance(d, str):
                spec = (d, 1, None)
            elif isinstance(d, tuple) and len(d) == 3:
                spec = d
            elif hasattr(d, "name") and hasattr(d, "min"):
                spec = (d.name, d.min, d.max)
            else:
                raise KilnError(f"dynamic= for {key!r} dim {i}: {d!r} is not a name, (name, min, max) or kiln.Dim")
            per_input.setdefault(key, {})[i] = spec
    return per_input, ranges


def from_onnx(source, *, dynamic: dict | None = None) -> Graph:
    """Import an ONNX model (a path or a ``ModelProto``). ``dim_param`` dims become symbols with the range
    [1, 2**31-1]; ``dynamic`` narrows them by name (``{"seq": (1, 2048)}``) or renames and ranges them
    per input, like the PyTorch path (``{"input_ids": {1: ("seq", 1, 2048)}}``). Unsupported ops raise
    one :class:`UnsupportedOpsError` listing them all."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        model, label = load_model(path), os.path.basename(path)
    elif isinstance(source, onnx.ModelProto):
        model, label = source, "ONNX model"
        _check_header(model, label)
        _check_model(model, label)
    else:
        raise KilnError(f"from_onnx takes a path or an onnx.ModelProto, got {type(source).__name__}")
    if model.functions:  # model-local functions (some exporters emit them): inline into one flat graph
        model = onnx.inliner.inline_local_functions(model)
    per_input, ranges = _dim_specs(dynamic)
    return OnnxImporter(model, label, per_input, ranges).run()
