"""Llama-family decoder (Llama, Mistral, Qwen2, Qwen3, Phi-3, Granite, OLMo 2, SmolLM3, Gemma, Gemma 2, Gemma 3) in plain
PyTorch.

Parameter names are exactly transformers' (`model.layers.{i}.self_attn.q_proj.weight`, ...), so an HF
state_dict loads with strict=True. Numerics follow transformers' modeling_llama: float32 RoPE
frequencies cast to the activation dtype, RMSNorm upcast to float32, rotate-half RoPE.
Checkpoints are read with ``checkpoint.py``'s safetensors reader (as load_dit's are).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..ir.kv_quant import check_kv_dtype, dequantize_kv, quantize_kv
from .checkpoint import assign_checked, read_safetensors

ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")
_ROPE_KEYS = {
    "default": (),
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
    # (Phi-3 / Phi-3.5's 128k context): per-frequency factors, the short set up to the original length, the long past it
    "longrope": ("short_factor", "long_factor", "original_max_position_embeddings"),
}
# keys a rope_scaling of that type may also carry (transformers' defaults when absent)
_ROPE_OPTIONAL = {"yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
                  "longrope": ("factor", "attention_factor")}
HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "granite", "olmo2", "smollm3", "gemma", "gemma2", "gemma3_text",
                  "gemma3")
# a multimodal model_type -> its text decoder's: kiln reads the decoder (config text_config, weights under language_model)
# and generates text; the vision tower and its projector are not read
MULTIMODAL_TEXT = {"gemma3": "gemma3_text"}
_TEXT_NAMES = (("model.language_model.", "model."), ("language_model.model.", "model."), ("language_model.lm_head.", "lm_head."))
_VISION_NAMES = ("vision_tower.", "multi_modal_projector.", "model.vision_tower.", "model.multi_modal_projector.")
HIDDEN_ACTS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}  # the MLP's gate activation: HF name -> kiln's


@dataclass
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int | None = None  # None: same as num_attention_heads
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # {"rope_type": "linear" | "llama3", ...}; None: plain RoPE
    partial_rotary_factor: float = 1.0  # (Phi-4-mini: 0.75) RoPE rotates each head's first rotary_dim dims, the rest pass
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # bias on q/k/v (Llama: also o_proj; Qwen2: q/k/v only)
    o_proj_bias: bool | None = None  # None: same as attention_bias
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: a query sees the last `sliding_window` keys
    qk_norm: bool = False  # Qwen3: q and k RMS-normalised over each head's dims (q_norm / k_norm) before RoPE
    # Granite: embeddings times embedding_multiplier, attention scaled by attention_multiplier (None: 1 / sqrt(head_dim)),
    # each layer's attention and MLP outputs times residual_multiplier before their residual adds, logits / logits_scaling
    embedding_multiplier: float = 1.0
    attention_multiplier: float | None = None
    residual_multiplier: float = 1.0
    logits_scaling: float = 1.0
    # OLMo 2: each layer's norms after its attention and MLP (post_attention_layernorm, post_feedforward_layernorm; no
    # input_layernorm), q / k RMS-normalised over the whole projection before RoPE, every norm's weight applied in
    # float32 before the cast (Olmo2RMSNorm)
    post_norms: bool = False
    # SmolLM3: per layer, 1 where its attention applies RoPE, 0 where it does not (NoPE; every 4th layer); None: all do
    no_rope_layers: list[int] | None = None
    hidden_act: str = "silu"  # the MLP's gate activation: "silu" or "gelu_pytorch_tanh" (Gemma)
    # Gemma: every norm's weight stored as an offset from 1, applied as (1 + w) in float32 before the cast
    # (GemmaRMSNorm), and the embeddings times sqrt(hidden_size) rounded to their dtype
    gemma_norms: bool = False
    # Gemma 2 / 3: a norm before and after both the attention and the MLP (input / post_attention / pre_feedforward /
    # post_feedforward_layernorm)
    sandwich_norms: bool = False
    # Gemma 2 / 3: per layer, 1 where it attends the last layer_window keys (Gemma 3: its RoPE base local_rope_theta), 0
    # for full attention; None: every layer alike (all sliding where sliding_window is set: Mistral)
    sliding_layers: list[int] | None = None
    layer_window: int | None = None
    local_rope_theta: float | None = None
    final_logit_softcapping: float | None = None  # logits = tanh(logits / c) * c (Gemma 2, Gemma 3 where set)
    attn_logit_softcapping: float | None = None  # (Gemma 2) the scaled attention scores t soft-capped to c * tanh(t / c)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.o_proj_bias is None:
            self.o_proj_bias = self.attention_bias
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        for name in ("no_rope_layers", "sliding_layers"):
            if getattr(self, name) is not None and len(getattr(self, name)) != self.num_hidden_layers:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {self.num_hidden_layers} layers")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r} (kiln's Llama-family MLP takes {', '.join(HIDDEN_ACTS)})")
        if self.rotary_dim < 2 or self.rotary_dim % 2 or not 0 < self.partial_rotary_factor <= 1:
            raise ValueError(f"partial_rotary_factor={self.partial_rotary_factor} of head_dim {self.head_dim} rotates "
                             f"{self.rotary_dim} dims; RoPE needs an even number of them, at least 2")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", "default")
            if kind not in ROPE_TYPES:
                raise ValueError(f"unsupported rope_type {kind!r}; kiln supports {', '.join(ROPE_TYPES)}")
            absent = [k for k in _ROPE_KEYS[kind] if k not in self.rope_scaling]
            if absent:
                raise ValueError(f"rope_scaling of type {kind!r} lacks {absent}")

    @property
    def rotary_dim(self) -> int:
        """The dims of each head RoPE rotates (transformers: int(head_dim * partial_rotary_factor))."""
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_hf(cls, hf: dict) -> LlamaConfig:
        """Build from an HF config.json dict (model_type: ``HF_MODEL_TYPES``; a multimodal one's text decoder:
        ``MULTIMODAL_TEXT``); unknown keys are ignored."""
        hf = _text_decoder(hf)
        model_type = hf.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(f"unsupported model_type {model_type!r}; kiln's LlamaConfig handles {HF_MODEL_TYPES}")
        act = _hidden_act(hf, model_type)
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        absent = [k for k in required if k not in hf]
        if absent:
            raise ValueError(f"HF config lacks {absent}")
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in hf.items() if k in known and v is not None}
        kw["hidden_act"] = act
        if model_type in ("gemma2", "gemma3_text"):
            hf = _gemma3_from_hf(hf, kw, model_type)
        kw["rope_theta"], kw["rope_scaling"], kw["partial_rotary_factor"] = _rope_from_hf(hf)
        if kw["partial_rotary_factor"] != 1.0 and model_type != "phi3":  # (the others' transformers code rotates all)
            raise ValueError(f"partial_rotary_factor={kw['partial_rotary_factor']} is supported for phi3 (Phi-4-mini), "
                             f"not {model_type}")
        # Defaults transformers' config classes use when a key is absent.
        kw.setdefault("max_position_embeddings", {"llama": 2048, "mistral": 4096 * 32, "qwen2": 32768, "qwen3": 32768,
                                                  "phi3": 4096, "granite": 2048, "olmo2": 2048, "smollm3": 32768,
                                                  "gemma": 8192, "gemma2": 8192, "gemma3_text": 131072}[model_type])
        kw["sliding_window"] = None
        if model_type == "mistral":
            kw["sliding_window"] = hf.get("sliding_window", 4096)
            kw["attention_bias"] = kw["mlp_bias"] = False  # MistralAttention / MistralMLP hard-code bias=False
        elif model_type == "olmo2":  # Olmo2MLP has no bias
            kw.update(post_norms=True, mlp_bias=False)
        elif model_type == "phi3":  # merged qkv_proj / gate_up_proj (split on load: split_merged), no biases
            kw["sliding_window"] = hf.get("sliding_window")
            kw["attention_bias"] = kw["mlp_bias"] = False
        elif model_type == "smollm3":  # a Llama whose every no_rope_layer_interval-th layer has no RoPE (SmolLM3Config's)
            if hf.get("use_sliding_window"):
                raise ValueError("smollm3 with use_sliding_window=True (sliding windows on its NoPE layers) is not supported")
            kw.setdefault("tie_word_embeddings", True)  # (SmolLM3Config's defaults)
            if not (hf.get("rope_theta") or (hf.get("rope_parameters") or hf.get("rope_scaling") or {}).get("rope_theta")):
                kw["rope_theta"] = 2e6
            every = hf.get("no_rope_layer_interval") or 4
            kw["no_rope_layers"] = hf.get("no_rope_layers") or [int((i + 1) % every != 0) for i in range(hf["num_hidden_layers"])]
        elif model_type == "gemma":  # GemmaConfig's defaults; (1 + w) norms, scaled embeddings, tied head
            kw.setdefault("head_dim", 256)
            kw.setdefault("tie_word_embeddings", True)
            kw.update(gemma_norms=True, mlp_bias=False)
        elif model_type in ("qwen2", "qwen3"):
            if hf.get("use_sliding_window"):
                raise ValueError(f"{model_type} with use_sliding_window=True (per-layer sliding window) is not supported")
            if model_type == "qwen2":  # Qwen2Attention: bias on q/k/v, none on o_proj; Qwen2MLP has no bias
                kw.update(attention_bias=True, o_proj_bias=False, mlp_bias=False)
            else:  # Qwen3Attention: bias on q/k/v/o as attention_bias says, RMSNorm on q and k per head
                kw.setdefault("head_dim", 128)  # Qwen3Config's default
                kw.update(o_proj_bias=None, mlp_bias=False, qk_norm=True)
        return cls(**kw)


def _text_decoder(hf: dict) -> dict:
    """A multimodal config's text decoder's (``MULTIMODAL_TEXT``: its text_config, the model_type its own); else ``hf``."""
    model_type = hf.get("model_type")
    if model_type not in MULTIMODAL_TEXT:
        return hf
    text = hf.get("text_config")
    if not isinstance(text, dict):
        raise ValueError(f"{model_type} config without a text_config: no text decoder to read")
    return {"tie_word_embeddings": hf.get("tie_word_embeddings", True), **text, "model_type": MULTIMODAL_TEXT[model_type]}


def _hidden_act(hf: dict, model_type: str) -> str:
    """The MLP's gate activation (HF's name): silu, or GELU (tanh) for the Gemmas."""
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "silu"
    act = "gelu_pytorch_tanh" if model_type == "gemma" and act == "gelu" else act  # (GemmaConfig's legacy value)
    if act not in HIDDEN_ACTS or (act != "silu" and not model_type.startswith("gemma")):
        raise ValueError(f"unsupported hidden_act {act!r} for {model_type} (only 'silu'"
                         + (", 'gelu_pytorch_tanh')" if model_type.startswith("gemma") else ")"))
    return act


def _gemma3_from_hf(hf: dict, kw: dict, model_type: str = "gemma3_text") -> dict:
    """Gemma 2 / Gemma 3 (text): their settings into ``kw`` (as Gemma2Config / Gemma3TextConfig read config.json, old and
    new forms); returns the config with its full-attention layers' RoPE as the plain ``rope_parameters`` (Gemma 3's
    sliding ones' base into kw; Gemma 2's layers share one RoPE)."""
    gemma2 = model_type == "gemma2"
    for key in ("use_bidirectional_attention",) + (() if gemma2 else ("attn_logit_softcapping",)):
        if hf.get(key):
            raise ValueError(f"{model_type} with {key}={hf[key]!r} is not supported")
    n = hf["num_hidden_layers"]
    pattern = 2 if gemma2 else hf.get("sliding_window_pattern") or 6
    types = hf.get("layer_types") or ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)]
    kw.setdefault("head_dim", 256)
    kw.setdefault("tie_word_embeddings", True)
    kw.update(gemma_norms=True, sandwich_norms=True, qk_norm=not gemma2, mlp_bias=False,
              attention_multiplier=float(hf.get("query_pre_attn_scalar") or 256) ** -0.5,
              sliding_layers=[int(t == "sliding_attention") for t in types],
              layer_window=int(hf.get("sliding_window") or 4096), final_logit_softcapping=hf.get("final_logit_softcapping"))
    if gemma2:  # (Gemma2Config's defaults: both softcappings on)
        kw.update(attn_logit_softcapping=hf.get("attn_logit_softcapping", 50.0),
                  final_logit_softcapping=hf.get("final_logit_softcapping", 30.0))
        return hf
    params = dict(hf.get("rope_parameters") or {})
    full = dict(params.get("full_attention") or {"rope_type": "default"})
    if hf.get("rope_scaling"):
        full.update(hf["rope_scaling"])
    full.setdefault("rope_theta", hf.get("rope_theta") or 1e6)
    local = dict(params.get("sliding_attention") or {"rope_type": "default"})
    local.setdefault("rope_theta", hf.get("rope_local_base_freq") or 1e4)
    if local.get("rope_type", "default") != "default":
        raise ValueError(f"gemma3_text sliding layers' rope_type {local['rope_type']!r} is not supported (only 'default')")
    kw["local_rope_theta"] = float(local["rope_theta"])
    return {**hf, "rope_parameters": full, "rope_scaling": None, "rope_theta": None}


def _rope_from_hf(hf: dict) -> tuple[float, dict | None, float]:
    """(rope_theta, rope_scaling, partial_rotary_factor) from transformers 5 `rope_parameters` or legacy
    `rope_theta`/`rope_scaling`."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise ValueError(f"per-layer-type rope_parameters are not supported: {sorted(params)}")
    theta = float(params.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0)
    kind = params.pop("rope_type", None) or params.pop("type", None) or "default"
    if kind not in ROPE_TYPES:
        raise ValueError(f"unsupported rope_type {kind!r}; kiln supports {', '.join(ROPE_TYPES)}")
    partial = float(params.pop("partial_rotary_factor", None) or hf.get("partial_rotary_factor") or 1.0)
    if kind == "default":
        return theta, None, partial
    if kind in ("llama3", "yarn", "longrope"):
        params.setdefault("original_max_position_embeddings", hf.get("original_max_position_embeddings") or hf.get("max_position_embeddings"))
    if kind == "yarn" and params.get("factor") is None:  # (transformers: the ratio of the two lengths)
        params["factor"] = hf.get("max_position_embeddings") / params["original_max_position_embeddings"]
    absent = [k for k in _ROPE_KEYS[kind] if params.get(k) is None]
    if absent:
        raise ValueError(f"rope_parameters of type {kind!r} lack {absent}")
    optional = {k: params[k] for k in _ROPE_OPTIONAL.get(kind, ()) if params.get(k) is not None}
    return theta, {"rope_type": kind, **{k: params.get(k) for k in _ROPE_KEYS[kind]}, **optional}, partial


def rope_inv_freq(cfg: LlamaConfig, device=None) -> torch.Tensor:
    """Inverse RoPE frequencies [rotary_dim // 2], float32, as transformers' ROPE_INIT_FUNCTIONS compute them."""
    dim = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    if kind == "default":
        return inv_freq
    if kind == "longrope":
        return _longrope_inv_freq(cfg, "short_factor", device)
    factor = scaling["factor"]
    if kind == "linear":
        return inv_freq / factor
    if kind == "yarn":
        return _yarn_inv_freq(cfg, device)
    # llama3 (_compute_llama3_parameters): keep high frequencies, divide low ones by `factor`,
    # interpolate in between on old_context_len / wavelen.
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * inv_freq_llama / factor + smooth * inv_freq_llama
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq_llama)


def local_inv_freq(cfg: LlamaConfig, device=None) -> torch.Tensor:
    """The sliding layers' inverse frequencies (Gemma 3: plain RoPE of base ``local_rope_theta``), float32."""
    dim = cfg.rotary_dim
    return 1.0 / (cfg.local_rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim))


def _yarn_inv_freq(cfg: LlamaConfig, device=None) -> torch.Tensor:
    """YaRN's inverse frequencies (transformers' _compute_yarn_parameters): each frequency interpolated (divided by
    ``factor``) or kept, by a linear ramp over the dims between the beta_fast and beta_slow rotation counts."""
    sc, dim, base = cfg.rope_scaling, cfg.rotary_dim, cfg.rope_theta
    original = sc["original_max_position_embeddings"]

    def correction_dim(rotations):
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(sc.get("beta_fast") or 32), correction_dim(sc.get("beta_slow") or 1)
    if sc.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    high = high + 0.001 if low == high else high
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    keep = 1 - torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1).to(device)
    return (1.0 / (sc["factor"] * pos_freqs)) * (1 - keep) + (1.0 / pos_freqs) * keep


def _longrope_inv_freq(cfg: LlamaConfig, which: str, device=None) -> torch.Tensor:
    """LongRoPE's inverse frequencies (transformers' _compute_longrope_parameters): the default ones divided by the
    ``which`` ("short_factor" / "long_factor") factor of each frequency."""
    factors = cfg.rope_scaling[which]
    dim = cfg.rotary_dim
    if len(factors) != dim // 2:
        raise ValueError(f"rope_scaling {which} has {len(factors)} factors; {dim} rotated dims need {dim // 2}")
    shape = torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32, device=device) * cfg.rope_theta**shape)


def longrope_original(cfg: LlamaConfig) -> int | None:
    """The original length of a LongRoPE model (Phi-3 128k / Phi-3.5), past which a sequence takes the long factors;
    None for the other RoPE types."""
    sc = cfg.rope_scaling or {}
    return int(sc["original_max_position_embeddings"]) if sc.get("rope_type") == "longrope" else None


def rope_attention_factor(cfg: LlamaConfig) -> float:
    """The factor cos and sin are scaled by (YaRN's and LongRoPE's attention factors; 1 for the other RoPE types)."""
    sc = cfg.rope_scaling or {}
    if sc.get("rope_type") not in ("yarn", "longrope"):
        return 1.0
    if sc.get("attention_factor") is not None:
        return float(sc["attention_factor"])
    if sc["rope_type"] == "longrope":  # (a factor absent: the two lengths' ratio, as transformers takes it)
        original = sc["original_max_position_embeddings"]
        factor = sc.get("factor") or cfg.max_position_embeddings / original
        return math.sqrt(1 + math.log(factor) / math.log(original)) if factor > 1 else 1.0

    def mscale(scale, m=1.0):
        return 0.1 * m * math.log(scale) + 1.0 if scale > 1 else 1.0
    factor, m, m_all = sc["factor"], sc.get("mscale"), sc.get("mscale_all_dim")
    return float(mscale(factor, m) / mscale(factor, m_all)) if m and m_all else mscale(factor)


class RMSNorm(nn.Module):
    """weight * (x * rsqrt(mean(x^2, -1) + eps)), the normalisation in float32 (as HF's LlamaRMSNorm); ``weight_first``:
    the weight applied in float32 too, then one cast (Olmo2RMSNorm); ``unit_offset``: the weight stored as its offset
    from 1 and applied as (1 + weight) in float32, then one cast (GemmaRMSNorm)."""

    def __init__(self, dim: int, eps: float, weight_first: bool = False, unit_offset: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if unit_offset else torch.ones(dim))
        self.eps, self.weight_first, self.unit_offset = eps, weight_first, unit_offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (x * (1.0 + self.weight.float())).to(dtype)
        return (self.weight * x).to(dtype) if self.weight_first else self.weight * x.to(dtype)


class RotaryEmbedding(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.attention_factor = rope_attention_factor(cfg)
        self.original = longrope_original(cfg)
        if self.original is not None:  # (inv_freq: the short set)
            self.register_buffer("long_inv_freq", _longrope_inv_freq(cfg, "long_factor"), persistent=False)
        if cfg.local_rope_theta is not None:  # (Gemma 3's sliding layers: plain RoPE of another base)
            self.register_buffer("local_inv_freq", local_inv_freq(cfg), persistent=False)

    def local(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the sliding layers' RoPE (``local_rope_theta``), as ``forward``'s."""
        emb = positions[..., None].float() * torch.cat((self.local_inv_freq, self.local_inv_freq)).float()
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [..., S, rotary_dim] in `dtype`, computed in float32 (times YaRN's / LongRoPE's attention factor).
        LongRoPE: a row's positions all take the long factors where its last position is past the original length
        (transformers' longrope_frequency_update). Per row: transformers takes the largest position of the whole batch,
        so there a short prompt's tokens depend on the prompts batched with it; here they are those of the prompt alone."""
        # the frequencies doubled before the product, not the product [..., S, D/2] after it (transformers' cat((freqs,
        # freqs))): the same values, but the table's concatenation is then of weights (folded at compile time) and the
        # step's cast, product, cos and sin are one kernel instead of four
        inv_freq = torch.cat((self.inv_freq, self.inv_freq))
        if self.original is not None:  # [..., 1, D]
            longer = positions.amax(-1, keepdim=True)[..., None] + 1 > self.original
            inv_freq = torch.where(longer, torch.cat((self.long_inv_freq, self.long_inv_freq)), inv_freq)
        emb = positions[..., None].float() * inv_freq.float()  # [..., S, D]
        if self.attention_factor != 1.0:
            return (emb.cos() * self.attention_factor).to(dtype), (emb.sin() * self.attention_factor).to(dtype)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def repeat_kv(x: torch.Tensor, n: int) -> torch.Tensor:
    """[B, KV, S, D] -> [B, KV * n, S, D], each kv head n times in a row (transformers' repeat_kv)."""
    if n == 1:
        return x
    b, kv, s, d = x.shape
    return x[:, :, None, :, :].expand(b, kv, n, s, d).reshape(b, kv * n, s, d)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin; x [B, H, S, D], cos/sin [S, R]: with R < D (a partial rotary factor) the first R
    dims rotated, the others as they are."""
    r = cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rot = x[..., :r]
    return torch.cat((rot * cos + rotate_half(rot) * sin, x[..., r:]), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int = 0):
        super().__init__()
        self.use_rope = cfg.no_rope_layers is None or bool(cfg.no_rope_layers[layer])  # (SmolLM3's NoPE layers: False)
        self.sliding = cfg.sliding_layers is not None and bool(cfg.sliding_layers[layer])  # (Gemma 2 / 3's local layers)
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        d, hd = cfg.hidden_size, cfg.head_dim
        self.q_proj = nn.Linear(d, self.n_heads * hd, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(d, self.n_kv_heads * hd, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(d, self.n_kv_heads * hd, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * hd, d, bias=cfg.o_proj_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(hd, cfg.rms_norm_eps, unit_offset=cfg.gemma_norms)
            self.k_norm = RMSNorm(hd, cfg.rms_norm_eps, unit_offset=cfg.gemma_norms)
        if cfg.post_norms:  # (OLMo 2: over the whole projections)
            self.q_norm = RMSNorm(self.n_heads * hd, cfg.rms_norm_eps, weight_first=True)
            self.k_norm = RMSNorm(self.n_kv_heads * hd, cfg.rms_norm_eps, weight_first=True)
        self.whole_qk_norm = cfg.post_norms
        self.scale = cfg.attention_multiplier  # (None: SDPA's 1 / sqrt(head_dim))
        self.softcap = cfg.attn_logit_softcapping  # (Gemma 2)

    def heads(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, S, hd], k, v [B, KV, S, hd] of x [B, S, D]: projected, (normalised,) q and k roped."""
        B, S, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)
        if self.whole_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if hasattr(self, "q_norm") and not self.whole_qk_norm:  # Qwen3's per head, after the transpose (as HF's before
            q, k = self.q_norm(q), self.k_norm(k)  # it): ROPE then reads the norm itself (schedule.rope_norm)
        if not self.use_rope:
            return q, k, v
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, mask: torch.Tensor | None = None) -> torch.Tensor:
        """x [B, S, D]; mask None means plain causal, else a bool [S, S_kv] (True = attend)."""
        B, S, _ = x.shape
        q, k, v = self.heads(x, cos, sin)
        if mask is None and self.softcap is not None:
            mask = torch.ones(S, S, dtype=torch.bool, device=x.device).tril()
        y = self.attend(q, k, v, mask, is_causal=mask is None)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.n_heads * self.head_dim))

    def attend(self, q, k, v, mask, is_causal: bool = False) -> torch.Tensor:
        """SDPA; with Gemma 2's soft-capped scores, its eager form: scores scaled, c * tanh(s / c), masked (bool mask,
        True = attend), softmax in float32, as transformers' eager_attention_forward (kiln fuses it into one ATTENTION)."""
        if self.softcap is None:
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                                  enable_gqa=self.n_kv_heads != self.n_heads, scale=self.scale)
        k, v = repeat_kv(k, self.n_heads // self.n_kv_heads), repeat_kv(v, self.n_heads // self.n_kv_heads)
        s = torch.matmul(q, k.transpose(2, 3)) * (self.scale if self.scale is not None else self.head_dim ** -0.5)
        s = torch.tanh(s / self.softcap) * self.softcap
        s = s.masked_fill(~mask, float("-inf"))
        return torch.matmul(F.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype), v)


class MLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, f, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(f, d, bias=cfg.mlp_bias)
        self.gelu = cfg.hidden_act == "gelu_pytorch_tanh"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate_proj(x)
        return self.down_proj((F.gelu(g, approximate="tanh") if self.gelu else F.silu(g)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int = 0):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.post, self.sandwich = cfg.post_norms, cfg.sandwich_norms
        d, eps, g = cfg.hidden_size, cfg.rms_norm_eps, cfg.gemma_norms
        if not self.post:
            self.input_layernorm = RMSNorm(d, eps, unit_offset=g)
        self.post_attention_layernorm = RMSNorm(d, eps, weight_first=self.post, unit_offset=g)
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(d, eps, unit_offset=g)
        if self.post or self.sandwich:
            self.post_feedforward_layernorm = RMSNorm(d, eps, weight_first=True, unit_offset=g)
        self.residual_multiplier = cfg.residual_multiplier

    def forward(self, x, cos, sin, mask=None) -> torch.Tensor:
        x = x + self.attn_out(self.self_attn(self.attn_in(x), cos, sin, mask))
        return x + self.mlp_out(self.mlp(self.mlp_in(x)))

    # the residual branches' ends: pre-norm (Llama), post-norm (OLMo 2) or both (Gemma 2 / 3), times Granite's residual
    # multiplier
    def attn_in(self, x):
        return x if self.post else self.input_layernorm(x)

    def attn_out(self, y):
        return scaled(self.post_attention_layernorm(y) if self.post or self.sandwich else y, self.residual_multiplier)

    def mlp_in(self, x):
        return x if self.post else (self.pre_feedforward_layernorm if self.sandwich else self.post_attention_layernorm)(x)

    def mlp_out(self, y):
        return scaled(self.post_feedforward_layernorm(y) if self.post or self.sandwich else y, self.residual_multiplier)


def scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x * factor, or x itself where the factor is 1 (the graphs of models without Granite's multipliers unchanged)."""
    return x if factor == 1.0 else x * factor


def granite_logits(logits: torch.Tensor, cfg: LlamaConfig) -> torch.Tensor:
    """Granite's logits / logits_scaling (a division, as transformers'), Gemma 2 / 3's final softcapping tanh(logits / c) * c;
    the logits themselves elsewhere."""
    logits = logits if cfg.logits_scaling == 1.0 else logits / cfg.logits_scaling
    c = cfg.final_logit_softcapping
    return logits if c is None else torch.tanh(logits / c) * c


def embed(m: LlamaModel, input_ids: torch.Tensor) -> torch.Tensor:
    """The token embeddings, times Granite's multiplier or Gemma's sqrt(hidden_size) (rounded to their dtype first)."""
    x = scaled(m.embed_tokens(input_ids), m.embedding_multiplier)
    return x * m.embed_scale.to(x.dtype) if m.gemma else x


class LlamaModel(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, weight_first=cfg.post_norms, unit_offset=cfg.gemma_norms)
        self.rotary_emb = RotaryEmbedding(cfg)
        self.sliding_window, self.layer_window = cfg.sliding_window, cfg.layer_window
        self.local_rope = cfg.local_rope_theta is not None  # (Gemma 3's sliding layers: their own RoPE base)
        self.embedding_multiplier, self.gemma = cfg.embedding_multiplier, cfg.gemma_norms
        if self.gemma:  # (GemmaModel: float32, cast to the embeddings' dtype when applied)
            self.register_buffer("embed_scale", torch.tensor(cfg.hidden_size ** 0.5), persistent=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = embed(self, input_ids)  # [B, S, D]
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)  # [S]
        cos, sin = self.rotary_emb(pos, x.dtype)  # [S, hd]
        local = self.rotary_emb.local(pos, x.dtype) if self.local_rope else (cos, sin)
        mask, window = None, None
        # Key j is visible to query i iff i - window < j <= i (transformers' sliding_window_overlay).
        if self.sliding_window is not None:
            mask = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - self.sliding_window)
        if self.layer_window is not None:  # (Gemma 2 / 3's sliding layers)
            window = (pos[None, :] <= pos[:, None]) & (pos[None, :] > pos[:, None] - self.layer_window)
        for layer in self.layers:
            x = layer(x, *local, window) if layer.self_attn.sliding else layer(x, cos, sin, mask)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    """input_ids [B, S] -> logits [B, S, vocab]. Causal, no KV cache, positions 0..S-1."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = LlamaModel(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Make lm_head.weight the very Parameter of embed_tokens when tie_word_embeddings."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def reset_buffers(self) -> None:
        """Recompute the non-persistent buffers (float32) on the parameters' device, e.g. after meta init."""
        device = self.model.embed_tokens.weight.device
        self.model.rotary_emb.inv_freq = rope_inv_freq(self.config, device=device)
        if self.config.local_rope_theta is not None:
            self.model.rotary_emb.local_inv_freq = local_inv_freq(self.config, device)
        if self.config.gemma_norms:
            self.model.embed_scale = torch.tensor(self.config.hidden_size ** 0.5, device=device)
        if self.model.rotary_emb.original is not None:
            self.model.rotary_emb.long_inv_freq = _longrope_inv_freq(self.config, "long_factor", device)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return granite_logits(self.lm_head(self.model(input_ids)), self.config)


class LlamaStep(nn.Module):
    """One generation step of a :class:`LlamaForCausalLM` over an explicit, preallocated KV cache.

    forward(input_ids [B, T], positions [B, T], slots [T], mask [B, 1, T, S], caches[, window_mask]) -> logits [B, vocab] of the
    last position ([B, T, vocab] of every position with ``all_logits``, what perplexity needs). ``caches`` is a
    tuple with, per layer, k_i, v_i [B, kv_heads, S, head_dim] and, with a ``kv_dtype``, k_scale_i, v_scale_i
    [B, kv_heads, S] float32. The step writes this step's keys / values at cache slots ``slots`` (in place,
    ``index_copy_``) and attends over the whole cache under ``mask`` (bool, True = attend), so prefill (T tokens)
    and decode (T = 1) are the same program at different sizes. Rows are left-padded: row b's token at slot s has
    position ``positions[b, t]``; the caller's mask hides the padding, the future and slots outside a sliding window.
    Gemma 2 / 3's sliding layers attend under ``window_mask`` (the same, and slots outside their window hidden too); without
    it they take ``mask``, which is theirs too while the cache is no longer than their window.

    ``kv_dtype`` "int8" / "fp8": the cache holds quantized codes and per-(row, head, slot) scales (``ir/kv_quant.py``):
    the step quantizes its keys (after RoPE) and values, writes codes and scales, and attention reads the
    dequantized cache ``(codes * scale).to(activation dtype)`` (kiln fuses that into ATTENTION's K / V loads).
    """

    def __init__(self, model: LlamaForCausalLM, kv_dtype: str | None = None, all_logits: bool = False):
        super().__init__()
        check_kv_dtype(kv_dtype)
        self.model = model
        cfg = model.config
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.kv_dtype, self.all_logits = kv_dtype, all_logits
        self.per_layer = 2 if kv_dtype is None else 4  # cache tensors per layer

    def forward(self, input_ids, positions, slots, mask, caches, window_mask=None):
        m = self.model.model
        B, T = input_ids.shape
        if window_mask is None and m.layer_window is not None and caches[0].shape[2] > m.layer_window:
            raise ValueError(f"a cache of {caches[0].shape[2]} slots is longer than the sliding layers' window of "
                             f"{m.layer_window} keys: give their mask (window_mask)")
        x = embed(m, input_ids)
        tables = [m.rotary_emb(positions, x.dtype)]  # cos, sin [B, T, hd]; Gemma 3's sliding layers': the second
        if m.local_rope:
            tables.append(m.rotary_emb.local(positions, x.dtype))
        tables = [(cos[:, None], sin[:, None]) for cos, sin in tables]
        for i, layer in enumerate(m.layers):
            a = layer.self_attn
            q, k, v = a.heads(layer.attn_in(x), *tables[int(a.sliding and m.local_rope)])
            kc, vc = self.write_cache(caches[self.per_layer * i: self.per_layer * (i + 1)], slots, k, v)
            y = a.attend(q, kc, vc, window_mask if a.sliding and window_mask is not None else mask)
            x = x + layer.attn_out(a.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)))
            x = x + layer.mlp_out(layer.mlp(layer.mlp_in(x)))
        return granite_logits(self.model.lm_head(m.norm(x if self.all_logits else x[:, -1])), self.model.config)

    def write_cache(self, caches: tuple, slots, k, v) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [B, kv_heads, T, hd] at ``slots`` of one layer's caches; returns the K / V attention reads
        [B, kv_heads, S, hd] in k's dtype."""
        if self.kv_dtype is None:
            kc, vc = caches
            kc.index_copy_(2, slots, k)
            vc.index_copy_(2, slots, v)
            return kc, vc
        read = []
        for x, codes, scales in zip((k, v), caches[:2], caches[2:]):
            c, s = quantize_kv(x, self.kv_dtype)  # [B, KV, T, hd], [B, KV, T]
            codes.index_copy_(2, slots, c)
            scales.index_copy_(2, slots, s)
            read.append(dequantize_kv(codes, scales, x.dtype))
        return read[0], read[1]


# --- checkpoints ----------------------------------------------------------------------------------


def load_llama(path: str | Path, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Load an HF checkpoint directory (config.json + model.safetensors, or sharded with an index)."""
    path = Path(path)
    cfg = LlamaConfig.from_hf(json.loads((path / "config.json").read_text()))
    tensors, source, where = read_safetensors(path, "model")
    return llama_from_tensors(cfg, tensors, source, where, dtype)


def text_tensors(tensors: dict, source: dict) -> tuple[dict, dict]:
    """A multimodal checkpoint's text decoder tensors under a text model's names (``model.language_model.*`` as
    transformers holds them, ``language_model.model.*`` as checkpoints store them -> ``model.*``), its vision tower
    and projector dropped; other checkpoints' tensors as they are."""
    if not any(name.startswith(tuple(p for p, _ in _TEXT_NAMES)) for name in tensors):
        return tensors, source
    out, where = {}, {}
    for name, t in tensors.items():
        if name.startswith(_VISION_NAMES):
            continue
        new = next((to + name[len(p):] for p, to in _TEXT_NAMES if name.startswith(p)), name)
        out[new], where[new] = t, source.get(name)
    return out, where


def merged_parts(cfg: LlamaConfig) -> dict[str, tuple[tuple[str, int], ...]]:
    """Phi-3's merged projections: merged weight name -> (Llama's part name, its rows) in the merged weight's order."""
    hd, q, kv, f = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size
    return {"self_attn.qkv_proj.weight": (("self_attn.q_proj.weight", q * hd), ("self_attn.k_proj.weight", kv * hd),
                                          ("self_attn.v_proj.weight", kv * hd)),
            "mlp.gate_up_proj.weight": (("mlp.gate_proj.weight", f), ("mlp.up_proj.weight", f))}


def split_merged(tensors: dict, source: dict, cfg: LlamaConfig) -> tuple[dict, dict]:
    """Phi-3's merged projections as Llama's: ``self_attn.qkv_proj.weight`` rows [q | k | v] -> q_proj / k_proj /
    v_proj, ``mlp.gate_up_proj.weight`` rows [gate | up] -> gate_proj / up_proj (views: nothing copied; a tensor, or a
    QuantWeight's codes, scales and zeros: ``QuantWeight.rows``). Other tensors pass as they are; a merged weight of the
    wrong height is left for ``assign_checked`` to name."""
    parts = merged_parts(cfg)
    out, where = {}, dict(source)
    for name, t in tensors.items():
        merged = next((m for m in parts if name.endswith("." + m)), None)
        shape = tuple(t.shape)
        if merged is None or len(shape) != 2 or shape[0] != sum(n for _, n in parts[merged]):
            out[name] = t
            continue
        prefix, at = name[: -len(merged)], 0
        for part, rows in parts[merged]:
            out[prefix + part] = t[at:at + rows] if isinstance(t, torch.Tensor) else t.rows(at, at + rows)
            where[prefix + part] = source.get(name)
            at += rows
    return out, where


def llama_from_tensors(cfg: LlamaConfig, tensors: dict[str, torch.Tensor], source: dict, where,
                       dtype: torch.dtype | None = None) -> LlamaForCausalLM:
    """A LlamaForCausalLM holding ``tensors`` (HF names; checked by :func:`assign_checked`, which names
    ``source[name]`` / ``where`` in its errors), cast to ``dtype`` unless None; no copy when no cast."""
    tensors, source = split_merged(*text_tensors(tensors, source), cfg)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    optional = frozenset({"lm_head.weight"} if cfg.tie_word_embeddings else ())
    assign_checked(model, tensors, source, where, optional, ignored_suffixes=("rotary_emb.inv_freq",))
    if dtype is not None:
        model.to(dtype)
    model.tie_weights()  # assign=True gave embed_tokens a new Parameter; lm_head must follow it
    model.reset_buffers()
    return model.eval()
