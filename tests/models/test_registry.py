"""kiln.models.registry: every spec builds; big ones are checked on the meta device only."""

import json

import pytest
import torch
from safetensors.torch import save_file

from kiln.models.dit import DiTConfig
from kiln.models.llama import LlamaConfig
from kiln.models.registry import REGISTRY, get

TINY = ["llama-tiny", "dit-tiny"]

# config.json of meta-llama/Llama-3.2-1B and of facebook/DiT-XL-2-256's transformer/, as published.
LLAMA_3_2_1B_JSON = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "head_dim": 64, "hidden_act": "silu", "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 8192, "max_position_embeddings": 131072, "mlp_bias": False,
    "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 16, "num_key_value_heads": 8,
    "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}  # fmt: skip
DIT_XL_2_256_JSON = {
    "_class_name": "Transformer2DModel", "activation_fn": "gelu-approximate", "attention_bias": True,
    "attention_head_dim": 72, "cross_attention_dim": None, "dropout": 0.0, "in_channels": 4,
    "norm_elementwise_affine": False, "norm_num_groups": 32, "norm_type": "ada_norm_zero", "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000, "num_layers": 28, "num_vector_embeds": None, "only_cross_attention": False,
    "out_channels": 8, "patch_size": 2, "sample_size": 32, "upcast_attention": False, "use_linear_projection": False,
}  # fmt: skip


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # a tied Parameter counts once


def llama_params(c: LlamaConfig) -> int:
    d, hd, f = c.hidden_size, c.head_dim, c.intermediate_size
    attn = d * c.num_attention_heads * hd * 2 + d * c.num_key_value_heads * hd * 2
    layer = attn + 3 * d * f + 2 * d
    return c.vocab_size * d * (1 if c.tie_word_embeddings else 2) + c.num_hidden_layers * layer + d


def dit_params(c: DiTConfig) -> int:
    d, p = c.inner_dim, c.patch_size
    embed = (256 * d + d) + (d * d + d) + (c.num_embeds_ada_norm + 1) * d  # per block, as diffusers stores it
    block = embed + (6 * d * d + 6 * d) + 4 * (d * d + d) + (4 * d * d + 4 * d) + (4 * d * d + d)
    patch = c.in_channels * p * p * d + d
    out = (2 * d * d + 2 * d) + (d * p * p * c.out_channels + p * p * c.out_channels)
    return patch + c.num_layers * block + out


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_tiny_builds_and_runs(name):
    spec = get(name)
    model = spec.build()
    assert not model.training
    out = model(**spec.example_inputs(batch=2))
    lead = (2, 16, spec.config["vocab_size"]) if spec.family == "llama" else (2, 8, 8, 8)
    assert out.shape == lead and out.dtype == torch.float32
    assert torch.isfinite(out).all() and out.std() > 1e-3
    # Every non-norm parameter is random (no zero-initialised adaLN / output projection).
    for pname, p in model.named_parameters():
        if "norm" not in pname:
            assert p.std() > 0.01, pname


@pytest.mark.parametrize("name", TINY)
def test_build_is_deterministic_in_seed(name):
    spec = get(name)
    a, b, c = spec.build(seed=0).state_dict(), spec.build(seed=0).state_dict(), spec.build(seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    x0, x1 = spec.example_inputs(batch=2, seed=0), spec.example_inputs(batch=2, seed=0)
    assert all(torch.equal(x0[k], x1[k]) for k in x0)


@pytest.mark.parametrize("name", TINY)
@torch.no_grad()
def test_build_bfloat16(name):
    spec = get(name)
    model = spec.build(dtype=torch.bfloat16)
    x = spec.example_inputs(batch=2, dtype=torch.bfloat16)
    if spec.family == "dit":
        assert x["hidden_states"].dtype == torch.bfloat16 and x["timestep"].dtype == torch.int64
    assert model(**x).dtype == torch.bfloat16


@torch.no_grad()
def test_build_from_weights_dir_uses_its_config(tmp_path):
    spec = get("llama-tiny")
    (tmp_path / "llama").mkdir()
    one_layer = {**spec.config, "num_hidden_layers": 1}
    (tmp_path / "llama" / "config.json").write_text(json.dumps({"model_type": "llama", **one_layer}))
    source = get("llama-tiny").build(seed=3)
    del source.model.layers[1]
    tensors = {k: v for k, v in source.state_dict().items() if k != "lm_head.weight"}  # tied
    save_file(tensors, tmp_path / "llama" / "model.safetensors")
    loaded = spec.build(weights=str(tmp_path / "llama"))
    assert len(loaded.model.layers) == 1
    ids = spec.example_inputs(batch=2)["input_ids"]
    assert torch.equal(loaded(ids), source(ids))

    dit = get("dit-tiny")
    (tmp_path / "dit").mkdir()
    (tmp_path / "dit" / "config.json").write_text(json.dumps({"_class_name": "DiTTransformer2DModel", **dit.config}))
    source = dit.build(seed=3)
    save_file(source.state_dict(), tmp_path / "dit" / "diffusion_pytorch_model.safetensors")
    x = dit.example_inputs(batch=2)
    assert torch.equal(dit.build(weights=str(tmp_path / "dit"))(**x), source(**x))


def test_llama_3_2_1b_config_and_size():
    spec = get("llama-3.2-1b")
    cfg = LlamaConfig(**spec.config)
    assert cfg == LlamaConfig.from_hf(LLAMA_3_2_1B_JSON)
    with torch.device("meta"):
        model = spec.build()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert n_params(model) == llama_params(cfg) == 1_235_814_400
    assert spec.dynamic() == {"input_ids": {0: ("batch", 1, 16), 1: ("seq", 1, 131072)}}


def test_dit_xl_2_256_config_and_size():
    spec = get("dit-xl-2-256")
    cfg = DiTConfig(**spec.config)
    assert cfg == DiTConfig.from_diffusers(DIT_XL_2_256_JSON)
    assert (cfg.inner_dim, cfg.out_channels) == (1152, 8)
    with torch.device("meta"):
        model = spec.build()
    assert n_params(model) == dit_params(cfg)
    batch = ("batch", 1, 64)
    assert spec.dynamic() == {"hidden_states": {0: batch}, "timestep": {0: batch}, "class_labels": {0: batch}}


def test_tiny_params_formula():
    with torch.device("meta"):
        assert n_params(get("llama-tiny").build()) == llama_params(LlamaConfig(**get("llama-tiny").config))
        assert n_params(get("dit-tiny").build()) == dit_params(DiTConfig(**get("dit-tiny").config))


def test_unknown_name_lists_known_names():
    with pytest.raises(KeyError) as err:
        get("llama-tiy")
    message = str(err.value)
    assert all(name in message for name in REGISTRY)
    assert "did you mean 'llama-tiny'" in message
