"""kiln IR -> ONNX (opset 18): open the optimized graph in Netron, cross-check it with onnxruntime.

Ops with a standard ONNX equivalent map to standard ops (ATTENTION and RMSNORM as their standard
decompositions), so an unfused graph runs in onnxruntime. Every other op — the fused ops of the
pass pipeline, and any op added later — becomes one node of the custom domain ``kiln`` with the op's
name and attributes, with no code needed per op. Symbolic dims become ``dim_param`` strings; sizes
the graph computes with (a RESHAPE to ``(batch, seq, 64)``) are computed from ``Shape`` of the
inputs at run time. Weights become initializers.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
import sympy
import torch
from onnx import TensorProto, helper, numpy_helper

from ...errors import KilnError
from ..graph import Graph, Node
from .emit import EMITTERS
from .static import KILN_TO_ONNX

OPSET = 18
KILN_DOMAIN = "kiln"
EXTERNAL_DATA_THRESHOLD = 1 << 30  # weights above 1 GiB go to a side file (protobuf stops at 2 GiB)


def _dim_proto(d):
    return d if isinstance(d, int) else str(d)


def _value_info(name: str, dtype: str, shape) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, KILN_TO_ONNX[dtype], [_dim_proto(d) for d in shape])


def _tensor_proto(t: torch.Tensor, name: str) -> TensorProto:
    t = t.detach().cpu().contiguous()
    if t.dtype == torch.bfloat16:
        return helper.make_tensor(name, TensorProto.BFLOAT16, list(t.shape), t.view(torch.int16).numpy().tobytes(), raw=True)
    if t.dtype == torch.float8_e4m3fn:
        return helper.make_tensor(name, TensorProto.FLOAT8E4M3FN, list(t.shape), t.view(torch.uint8).numpy().tobytes(), raw=True)
    return numpy_helper.from_array(t.numpy(), name)


def attribute_value(v):
    """A kiln attribute as an ONNX attribute value: numbers, strings and flat number lists stay
    themselves, bools become ints, anything else (dims, nested tuples) its string."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float, str)):
        return v
    if isinstance(v, tuple) and v and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return list(v)
    if isinstance(v, tuple) and v and all(isinstance(x, float) for x in v):
        return list(v)
    return str(v)


class Exporter:
    def __init__(self, graph: Graph, name: str):
        self.g = graph
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.value_info: list[onnx.ValueInfoProto] = []
        self.names: dict[Node, str] = {}
        self._used: set[str] = set()
        self._consts: dict[tuple, str] = {}
        self._syms: dict[object, str] = {}  # dims and casts already computed
        self._typed: set[str] = {n.attrs["name"] for n in graph.inputs}
        self.custom = False
        # graph output names: only the outputs get them
        self._reserved = set(graph.output_names) - {n.attrs["name"] for n in graph.inputs}
        self._sym_src = {}  # symbol -> (input value name, axis)
        for n in graph.inputs:
            for i, d in enumerate(n.shape):
                if isinstance(d, sympy.Symbol) and d not in self._sym_src:
                    self._sym_src[d] = (n.attrs["name"], i)

    # ------------------------------------------------------------------ naming and emitting
    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self._used or name in self._reserved:
            name, i = f"{base}_{i}", i + 1
        self._used.add(name)
        return name

    def emit(self, op_type: str, inputs, base: str, domain: str = "", n_out: int = 1, **attrs):
        outs = [self.fresh(base) for _ in range(n_out)]
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self.fresh(f"{base}/{op_type}"),
                                           domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def constant(self, value, dtype: str, shape=None) -> str:
        """An initializer holding ``value`` (a number or a list) as ``dtype``."""
        arr = np.array(value, dtype=np.float32 if dtype == "bfloat16" else _np(dtype))
        if shape is not None:
            arr = arr.reshape(shape)
        key = (dtype, arr.shape, arr.tobytes())
        name = self._consts.get(key)
        if name is None:
            name = self._consts[key] = self.fresh("const")
            t = torch.from_numpy(arr.copy())
            self.inits.append(_tensor_proto(t.to(torch.bfloat16) if dtype == "bfloat16" else t, name))
        return name

    def cast(self, name: str, src: str, dst: str) -> str:
        if src == dst:
            return name
        key = ("cast", name, dst)
        if key not in self._syms:
            self._syms[key] = self.emit("Cast", [name], f"{name}_{dst}", to=KILN_TO_ONNX[dst])
        return self._syms[key]

    # ------------------------------------------------------------------ symbolic sizes
    def size(self, d) -> str:
        """An int64 [1] tensor holding dim ``d`` (an int or a sympy expression over the inputs' symbols)."""
        if isinstance(d, (int, sympy.Integer)):
            return self.constant([int(d)], "int64")
        name = self._syms.get(d)
        if name is None:
            name = self._syms[d] = self._sym_expr(d)
        return name

    def _sym_expr(self, e) -> str:
        if isinstance(e, sympy.Symbol):
            if e not in self._sym_src:
                raise KilnError(f"cannot export to ONNX: no input has dim {e} by itself, so its value cannot be read "
                                "from the inputs' shapes")
            inp, ax = self._sym_src[e]
            return self.emit("Shape", [inp], str(e), start=ax, end=ax + 1)
        if isinstance(e, sympy.Add):
            acc = self.size(e.args[0])
            for a in e.args[1:]:
                acc = self.emit("Add", [acc, self.size(a)], "dim")
            return acc
        if isinstance(e, sympy.Mul):
            coeff, rest = e.as_coeff_Mul()
            factors = sympy.Mul.make_args(rest)
            acc = self.size(factors[0])
            for a in factors[1:]:
                acc = self.emit("Mul", [acc, self.size(a)], "dim")
            num, den = sympy.fraction(sympy.Rational(coeff))
            if num != 1:
                acc = self.emit("Mul", [acc, self.size(int(num))], "dim")
            if den != 1:  # the whole dim is an integer, so the division is exact
                acc = self.emit("Div", [acc, self.size(int(den))], "dim")
            return acc
        if isinstance(e, sympy.Pow) and e.exp.is_Integer and e.exp > 0:
            acc = self.size(e.base)
            for _ in range(int(e.exp) - 1):
                acc = self.emit("Mul", [acc, self.size(e.base)], "dim")
            return acc
        if isinstance(e, (sympy.floor, sympy.ceiling)):
            num, den = sympy.fraction(sympy.together(e.args[0]))
            if isinstance(e, sympy.floor):
                return self._floordiv(self.size(num), self.size(den))
            return self.emit("Neg", [self._floordiv(self.size(-num), self.size(den))], "dim")  # ceil(a/b) = -floor(-a/b)
        if isinstance(e, sympy.Mod):
            return self.emit("Mod", [self.size(e.args[0]), self.size(e.args[1])], "dim")
        if isinstance(e, (sympy.Max, sympy.Min)):
            return self.emit("Max" if isinstance(e, sympy.Max) else "Min", [self.size(a) for a in e.args], "dim")
        raise KilnError(f"cannot export to ONNX: dim expression {e} ({type(e).__name__})")

    def _floordiv(self, a: str, b: str) -> str:
        # (a - a mod b) / b: exact, and floors for either sign (ONNX's integer Div truncates)
        return self.emit("Div", [self.emit("Sub", [a, self.emit("Mod", [a, b], "dim")], "dim"), b], "dim")

    def shape(self, dims) -> str:
        """An int64 [rank] tensor for a shape of ints and dims."""
        if all(isinstance(d, int) for d in dims):
            return self.constant([int(d) for d in dims], "int64", (len(dims),))
        return self.emit("Concat", [self.size(d) for d in dims], "shape", axis=0)

    def scalar(self, v, dtype: str) -> str:
        """A rank-0 tensor of ``dtype`` holding ``v`` (a number or a dim)."""
        if isinstance(v, sympy.Expr) and not v.is_number:
            s = self.emit("Reshape", [self.size(v), self.constant([], "int64", (0,))], "scalar")
            return self.cast(s, "int64", dtype)
        return self.constant(v if not isinstance(v, sympy.Expr) else int(v), dtype)

    # ------------------------------------------------------------------ the graph
    def arg(self, n: Node, dtype: str | None = None) -> str:
        """The ONNX value of ``n`` as ``dtype`` (default its own); a CONST becomes a rank-0 constant of
        that dtype, since ONNX ops take operands of one type where kiln's CONST scalars are weak."""
        dtype = dtype or n.dtype
        if n.op == "CONST":
            return self.scalar(n.attrs["value"], dtype)
        return self.cast(self.names[n], n.dtype, dtype)

    def run(self) -> onnx.ModelProto:
        g = self.g
        inputs = []
        for n in g.inputs:
            self.names[n] = self.fresh(n.attrs["name"])
            inputs.append(_value_info(self.names[n], n.dtype, n.shape))
        for n in g.nodes:
            if n.op == "WEIGHT":
                self.names[n] = self.fresh(n.attrs["name"])
                self.inits.append(_tensor_proto(g.weights[n.attrs["name"]], self.names[n]))
        out_names: dict[Node, str] = {}
        for o, name in zip(g.outputs, g.output_names):
            if o.op not in ("INPUT", "WEIGHT", "CONST") and o not in out_names:
                out_names[o] = name
        for n in g.nodes:
            if n.op in ("INPUT", "WEIGHT", "CONST"):
                continue
            first = len(self.nodes)
            emit = EMITTERS.get(n.op)
            out = emit(self, n, n.name) if emit is not None else self.generic(n, n.name)
            if n in out_names:
                out = self._rename(out, out_names[n], first)
            if out not in self._typed:  # an emitter may hand back an existing value (FLOOR of an int)
                self._typed.add(out)
                self.value_info.append(_value_info(out, n.dtype, n.shape))
            self.names[n] = out
        outputs = []
        for o, name in zip(g.outputs, g.output_names):
            if self.names.get(o) != name:  # an input, weight or constant returned as is, or one value twice
                self._rename(self.arg(o), name, len(self.nodes))
            outputs.append(_value_info(name, o.dtype, o.shape))
        out_set = {o.name for o in outputs}
        graph = helper.make_graph(self.nodes, self.name, inputs, outputs, initializer=self.inits,
                                  value_info=[v for v in self.value_info if v.name not in out_set])
        opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(KILN_DOMAIN, 1)] if self.custom else [])
        model = helper.make_model(graph, opset_imports=opsets, producer_name="kiln", ir_version=8)
        model.doc_string = "exported by kiln; dims: " + ", ".join(f"{k} in [{lo}, {hi}]" for k, (lo, hi) in g.symbols.items())
        return model

    def _rename(self, value: str, name: str, first: int) -> str:
        """Make graph output ``name`` hold ``value``: rename it where this op's nodes (from index
        ``first``) produced it, else add an Identity."""
        self._reserved.discard(name)
        self._used.add(name)
        for node in self.nodes[first:]:
            if value in node.output:
                node.output[list(node.output).index(value)] = name
                return name
        self.nodes.append(helper.make_node("Identity", [value], [name], name=self.fresh(f"{name}/Identity")))
        return name

    def generic(self, n: Node, base: str) -> str:
        """Any op without a standard equivalent: one ``kiln``-domain node carrying the op's attributes."""
        self.custom = True
        attrs = {k: attribute_value(v) for k, v in n.attrs.items() if v is not None}
        return self.emit(n.op, [self.arg(i) for i in n.inputs], base, domain=KILN_DOMAIN, **attrs)


def _np(dtype: str):
    return {"float32": np.float32, "float64": np.float64, "float16": np.float16, "int64": np.int64, "int32": np.int32,
            "int16": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_}[dtype]


def to_onnx(graph: Graph, name: str = "kiln") -> onnx.ModelProto:
    """The graph as an ONNX model (opset 18; fused ops as ``kiln``-domain nodes)."""
    return Exporter(graph, name).run()


def save_onnx(graph: Graph, path: str | os.PathLike, name: str | None = None) -> str:
    """Write the graph to ``path``; weights over 1 GiB go to ``<path>.data`` beside it."""
    path = os.fspath(path)
    model = to_onnx(graph, name or os.path.splitext(os.path.basename(path))[0])
    big = graph.weight_bytes() > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(model, path, save_as_external_data=big, all_tensors_to_one_file=True,
                    location=os.path.basename(path) + ".data" if big else None)
    return path

