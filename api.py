"""The three ways in: ``kiln.jit``, ``kiln.compile`` and ``kiln.load``. All return (or wrap) a
:class:`CompiledModel`: callable like the eager model, with ``.graph``, ``.report()`` and ``.save()``."""
from __future__ import annotations

import functools
import os
import warnings
from contextlib import contextmanager

import torch

from .config import CompileConfig
from .errors import CaptureError, KilnError
from .ir.graph import Graph
from .ir.types import eval_dim, torch_dtype
from .passes.pipeline import run_pipeline
from .passes.report import Report
from .runtime import artifact
from .runtime.executor import Executor
from .runtime.signature import Signature, output_names, output_structure


class Dim:
    """A named dynamic dim with an inclusive range: ``kiln.Dim("seq", 1, 2048)``."""

    def __init__(self, name: str, min: int = 1, max: int | None = None):
        if not name.isidentifier():
            raise KilnError(f"dim name {name!r} must be an identifier")
        if max is not None and max < min:
            raise KilnError(f"dim {name}: max {max} < min {min}")
        self.name, self.min, self.max = name, min, max

    def __repr__(self) -> str:
        return f"Dim({self.name!r}, {self.min}, {self.max})"


class CompiledModel:
    """A compiled graph with its call signature. Call it like the model it came from."""

    def __init__(self, graph: Graph, signature: Signature, config: CompileConfig, report: Report,
                 manifest: dict | None = None, tuning: dict | None = None):
        from .codegen.cache import Cache
        from .codegen.tuning import Tuner

        self.graph = graph
        self.signature = signature
        self.config = config
        self._report = report
        self.manifest = manifest or {}
        self.files: dict[str, bytes] = {}  # data files an artifact carried (save(files=...))
        tuner = Tuner(Cache.from_config(config), decisions=(tuning or {}).get("decisions"), force=config.kernels)
        self.executor = Executor(graph, device=config.device, max_plans=config.max_plans, backend=config.backend,
                                 cuda_graphs=config.cuda_graphs, tuner=tuner)

    def __call__(self, *args, **kwargs):
        tensors = self.signature.flatten(args, kwargs)
        with torch.no_grad():
            outputs = self.run(tensors)
        return self.signature.unflatten(outputs)

    def run(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Run on the flat input tensors (graph order); returns the model's outputs, flat. Inputs the model
        updates in place (a KV cache) hold their new values afterwards, as they would in eager torch."""
        outputs = self.executor.run(tensors)
        g = self.graph
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


def _wrap_callable(fn):
    """A Module whose forward has ``fn``'s signature (torch.export needs a Module)."""
    import inspect
    import types

    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        raise KilnError(f"cannot read the signature of {fn!r}",
                        hint="wrap it in a python function with named tensor parameters") from None
    # torch.export records only frames named `forward` (and registered anchors): make fn's own frames
    # count, so an unsupported op inside it is reported at its own file:line
    anchor = getattr(torch.fx.proxy, "_register_stack_trace_anchor", None)
    if anchor is not None:
        anchor(fn)
    elif isinstance(fn, types.FunctionType):
        renamed = types.FunctionType(fn.__code__.replace(co_name="forward"), fn.__globals__, fn.__name__,
                                     fn.__defaults__, fn.__closure__)
        renamed.__kwdefaults__ = fn.__kwdefaults__
        fn = renamed

    class Fn(torch.nn.Module):
        def forward(self, *args, **kwargs):
            return fn(*args, **kwargs)

    Fn.forward.__signature__ = sig.replace(parameters=[inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
                                           + list(sig.parameters.values()))
    Fn.__name__ = getattr(fn, "__name__", "fn")
    return Fn()


def _dynamic_shapes(dynamic: dict | None, canonical: dict):
    """kiln's ``dynamic=`` -> torch.export ``dynamic_shapes`` plus the dim names per input."""
    ds = {k: None for k in canonical}
    names: dict[str, dict[int, str]] = {}
    if not dynamic:
        return ds, names
    if not isinstance(dynamic, dict):
        raise KilnError("dynamic= takes a dict: {input name: {dim index: name | (name, min, max) | kiln.Dim}}")
    dims: dict[str, torch.export.Dim] = {}
    ranges: dict[str, tuple] = {}
    for arg, spec in dynamic.items():
        if arg not in canonical:
            raise KilnError(f"dynamic= names {arg!r}, which is not an argument of this call "
                            f"(arguments: {', '.join(canonical)})")
        t = canonical[arg]
        if not isinstance(t, torch.Tensor):
            raise KilnError(f"dynamic= names {arg!r}, which is not a tensor")
        per = {}
        for i, d in spec.items():
            if not isinstance(i, int) or not -t.dim() <= i < t.dim():
                raise KilnError(f"dynamic= for {arg!r}: dim {i} does not exist (rank {t.dim()})")
            i %= t.dim()
            if isinstance(d, str):
                name, lo, hi = d, 1, None
            elif isinstance(d, tuple) and len(d) == 3:
                name, lo, hi = d
            elif isinstance(d, Dim):
                name, lo, hi = d.name, d.min, d.max
            elif type(d).__name__ in ("Dim", "_Dim") or hasattr(d, "__name__"):
                name, lo, hi = d.__name__, getattr(d, "min", 1), getattr(d, "max", None)
            else:
                raise KilnError(f"dynamic= for {arg!r} dim {i}: {d!r} is not a name, (name, min, max) or kiln.Dim")
            if name in ranges and ranges[name] != (lo, hi):
                raise KilnError(f"dim {name!r} is declared twice with different ranges {ranges[name]} and {(lo, hi)}")
            if hi is not None and hi < 2:
                continue  # a dim that can only be 1 is static
            size = t.shape[i]
            if size < lo or (hi is not None and size > hi):
                raise KilnError(f"example input {arg!r} dim {i} ({name}) is {size}, outside the declared range "
                                f"[{lo}, {hi if hi is not None else 'inf'}]")
            ranges[name] = (lo, hi)
            if name not in dims:
                dims[name] = torch.export.Dim(name, min=lo, max=hi) if hi is not None else torch.export.Dim(name, min=lo)
            per[i] = dims[name]
            names.setdefault(arg, {})[i] = name
        ds[arg] = per
    return ds, names


def _widen_size_one(canonical: dict, dim_names: dict[str, dict[int, str]]) -> dict:
    """The example to capture with: torch.export fixes a dim whose example size is 1 even when it is
    declared dynamic, so such dims are captured at size 2 (the example repeated along them)."""
    capture = dict(canonical)
    for arg, per in dim_names.items():
        t = capture[arg]
        for i in per:
            if t.shape[i] == 1:
                t = torch.cat([t, t], dim=i)
        capture[arg] = t
    return capture


@contextmanager
def _eval_mode(module: torch.nn.Module):
    """Capture with inference semantics without leaving the user's module changed."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _hf_fixed_kwargs(module, fn) -> dict:
    """HF models return a KV-cache object by default; capture without it (generation is separate)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if "use_cache" in params and hasattr(getattr(module, "config", None), "use_cache"):
        return {"use_cache": False}
    return {}


def _relaxed(dynamic_shapes: dict) -> dict:
    """The same dims as ``Dim.DYNAMIC`` hints with their ranges: torch may then add guards it cannot
    prove over the whole range (torch 2.11 cannot prove ``min(8*s, 16*s) == 8*s``) instead of failing."""
    out = {}
    for arg, per in dynamic_shapes.items():
        if not per:
            out[arg] = per
            continue
        out[arg] = {}
        for i, d in per.items():
            lo, hi = getattr(d, "min", 1), getattr(d, "max", None)
            try:
                out[arg][i] = torch.export.Dim.DYNAMIC(min=lo, max=hi if hi is not None and hi < 2**62 else None)
            except TypeError:  # a torch without ranged hints
                out[arg][i] = torch.export.Dim.DYNAMIC
    return out


def _export(module, canonical: dict, dynamic_shapes: dict, dim_names: dict):
    def run(ds):
        with torch.no_grad(), _eval_mode(module):
            return torch.export.export(module, (), canonical, dynamic_shapes=ds, strict=False)

    try:
        try:
            return run(dynamic_shapes)
        except Exception as first:
            if "Constraints violated" not in str(first) or not dim_names:
                raise
            try:
                ep = run(_relaxed(dynamic_shapes))
            except Exception:
                raise first from None
            if not _all_dims_symbolic(ep, dim_names):
                raise first from None
            return ep
    except KilnError:
        raise
    except Exception as e:
        if os.environ.get("KILN_DEBUG"):
            raise
        text = str(e).strip().splitlines()
        msg = "\n  ".join(text[:12]) + ("\n  ..." if len(text) > 12 else "")
        raise CaptureError(f"torch.export could not capture the model: {type(e).__name__}: {msg}",
                           hint="KILN_DEBUG=1 shows the full error; a dim that cannot be dynamic is usually "
                                "named in it") from None


def _declared_ranges(dynamic_shapes: dict) -> dict:
    return {d.__name__: (d.min, d.max if d.max is not None and d.max < 2**62 else None)
            for per in dynamic_shapes.values() if per for d in per.values()}


def _all_dims_symbolic(ep, dim_names: dict) -> bool:
    """Every declared dynamic dim is still a symbol in the exported program's inputs."""
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    for arg, per in dim_names.items():
        v = vals.get(arg)
        if not isinstance(v, torch.Tensor) or any(not isinstance(v.shape[i], torch.SymInt) for i in per):
            return False
    return True


def compile(model, example_inputs=(), example_kwargs: dict | None = None, *, dynamic: dict | None = None,
            config: CompileConfig | None = None, report_hook=None) -> CompiledModel:
    """Compile ``model`` (an ``nn.Module``, a function of tensors, a ``torch.export.ExportedProgram``, or
    the path of a ``.pt2`` or ``.onnx`` file) for the example inputs, which are given as torch.export takes them.

    ``dynamic`` declares symbolic dims: ``{"input_ids": {0: ("batch", 1, 8), 1: kiln.Dim("seq", 1, 2048)}}``;
    every other dim is fixed to its example size. An ONNX file declares its own dims (``dim_param``);
    ``dynamic`` may rename / range them the same way, or range them by name: ``{"seq": (1, 2048)}``."""
    config = config or CompileConfig()
    report = Report(listener=report_hook)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_kwargs = dict(example_kwargs or {})

    if isinstance(model, (str, os.PathLike)):
        model = _load_source(os.fspath(model), report, dynamic)
    if isinstance(model, Graph):  # an ONNX file, imported by _load_source
        graph, signature, module, ep = model, _onnx_signature(model), None, None
    elif isinstance(model, torch.export.ExportedProgram):
        ep = model
        signature = Signature.from_exported(ep)
        dim_names = None
        module = None
        report.model.update(name=os.path.basename(str(getattr(ep, "_kiln_path", ""))) or "ExportedProgram",
                            source="torch.export program")
    else:
        if isinstance(model, torch.nn.Module):
            module, fn = model, model.forward
        elif callable(model):
            module, fn = _wrap_callable(model), model
        else:
            raise KilnError(f"cannot compile a {type(model).__name__}",
                            hint="pass an nn.Module, a function of tensors, an ExportedProgram or a .pt2 path")
        signature, canonical = Signature.from_callable(fn, tuple(example_inputs), example_kwargs,
                                                       fixed=_hf_fixed_kwargs(module, fn))
        ds, dim_names = _dynamic_shapes(dynamic, canonical)
        report.model.update(name=type(model).__name__ if isinstance(model, torch.nn.Module) else getattr(model, "__name__", "fn"),
                            source="torch.export")
        with report.phase("capture"):
            ep = _export(module, _widen_size_one(canonical, dim_names), ds, dim_names)

    if ep is not None:  # (an ONNX file arrives imported)
        from .ir.from_fx import from_exported

        with report.phase("import"):
            graph, _ = from_exported(ep, dim_names, input_names=signature.input_paths)
        if module is not None:
            for name, (lo, hi) in _declared_ranges(ds).items():
                got = graph.symbols.get(name)
                if got is not None and got[0] == 2 and lo <= 1:
                    # torch < 2.12 reports every backed size as >= 2 (its 0/1 specialisation), not a guard of the model;
                    # kiln's ops broadcast at any size and the graph is the same, so size 1 keeps the declared range
                    graph.symbols[name] = got = (1, got[1])
                if got is not None and (got[0] != lo or (hi is not None and got[1] != hi)):
                    report.notes.append(f"dim {name}: declared [{lo}, {hi}], the model only works for [{got[0]}, {got[1]}] "
                                        "(torch.export's analysis); calls are checked against the narrower range")
        signature.output = output_structure(ep.call_spec.out_spec)
        names = output_names(signature.output)
        updates = [(o, n) for o, n in zip(graph.outputs, graph.output_names) if n in graph.updates]
        user = [o for o, n in zip(graph.outputs, graph.output_names) if n not in graph.updates]
        if len(user) != len(names):
            raise CaptureError("the exported program's outputs do not match its output structure")
        graph.set_outputs([o for o, _ in updates] + user, [n for _, n in updates] + names)
    report.ops_before = graph.histogram()
    report.model.update(parameters=sum(t.numel() for t in graph.weights.values()), weight_bytes=graph.weight_bytes(),
                        inputs=[n.attrs["name"] for n in graph.inputs], outputs=list(graph.output_names))
    with report.phase("optimize"):
        run_pipeline(graph, config.disable, report)
    report.ops_after = graph.histogram()
    with report.phase("plan"):
        compiled = CompiledModel(graph, signature, config, report)
        example = signature.flatten(tuple(example_inputs), example_kwargs) if module is not None else None
        # a graph that updates its inputs (a KV-cache step) is planned at its first call instead: planning runs
        # the graph once, which must not write into the caller's example tensors, and the example's shapes are
        # rarely the ones generation runs at
        if example is not None and not graph.updates:
            from .ir.bind import bind_inputs

            binding = bind_inputs(graph, example)
            plan = compiled.executor.plan(binding, example)
            report.memory = {**plan.memory.summary(), "binding": binding}
    if config.verify and module is not None:
        with report.phase("verify"):
            report.verify = _verify(module, compiled, example_inputs, example_kwargs, signature)
    return compiled


def _verify(module, compiled: CompiledModel, args, kwargs, signature: Signature) -> dict:
    import torch.utils._pytree as pytree

    with torch.no_grad(), _eval_mode(module):
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
        from .ir.from_onnx import from_onnx

        report.model.update(name=os.path.basename(path), source="ONNX")
        with report.phase("import ONNX"):
            return from_onnx(path, dynamic=dynamic)
    raise KilnError(f"{path}: unknown model file type {ext!r}", hint="kiln compiles .pt2 and .onnx files and nn.Modules")


# ----------------------------------------------------------------------------- load, jit


def load(path: str | os.PathLike, device: str | None = None, backend: str | None = None) -> CompiledModel:
    """Load a ``.kiln`` artifact; no model source is needed. ``device`` overrides where it runs,
    ``backend`` how ("kernels", "reference", "auto"; see CompileConfig.backend)."""
    graph, manifest, report_dict, tuning, files = artifact.load(path)
    config = CompileConfig.from_dict(manifest.get("config") or {})
    if device is None:  # where it was compiled to run, when this machine has it
        device = config.device or manifest.get("device") or "cpu"
        if torch.device(device).type == "cuda" and not torch.cuda.is_available():
            warnings.warn(f"{path} was compiled for {device}, which this machine lacks; running on the CPU", stacklevel=2)
            device = "cpu"
    config.device = device
    if backend is not None:
        config.backend = backend
        config.__post_init__()
    signature = Signature.from_dict(manifest["signature"])
    m = CompiledModel(graph, signature, config, Report.from_dict(report_dict), manifest, tuning)
    m.files = files
    return m


class _Jit:
    """Compiles on the first call, with that call's inputs; later calls run the compiled graph."""

    def __init__(self, target, dynamic, config):
        self._target = target
        self._dynamic = dynamic
        self._config = config
        self._compiled: CompiledModel | None = None

    def __call__(self, *args, **kwargs):
        if self._compiled is None:
            self._compiled = compile(self._target, args, kwargs, dynamic=self._dynamic, config=self._config)
        return self._compiled(*args, **kwargs)

    @property
    def compiled(self) -> CompiledModel:
        if self._compiled is None:
            raise KilnError("not compiled yet: kiln.jit compiles on the first call")
        return self._compiled

    @property
    def graph(self) -> Graph:
        return self.compiled.graph

    def report(self) -> Report:
        return self.compiled.report()

    def save(self, path, overwrite: bool = False) -> str:
        return self.compiled.save(path, overwrite=overwrite)


class JitModule(_Jit):
    """``kiln.jit(module)``: a drop-in for the module; other attributes come from the module."""

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._target, name)

    def __repr__(self) -> str:
        return f"kiln.jit({type(self._target).__name__})"


def jit(target=None, *, dynamic: dict | None = None, config: CompileConfig | None = None):
    """``model = kiln.jit(model)`` or ``@kiln.jit`` / ``@kiln.jit(dynamic=...)`` on a function of tensors.
    The first call captures with its real inputs; ``dynamic`` declares symbolic dims as in :func:`compile`."""
    if target is None:
        return lambda t: jit(t, dynamic=dynamic, config=config)
    if isinstance(target, torch.nn.Module):
        return JitModule(target, dynamic, config)
    if not callable(target):
        raise KilnError(f"kiln.jit takes a module or a function, got {type(target).__name__}")
    wrapper = _Jit(target, dynamic, config)
    functools.update_wrapper(wrapper, target)
    return wrapper
