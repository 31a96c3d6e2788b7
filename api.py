"""The three ways in: ``kiln.jit``, ``kiln.compile`` and ``kiln.load``. All return (or wrap) a
:class:`CompiledModel`: callable like the eager model, with ``.graph``, ``.report()`` and ``.save()``."""
from __future__ import annotations

import dataclasses
import operator
import os
import types
import warnings
from dataclasses import dataclass
from functools import partial

import torch
import torch.utils._pytree as pytree

from .codegen import compile_pool
from .config import CompileConfig
from .errors import CaptureError, InputError, KilnError, SourceChangedError
from .ir.bind import bind_inputs
from .ir.fx import capture
from .ir.fx.capture import Dim  # noqa: F401  (kiln.Dim)
from .ir.fx.importer import from_exported
from .ir.graph import Graph
from .ir.types import eval_dim, torch_dtype
from .passes.pipeline import run_pipeline
from .passes.report import Report
from .runtime import artifact, warm_libs
from .runtime.executor import Executor
from .runtime.target import Target
from .runtime.signature import Signature, output_names, output_structure


class SourceWatch:
    """The parameters and buffers a graph was compiled from, and a cheap check that they are still there,
    unwritten: each registered tensor is still the same object (not replaced), with the same version counter (no
    in-place write) and storage (no ``.data =``, which ``.to()`` uses). About 0.3 us per tensor.

    A compiled *function* (``fn``) is watched through what it names (torch.export lifts the tensors it reads with
    version counters of their own): each global or closure name bound to a tensor, a module, or a list / tuple /
    dict of them must still be bound to that object, those tensors unwritten and those modules' parameters and
    buffers as above; the functions it names are followed likewise (``_References``). An ``ExportedProgram``
    (``program``) is watched through its state dict and constants, which are its module's own tensors."""

    def __init__(self, module: torch.nn.Module | None = None, fn=None, program: torch.export.ExportedProgram | None = None):
        refs = _References()
        if fn is not None:
            refs.follow(fn)
        seen, slots = set(), []
        if program is not None:
            slots += [(reg, k, t) for reg in (program.state_dict, program.constants) for k, t in reg.items()
                      if isinstance(t, torch.Tensor)]
        for root in ([module] if module is not None else []) + refs.modules:
            for m in root.modules():
                if id(m) not in seen:
                    seen.add(id(m))
                    slots += [(reg, k, t) for reg in (m._parameters, m._buffers) for k, t in reg.items() if t is not None]
        slots += [({0: t}, 0, t) for t in refs.tensors]  # (a named tensor's own registry: its binding is checked below)
        self.registries, self.keys, self.tensors = [r for r, _, _ in slots], [k for _, k, _ in slots], [t for _, _, t in slots]
        self.versions = list(map(_VERSION, self.tensors))
        self.ptrs = list(map(torch.Tensor.data_ptr, self.tensors))
        self.bindings = refs.bindings
        self.source = "function" if fn is not None else "program" if program is not None else "module"

    def changed(self) -> bool:
        ts = self.tensors
        return (list(map(_VERSION, ts)) != self.versions or list(map(torch.Tensor.data_ptr, ts)) != self.ptrs
                or any(map(operator.is_not, map(dict.get, self.registries, self.keys), ts))
                or any(read() is not obj for read, obj in self.bindings))


class _References:
    """What a function reads by name: the tensors, modules and containers of them bound to its globals, closure
    cells and defaults (``bindings``: how to read each name again, and what it held), through the functions,
    bound methods and partials it names, up to ``FOLLOW`` calls deep."""

    FOLLOW = 3

    def __init__(self):
        self.bindings: list[tuple] = []
        self.modules: list[torch.nn.Module] = []
        self.tensors: list[torch.Tensor] = []
        self._seen: set[int] = set()

    def follow(self, fn, depth: int = 0) -> None:
        if id(fn) in self._seen or depth > self.FOLLOW:
            return
        self._seen.add(id(fn))
        if isinstance(fn, partial):
            for v in (*fn.args, *fn.keywords.values()):
                self._value(v, depth)
            self.follow(fn.func, depth)
        elif isinstance(fn, types.MethodType):
            self._value(fn.__self__, depth)
            self.follow(fn.__func__, depth)
        elif isinstance(fn, types.FunctionType):
            g = fn.__globals__
            for name in sorted(_names(fn.__code__)):
                if name in g and self._value(g[name], depth):
                    self.bindings.append((partial(dict.get, g, name), g[name]))
            for cell in fn.__closure__ or ():
                v = _cell_value(cell)
                if self._value(v, depth):
                    self.bindings.append((partial(_cell_value, cell), v))
            for v in (*(fn.__defaults__ or ()), *(fn.__kwdefaults__ or {}).values()):
                self._value(v, depth)

    def _value(self, v, depth: int) -> bool:
        """Watch ``v`` where it is a tensor, a module or a container of them (True: watch the name bound to it
        too); follow it where it is a function."""
        if isinstance(v, torch.Tensor):
            if id(v) not in self._seen:
                self._seen.add(id(v))
                self.tensors.append(v)
            return True
        if isinstance(v, torch.nn.Module):
            self.modules.append(v)
            return True
        if isinstance(v, (list, tuple, dict)):
            items = [x for x in (v.values() if isinstance(v, dict) else v) if isinstance(x, (torch.Tensor, torch.nn.Module))]
            for x in items:
                self._value(x, depth)
            return bool(items)
        if isinstance(v, (types.FunctionType, types.MethodType, partial)):
            self.follow(v, depth + 1)
        return False


def _names(code: types.CodeType) -> set:
    """The global names a code object reads, its nested functions' and comprehensions' too."""
    names = set(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names |= _names(c)
    return names


def _cell_value(cell):
    try:
        return cell.cell_contents
    except ValueError:  # (an empty cell: a name the function defines later)
        return None


_VERSION = operator.attrgetter("_version")


class CompiledModel:
    """A compiled graph with its call signature. Call it like the model it came from."""

    def __init__(self, graph: Graph, signature: Signature, config: CompileConfig, report: Report,
                 manifest: dict | None = None, tuning: dict | None = None):
        self.graph = graph
        self.signature = signature
        self.config = config
        self._report = report
        self.manifest = manifest or {}
        self.files: dict[str, bytes] = {}  # data files an artifact carried (save(files=...))
        self.source_watch: SourceWatch | None = None  # the module compiled from, when its weights are shared
        target = Target.from_config(config, default_device=next((t.device for t in graph.weights.values()), None), tuning=tuning)
        self.executor = Executor(graph, target)

    def __call__(self, *args, **kwargs):
        tensors = self.signature.flatten(args, kwargs)
        with torch.no_grad():
            outputs = self.run(tensors)
        return self.signature.unflatten(outputs)

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run on the flat input tensors (graph order); returns the model's outputs, flat. Inputs the model
        updates in place (a KV cache) hold their new values afterwards, as they would in eager torch."""
        try:
            plan = self.executor.plan_for(tensors)
        except InputError:
            self.check_source()  # inputs that fit the new weights, not the old graph (``.half()``): say what changed
            raise
        g = self.graph
        if g.updates:
            self.check_source()  # before running: a stale run would write the caller's inputs
        plan.bind(tensors)
        outputs = plan.replay()
        if not g.updates:
            self.check_source()  # (checked while the device runs the replay: the check costs no latency there)
        outputs = plan.handout(outputs)
        if not g.updates:
            return outputs
        index = {n.attrs["name"]: k for k, n in enumerate(g.inputs)}
        user = []
        for name, value in zip(g.output_names, outputs):
            target = g.updates.get(name)
            if target is None:
                user.append(value)
            else:
                t = tensors[index[target]]
                if value.data_ptr() != t.data_ptr() or value.stride() != t.stride():  # (kernels: written in place)
                    t.copy_(value)
        return user

    def check_source(self) -> None:
        """Refuse to run when the module this was compiled from has changed its weights: the graph holds some of
        them as compile-time products (merged, folded) and some as the module's own tensors, so it would answer
        with neither the old nor the new model."""
        if self.source_watch is not None and self.source_watch.changed():
            what = {"function": "a tensor or module the compiled function names has been written or rebound since",
                    "program": "the exported program's weights (its module's own tensors) have been written since",
                    }.get(self.source_watch.source, "the module this model was compiled from has changed its parameters "
                          "or buffers since (load_state_dict, an in-place update, .to(), a replaced tensor)")
            raise SourceChangedError(f"{what}; the compiled graph holds compile-time products of the old ones",
                                     hint="compile it again, or use kiln.jit, which rebuilds itself when the weights change")

    def report(self) -> Report:
        return self._report

    @property
    def device(self) -> torch.device:
        return self.executor.device

    @property
    def inputs(self) -> list[dict]:
        """Each graph input: name, shape (ints and symbol names), dtype; and the symbol ranges."""
        return [{"name": n.attrs["name"], "shape": [d if isinstance(d, int) else str(d) for d in n.shape],
                 "dtype": n.dtype} for n in self.graph.inputs]

    def save(self, path: str | os.PathLike, overwrite: bool = False, *, extra: dict | None = None,
             files: dict[str, bytes] | None = None) -> str:
        """Write a self-contained ``.kiln`` artifact (refuses to replace a file unless ``overwrite``).
        ``extra``: more manifest entries; ``files``: data files to keep with it (``CompiledModel.files``)."""
        return artifact.save(path, self.graph, signature=self.signature.to_dict(), config=self.config.to_dict(),
                             report=self._report.to_dict(), extra={"device": self.device.type, **(extra or {})},
                             tuning=self.executor.tuner.to_json() if self.executor.tuner and self.executor.tuner.decisions else None,
                             files=files, overwrite=overwrite)

    def as_component(self) -> artifact.Component:
        """This model as one named graph of a multi-graph artifact (``artifact.save_components``)."""
        tuner = self.executor.tuner
        return artifact.Component(self.graph, self.signature.to_dict(), self.config.to_dict(), self._report.to_dict(),
                                  tuner.to_json() if tuner and tuner.decisions else None, {"device": self.device.type})

    def random_inputs(self, dims: dict[str, int] | None = None, seed: int = 0) -> list[torch.Tensor]:
        """Random tensors that fit the inputs (symbols take ``dims`` or a small default in range);
        integer inputs feeding an embedding stay below its number of rows."""
        dims = dict(dims or {})
        for name in dims:
            if name not in self.graph.symbols:
                raise KilnError(f"unknown dim {name!r}; this model's dims are {', '.join(self.graph.symbols) or 'none'}")
        bindings = {}
        for name, (lo, hi) in self.graph.symbols.items():
            v = dims.get(name, min(max(lo, 16 if name != "batch" else 1), hi))
            if not lo <= v <= hi:
                raise KilnError(f"dim {name} = {v} is outside its range [{lo}, {hi}]")
            bindings[name] = v
        gen = torch.Generator().manual_seed(seed)
        out = []
        for n in self.graph.inputs:
            shape = [eval_dim(d, bindings) for d in n.shape]
            dt = torch_dtype(n.dtype)
            if dt.is_floating_point:
                t = torch.randn(shape, generator=gen).to(dt)
            elif dt == torch.bool:
                t = torch.ones(shape, dtype=torch.bool)
            else:
                t = torch.randint(0, _index_bound(self.graph, n), shape, generator=gen, dtype=dt)
            out.append(t.to(self.device))
        return out

    def __repr__(self) -> str:
        ins = ", ".join(f"{i['name']}: {i['dtype']}[{', '.join(map(str, i['shape']))}]" for i in self.inputs)
        return f"<kiln.CompiledModel ({ins}) -> {', '.join(self.graph.output_names)}; {len(self.graph.nodes)} nodes>"


def _index_bound(graph: Graph, node) -> int:
    """How large an integer input may be: rows of the embedding table it indexes, the size of the axis an
    INDEX_COPY writes at it (a cache slot), else 1000."""
    bound = 1000
    for u in node.users:
        if u.op == "EMBEDDING" and u.inputs[1] is node and isinstance(u.inputs[0].shape[0], int):
            bound = min(bound, u.inputs[0].shape[0])
        if u.op == "INDEX_COPY" and u.inputs[1] is node and isinstance(u.inputs[0].shape[u.attrs["axis"]], int):
            bound = min(bound, u.inputs[0].shape[u.attrs["axis"]])
    return bound


# ----------------------------------------------------------------------------- compile


def compile(model, example_inputs=(), example_kwargs: dict | None = None, *, dynamic: dict | None = None,
            config: CompileConfig | None = None, report_hook=None, calibration=None, prequantized=None) -> CompiledModel:
    """Compile ``model`` (an ``nn.Module``, a function of tensors, a ``torch.export.ExportedProgram``, or
    the path of a ``.pt2`` or ``.onnx`` file) for the example inputs, which are given as torch.export takes them.

    ``dynamic`` declares symbolic dims: ``{"input_ids": {0: ("batch", 1, 8), 1: kiln.Dim("seq", 1, 2048)}}``;
    every other dim is fixed to its example size. An ONNX file declares its own dims (``dim_param``);
    ``dynamic`` may rename / range them the same way, or range them by name: ``{"seq": (1, 2048)}``.
    ``calibration``: inputs for ``config.quantize`` (GPTQ fits to them; every mode reports its error on them),
    a list of calls, each a dict of keyword arguments, a tuple of positional ones, or one tensor.
    ``prequantized``: weights a checkpoint holds already quantized (GPTQ), as ``[(parameter, QuantWeight), ...]``
    (or a dict): each model parameter the graph reads (matched by storage) is packed from its QuantWeight as given,
    and with ``config.quantize`` set every other weight stays float."""
    config = config or CompileConfig()
    report = Report(listener=report_hook)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_kwargs = dict(example_kwargs or {})
    src = capture_model(model, tuple(example_inputs), example_kwargs, dynamic, report)
    return build(src, config, report, example_inputs, example_kwargs, calibration=calibration, prequantized=prequantized)


def build(src: "Source", config: CompileConfig, report: Report, example_inputs=(), example_kwargs: dict | None = None,
          calibration=None, prequantized=None) -> CompiledModel:
    """An imported graph optimized and made runnable; planned at the example's shapes, verified against the eager
    module when the config asks; refusing to run once the source module's weights change. ``calibration``: as
    :func:`compile` takes it."""
    graph = src.graph
    report.ops_before = graph.histogram()
    report.model.update(parameters=sum(t.numel() for t in graph.weights.values()), weight_bytes=graph.weight_bytes(),
                        inputs=[n.attrs["name"] for n in graph.inputs], outputs=list(graph.output_names))
    samples = _calibration_inputs(calibration, src.signature)
    if prequantized is not None and config.quantize is None:
        raise KilnError("prequantized weights are packed by the quantize_weights pass, which config.quantize=None turns off",
                        hint="set CompileConfig(quantize=...) to the checkpoint's mode (w4a16 / w8a16)")
    by_name = _prequantized_by_name(graph, prequantized) if prequantized is not None else None
    if by_name is not None and len(by_name) < len(prequantized):
        raise KilnError(f"{len(prequantized) - len(by_name)} of the {len(prequantized)} prequantized weights are not weights "
                        "the captured graph reads (matched by storage and shape)",
                        hint="give the model's own parameters, as they are when it is compiled (after any .to())")
    tp = tensor_parallel(config)
    if tp[1] > 1:
        config = dataclasses.replace(config, tp_rank=tp[0])  # (recorded in the artifact: the shard's rank)
    with report.phase("optimize"):
        run_pipeline(graph, config.disable, report, config.quantize_spec(), samples, tp=tp, prequantized=by_name)
    report.ops_after = graph.histogram()
    with report.phase("plan"):
        compiled = CompiledModel(graph, src.signature, config, report)
        if src.watch is not None or src.module is not None:
            compiled.source_watch = src.watch or SourceWatch(src.module)
        # a graph that updates its inputs (a KV-cache step) is planned at its first call instead: planning runs
        # the graph once, which must not write into the caller's example tensors, and the example's shapes are
        # rarely the ones generation runs at
        if src.example is not None and not graph.updates:
            binding = bind_inputs(graph, src.example)
            plan = compiled.executor.plan(binding, src.example)
            report.memory = {**plan.memory.summary(), "binding": binding}
    if config.verify and src.module is not None and src.example is not None:
        with report.phase("verify"):
            report.verify = _verify(src.module, compiled, example_inputs, example_kwargs or {}, src.signature)
    return compiled


def process_group() -> tuple[int, int]:
    """(rank, world size) of torch.distributed's default process group; (0, 1) when none is initialised."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def tensor_parallel(config: CompileConfig) -> tuple[int, int]:
    """(rank, world) of the shard ``config`` asks for: ``tp_rank`` when given (offline sharding needs no process group),
    else the rank of the initialised process group, which must have ``tp`` ranks."""
    if config.tp == 1:
        return 0, 1
    if config.tp_rank is not None:
        return config.tp_rank, config.tp
    rank, world = process_group()
    if world == 1:
        raise KilnError(f"tp={config.tp} needs an initialised torch.distributed process group of {config.tp} ranks",
                        hint=f"call torch.distributed.init_process_group in each of {config.tp} processes (torchrun "
                             f"--nproc-per-node {config.tp}), or shard offline: CompileConfig(tp={config.tp}, tp_rank=R)")
    if world != config.tp:
        raise KilnError(f"tp={config.tp}, but the process group has {world} ranks",
                        hint=f"tp must be the process group's size ({world})")
    return rank, world


def _calibration_inputs(calibration, signature: Signature) -> list | None:
    """Each calibration call (kwargs dict, args tuple or one tensor) as the graph's flat input tensors."""
    if calibration is None:
        return None
    samples = []
    for k, call in enumerate(calibration):
        args, kwargs = ((), call) if isinstance(call, dict) else ((call,) if isinstance(call, torch.Tensor) else tuple(call), {})
        try:
            samples.append(signature.flatten(args, kwargs))
        except KilnError as e:
            raise KilnError(f"calibration call {k}: {e.message}", hint=e.hint) from None
    return samples


def _prequantized_by_name(graph: Graph, prequantized) -> dict:
    """(parameter, QuantWeight) pairs -> {graph weight name: QuantWeight on that weight's device}: the graph's weights
    are the captured parameters' storage (names like ``lifted_tensor_3`` say nothing), so they match by storage."""
    def key(t):
        return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)

    pairs = prequantized.items() if isinstance(prequantized, dict) else prequantized
    by_key = {key(t): qw for t, qw in pairs}
    out = {}
    for name, t in graph.weights.items():
        qw = by_key.get(key(t))
        if qw is not None and t.dim() == 2 and tuple(t.shape) == tuple(qw.shape):
            out[name] = qw.to(t.device)
    return out


@dataclass
class Source:
    """A model captured and imported: its graph, how it is called, and (for modules and functions) the eager
    module and the example's flat tensors."""
    graph: Graph
    signature: Signature
    module: torch.nn.Module | None = None
    example: list | None = None
    watch: SourceWatch | None = None  # what a compiled function reads (a module's are watched from ``module``)


def capture_model(model, args: tuple, kwargs: dict, dynamic: dict | None, report: Report) -> Source:
    """``model`` captured (modules, functions, ExportedPrograms) or read (.pt2, .onnx) and imported into a graph."""
    if isinstance(model, (str, os.PathLike)):
        model = _load_source(os.fspath(model), report, dynamic)
    if isinstance(model, Graph):  # an ONNX file, imported by _load_source
        return Source(model, _onnx_signature(model))
    if isinstance(model, torch.export.ExportedProgram):
        report.model.update(name=os.path.basename(str(getattr(model, "_kiln_path", ""))) or "ExportedProgram",
                            source="torch.export program")
        signature = Signature.from_exported(model)
        return Source(_import(model, signature, None, None, report), signature, watch=SourceWatch(program=model))
    if isinstance(model, torch.nn.Module):
        module, fn = model, model.forward
    elif callable(model):
        module, fn = capture.wrap_callable(model), model
    else:
        raise KilnError(f"cannot compile a {type(model).__name__}",
                        hint="pass an nn.Module, a function of tensors, an ExportedProgram or a .pt2 path")
    signature, canonical = Signature.from_callable(fn, args, kwargs, fixed=capture.hf_fixed_kwargs(module, fn))
    _start_compile_workers(module, args, kwargs)
    shapes, dim_names = capture.dynamic_shapes(dynamic, canonical)
    report.model.update(name=type(model).__name__ if isinstance(model, torch.nn.Module) else getattr(model, "__name__", "fn"),
                        source="torch.export")
    with report.phase("capture"):
        ep = capture.export(module, capture.widen_size_one(canonical, dim_names), shapes, dim_names)
    graph = _import(ep, signature, dim_names, shapes, report)
    watch = None if module is model else SourceWatch(fn=model)  # (a module's is made when built: ``build``)
    watched = watch.tensors if watch else [*module.parameters(), *module.buffers()]
    _note_unwatched(watched, ep, "function" if watch else "module", report)
    return Source(graph, signature, module, signature.flatten(args, kwargs), watch)


def _note_unwatched(watched: list, ep, source: str, report: Report) -> None:
    """The report says how many of the tensors the program reads (besides its inputs) no watch sees: changed
    after compiling, they would go unseen."""
    seen = {t.untyped_storage().data_ptr() for t in watched}
    lifted = [t for t in ep.constants.values() if isinstance(t, torch.Tensor)]
    unseen = sum(t.untyped_storage().data_ptr() not in seen for t in lifted)
    if unseen:
        how = ("not ones it names (reached through an object's attributes, or made inside it)" if source == "function" else
               "not its parameters or buffers (globals, attributes of other objects, or made inside its forward)")
        report.notes.append(f"{unseen} of the {len(lifted)} tensors the {source} reads are {how}: changes to them after "
                            "compiling go unseen")


def _start_compile_workers(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
    """A model on a CUDA device: start the Triton compile workers (``codegen/compile_pool.py``) now, so that their
    imports (seconds) overlap torch.export's and they are ready when the plans built after want them."""
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    tensors += list(module.parameters())[:1]
    if any(t.is_cuda for t in tensors):
        compile_pool.start()


def _import(ep, signature: Signature, dim_names: dict | None, shapes: dict | None, report: Report) -> Graph:
    """The exported program as a graph whose outputs are the updated inputs' new values, then the model's
    outputs in the order of its output structure (recorded in ``signature``)."""
    with report.phase("import"):
        graph, _ = from_exported(ep, dim_names, input_names=signature.input_paths)
    if shapes is not None:
        _note_narrowed_ranges(graph, shapes, report)
    signature.output = output_structure(ep.call_spec.out_spec)
    names = output_names(signature.output)
    updates = [(o, n) for o, n in zip(graph.outputs, graph.output_names) if n in graph.updates]
    user = [o for o, n in zip(graph.outputs, graph.output_names) if n not in graph.updates]
    if len(user) != len(names):
        raise CaptureError("the exported program's outputs do not match its output structure")
    graph.set_outputs([o for o, _ in updates] + user, [n for _, n in updates] + names)
    return graph


def _note_narrowed_ranges(graph: Graph, shapes: dict, report: Report) -> None:
    for name, (lo, hi) in capture.declared_ranges(shapes).items():
        got = graph.symbols.get(name)
        if got is not None and got[0] == 2 and lo <= 1:
            # torch < 2.12 reports every backed size as >= 2 (its 0/1 specialisation), not a guard of the model;
            # kiln's ops broadcast at any size and the graph is the same, so size 1 keeps the declared range
            graph.symbols[name] = got = (1, got[1])
        if got is not None and (got[0] != lo or (hi is not None and got[1] != hi)):
            report.notes.append(f"dim {name}: declared [{lo}, {hi}], the model only works for [{got[0]}, {got[1]}] "
                                "(torch.export's analysis); calls are checked against the narrower range")


def _verify(module, compiled: CompiledModel, args, kwargs, signature: Signature) -> dict:
    import torch.utils._pytree as pytree

    with torch.no_grad(), capture.eval_mode(module):
        want = module(*args, **{**signature.fixed, **kwargs})
        got = compiled(*args, **kwargs)
    errs = {}
    wl, gl = pytree.tree_leaves(want), pytree.tree_leaves(got)
    names = [n for n in compiled.graph.output_names if n not in compiled.graph.updates]
    for name, w, g in zip(names, wl, gl):
        w64, g64 = w.detach().double(), g.detach().double()
        errs[name] = float((g64 - w64).norm() / w64.norm().clamp_min(1e-30))
    return {"rel_err": errs}


def _onnx_signature(graph: Graph) -> Signature:
    """An ONNX model is called with its inputs by name (or in order); it returns its one output, or a
    dict of its outputs by name."""
    names = [n.attrs["name"] for n in graph.inputs]
    signature = Signature(names, names, {}, "", [], {"leaf": True})
    signature._set_leaves({n: torch.empty(0) for n in names})
    if len(graph.outputs) > 1:
        signature.output = {"type": "dict", "keys": list(graph.output_names), "children": [{"leaf": True}] * len(graph.outputs)}
    return signature


def _load_source(path: str, report: Report, dynamic: dict | None = None):
    if not os.path.exists(path):
        raise KilnError(f"{path}: no such file")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".pt2":
        with report.phase("load .pt2"):
            try:
                ep = torch.export.load(path)
            except Exception as e:
                raise KilnError(f"{path}: cannot read it as a torch.export program ({type(e).__name__}: {e})",
                                hint="write it with torch.export.save") from None
        ep._kiln_path = path
        return ep
    if ext == ".kiln":
        raise KilnError(f"{path} is already a compiled artifact", hint="load it with kiln.load / kiln run")
    if ext == ".onnx":
        report.model.update(name=os.path.basename(path), source="ONNX")
        from .ir.onnx import from_onnx  # (here: onnx takes ~0.8 s to import, and most processes never read one)
        with report.phase("import ONNX"):
            return from_onnx(path, dynamic=dynamic, notes=report.notes)
    raise KilnError(f"{path}: unknown model file type {ext!r}", hint="kiln compiles .pt2 and .onnx files and nn.Modules")


# ----------------------------------------------------------------------------- load, jit


def load(path: str | os.PathLike, device: str | None = None, backend: str | None = None, *,
         component: str | None = None) -> CompiledModel:
    """Load a ``.kiln`` artifact; no model source is needed. ``device`` overrides where it runs,
    ``backend`` how ("kernels", "reference", "auto"; see CompileConfig.backend). ``component``: one named graph
    of an artifact of several (a diffusion pipeline's "step", "vae", "text_encoder")."""
    if device is not None:
        check_device(device)
    graph, manifest, report_dict, tuning, files = artifact.load(path, component, on_manifest=partial(_warm_libraries, device))
    config = CompileConfig.from_dict(manifest.get("config") or {})
    if config.tp > 1:
        artifact.check_shard(os.fspath(path), manifest, *process_group())
    if device is None:  # where it was compiled to run, when this machine has it
        device = _compiled_for(manifest)
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            warnings.warn(f"{path} was compiled for {device}, which this machine lacks; running on the CPU", stacklevel=2)
            device = "cpu"
    config.device = device
    if backend is not None:
        config.backend = backend
        config.__post_init__()
    signature = Signature.from_dict(manifest["signature"])  # (the Target below refuses a backend the device lacks)
    m = CompiledModel(graph, signature, config, Report.from_dict(report_dict), manifest, tuning)
    m.files = files
    return m


def _compiled_for(manifest: dict) -> str:
    return (manifest.get("config") or {}).get("device") or manifest.get("device") or "cpu"


def _warm_libraries(device: str | None, manifest: dict) -> None:
    """Start loading the GPU libraries the artifact's graph calls (runtime/warm_libs.py) while the load goes on."""
    try:
        d = torch.device(device or _compiled_for(manifest))
    except (RuntimeError, TypeError):  # (a bad device name in the manifest: the load itself reports it)
        return
    bf16 = any(isinstance(i, dict) and i.get("dtype") == "bfloat16" for i in manifest.get("inputs") or ())
    warm_libs.start(d, manifest.get("libraries"), torch.bfloat16 if bf16 else torch.float16)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device kiln can run on; a KilnError when torch does not know the name, it is neither
    cpu nor cuda, or it is a CUDA device this machine lacks."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise KilnError(f"device {str(device)!r} is not a device name", hint="kiln runs on cpu, cuda or cuda:N") from None
    if d.type not in ("cpu", "cuda"):
        raise KilnError(f"device {str(device)!r}: kiln runs on the CPU or a CUDA GPU", hint="use cpu, cuda or cuda:N")
    if d.type == "cuda" and not torch.cuda.is_available():
        why = f"torch {torch.__version__} was built without CUDA" if torch.version.cuda is None else "no CUDA GPU is visible"
        raise KilnError(f"device {str(device)!r}: this machine cannot run CUDA ({why})", hint="run on the CPU: device cpu")
    if d.type == "cuda" and d.index is not None and d.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise KilnError(f"device {str(device)!r}: this machine has {n} CUDA GPU{'s' if n != 1 else ''}",
                        hint=f"use cuda:0 .. cuda:{n - 1}")
    return d
