"""Capturing the generator's step (:class:`~kiln.models.llama.LlamaStep`) in time independent of the model's depth.

torch.export traces every decoder layer, though each is the same program on other weights and caches: a 16-layer
Llama-3.2-1B spends most of its compile there. So the step is captured with the first ``CAPTURE_LAYERS`` layers (the
model's own modules, nothing copied) and ``ir/repeat.py`` builds the full depth in the IR by repeating the last
captured layer with each further layer's weights (``model.layers.{i}.*``) and caches (``cache_names``), checking first
that the captured layers are one program. The graph is the one a capture of every layer imports; where a check fails,
the step is captured whole and the report's notes say why.

Layers that differ in a period (SmolLM3: no RoPE in every 4th layer) repeat as blocks: where every layer i is built as
layer i mod P (``layer_period``), the first 2 P layers are captured and each block of P layers is one "layer" of the
repeat, its roles numbered by the place in the block (``2.self_attn.q_proj.weight``, ``2.k_cache``). A depth that is
not whole blocks (Gemma-3-1B: 26 layers, P = 6) starts the blocks after its first depth mod P layers, which are captured
as they are (their tensors outside every block, as the embedding's are).
"""
from __future__ import annotations

import copy
import inspect

import torch

from ..api import Source, capture_model
from ..ir.fx.capture import wrap_callable
from ..ir.repeat import NewLayer, RepeatError, repeat_layers
from ..models.llama import LlamaStep
from ..passes.report import Report
from ..runtime.signature import Signature

CAPTURE_LAYERS = 2  # decoder layers torch.export traces of a deeper model (0: all of them); two: one to check the other by


def step_function(step: torch.nn.Module, num_layers: int, kv_dtype: str | None = None):
    """``step`` as a function of named tensors (k_cache_0, v_cache_0, ...; see ``cache_names``): what kiln.compile
    captures. A model with sliding-window layers beside full ones (Gemma 2 / 3) takes their mask, ``window_mask``, after
    ``mask``."""
    names = cache_names(num_layers, kv_dtype)
    masks = ("mask", "window_mask") if step.model.config.layer_window is not None else ("mask",)

    def fn(input_ids, positions, slots, mask, **rest):
        return step(input_ids, positions, slots, mask, tuple(rest[n] for n in names), rest.get("window_mask"))

    P = inspect.Parameter
    fn.__signature__ = inspect.Signature([P(n, P.POSITIONAL_OR_KEYWORD) for n in ("input_ids", "positions", "slots", *masks, *names)])
    fn.__name__ = "llama_step"
    return fn


def cache_names(num_layers: int, kv_dtype: str | None = None) -> list[str]:
    """The cache inputs, per layer: k_cache_i, v_cache_i, and with a quantized cache k_scale_i, v_scale_i
    (:class:`~kiln.models.llama.LlamaStep`'s order)."""
    kinds = cache_kinds(kv_dtype)
    return [f"{kind}_{i}" for i in range(num_layers) for kind in kinds]


def cache_kinds(kv_dtype: str | None = None) -> tuple[str, ...]:
    return ("k_cache", "v_cache") + (("k_scale", "v_scale") if kv_dtype is not None else ())


def capture_step(model, kv_dtype: str | None, example: dict, dims: dict, report: Report, layers: int | None = None) -> Source:
    """The step of ``model`` (kiln's LlamaForCausalLM) imported into a graph, for the example inputs ``example`` and the
    dynamic dims ``dims`` of the whole depth: ``layers`` (None: ``CAPTURE_LAYERS``) layers captured and the rest repeated
    in the IR when the model is deeper and ``layers`` >= 2, else (or where the repeat declines) every layer captured."""
    layers = CAPTURE_LAYERS if layers is None else layers
    depth = model.config.num_hidden_layers
    full = step_function(LlamaStep(model, kv_dtype), depth, kv_dtype)
    src = None
    period, prefix = layer_period(model) if layers >= 2 else (1, 0)
    if period > 1:  # (the prefix and two blocks captured, whatever ``layers`` says)
        try:
            src = _repeated(model, kv_dtype, example, dims, report, prefix + 2 * period, full, period, prefix)
        except RepeatError as e:
            report.notes.append(f"captured all {depth} layers: repeating the last of two captured blocks of {period} "
                                f"layers declined ({e})")
    elif 2 <= layers < depth:
        try:
            src = _repeated(model, kv_dtype, example, dims, report, layers, full)
        except RepeatError as e:
            report.notes.append(f"captured all {depth} layers: repeating the last of {layers} captured ones declined ({e})")
    src = src or capture_model(full, (), example, dims, report)
    name_weights(src.graph, model)
    return src


def name_weights(graph, model) -> None:
    """The graph's weights named as ``model``'s parameters (``model.layers.3.self_attn.q_proj.weight``, the reports'
    and artifacts' names): the step is captured as a function that closes over the model, whose tensors torch.export
    lifts as ``lifted_tensor_N``. Matched by storage, as the importer matches tied weights; a weight the model does not
    hold (a constant the step makes) keeps its name."""
    def key(t):
        return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype

    qualified: dict[tuple, str] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        qualified.setdefault(key(t), name)
    graph.rename_weights({w: qualified[key(t)] for w, t in graph.weights.items() if key(t) in qualified})


def _repeated(model, kv_dtype, example: dict, dims: dict, report: Report, layers: int, full, period: int = 1,
              prefix: int = 0) -> Source:
    """The step captured with the first ``layers`` layers, then made as deep as the model by ``repeat_layers``, blocks of
    ``period`` layers the unit it repeats (``layers``: ``prefix`` layers, then whole blocks)."""
    depth = model.config.num_hidden_layers
    if period == 1:  # (layer_period checked the blocks' layers)
        shape = layer_structure(model.model.layers[layers - 1])
        odd = next((i for i, layer in enumerate(model.model.layers) if i >= layers and layer_structure(layer) != shape), None)
        if odd is not None:  # (the graph shows the captured layers only)
            raise RepeatError(f"layer {odd} is not built as layer {layers - 1} is (modules, their settings, parameter shapes)")
    kinds = cache_kinds(kv_dtype)
    dropped = set(cache_names(depth, kv_dtype)) - set(cache_names(layers, kv_dtype))
    small = step_function(LlamaStep(first_layers(model, layers), kv_dtype), layers, kv_dtype)
    src = capture_model(small, (), {k: v for k, v in example.items() if k not in dropped},
                        {k: v for k, v in dims.items() if k not in dropped}, report)
    with report.phase("repeat layers"):
        def unit(i: int, role: str) -> tuple[int, str]:  # layer i's role -> (its block, the role by its place in it)
            return (i, role) if period == 1 else ((i - prefix) // period, f"{(i - prefix) % period}.{role}")
        owners = {f"{kind}_{i}": unit(i, kind) for i in range(prefix, layers) for kind in kinds}
        owners.update({name: unit(*o) for name, o in _layer_weights(src.graph.weights, model.model.layers[:layers]).items()
                       if o[0] >= prefix})  # (the prefix layers' tensors belong to no block)
        new = []
        for first in range(layers, depth, period):
            block = range(first, first + period)
            new.append(NewLayer({unit(i, role)[1]: t.detach() for i in block for role, t in _tensors(model.model.layers[i]).items()},
                                {unit(i, kind)[1]: f"{kind}_{i}" for i in block for kind in kinds}))
        graph = repeat_layers(src.graph, owners, new)
    signature, canonical = Signature.from_callable(full, (), example)
    signature.output = src.signature.output
    report.notes.append(f"captured {layers} of {depth} layers, the rest repeated in the IR"
                        + (f" (blocks of {period}: layer i is built as layer i mod {period}" if period > 1 else "")
                        + (f"; the blocks after the first {prefix} layers)" if prefix else ")" if period > 1 else ""))
    return Source(graph, signature, wrap_callable(full), signature.flatten((), canonical))


def layer_period(model) -> tuple[int, int]:
    """(P, R): the smallest P > 1 such that every decoder layer i is built as layer i mod P (``layer_structure``), the
    depth R = depth mod P layers (a prefix, captured as they are) and then whole blocks of P, at least three of them
    (two captured, one or more repeated); else (1, 0) (all alike, or no period: the repeat of single layers checks and
    declines)."""
    shapes = [layer_structure(layer) for layer in model.model.layers]
    n = len(shapes)
    if all(s == shapes[0] for s in shapes):
        return 1, 0
    return next(((p, n % p) for p in range(2, n // 3 + 1)
                 if n // p >= 3 and all(shapes[i] == shapes[i % p] for i in range(n))), (1, 0))


def first_layers(model, n: int):
    """``model`` (a LlamaForCausalLM) with only its first ``n`` decoder layers: the same modules and parameters, nothing
    copied, the model itself unchanged."""
    inner = copy.copy(model.model)
    inner._modules = {**inner._modules, "layers": torch.nn.ModuleList(model.model.layers[:n])}
    outer = copy.copy(model)
    outer._modules = {**outer._modules, "model": inner}
    return outer


def layer_structure(layer: torch.nn.Module) -> list:
    """What makes two layers one program but their tensors: each module's name, class and plain settings (eps, head
    counts, features), each parameter's and buffer's name, shape and dtype."""
    def settings(m):
        return sorted((k, v) for k, v in vars(m).items() if not k.startswith("_") and isinstance(v, (bool, int, float, str, type(None))))

    return ([(name, type(m).__qualname__, settings(m)) for name, m in layer.named_modules()]
            + [(name, tuple(t.shape), t.dtype) for name, t in _tensors(layer).items()])


def _tensors(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(layer.named_parameters()), **dict(layer.named_buffers())}


def _layer_weights(weights: dict[str, torch.Tensor], layers) -> dict[str, tuple[int, str]]:
    """{graph weight name: (layer, parameter name in the layer)} of the graph weights that are a layer's own tensors
    (matched by storage, as the importer matches tied weights); a tensor two layers share belongs to neither."""
    def key(t):
        return t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype

    owner: dict[tuple, tuple[int, str] | None] = {}
    for i, layer in enumerate(layers):
        for role, t in _tensors(layer).items():
            owner[key(t)] = (i, role) if key(t) not in owner else None
    found = {name: owner.get(key(t)) for name, t in weights.items()}
    return {name: o for name, o in found.items() if o is not None}
