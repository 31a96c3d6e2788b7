"""``kiln.jit``: compile on the first call, and never answer from stale weights.

A jitted module's compiled graph holds compile-time products of the module's parameters and buffers (merged
QKV / gate-up weights, folded transposes, norms merged by CSE) beside views of the live tensors. So every call
checks that the module's parameters and buffers are those it was compiled from — each still registered under its
name, with the same storage and version counter (bumped by every in-place write: ``load_state_dict``, optimizer
steps, ``mul_``); about 0.3 us per tensor, done while the device runs the call — and when anything changed:

- same names, shapes and dtypes (new values, another device): the weights are *re-folded*: the graph as
  imported is rebuilt from its JSON with the module's current tensors and optimized again (no torch.export
  recapture; kernels and tuning come from the cache);
- anything else (``.half()``, a parameter replaced by one of another shape, a new buffer): the module is
  captured again with this call's inputs.

A jitted *function* is compiled again when a tensor or module it names (a global, a closure variable, through
the functions it calls) is rebound or written (``api.SourceWatch``). ``rebuilds`` counts both. Methods of the
module that return the module (``.to()``, ``.half()``, ``.eval()``, ...) return the jitted module, so
``j = j.to(torch.bfloat16)`` keeps it jitted.
"""
from __future__ import annotations

import functools

import torch

from .api import CompiledModel, Source, build, capture_model, compile
from .config import CompileConfig
from .errors import CallFormError, KilnError, SourceChangedError
from .ir.graph import Graph, GraphError
from .ir.serialize import graph_from_json, graph_to_json
from .passes.report import Report


def module_state(module: torch.nn.Module) -> tuple:
    """What a compiled graph depends on in ``module``: every parameter and buffer (tied ones under each name)."""
    return tuple((name, id(t), t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape)) for name, t in _tensors(module).items())


def _tensors(module: torch.nn.Module) -> dict:
    """name -> tensor of every parameter and buffer (non-persistent buffers too; tied ones under each name)."""
    return {**dict(module.named_parameters(remove_duplicate=False)), **dict(module.named_buffers(remove_duplicate=False))}


def _types(state: tuple) -> dict:
    return {name: (dtype, shape) for name, _, _, _, dtype, _, shape in state}


class _Jit:
    """Compiles on the first call, with that call's inputs; later calls run the compiled graph."""

    def __init__(self, target, dynamic, config):
        self._target = target
        self._dynamic = dynamic
        self._config = config or CompileConfig()
        self._compiled: CompiledModel | None = None
        self._imported: dict | None = None  # the graph as imported (JSON), to re-fold weights without recapture
        self._constants: dict = {}  # weights of the imported graph that are not the module's (lifted constants)
        self._signature = None
        self._state: tuple = ()
        self.rebuilds = {"refold": 0, "recompile": 0}

    def __call__(self, *args, **kwargs):
        if self._compiled is None:
            self._compile(args, kwargs)
        try:
            return self._compiled(*args, **kwargs)
        except CallFormError as e:  # (the example call was the first call: say so)
            e.hint = (f"kiln.jit compiled for its first call's arguments: pass {e.argument!r} the same way on every call, "
                      "or use one kiln.jit of the model for each form of call")
            raise
        except SourceChangedError:  # the compiled model saw its module's weights change: rebuild and run again
            self._rebuild(args, kwargs)
            return self._compiled(*args, **kwargs)

    def _compile(self, args, kwargs) -> None:
        if not isinstance(self._target, torch.nn.Module):
            self._compiled = compile(self._target, args, kwargs, dynamic=self._dynamic, config=self._config)
            return
        report = Report()
        src = capture_model(self._target, args, dict(kwargs), self._dynamic, report)
        live = _tensors(self._target)
        self._imported = graph_to_json(src.graph)
        self._constants = {n: t for n, t in src.graph.weights.items() if n not in live}
        self._signature = src.signature
        self._state = module_state(self._target)
        self._compiled = build(src, self._config, report, args, kwargs)

    def _rebuild(self, args, kwargs) -> None:
        """A module's new weights re-folded where they fit; anything else (a function's tensors) compiled again."""
        state = module_state(self._target) if isinstance(self._target, torch.nn.Module) else None
        if state is not None and _types(state) == _types(self._state) and self._refold():
            self.rebuilds["refold"] += 1
            self._state = state
        else:
            self.rebuilds["recompile"] += 1
            self._compile(args, kwargs)

    def _refold(self) -> bool:
        """Rebuild the compiled graph from the imported one with the module's current tensors; False when they
        no longer fit it (then the caller recaptures)."""
        live = {n: t.detach() for n, t in _tensors(self._target).items()}
        names = self._imported["weights"]
        if any(n not in live and n not in self._constants for n in names):
            return False
        weights = {n: live[n] if n in live else self._constants[n] for n in names}
        try:
            graph = graph_from_json(self._imported, weights)
        except GraphError:
            return False
        self._compiled = build(Source(graph, self._signature, self._target), self._config, Report())
        return True

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
    """``kiln.jit(module)``: a drop-in for the module; other attributes come from (and go to) the module."""

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        value = getattr(self._target, name)
        if callable(value) and getattr(value, "__self__", None) is self._target:
            @functools.wraps(value)
            def method(*args, **kwargs):  # module.to(...) and friends return the module: give back the jitted one
                result = value(*args, **kwargs)
                return self if result is self._target else result
            return method
        return value

    def __setattr__(self, name, value):
        if name.startswith("_") or name == "rebuilds":
            object.__setattr__(self, name, value)
        else:
            setattr(self._target, name, value)

    def __repr__(self) -> str:
        return f"kiln.jit({type(self._target).__name__})"


def jit(target=None, *, dynamic: dict | None = None, config: CompileConfig | None = None):
    """``model = kiln.jit(model)`` or ``@kiln.jit`` / ``@kiln.jit(dynamic=...)`` on a function of tensors.
    The first call captures with its real inputs; ``dynamic`` declares symbolic dims as in :func:`compile`.
    A jitted module notices when its parameters or buffers change and rebuilds (see the module docstring)."""
    if target is None:
        return lambda t: jit(t, dynamic=dynamic, config=config)
    if isinstance(target, torch.nn.Module):
        return JitModule(target, dynamic, config)
    if not callable(target):
        raise KilnError(f"kiln.jit takes a module or a function, got {type(target).__name__}")
    wrapper = _Jit(target, dynamic, config)
    functools.update_wrapper(wrapper, target)
    return wrapper
