"""Named reference models: config, random or checkpoint weights, example inputs, symbolic dims."""

from __future__ import annotations

import dataclasses
import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import KilnError
from .dit import DiT, DiTConfig, load_dit
from .llama import HF_MODEL_TYPES, LlamaConfig, LlamaForCausalLM, RMSNorm, load_llama

INIT_STD = 0.02
MAX_BATCH = {"llama": 16, "dit": 64}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str  # "llama" or "dit"
    config: dict = field(hash=False)  # kwargs for LlamaConfig / DiTConfig
    description: str = ""

    def model_config(self) -> LlamaConfig | DiTConfig:
        return (LlamaConfig if self.family == "llama" else DiTConfig)(**self.config)

    def build(self, weights: str | None = None, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
        """The model in eval mode: loaded from the checkpoint dir `weights` (its config.json wins over
        self.config), else randomly initialised, deterministically from `seed`.

        Builds on the current default device; under `torch.device("meta")` nothing is initialised.
        """
        if weights is not None:
            return (load_llama if self.family == "llama" else load_dit)(weights, dtype)
        cfg = self.model_config()
        model = LlamaForCausalLM(cfg) if self.family == "llama" else DiT(cfg)
        init_weights(model, seed)
        model.to(dtype)
        model.reset_buffers()
        return model.eval()

    def example_inputs(
        self, batch: int = 1, seq: int | None = None, dtype: torch.dtype = torch.float32, seed: int = 0
    ) -> dict[str, torch.Tensor]:
        """Keyword inputs for forward, on CPU. `seq` is the llama sequence length (default 16); DiT ignores it."""
        g = torch.Generator().manual_seed(seed)
        cfg = self.model_config()
        if self.family == "llama":
            seq = seq or min(16, cfg.max_position_embeddings)
            return {"input_ids": torch.randint(0, cfg.vocab_size, (batch, seq), generator=g)}
        size = cfg.sample_size
        return {
            "hidden_states": torch.randn(batch, cfg.in_channels, size, size, generator=g).to(dtype),
            "timestep": torch.randint(0, 1000, (batch,), generator=g),
            "class_labels": torch.randint(0, cfg.num_embeds_ada_norm, (batch,), generator=g),
        }

    def dynamic(self) -> dict[str, dict[int, tuple[str, int, int]]]:
        """Symbolic dims per input: {input: {axis: (name, min, max)}}; equal names are one symbol."""
        batch = ("batch", 1, MAX_BATCH[self.family])
        if self.family == "llama":
            return {"input_ids": {0: batch, 1: ("seq", 1, self.model_config().max_position_embeddings)}}
        return {"hidden_states": {0: batch}, "timestep": {0: batch}, "class_labels": {0: batch}}


def export_dims(dynamic: dict[str, dict[int, tuple[str, int, int]]]) -> dict[str, dict[int, torch.export.Dim]]:
    """ModelSpec.dynamic() -> torch.export dynamic_shapes (one Dim object per name)."""
    dims: dict[str, torch.export.Dim] = {}
    for axes in dynamic.values():
        for name, lo, hi in axes.values():
            dims.setdefault(name, torch.export.Dim(name, min=lo, max=hi))
    return {arg: {axis: dims[spec[0]] for axis, spec in axes.items()} for arg, axes in dynamic.items()}


@torch.no_grad()
def init_weights(model: nn.Module, seed: int = 0) -> None:
    """Linear / conv / embedding weights and every bias ~ N(0, 0.02); norm weights 1, norm biases 0.

    Draws on a CPU generator in module order, so the values do not depend on the device. Nothing is
    zero-initialised (DiT's adaLN and output projections included), so every path carries signal.
    """
    g = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, (RMSNorm, nn.LayerNorm))
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen or p.is_meta:
                continue
            seen.add(id(p))
            if is_norm:
                p.fill_(1.0 if name == "weight" else 0.0)
            else:
                p.copy_(torch.randn(p.shape, generator=g) * INIT_STD)


_LLAMA_3_2_1B = dict(
    vocab_size=128256,
    hidden_size=2048,
    intermediate_size=8192,
    num_hidden_layers=16,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=64,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    max_position_embeddings=131072,
    tie_word_embeddings=True,
)

REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in (
        ModelSpec(
            "llama-tiny",
            "llama",
            # Llama-3.2 structure (GQA, llama3 RoPE, tied embeddings) at toy size.
            dict(
                _LLAMA_3_2_1B,
                vocab_size=256,
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=16,
                max_position_embeddings=256,
            ),
            "2-layer Llama-3.2-shaped decoder for tests",
        ),
        ModelSpec("llama-3.2-1b", "llama", _LLAMA_3_2_1B, "meta-llama/Llama-3.2-1B"),
        ModelSpec(
            "dit-tiny",
            "dit",
            dict(
                num_attention_heads=2,
                attention_head_dim=8,
                in_channels=4,
                out_channels=8,
                num_layers=2,
                sample_size=8,
                patch_size=2,
                num_embeds_ada_norm=10,
            ),
            "2-layer DiT on 8x8 latents, 10 classes, for tests",
        ),
        ModelSpec(
            "dit-xl-2-256",
            "dit",
            dict(
                num_attention_heads=16,
                attention_head_dim=72,
                in_channels=4,
                out_channels=8,
                num_layers=28,
                sample_size=32,
                patch_size=2,
                num_embeds_ada_norm=1000,
            ),
            "facebook/DiT-XL-2-256 (transformer), 32x32x4 latents, 1000 ImageNet classes",
        ),
    )
}


class UnknownModelError(KilnError, KeyError):
    def __str__(self) -> str:  # KeyError would repr() the message
        return self.message


def get(name: str) -> ModelSpec:
    """The spec registered as `name`; an unknown name raises UnknownModelError (a KeyError) listing the names."""
    if name in REGISTRY:
        return REGISTRY[name]
    close = difflib.get_close_matches(name, REGISTRY, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise UnknownModelError(f"unknown model {name!r}; known: {', '.join(sorted(REGISTRY))}{hint}")


def spec_for(name: str | None, weights: str | None = None) -> ModelSpec:
    """The spec of ``--model NAME [--weights DIR]``: NAME's, with a Llama-family checkpoint's own config (its vocabulary,
    context length and shape, which the example inputs and dims follow); or, without NAME, the LLM checkpoint in DIR
    (``HF_MODEL_TYPES``), named after its directory."""
    spec = get(name) if name is not None else None
    if weights is None or (spec is not None and spec.family != "llama"):
        return spec
    path = Path(weights)
    if not (path / "config.json").is_file():  # (a diffusers pipeline directory: its transformer's is in transformer/)
        raise KilnError(f"--weights {weights} has no config.json of its own: a diffusers pipeline directory?",
                        hint="--pipeline compiles a pipeline; --model dit-xl-2-256 --weights DIR its transformer")
    hf = json.loads((path / "config.json").read_text())
    if spec is None and hf.get("model_type") not in HF_MODEL_TYPES:
        kind = hf.get("model_type") or hf.get("_class_name") or "unknown"
        raise KilnError(f"--weights {weights}: a {kind} checkpoint, which kiln builds only as a named model",
                        hint=f"LLM checkpoints ({', '.join(HF_MODEL_TYPES)}) need no --model; else give --model NAME "
                             f"({', '.join(sorted(REGISTRY))})")
    try:
        config = dataclasses.asdict(LlamaConfig.from_hf(hf))
    except ValueError as e:
        raise KilnError(f"--weights {weights}: {e}") from None
    if spec is not None:
        return dataclasses.replace(spec, config=config)
    return ModelSpec(path.resolve().name, "llama", config, f"the {hf['model_type']} checkpoint in {weights}")
