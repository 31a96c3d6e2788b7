"""Graph and Node of the kiln IR.

A :class:`Graph` holds nodes in topological order, the graph inputs (``INPUT`` nodes), the outputs,
the weights (by name, beside the graph) and the symbols with their ranges. Nodes are small and
explicit: op, inputs, attributes, result type. A node's inputs change only through the graph
(:meth:`Graph.set_input`, :meth:`Graph.replace_all_uses`), which keeps ``users`` right.
"""
from __future__ import annotations

import itertools
from collections import Counter
from typing import Iterable

import sympy
import torch

from .ops import OPS, REQUIRED, ShapeError, const_type
from .types import TType, dims_equal, dtype_name, free_symbols, shape_str

_ids = itertools.count()


class GraphError(ValueError):
    """The graph breaks one of the IR's invariants (raised by :meth:`Graph.verify`)."""


class Node:
    __slots__ = ("id", "op", "inputs", "attrs", "shape", "dtype", "name", "loc", "users")

    def __init__(self, op: str, inputs: tuple, attrs: dict, ttype: TType, name: str, loc: str | None = None):
        self.id = next(_ids)
        self.op = op
        self.inputs = inputs
        self.attrs = attrs
        self.shape, self.dtype = ttype.shape, ttype.dtype
        self.name = name
        self.loc = loc  # "file.py:123 (module.path)" where the node came from, when known
        self.users: dict[Node, None] = {}  # ordered set

    @property
    def type(self) -> TType:
        return TType(self.shape, self.dtype)

    def __repr__(self) -> str:
        args = ", ".join(i.name for i in self.inputs)
        attrs = ", ".join(f"{k}={v}" for k, v in self.attrs.items())
        sep = ", " if args and attrs else ""
        return f"%{self.name}: {self.dtype}{shape_str(self.shape)} = {self.op}({args}{sep}{attrs})"


def _freeze(v):
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, tuple):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, torch.dtype):
        return dtype_name(v)
    if isinstance(v, sympy.Expr) and v.is_Integer:
        return int(v)
    return v


def check_attrs(op: str, attrs: dict) -> dict:
    """Fill defaults, reject unknown and missing attributes; lists become tuples."""
    opdef = OPS.get(op)
    if opdef is None:
        raise GraphError(f"unknown op {op!r}")
    unknown = set(attrs) - set(opdef.attrs)
    if unknown:
        raise GraphError(f"{op}: unknown attribute(s) {', '.join(sorted(unknown))}")
    out = {}
    for k, default in opdef.attrs.items():
        if k in attrs:
            out[k] = _freeze(attrs[k])
        elif default is REQUIRED:
            raise GraphError(f"{op}: missing attribute {k!r}")
        else:
            out[k] = default
    return out


def infer(op: str, inputs: Iterable[TType], attrs: dict) -> TType:
    opdef = OPS[op]
    ins = list(inputs)
    if len(ins) < opdef.min_inputs or (opdef.max_inputs is not None and len(ins) > opdef.max_inputs):
        want = opdef.min_inputs if opdef.min_inputs == opdef.max_inputs else f"{opdef.min_inputs}..{opdef.max_inputs or 'n'}"
        raise ShapeError(f"{op} takes {want} inputs, got {len(ins)}")
    return opdef.infer(ins, attrs)


class Graph:
    def __init__(self):
        self.nodes: list[Node] = []
        self.inputs: list[Node] = []
        self.outputs: list[Node] = []
        self.output_names: list[str] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.symbols: dict[str, tuple[int, int]] = {}  # name -> (min, max), inclusive
        # output name -> input name: that output is the input's new value (a program that updates an input in
        # place, e.g. a KV cache); the caller's tensor receives it after each call
        self.updates: dict[str, str] = {}
        # merged weight name -> its parts ((name, first row, end row), ...), recorded by fuse_horizontal_gemm for
        # quantize_weights (a merged weight built from checkpoint-quantized parts); not serialized
        self.weight_parts: dict[str, tuple[tuple[str, int, int], ...]] = {}
        self._names: set[str] = set()
        self._weight_nodes: dict[str, Node] = {}

    # ------------------------------------------------------------------ building
    def _unique(self, base: str) -> str:
        base = base or "v"
        name, i = base, 1
        while name in self._names:
            name, i = f"{base}_{i}", i + 1
        self._names.add(name)
        return name

    def _append(self, node: Node) -> Node:
        for i in node.inputs:
            i.users[node] = None
        self.nodes.append(node)
        return node

    def add(self, op: str, inputs=(), *, name: str | None = None, loc: str | None = None, **attrs) -> Node:
        """Append a node; its type is inferred (a :class:`ShapeError` says why it cannot be)."""
        attrs = check_attrs(op, attrs)
        inputs = tuple(inputs)
        for i in inputs:
            if not isinstance(i, Node):
                raise GraphError(f"{op}: input {i!r} is not a Node")
        if OPS[op].infer is None:
            raise GraphError(f"{op} nodes are made with add_input / add_weight / const")
        ttype = infer(op, (i.type for i in inputs), attrs)
        return self._append(Node(op, inputs, attrs, ttype, self._unique(name or op.lower()), loc))

    def add_input(self, name: str, shape, dtype: str) -> Node:
        if any(n.attrs["name"] == name for n in self.inputs):
            raise GraphError(f"duplicate input name {name!r}")
        node = self._append(Node("INPUT", (), {"name": name}, TType(tuple(shape), dtype), self._unique(name)))
        self.inputs.append(node)
        return node

    def add_weight(self, name: str, tensor: torch.Tensor | None = None, ttype: TType | None = None) -> Node:
        """The WEIGHT node for ``name`` (one per name); ``tensor`` is stored in ``graph.weights``."""
        if name in self._weight_nodes:
            return self._weight_nodes[name]
        if tensor is not None:
            self.weights[name] = tensor
            ttype = TType(tuple(tensor.shape), dtype_name(tensor.dtype))
        elif ttype is None:
            raise GraphError(f"weight {name!r} needs a tensor or a type")
        node = self._append(Node("WEIGHT", (), {"name": name}, ttype, self._unique(name.replace(".", "_"))))
        self._weight_nodes[name] = node
        return node

    def const(self, value, name: str | None = None) -> Node:
        value = _freeze(value)
        return self._append(Node("CONST", (), {"value": value}, const_type(value), self._unique(name or "c")))

    def set_outputs(self, nodes: list[Node], names: list[str] | None = None) -> None:
        self.outputs = list(nodes)
        self.output_names = list(names) if names else [f"output_{i}" for i in range(len(nodes))]

    # ------------------------------------------------------------------ rewriting
    def set_input(self, node: Node, index: int, new: Node) -> None:
        old = node.inputs[index]
        node.inputs = node.inputs[:index] + (new,) + node.inputs[index + 1:]
        if old not in node.inputs:
            old.users.pop(node, None)
        new.users[node] = None

    def replace_all_uses(self, old: Node, new: Node) -> int:
        """Make every user of ``old`` (and the graph outputs) read ``new``; returns how many changed.
        ``new`` itself keeps reading ``old`` (so ``new = f(old)`` can be put in ``old``'s place)."""
        if old is new:
            return 0
        if not (dims_equal_shapes(old.shape, new.shape) and old.dtype == new.dtype):
            raise GraphError(f"replace {old!r} by {new!r}: types differ")
        count = 0
        for user in [u for u in old.users if u is not new]:
            user.inputs = tuple(new if i is old else i for i in user.inputs)
            new.users[user] = None
            del old.users[user]
            count += 1
        for k, o in enumerate(self.outputs):
            if o is old:
                self.outputs[k] = new
                count += 1
        return count

    def remove_dead(self) -> int:
        """Drop nodes nothing reaches from the outputs (graph inputs always stay). Returns the count."""
        live: set[Node] = set(self.inputs)
        stack = list(self.outputs)
        while stack:
            n = stack.pop()
            if n not in live:
                live.add(n)
                stack.extend(n.inputs)
        dead = [n for n in self.nodes if n not in live]
        for n in dead:
            for i in n.inputs:
                i.users.pop(n, None)
        self.nodes = [n for n in self.nodes if n in live]
        used = {n.attrs["name"] for n in self.nodes if n.op == "WEIGHT"}
        for k in [k for k in self.weights if k not in used]:
            del self.weights[k]
        self._weight_nodes = {k: v for k, v in self._weight_nodes.items() if k in used}
        return len(dead)

    def toposort(self) -> None:
        """Re-establish topological order, keeping the current order wherever it is already valid."""
        order: list[Node] = []
        state: dict[Node, int] = {}
        for root in self.nodes:
            if root in state:
                continue
            stack = [(root, 0)]
            while stack:
                n, k = stack.pop()
                if k == 0:
                    if state.get(n) == 2:
                        continue
                    if state.get(n) == 1:
                        raise GraphError(f"cycle through {n!r}")
                    state[n] = 1
                if k < len(n.inputs):
                    stack.append((n, k + 1))
                    if state.get(n.inputs[k]) != 2:
                        stack.append((n.inputs[k], 0))
                else:
                    state[n] = 2
                    order.append(n)
        self.nodes = order

    # ------------------------------------------------------------------ queries
    def rename_weights(self, names: dict[str, str]) -> None:
        """Weight ``old`` is called ``names[old]`` from now on (graph.weights, its WEIGHT node, merged weights' parts)."""
        taken = set(self.weights) | set(self._weight_nodes)
        clash = sorted(new for old, new in names.items() if new != old and (new in taken and new not in names
                                                                            or list(names.values()).count(new) > 1))
        if clash:
            raise GraphError(f"rename_weights: {clash} would name two weights")
        self.weights = {names.get(k, k): v for k, v in self.weights.items()}
        self._weight_nodes = {names.get(k, k): n for k, n in self._weight_nodes.items()}
        for n in self._weight_nodes.values():
            n.attrs["name"] = names.get(n.attrs["name"], n.attrs["name"])
        self.weight_parts = {names.get(k, k): tuple((names.get(p, p), a, b) for p, a, b in parts)
                             for k, parts in self.weight_parts.items()}

    def histogram(self) -> dict[str, int]:
        return dict(Counter(n.op for n in self.nodes if n.op not in ("INPUT", "WEIGHT", "CONST")).most_common())

    def weights_device(self) -> torch.device:
        """Where the weights live: the device of any weight off the CPU (a model moved to CUDA), else the CPU.
        Values computed from no weight (folded constants, calibration's) are made there."""
        return next((t.device for t in self.weights.values() if t.device.type != "cpu"), torch.device("cpu"))

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights.values())

    def __repr__(self) -> str:
        lines = [f"graph({', '.join(repr(i) for i in self.inputs)}) symbols={self.symbols}"]
        lines += ["  " + repr(n) for n in self.nodes if n.op != "INPUT"]
        lines.append("  return " + ", ".join(f"{k}=%{o.name}" for k, o in zip(self.output_names, self.outputs)))
        return "\n".join(lines)

    # ------------------------------------------------------------------ verifier
    def verify(self) -> None:
        """Check every invariant; raise :class:`GraphError` naming the first node that breaks one."""
        seen: set[Node] = set()
        names: set[str] = set()
        for n in self.nodes:
            where = f"node %{n.name} ({n.op})"
            if n.op not in OPS:
                raise GraphError(f"{where}: unknown op")
            if n.name in names:
                raise GraphError(f"{where}: duplicate name")
            names.add(n.name)
            self._verify_edges(n, where, seen)
            self._verify_type(n, where)
            if n.op == "INPUT" and n not in self.inputs:
                raise GraphError(f"{where}: not one of the graph inputs")
            unknown = (_symbols_of(n.shape) | _symbols_of(tuple(n.attrs.values()))) - set(self.symbols)
            if unknown:
                raise GraphError(f"{where}: undeclared symbol(s) {', '.join(sorted(unknown))}")
            seen.add(n)
        self._verify_interface(seen)

    def _verify_edges(self, n: Node, where: str, seen: set) -> None:
        for i in n.inputs:
            if i not in seen:
                raise GraphError(f"{where}: input %{i.name} is not defined before it")
            if n not in i.users:
                raise GraphError(f"{where}: missing from the users of %{i.name}")
        for u in n.users:
            if n not in u.inputs:
                raise GraphError(f"{where}: lists %{u.name} as a user, which does not read it")

    def _verify_type(self, n: Node, where: str) -> None:
        """Normalised attributes, and the stored type agrees with the weight, the constant or the op's type rule."""
        try:
            attrs = check_attrs(n.op, n.attrs)
        except GraphError as e:
            raise GraphError(f"{where}: {e}") from None
        if attrs != n.attrs:
            raise GraphError(f"{where}: attributes are not normalised")
        if n.op == "WEIGHT":
            w = self.weights.get(n.attrs["name"])
            if w is None:
                raise GraphError(f"{where}: no weight named {n.attrs['name']!r}")
            if tuple(w.shape) != n.shape or dtype_name(w.dtype) != n.dtype:
                raise GraphError(f"{where}: weight is {dtype_name(w.dtype)}{list(w.shape)}, node says {n.dtype}{shape_str(n.shape)}")
        elif n.op == "CONST":
            if const_type(n.attrs["value"]) != n.type:
                raise GraphError(f"{where}: type does not match its value")
        elif n.op != "INPUT":
            try:
                t = infer(n.op, (i.type for i in n.inputs), n.attrs)
            except ShapeError as e:
                raise GraphError(f"{where}: {e}") from None
            if not (dims_equal_shapes(t.shape, n.shape) and t.dtype == n.dtype):
                raise GraphError(f"{where}: stored type {n.dtype}{shape_str(n.shape)}, inferred {t.dtype}{shape_str(t.shape)}")

    def _verify_interface(self, seen: set) -> None:
        """Inputs, outputs, updates and symbol ranges."""
        for i in self.inputs:
            if i not in seen or i.op != "INPUT":
                raise GraphError(f"graph input %{i.name} is not an INPUT node of the graph")
        for o in self.outputs:
            if o not in seen:
                raise GraphError(f"graph output %{o.name} is not a node of the graph")
        if len(self.output_names) != len(self.outputs):
            raise GraphError("output_names and outputs differ in length")
        inputs_by_name = {i.attrs["name"]: i for i in self.inputs}
        for out, inp in self.updates.items():
            if out not in self.output_names or inp not in inputs_by_name:
                raise GraphError(f"update {out!r} -> input {inp!r}: no such output or input")
            o, i = self.outputs[self.output_names.index(out)], inputs_by_name[inp]
            if o.type != i.type:
                raise GraphError(f"update {out!r} is {o.dtype}{shape_str(o.shape)}, input {inp!r} is {i.dtype}{shape_str(i.shape)}")
        for name, (lo, hi) in self.symbols.items():
            if not 0 <= lo <= hi:
                raise GraphError(f"symbol {name}: bad range [{lo}, {hi}]")


def _symbols_of(value) -> set[str]:
    """Names of the symbols in a dim, an attribute or a tuple of them."""
    if isinstance(value, tuple):
        return set().union(*(_symbols_of(v) for v in value))
    return free_symbols(value)


def dims_equal_shapes(a, b) -> bool:
    return len(a) == len(b) and all(dims_equal(x, y) for x, y in zip(a, b))
