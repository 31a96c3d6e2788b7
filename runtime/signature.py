"""How a compiled model is called and what it returns, stored as plain JSON.

A call ``model(*args, **kwargs)`` is first made canonical: every argument by its parameter name, in
the order of the forward's signature (``{"input_ids": t, "use_cache": False}``). Its pytree leaves
are the graph's tensor inputs plus the non-tensor values torch.export baked into the graph, which a
later call must repeat. The outputs come back in the eager model's structure: a tensor, tuple, list,
dict, or an HF / diffusers ``ModelOutput``.
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
import sys

import torch
import torch.utils._pytree as pytree

from ..errors import CallFormError, InputError, KilnError

_JSON_SCALARS = (type(None), bool, int, float, str)


def _describe(v) -> str:
    if isinstance(v, torch.Tensor):
        return f"a tensor {str(v.dtype).removeprefix('torch.')}{list(v.shape)}"
    return repr(v)


class Signature:
    def __init__(self, params: list[str], given: list[str], defaults: dict, treespec: str,
                 leaves: list[dict], output: dict, fixed: dict | None = None):
        self.params = params  # every parameter name of the forward, in order
        self.given = given  # the ones the compile call passed, in order
        self.defaults = defaults  # JSON-able defaults of the parameters
        self.fixed = fixed or {}  # values kiln chose for the capture (HF use_cache=False): the call's default
        self.treespec = _norm(treespec)  # pytree spec of {name: value for name in given}
        self.leaves = leaves  # [{"path": "input_ids", "tensor": True} | {"path": ..., "const": v}]
        self.output = output  # output structure (see output_structure)
        self._matched = None  # the last call's TreeSpec that matched ``treespec`` (its JSON costs ~100 us a call)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_callable(cls, fn, args: tuple, kwargs: dict, fixed: dict | None = None) -> tuple["Signature", dict]:
        """Canonical kwargs for the example call and a signature whose output is not yet known.
        ``fixed`` are arguments kiln adds to the capture (and to every call that omits them)."""
        try:
            sig = inspect.signature(fn)
        except (TypeError, ValueError):
            raise KilnError(f"cannot read the signature of {fn!r}") from None
        params, defaults = [], {}
        for p in sig.parameters.values():
            if p.kind in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY):
                raise KilnError(f"kiln needs named parameters; {getattr(fn, '__qualname__', fn)} has "
                                f"{'*' + p.name if p.kind == p.VAR_POSITIONAL else 'positional-only ' + p.name}",
                                hint="wrap it in a function with named tensor parameters")
            if p.kind == p.VAR_KEYWORD:
                continue
            params.append(p.name)
            if p.default is not p.empty and isinstance(p.default, _JSON_SCALARS):
                defaults[p.name] = p.default
        fixed = {k: v for k, v in (fixed or {}).items() if k not in kwargs}
        try:
            bound = sig.bind(*args, **kwargs, **fixed)
        except TypeError as e:
            raise InputError(f"example inputs do not fit the signature {sig}: {e}") from None
        extra = [n for p in sig.parameters.values() if p.kind == p.VAR_KEYWORD for n in bound.arguments.get(p.name, {})]
        if extra:
            raise InputError(f"argument(s) {', '.join(map(repr, extra))} would go through **kwargs, which kiln "
                             "does not capture", hint="pass only the forward's named parameters")
        canonical = {p: bound.arguments[p] for p in params if p in bound.arguments}
        sigobj = cls(params, list(canonical), defaults, "", [], {"leaf": True}, fixed)
        sigobj._set_leaves(canonical)
        return sigobj, canonical

    @classmethod
    def from_exported(cls, ep) -> "Signature":
        """The signature of a loaded ExportedProgram: its flat positional inputs take their placeholder
        names, its keyword inputs their keys."""
        from torch.export.graph_signature import InputKind

        args_spec, kwargs_spec = ep.call_spec.in_spec.children()
        user = [n for n, s in zip((n for n in ep.graph.nodes if n.op == "placeholder"), ep.graph_signature.input_specs)
                if s.kind == InputKind.USER_INPUT]
        if any(not c.is_leaf() for c in args_spec.children() + kwargs_spec.children()):
            raise KilnError("this .pt2 program takes nested inputs; kiln reads programs whose inputs are tensors "
                            "and scalars")
        names = [n.name for n in user[: args_spec.num_children]] + list(kwargs_spec.context)
        canonical = {}
        for name, node in zip(names, user):
            v = node.meta.get("val")
            canonical[name] = v if isinstance(v, torch.Tensor) else v
        sigobj = cls(names, names, {}, "", [], {"leaf": True})
        sigobj._set_leaves(canonical)
        return sigobj

    def _set_leaves(self, canonical: dict) -> None:
        flat, spec = pytree.tree_flatten_with_path(canonical)
        self.treespec = _norm(pytree.treespec_dumps(spec))
        self._matched = None
        self.leaves = []
        for path, v in flat:
            entry = {"path": _path_str(path)}
            if isinstance(v, torch.Tensor):
                entry["tensor"] = True
            elif isinstance(v, _JSON_SCALARS):
                entry["const"] = v
            else:
                raise KilnError(f"argument {entry['path']} is a {type(v).__name__}; kiln inputs are tensors, "
                                "python scalars, None, or tuples / lists / dicts of them")
            self.leaves.append(entry)

    @property
    def input_paths(self) -> list[str]:
        return [leaf["path"] for leaf in self.leaves if leaf.get("tensor")]

    # ------------------------------------------------------------------ calling
    def canonical(self, args: tuple, kwargs: dict) -> dict:
        if len(args) > len(self.params):
            raise InputError(f"takes at most {len(self.params)} positional arguments ({', '.join(self.params)}), "
                             f"got {len(args)}")
        values = dict(zip(self.params, args))
        for k, v in kwargs.items():
            if k in values:
                raise InputError(f"got multiple values for argument {k!r}")
            if k not in self.params:
                raise InputError(f"unexpected argument {k!r}; parameters are {', '.join(self.params)}")
            values[k] = v
        out = {}
        tensor_args = {re.split(r"[\[.]", p, maxsplit=1)[0] for p in self.input_paths}
        for name in self.given:
            if name in values:
                out[name] = values.pop(name)
            elif name in self.fixed:
                out[name] = self.fixed[name]
            elif name in self.defaults and name not in tensor_args:
                out[name] = self.defaults[name]
            else:
                raise CallFormError(f"missing argument {name!r}", name)
        for name, v in values.items():  # passed now, not at compile: fine only if it is the default anyway
            if name in self.defaults and isinstance(v, _JSON_SCALARS) and v == self.defaults[name]:
                continue
            if name in self.defaults and not isinstance(v, torch.Tensor):
                raise CallFormError(f"argument {name!r} was fixed to its default {self.defaults[name]!r} when the model "
                                    f"was compiled; got {_describe(v)}", name, hint=f"compile with {name}={v!r} in the example call")
            raise CallFormError(f"argument {name!r} was not given when the model was compiled, so the "
                                f"compiled graph cannot take it (got {_describe(v)})", name,
                                hint=f"compile with an example value for {name!r}")
        return out

    def flatten(self, args: tuple, kwargs: dict) -> list[torch.Tensor]:
        """The graph's input tensors for this call; raises InputError when the call does not fit."""
        canonical = self.canonical(args, kwargs)
        flat, spec = pytree.tree_flatten(canonical)
        if spec != self._matched and _norm(pytree.treespec_dumps(spec)) != self.treespec:
            want = pytree.treespec_loads(self.treespec)
            for name in self.given:
                got_spec = pytree.tree_structure(canonical[name])
                want_sub = pytree.tree_structure(pytree.tree_unflatten([0] * want.num_leaves, want)[name])
                if got_spec != want_sub:
                    raise InputError(f"argument {name!r} has a different structure than when the model was "
                                     f"compiled (got {_describe(canonical[name])})")
            raise InputError("the arguments have a different structure than when the model was compiled")
        self._matched = spec
        tensors = []
        for v, leaf in zip(flat, self.leaves):
            if leaf.get("tensor"):
                if not isinstance(v, torch.Tensor):
                    raise InputError(f"argument {leaf['path']} must be a tensor, got {_describe(v)}")
                tensors.append(v)
            elif isinstance(v, torch.Tensor) or v != leaf["const"]:
                raise InputError(f"argument {leaf['path']} was fixed to {leaf['const']!r} when the model was "
                                 f"compiled; got {_describe(v)}", hint="compile again with this value")
        return tensors

    def unflatten(self, tensors: list[torch.Tensor]):
        it = iter(tensors)
        value = _build(self.output, it)
        return value

    # ------------------------------------------------------------------ data
    def to_dict(self) -> dict:
        return {"params": self.params, "given": self.given, "defaults": self.defaults, "fixed": self.fixed,
                "treespec": json.loads(self.treespec), "leaves": self.leaves, "output": self.output}

    @classmethod
    def from_dict(cls, d: dict) -> "Signature":
        return cls(d["params"], d["given"], d["defaults"], json.dumps(d["treespec"]), d["leaves"], d["output"],
                   d.get("fixed"))


def _norm(treespec: str) -> str:
    return json.dumps(json.loads(treespec), sort_keys=True) if treespec else ""


def _path_str(path) -> str:
    s = pytree.keystr(path)
    # {'input_ids'} -> input_ids ; ['pair'][0] -> pair[0]
    if s.startswith("['"):
        end = s.index("']")
        s = s[2:end] + s[end + 2:]
    return s


# ----------------------------------------------------------------------------- outputs


def output_structure(spec: pytree.TreeSpec) -> dict:
    """A JSON description of a pytree output spec."""
    if spec.is_leaf():
        return {"leaf": True}
    t = spec.type
    children = [output_structure(c) for c in spec.children()]
    if t is tuple or t is list:
        return {"type": t.__name__, "children": children}
    if t is dict:
        return {"type": "dict", "keys": list(spec.context), "children": children}
    if t is type(None):
        return {"type": "none"}
    if _is_model_output(t):
        return {"type": "model_output", "class": f"{t.__module__}.{t.__qualname__}", "keys": list(spec.context),
                "children": children}
    if t.__module__ == "torch.return_types":  # x.max(dim) and friends: (values, indices)
        return {"type": "return_types", "class": t.__name__, "children": children}
    if issubclass(t, tuple) and hasattr(t, "_fields"):  # namedtuple: rebuilt as a plain tuple
        return {"type": "tuple", "children": children}
    raise KilnError(f"kiln cannot return outputs of type {t.__name__}",
                    hint="return tensors, tuples, lists, dicts or an HF ModelOutput")


def _is_model_output(t) -> bool:
    for mod, name in (("transformers.utils", "ModelOutput"), ("diffusers.utils", "BaseOutput")):
        if t.__module__.split(".")[0] == mod.split(".")[0]:
            try:
                base = getattr(importlib.import_module(mod), name)
            except (ImportError, AttributeError):
                continue
            if isinstance(t, type) and issubclass(t, base):
                return True
    return False


def output_names(s: dict, prefix: str = "output") -> list[str]:
    """A name per output leaf: ModelOutput / dict keys (``logits``), else ``output[0]``."""
    if s.get("leaf"):
        return [prefix]
    names = []
    keys = s.get("keys")
    for i, c in enumerate(s.get("children", [])):
        if keys is not None:
            sub = str(keys[i]) if prefix == "output" else f"{prefix}.{keys[i]}"
        else:
            sub = f"{prefix}[{i}]"
        names += output_names(c, sub)
    return names


class ModelOutput(dict):
    """The fields of a transformers / diffusers ModelOutput whose class this process has not imported (a loaded
    artifact needs no model code, and importing diffusers to build one output would add seconds to the first call):
    ``out.sample``, ``out["sample"]``, ``out[0]`` and ``out.to_tuple()`` work as on the original class (indices and
    ``to_tuple`` skip None fields, as theirs do). Once the process has imported the original class's module, outputs
    are of that class again."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"this output has no field {name!r}; it has {', '.join(self)}") from None

    def __getitem__(self, key):
        if isinstance(key, (int, slice)):
            return self.to_tuple()[key]
        return super().__getitem__(key)

    def to_tuple(self) -> tuple:
        return tuple(v for v in self.values() if v is not None)


def _output_class(qualname: str):
    """The ModelOutput class named in an artifact when this process has imported its module (transformers / diffusers
    classes only), else kiln's ``ModelOutput``: outputs never import a model library."""
    module, _, name = qualname.rpartition(".")
    if module.split(".")[0] not in ("transformers", "diffusers") or module not in sys.modules:
        return ModelOutput
    cls = getattr(sys.modules[module], name, None)
    return cls if isinstance(cls, type) and _is_model_output(cls) else ModelOutput


def _build(s: dict, it):
    if s.get("leaf"):
        return next(it)
    kind = s["type"]
    if kind == "none":
        return None
    children = [_build(c, it) for c in s.get("children", [])]
    if kind == "tuple":
        return tuple(children)
    if kind == "return_types":
        cls = getattr(torch.return_types, s["class"], None)
        return cls(children) if cls is not None else tuple(children)
    if kind == "list":
        return children
    values = dict(zip(s["keys"], children))
    if kind == "model_output":
        return _output_class(s["class"])(**values)
    return values
