"""torch.export ``ExportedProgram`` -> kiln IR.

A program that calls no higher-order op and mutates nothing but its own inputs, in the ways ``_functional`` can
follow, is imported as exported; any other is first functionalised with ``run_decompositions({})`` (inlines
higher-order ops such as ``wrap_with_set_grad_enabled`` and removes in-place ops, but keeps linear / SDPA / layer_norm
whole), which retraces the whole program (as long as the export itself: a DiT-XL/2 pipeline's ``from_diffusers`` took
8.3 s on the test machine's CPU with its step graph retraced, 4.7 s since its writes are followed). Each
aten call is then lowered by its handler in :mod:`.aten` / :mod:`.aten_nn` / :mod:`.aten_shape`. Dynamic sizes stay symbolic: torch's
size symbols are renamed after the user's dims (``s70`` -> ``seq``) and keep the ranges torch.export
proved. An input the program writes in place (a KV cache) becomes an extra output, its new value, listed
in ``Graph.updates``. Every op kiln cannot import is collected, with the file:line that
produced it, and reported in ONE error.
"""
from __future__ import annotations

import math
import os
import re
import sys
import warnings

import sympy
import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind

from ...errors import CaptureError, UnsupportedOpsError
from ..graph import Graph, Node, dims_equal_shapes
from ..lowering import INT_MAX, POISON, Lowering, Unsupported
from ..registry import merged
from ..types import TType, dim, dtype_name, shape_str, sym
from . import aten, aten_nn, aten_shape
from .lower import INPLACE_AS, functional_key, handler_key

HANDLERS = merged(aten.HANDLERS, aten_nn.HANDLERS, aten_shape.HANDLERS)


class Importer(Lowering):
    """State of one import: the graph being built and the value of every FX node so far."""

    def __init__(self, ep: ExportedProgram, dim_names: dict[str, dict[int, str]] | None,
                 input_names: list[str] | None = None):
        super().__init__()
        self.ep = ep
        self.graph = Graph()
        self.env: dict[torch.fx.Node, object] = {}
        self.symmap: dict[sympy.Symbol, sympy.Symbol] = {}
        self.constants: dict[str, object] = {}  # non-tensor user inputs, by placeholder name
        self._consts: dict[tuple, Node] = {}
        self._dim_names = dim_names or {}
        self._input_names = list(input_names) if input_names else None
        self._written: dict[str, Node] = {}  # placeholder name -> its value after the program's write into it
        self._input_node_names: list[str] = []

    # ------------------------------------------------------------------ values
    def const(self, value) -> Node:
        """A (cached) CONST node for a python scalar or a symbolic dim."""
        if isinstance(value, float) and math.isnan(value):
            key = ("nan",)
        else:
            key = (type(value).__name__, value)
        n = self._consts.get(key)
        if n is None:
            n = self._consts[key] = self.graph.const(value)
        return n

    def add(self, op: str, inputs=(), **attrs) -> Node:
        return self.graph.add(op, inputs, loc=self.loc, **attrs)

    def sym_expr(self, v) -> object:
        """A python int / SymInt / SymFloat / SymBool as an int, float, bool or kiln dim."""
        if isinstance(v, (bool, int, float)):
            return v
        if isinstance(v, (torch.SymInt, torch.SymFloat, torch.SymBool)):
            expr = v.node.expr
            if isinstance(v, torch.SymInt):
                return dim(self._convert_expr(expr))
            if expr.is_number:
                return bool(expr) if isinstance(v, torch.SymBool) else float(expr)
            if isinstance(v, torch.SymBool):
                return None  # only asserts use these; kiln checks ranges itself
            raise Unsupported(f"symbolic float {expr}")
        raise TypeError(f"not a scalar: {v!r}")

    def _convert_expr(self, e):
        from torch.utils._sympy import functions as tf

        if e.is_Symbol:
            if e not in self.symmap:
                self.symmap[e] = sym(str(e))
            return self.symmap[e]
        if e.is_Number:
            return e
        args = [self._convert_expr(a) for a in e.args]
        if isinstance(e, (sympy.Add, sympy.Mul, sympy.Pow, sympy.Max, sympy.Min, sympy.floor, sympy.ceiling)):
            return e.func(*args)
        name = type(e).__name__
        if name == "FloorDiv" or isinstance(e, getattr(tf, "FloorDiv", ())):
            return sympy.floor(args[0] / args[1])
        if name in ("CleanDiv", "IntTrueDiv", "TruncToInt", "FloatTrueDiv"):
            return args[0] / args[1] if len(args) == 2 else args[0]
        if name == "CeilDiv":
            return sympy.ceiling(args[0] / args[1])
        if name in ("Mod", "PythonMod"):
            return sympy.Mod(args[0], args[1])
        raise Unsupported(f"symbolic size expression {e} ({name})")

    def meta_type(self, node: torch.fx.Node) -> TType | None:
        v = node.meta.get("val")
        if isinstance(v, torch.Tensor):
            return TType(tuple(self.sym_expr(d) for d in v.shape), dtype_name(v.dtype))
        return None

    # ------------------------------------------------------------------ the program
    def run(self) -> Graph:
        gm = self.ep.graph_module
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        specs = self.ep.graph_signature.input_specs
        if len(specs) != len(placeholders):
            raise CaptureError("exported program: input specs and placeholders disagree")
        self._name_symbols(placeholders, specs)
        self._bind_placeholders(placeholders, specs)
        self.lower_all([n for n in gm.graph.nodes if n.op == "call_function"])
        self._set_outputs(placeholders, next(n for n in gm.graph.nodes if n.op == "output"))
        self.graph.remove_dead()
        self.graph.verify()
        return self.graph

    def _bind_placeholders(self, placeholders, specs) -> None:
        """Weights (tied ones: one tensor, one node), tensor inputs, and the non-tensor inputs torch baked in."""
        g, ep = self.graph, self.ep
        weights_by_ptr: dict[tuple, str] = {}
        tensor_inputs = 0
        for node, spec in zip(placeholders, specs):
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                t = ep.state_dict.get(spec.target)
                t = (ep.constants[spec.target] if t is None else t).detach()
                key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
                name = weights_by_ptr.setdefault(key, spec.target)
                self.env[node] = g.add_weight(name, t if name == spec.target else None)
            elif spec.kind == InputKind.USER_INPUT:
                val = node.meta.get("val")
                if isinstance(val, torch.Tensor):
                    name = self._input_names[tensor_inputs] if self._input_names else node.name
                    tensor_inputs += 1
                    self.env[node] = g.add_input(name, self.meta_type(node).shape, dtype_name(val.dtype))
                    self._input_node_names.append(node.name)
                else:
                    self.env[node] = val
                    self.constants[node.name] = val
            else:
                raise CaptureError(f"exported program: unsupported input kind {spec.kind.name} ({node.name})")

    # ------------------------------------------------------------------ the lowering loop's hooks
    def key(self, node) -> str:
        return handler_key(node.target)

    def where(self, node) -> str:
        return location(node)

    def handler(self, node):
        fn = HANDLERS.get(functional_key(node.target))  # (a last write: its functional op's handler, see _functional)
        return None if fn is None else (lambda node, ins: fn(self, node, *ins))

    def inputs(self, node):
        return torch.fx.node.map_arg(node.args, self.env.get), torch.fx.node.map_arg(node.kwargs, self.env.get)

    def store(self, node, value) -> None:
        if value is not POISON:
            self._check(node, value)
        self.env[node] = value
        if value is not POISON and (x := _written_input(node)) is not None:  # a write into a user input (_functional)
            self.env[x] = self.env[node.args[0]] = value  # readers after it see the new value
            self._written[x.name] = value

    # ------------------------------------------------------------------ outputs
    def _set_outputs(self, placeholders, out_node) -> None:
        """The user outputs, after the new values of the inputs the program writes (``Graph.updates``)."""
        g = self.graph
        outs, names, updates = [], [], {}
        user = [p for p in placeholders if p.name in self._input_node_names]
        input_of = {n.name: g.inputs[k] for k, n in enumerate(user)}

        def update(pname, v):
            name = input_of[pname].attrs["name"]
            updates[f"{name}:updated"] = name
            outs.append(v)
            names.append(f"{name}:updated")

        for pname, v in self._written.items():  # in-place writes imported as exported: their final values
            update(pname, v)
        for spec, arg in zip(self.ep.graph_signature.output_specs, out_node.args[0]):
            v = self.env.get(arg) if isinstance(arg, torch.fx.Node) else arg
            if spec.kind == OutputKind.USER_INPUT_MUTATION and spec.target in input_of and isinstance(v, Node):
                update(spec.target, v)  # the program writes this input: its new value is an output
                continue
            if spec.kind != OutputKind.USER_OUTPUT:
                where = location(arg) if isinstance(arg, torch.fx.Node) else "?"
                raise UnsupportedOpsError({f"in-place update of {spec.kind.name.lower()} {spec.target}": [where]})
            if not isinstance(v, Node):
                raise CaptureError(f"output {spec.arg.name} is not a tensor ({v!r}); kiln graphs return tensors")
            outs.append(v)
            names.append(spec.arg.name)
        g.set_outputs(outs, names)
        g.updates = updates

    def _name_symbols(self, placeholders, specs) -> None:
        """Rename torch's size symbols after the user's dims and record their ranges."""
        names: dict[sympy.Symbol, str] = {}
        for node, spec in zip(placeholders, specs):
            if spec.kind != InputKind.USER_INPUT:
                continue
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor):
                continue
            for i, d in enumerate(val.shape):
                if isinstance(d, torch.SymInt) and d.node.expr.is_Symbol:
                    want = self._dim_names.get(node.name, {}).get(i)
                    names.setdefault(d.node.expr, want or f"{node.name}_{i}")
        for s, name in names.items():
            self.symmap[s] = sym(name)
        for s, vr in self.ep.range_constraints.items():
            if s not in self.symmap and s.is_Symbol:
                self.symmap[s] = sym(str(s))
            if s.is_Symbol:
                lo, hi = _bound(vr.lower, 0), _bound(vr.upper, INT_MAX)
                # sizes are positive (kiln's symbols are declared so); an empty dim is not a shape kiln runs
                self.graph.symbols[self.symmap[s].name] = (max(lo, 1), min(hi, INT_MAX))

    def _check(self, fx_node: torch.fx.Node, value) -> None:
        """The lowered value must have the type torch.export recorded for the node."""
        if not isinstance(value, Node):
            return
        want = self.meta_type(fx_node)
        if want is None:
            return
        if not dims_equal_shapes(value.shape, want.shape):
            raise CaptureError(f"internal error importing {fx_node.target} at {self.loc}: kiln computed shape "
                               f"{shape_str(value.shape)}, torch recorded {shape_str(want.shape)}",
                               hint="please report this with KILN_DEBUG=1 output")
        if value.dtype != want.dtype:
            raise CaptureError(f"internal error importing {fx_node.target} at {self.loc}: kiln computed dtype "
                               f"{value.dtype}, torch recorded {want.dtype}", hint="please report this")


def _bound(v, default: int) -> int:
    """A range end as an int; torch's infinities (sympy.oo, int_oo) become ``default``."""
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        return default
    return default if math.isinf(f) else int(v)


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def location(node: torch.fx.Node) -> str:
    """``path/file.py:123 (in fn)`` from the node's recorded stack trace, plus the module path."""
    frames = _FRAME.findall(node.meta.get("stack_trace") or "")
    where = ""
    if frames:
        path, line, fn = frames[-1]
        where = f"{_short_path(path)}:{line} (in {fn})"
    stack = node.meta.get("nn_module_stack") or {}
    if stack:
        module = list(stack.values())[-1][0]
        if module:
            where = f"{where} [{module}]" if where else f"[{module}]"
    return where or f"<node {node.name}>"


def _short_path(path: str) -> str:
    for root in sorted((p for p in sys.path if p and "site-packages" in p), key=len, reverse=True):
        if path.startswith(root + os.sep):
            return os.path.relpath(path, root)
    try:
        rel = os.path.relpath(path)
        return rel if not rel.startswith("..") else path
    except ValueError:
        return path


def from_exported(ep: ExportedProgram, dim_names: dict[str, dict[int, str]] | None = None,
                  input_names: list[str] | None = None) -> tuple[Graph, dict]:
    """Import an ExportedProgram. ``dim_names`` names the dynamic dims per user input
    (``{"input_ids": {0: "batch", 1: "seq"}}``); ``input_names`` names the tensor inputs in order
    (default: their placeholder names). Returns the graph and the non-tensor user inputs torch.export
    baked in (by placeholder name)."""
    if _functional(ep):  # nothing to functionalise: import as exported (the retrace below costs as much as export)
        try:
            imp = Importer(ep, dim_names, input_names)
            return imp.run(), imp.constants
        except Exception:  # an op only the decomposed form has a handler for: the general path decides
            pass
    try:
        with warnings.catch_warnings():  # (torch >= 2.13 warns from its own deepcopy of the call graph: not the user's)
            warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)", category=FutureWarning)
            ep = ep.run_decompositions({})
    except Exception as e:
        raise CaptureError(f"torch.export could not functionalise the program: {type(e).__name__}: {e}") from e
    imp = Importer(ep, dim_names, input_names)
    graph = imp.run()
    return graph, imp.constants


# reads of a tensor's metadata only: they may come before a write into it
_SHAPE_ONLY = frozenset({torch.ops.aten.sym_size.int, torch.ops.aten.sym_stride.int, torch.ops.aten.sym_numel.default,
                         torch.ops.aten.sym_storage_offset.default})
# in-place ops the importer follows as the last write into a tensor (a pipeline step's new latents / scheduler state
# / step index; T5's ``relative_buckets += ...``), by their functional op's handler (lower.functional_key)
_LAST_WRITES = INPLACE_AS
_SCALAR_MODULES = ("_operator", "operator", "math", "builtins", "torch.sym_float")
# ops that return their input itself where nothing changes (``x.to(x.dtype)``): a write into one writes the input
_IDENTITY_ALIASES = frozenset({"aten.to", "aten.alias", "aten.detach"})


def _written_input(node) -> torch.fx.Node | None:
    """The placeholder ``node`` writes into, or None: an index_copy_ or a ``_LAST_WRITES`` op whose destination is a
    placeholder, or for the latter one seen through ops that return it unchanged (``latents.to(float32)`` of a float32
    input: export hands the write that node). ``_functional`` admits it only into a user input, once, in the order
    it needs."""
    t = node.target
    writes = isinstance(t, torch._ops.OpOverload) and (t == torch.ops.aten.index_copy_.default or handler_key(t) in _LAST_WRITES)
    if not (writes and node.args and isinstance(node.args[0], torch.fx.Node)):
        return None
    x = node.args[0]
    while t != torch.ops.aten.index_copy_.default and x.op == "call_function" and _identity_alias(x):
        x = x.args[0]  # (a KV cache's index_copy_ only straight into the input: its readers come after it)
    return x if x.op == "placeholder" else None


def _identity_alias(node: torch.fx.Node) -> bool:
    """``node`` (an ``_IDENTITY_ALIASES`` op) returns its input itself: same dtype, shape and strides in the record."""
    if not (isinstance(node.target, torch._ops.OpOverload) and handler_key(node.target) in _IDENTITY_ALIASES
            and node.args and isinstance(node.args[0], torch.fx.Node)):
        return False
    got, src = node.meta.get("val"), node.args[0].meta.get("val")
    return (isinstance(got, torch.Tensor) and isinstance(src, torch.Tensor) and got.dtype == src.dtype
            and got.shape == src.shape and got.stride() == src.stride())


def _aliases(node: torch.fx.Node) -> bool:
    """``node``'s value may share memory with one of its inputs: an op whose schema marks a returned alias (a view:
    view, slice, expand, chunk, ``to`` that may return its input, ...), an item of such a list, or an in-place op."""
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.is_mutable or any(r.alias_info is not None for r in t._schema.returns)
    return getattr(t, "__name__", None) == "getitem"


def _functional(ep: ExportedProgram) -> bool:
    """The program calls no higher-order op and mutates nothing (no in-place or out= op, no input / buffer mutation)
    but in the writes the importer follows without functionalisation: what ``run_decompositions({})`` would give,
    minus the retrace. Each tensor is written once:

    - ``index_copy_`` into a user input (a KV cache write), with every other reader of that input after it (they read
      the new value);
    - a ``_LAST_WRITES`` op (copy_, add_, ...) into a user input or into a tensor an op made (not a view of another),
      as that tensor's last use: no reader of it, nor of any view of it, after the write (those before it read the old
      value; a view read after it would see the new one, which the import would not give it; export hands later
      readers the write's own result, the new value), computing in the destination's dtype (``_in_own_dtype``). A
      written user input's final value is an output (``Graph.updates``)."""
    sig = ep.graph_signature
    if sig.buffers_to_mutate or sig.user_inputs_to_mutate:
        return False
    user_inputs = {s.arg.name for s in sig.input_specs if s.kind == InputKind.USER_INPUT}
    order = {n: k for k, n in enumerate(ep.graph.nodes)}
    written = set()
    for n in ep.graph.nodes:
        if n.op != "call_function":
            continue
        t = n.target
        if isinstance(t, torch._ops.OpOverload):
            if t._schema.is_mutable:
                x = _written_input(n) or (n.args[0] if n.args else None)
                if not isinstance(x, torch.fx.Node) or x in written:
                    return False
                into_input = x.op == "placeholder" and x.name in user_inputs
                if t == torch.ops.aten.index_copy_.default:
                    others = [u for u in x.users if u is not n and u.target not in _SHAPE_ONLY]
                    if not (into_input and all(order[u] > order[n] for u in others)):
                        return False
                elif not (handler_key(t) in _LAST_WRITES and (into_input or x.op == "call_function" and not _aliases(x))
                          and not _read_after(x, n, order) and _in_own_dtype(n)):
                    return False
                written.add(x)
        elif getattr(t, "__module__", None) not in _SCALAR_MODULES:
            return False  # a higher-order op (wrap_with_set_grad_enabled, cond, ...) or something unknown
    return True


def _in_own_dtype(write: torch.fx.Node) -> bool:
    """An in-place ``add_`` (``sub_``, ...) computes in its operands' promoted dtype and rounds to its destination's:
    imported by the functional op's handler it would round the other operand first, so only where no promotion
    happens (a copy_ casts its source either way)."""
    if handler_key(write.target) == "aten.copy_":
        return True
    dst = write.args[0].meta.get("val")
    vals = [a.meta.get("val") if isinstance(a, torch.fx.Node) else a for a in (*write.args[1:], *write.kwargs.values())]
    try:
        return isinstance(dst, torch.Tensor) and all(torch.result_type(dst, v) == dst.dtype for v in vals)
    except (TypeError, RuntimeError):
        return False


def _read_after(x: torch.fx.Node, write: torch.fx.Node, order: dict) -> bool:
    """Whether ``x`` or a view of it (``_aliases``, transitively) is read by a node after ``write``, other than
    ``write`` itself."""
    views, stack = {x}, [x]
    while stack:
        for u in stack.pop().users:
            if u is write or u.target in _SHAPE_ONLY:
                continue
            if order[u] > order[write]:
                return True
            if u not in views and _aliases(u):
                views.add(u)
                stack.append(u)
    return False
