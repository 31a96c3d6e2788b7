"""Capturing a module with torch.export, and the workarounds torch versions need.

kiln's ``dynamic=`` becomes torch.export ``dynamic_shapes`` (:func:`dynamic_shapes`); a dim declared dynamic
with an example of size 1 is captured at size 2 (:func:`widen_size_one`: torch.export would fix it); capture
runs in eval mode without changing the user's module (:func:`eval_mode`); HF models are captured without
their KV-cache object (:func:`hf_fixed_kwargs`); and when torch 2.11 cannot prove a guard over a declared
range, the capture retries with ranged ``Dim.DYNAMIC`` hints and keeps the result only if every declared dim
stayed symbolic (:func:`export`).
"""
from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from ...errors import CaptureError, KilnError


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


def wrap_callable(fn):
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


def dynamic_shapes(dynamic: dict | None, canonical: dict):
    """kiln's ``dynamic=`` -> torch.export ``dynamic_shapes`` plus the dim names per input.

    A name used in several places is one dim. Its range is given once, by ``kiln.Dim`` or ``(name, min, max)``;
    a plain name (or ``(name,)``) elsewhere means that same dim. Two different explicit ranges are an error."""
    ds = {k: _static_like(v) for k, v in canonical.items()}
    names: dict[str, dict[int, str]] = {}
    if not dynamic:
        return ds, names
    if not isinstance(dynamic, dict):
        raise KilnError("dynamic= takes a dict: {input name: {dim index: name | (name, min, max) | kiln.Dim}}")
    entries = _dim_entries(dynamic, canonical)
    ranges = _merged_ranges(entries)
    dims: dict[str, torch.export.Dim] = {}
    for arg in dynamic:
        ds[arg] = {}
    for arg, i, name, _, _, _ in entries:
        lo, hi = ranges[name]
        if hi is not None and hi < 2:
            continue  # a dim that can only be 1 is static
        size = canonical[arg].shape[i]
        if size < lo or (hi is not None and size > hi):
            raise KilnError(f"example input {arg!r} dim {i} ({name}) is {size}, outside the declared range "
                            f"[{lo}, {hi if hi is not None else 'inf'}]")
        if name not in dims:
            dims[name] = torch.export.Dim(name, min=lo, max=hi) if hi is not None else torch.export.Dim(name, min=lo)
        ds[arg][i] = dims[name]
        names.setdefault(arg, {})[i] = name
    return ds, names


def _dim_entries(dynamic: dict, canonical: dict) -> list[tuple]:
    """Every entry of ``dynamic=`` as (input, dim index >= 0, name, min, max, ranged); ``ranged`` is False for a
    plain name, which takes the range declared elsewhere."""
    entries = []
    for arg, spec in dynamic.items():
        if arg not in canonical:
            raise KilnError(f"dynamic= names {arg!r}, which is not an argument of this call "
                            f"(arguments: {', '.join(canonical)})")
        t = canonical[arg]
        if not isinstance(t, torch.Tensor):
            raise KilnError(f"dynamic= names {arg!r}, which is not a tensor")
        if not isinstance(spec, dict):
            raise KilnError(f"dynamic= for {arg!r} takes a dict {{dim index: name | (name, min, max) | kiln.Dim}}, got {spec!r}")
        for i, d in spec.items():
            if not isinstance(i, int) or not -t.dim() <= i < t.dim():
                raise KilnError(f"dynamic= for {arg!r}: dim {i} does not exist (rank {t.dim()})")
            entries.append((arg, i % t.dim(), *_dim_spec(arg, i, d)))
    return entries


def _dim_spec(arg: str, i: int, d) -> tuple[str, int, int | None, bool]:
    """(name, min, max, ranged) of one dim declaration."""
    if isinstance(d, str):
        return d, 1, None, False
    if isinstance(d, tuple) and len(d) == 1 and isinstance(d[0], str):
        return d[0], 1, None, False
    if isinstance(d, tuple) and len(d) == 3 and isinstance(d[0], str):
        return d[0], d[1], d[2], True
    if isinstance(d, Dim):
        return d.name, d.min, d.max, True
    if type(d).__name__ in ("Dim", "_Dim") or hasattr(d, "__name__"):  # a torch.export.Dim
        return d.__name__, getattr(d, "min", 1), getattr(d, "max", None), True
    raise KilnError(f"dynamic= for {arg!r} dim {i}: {d!r} is not a name, (name, min, max) or kiln.Dim")


def _merged_ranges(entries: list[tuple]) -> dict[str, tuple]:
    """dim name -> (min, max or None): the range its ranged entries agree on, else [1, inf)."""
    ranges: dict[str, tuple] = {}
    for _, _, name, lo, hi, ranged in entries:
        if ranged and ranges.setdefault(name, (lo, hi)) != (lo, hi):
            raise KilnError(f"dim {name!r} is declared twice with different ranges {ranges[name]} and {(lo, hi)}",
                            hint=f"give its range once; a plain {name!r} elsewhere means the same dim")
    for _, _, name, *_ in entries:
        ranges.setdefault(name, (1, None))
    return ranges


def _static_like(value):
    """A dynamic_shapes entry fixing every dim of ``value``: None, or the same container of Nones (torch.export
    wants the structure of a dict / list / tuple argument mirrored: ``{"resolution": None, "aspect_ratio": None}``)."""
    if isinstance(value, dict):
        return {k: _static_like(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_static_like(v) for v in value) if not hasattr(value, "_fields") else tuple(_static_like(v) for v in value)
    return None


def widen_size_one(canonical: dict, dim_names: dict[str, dict[int, str]]) -> dict:
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
def eval_mode(module: torch.nn.Module):
    """Capture with inference semantics without leaving the user's module changed."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def hf_fixed_kwargs(module, fn) -> dict:
    """HF models return a KV-cache object by default; capture without it (generation is separate)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return {}
    if "use_cache" in params and hasattr(getattr(module, "config", None), "use_cache"):
        return {"use_cache": False}
    return {}


def _relaxed(shapes: dict) -> dict:
    """The same dims as ``Dim.DYNAMIC`` hints with their ranges: torch may then add guards it cannot
    prove over the whole range (torch 2.11 cannot prove ``min(8*s, 16*s) == 8*s``) instead of failing."""
    out = {}
    for arg, per in shapes.items():
        if not _declared(per):
            out[arg] = per  # no dynamic dim: None, or a container of Nones
            continue
        out[arg] = {}
        for i, d in per.items():
            lo, hi = getattr(d, "min", 1), getattr(d, "max", None)
            try:
                out[arg][i] = torch.export.Dim.DYNAMIC(min=lo, max=hi if hi is not None and hi < 2**62 else None)
            except TypeError:  # a torch without ranged hints
                out[arg][i] = torch.export.Dim.DYNAMIC
    return out


def export(module, canonical: dict, shapes: dict, dim_names: dict):
    """torch.export of ``module`` called with the keyword arguments ``canonical``; ``shapes``: its dynamic_shapes,
    ``dim_names``: the dim names per input. Any failure is a CaptureError with torch's first lines."""
    def run(ds):
        with torch.no_grad(), eval_mode(module):
            return torch.export.export(module, (), canonical, dynamic_shapes=ds, strict=False)

    try:
        try:
            return run(shapes)
        except Exception as first:
            if "Constraints violated" not in str(first) or not dim_names:
                raise
            try:
                ep = run(_relaxed(shapes))
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


def declared_ranges(shapes: dict) -> dict:
    """dim name -> (min, max or None) of the dims declared in torch.export ``shapes``."""
    return {d.__name__: (d.min, d.max if d.max is not None and d.max < 2**62 else None)
            for per in shapes.values() if _declared(per) for d in per.values()}


def _declared(per) -> bool:
    """``per`` is a tensor argument's {dim index: torch.export.Dim} (not None, nor a container's structure of Nones)."""
    return isinstance(per, dict) and bool(per) and all(isinstance(i, int) for i in per)


def _all_dims_symbolic(ep, dim_names: dict) -> bool:
    """Every declared dynamic dim is still a symbol in the exported program's inputs."""
    vals = {n.name: n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder"}
    for arg, per in dim_names.items():
        v = vals.get(arg)
        if not isinstance(v, torch.Tensor) or any(not isinstance(v.shape[i], torch.SymInt) for i in per):
            return False
    return True
