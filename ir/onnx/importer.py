"""ONNX ``ModelProto`` -> kiln IR.

A model (opset >= 17, as ``torch.onnx.export`` writes it with either exporter; an older one is upgraded
with ``onnx.version_converter``) is read with the ``onnx`` package, checked, and lowered node by node by
the handlers in :mod:`.ops`, :mod:`.shape` and :mod:`.transformer`. ``dim_param`` dims become kiln symbols;
initializers become weights (external-data files included).

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

import onnx
from onnx import TensorProto

from ...errors import CaptureError, KilnError
from ..graph import Graph, Node
from ..lowering import INT_MAX, POISON, Lowering, Unsupported
from ..registry import merged
from ..types import FLOAT_DTYPES, dims_equal, shape_str, sym
from . import ops, shape, transformer
from .load import check_header, check_model, default_opset, load_model, upgrade_opset
from .lower import key_of
from .static import ONNX_DTYPES, STATIC_LIMIT, CannotEval, Static, kiln_dtype, py_scalar

HANDLERS = merged(ops.HANDLERS, shape.HANDLERS, transformer.HANDLERS)
STATIC_EVAL = merged(ops.STATIC_EVAL, shape.STATIC_EVAL)


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


class OnnxImporter(Lowering):
    """State of one import: the graph being built and the value of every ONNX value name so far."""

    def __init__(self, model: onnx.ModelProto, source: str = "ONNX model", dynamic: dict | None = None,
                 ranges: dict | None = None):
        super().__init__()
        self.model = model
        self.source = source
        self.opset = default_opset(model)
        self.graph = Graph()
        self.env: dict[str, object] = {}
        self._consts: dict[tuple, Node] = {}
        self._dynamic = dynamic or {}
        self._ranges = dict(ranges or {})
        self._renamed: dict[str, str] = {}

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
        self._bind_inputs()
        self._checks = _inferred_types(self.model)
        nodes = list(self.model.graph.node)
        self._used = {i for n in nodes for i in n.input} | {o.name for o in self.model.graph.output}
        self.lower_all(list(enumerate(nodes)))
        outs, names = [], []
        for vo in self.model.graph.output:
            v = self.env.get(vo.name)
            if v is None:
                raise KilnError(f"{self.source}: graph output {vo.name!r} is not produced by any node")
            outs.append(self.node(v))
            names.append(vo.name)
            self._check_output(vo, outs[-1])
        self.graph.set_outputs(outs, names)
        self.graph.remove_dead()
        self.graph.verify()
        return self.graph

    def _bind_inputs(self) -> None:
        """Initializers become statics (weights when read), graph inputs INPUT nodes with symbolic dims."""
        g, model = self.graph, self.model
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
                what = {"sequence_type": "a sequence", "optional_type": "an optional", "map_type": "a map",
                        "sparse_tensor_type": "a sparse tensor"}.get(vi.type.WhichOneof("value"), "a tensor of unknown rank")
                raise KilnError(f"{self.source}: input {vi.name!r} is {what}; kiln imports tensors of known rank only")
            try:
                dtype = kiln_dtype(tt.elem_type)
            except Unsupported as e:
                raise KilnError(f"{self.source}: input {vi.name!r}: {e}") from None
            shape = tuple(self._symbol_for(vi.name, i, d) for i, d in enumerate(tt.shape.dim))
            self.env[vi.name] = g.add_input(vi.name, shape, dtype)
        for name, (lo, hi) in self._ranges.items():
            if name not in g.symbols:
                raise KilnError(f"{self.source}: no dynamic dim named {name!r}; its dims are "
                                f"{', '.join(g.symbols) or 'none (every dim is fixed)'}")
            g.symbols[name] = (max(int(lo), 1), min(int(hi), INT_MAX) if hi is not None else INT_MAX)

    # ------------------------------------------------------------------ the lowering loop's hooks
    def key(self, item) -> str:
        return key_of(item[1])

    def where(self, item) -> str:
        k, node = item
        return node.name or f"<node {k}: {node.op_type} -> {', '.join(node.output)}>"

    def handler(self, item):
        key = key_of(item[1])
        return self._lower if key in HANDLERS else None

    def inputs(self, item) -> list:
        return [self.env.get(i, POISON) if i else None for i in item[1].input]

    def _lower(self, item, ins):
        """The node's value: evaluated at import time when every input is a small static, else lowered."""
        node = item[1]
        key, attrs = key_of(node), attr_values(node)
        if key in STATIC_EVAL and _evaluable(ins):
            try:
                return STATIC_EVAL[key](self, node, ins, attrs)
            except CannotEval:
                pass
        return HANDLERS[key](self, node, ins, attrs)

    def store(self, item, value) -> None:
        node = item[1]
        if value is POISON:
            self.env.update((o, POISON) for o in node.output)
            return
        values = value if isinstance(value, list) else [value]
        for i, o in enumerate(node.output):
            v = values[i] if i < len(values) else None
            if v is None and o and o in self._used:
                self.refuse(f"{key_of(node)} (output {i}, {o!r})", self.loc)
                v = POISON
            if o:
                self._check(o, v, self._checks)
                self.env[o] = v

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


def from_onnx(source, *, dynamic: dict | None = None, notes: list | None = None) -> Graph:
    """Import an ONNX model (a path or a ``ModelProto``). ``dim_param`` dims become symbols with the range
    [1, 2**31-1]; ``dynamic`` narrows them by name (``{"seq": (1, 2048)}``) or renames and ranges them
    per input, like the PyTorch path (``{"input_ids": {1: ("seq", 1, 2048)}}``). A model older than opset 17
    is upgraded with ``onnx.version_converter`` first, which is said in ``notes`` (a list the import appends
    to, e.g. a compile report's). Unsupported ops raise one :class:`UnsupportedOpsError` listing them all."""
    if isinstance(source, (str, os.PathLike)):
        path = os.fspath(source)
        model, label = load_model(path), os.path.basename(path)
    elif isinstance(source, onnx.ModelProto):
        model, label = source, "ONNX model"
        check_header(model, label)
        check_model(model, label)
    else:
        raise KilnError(f"from_onnx takes a path or an onnx.ModelProto, got {type(source).__name__}")
    if model.functions:  # model-local functions (some exporters emit them): inline into one flat graph
        model = onnx.inliner.inline_local_functions(model)
    model, note = upgrade_opset(model, label)
    if note is not None and notes is not None:
        notes.append(f"{label}: {note}")
    per_input, ranges = _dim_specs(dynamic)
    return OnnxImporter(model, label, per_input, ranges).run()
