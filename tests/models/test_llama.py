"""kiln.models.llama against transformers' Llama / Mistral / Qwen2 / Qwen3 / Phi-3 / Granite / OLMo 2 / SmolLM3 / Gemma / Gemma 3
on tiny random configs (CPU)."""

import json
import math

import pytest
import torch

from kiln.testing import TOL, rel_err
import transformers
from safetensors.torch import load_file, save_file
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from kiln.models.llama import LlamaConfig, LlamaForCausalLM, llama_from_tensors, load_llama, rope_inv_freq
from kiln.models.registry import export_dims, get


SMALL = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    rope_theta=500000.0,
    factor=32.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,  # small, so low / medium / high frequency bands all occur at head_dim 16
)
LONGROPE = dict(short_factor=[1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.1, 3.8], long_factor=[1.0, 1.5, 2.2, 3.5, 5.0, 8.0, 12.0, 20.0],
                original_max_position_embeddings=8)
CASES = {
    "llama": ("LlamaConfig", {}),
    "llama-llama3rope-tied": ("LlamaConfig", dict(rope_parameters=LLAMA3_ROPE, tie_word_embeddings=True)),
    "llama-bias-mha": ("LlamaConfig", dict(attention_bias=True, mlp_bias=True, num_key_value_heads=4)),
    "mistral-headdim24": ("MistralConfig", dict(head_dim=24, sliding_window=None)),
    "mistral-window4": ("MistralConfig", dict(sliding_window=4)),
    "qwen2-tied": ("Qwen2Config", dict(tie_word_embeddings=True)),
    "qwen3-headdim24": ("Qwen3Config", dict(head_dim=24)),  # q / k norms; a head dim that is not hidden / heads
    "qwen3-bias-tied": ("Qwen3Config", dict(attention_bias=True, tie_word_embeddings=True)),
    # YaRN (Qwen3's long-context setting): frequencies on both sides of the ramp at head_dim 16, cos / sin scaled
    "qwen3-yarn": ("Qwen3Config", dict(head_dim=16, rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
                                                                          original_max_position_embeddings=16))),
    "llama-yarn-mscale": ("LlamaConfig", dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=8.0, mscale=1.0,
                                                                   mscale_all_dim=0.5, original_max_position_embeddings=32,
                                                                   beta_fast=16, truncate=False))),
    "granite-multipliers": ("GraniteConfig", dict(embedding_multiplier=12.0, attention_multiplier=0.015625, residual_multiplier=0.22,
                                                  logits_scaling=8.0, attention_bias=True)),
    "olmo2-post-norms": ("Olmo2Config", dict(attention_bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    "phi3-window4": ("Phi3Config", dict(sliding_window=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)),  # merged qkv / gate_up
    # LongRoPE (Phi-3 / 3.5's long context): 11 tokens past the original 8, so the long factors; the attention factor
    # from the lengths' ratio 64 / 8
    # Phi-4-mini's partial rotary (here half of each head's 16 dims), with LongRoPE's factors for those 8
    "phi3-partial-longrope": ("Phi3Config", dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64,
                                                 original_max_position_embeddings=8, partial_rotary_factor=0.5,
                                                 rope_parameters=dict(rope_type="longrope", rope_theta=1e4,
                                                                      short_factor=LONGROPE["short_factor"][:4],
                                                                      long_factor=LONGROPE["long_factor"][:4]))),
    # SmolLM3: every second layer here without RoPE (NoPE), q / k / v / o biases
    "smollm3-nope": ("SmolLM3Config", dict(no_rope_layer_interval=2, attention_bias=True, pad_token_id=0, bos_token_id=1,
                                           eos_token_id=2)),
    # Gemma: (1 + w) norms in float32, embeddings times sqrt(hidden) in their dtype, GELU (tanh) MLP, tied head
    "gemma": ("GemmaConfig", dict(head_dim=16)),
    # Gemma 3: norms before and after attention and MLP, (1 + w) q / k norms, its query_pre_attn_scalar, a sliding
    # layer (window 4 of the 11 tokens, RoPE base 10k) beside a full one (base 1e6, linear scaling), final softcapping
    "gemma3-window4-softcap": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                                                        layer_types=["sliding_attention", "full_attention"],
                                                        final_logit_softcapping=5.0, rope_parameters=dict(
                                                            sliding_attention=dict(rope_type="default", rope_theta=1e4),
                                                            full_attention=dict(rope_type="linear", rope_theta=1e6, factor=8.0)))),
    # Gemma 2: sandwich norms, sliding layers (window 4) beside full ones with one RoPE, soft-capped attention scores
    # and logits (caps small enough to bend them)
    "gemma2-window4-softcaps": ("Gemma2Config", dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=24,
                                                     attn_logit_softcapping=1.5, final_logit_softcapping=2.0)),
    "phi3-longrope": ("Phi3Config", dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64,
                                         original_max_position_embeddings=8,  # (Phi3Config's own key wins)
                                         rope_parameters=dict(rope_type="longrope", rope_theta=1e4, **LONGROPE))),
}


def hf_model(case: str, attn: str = "eager") -> transformers.PreTrainedModel:
    name, kw = CASES[case]
    torch.manual_seed(0)
    cfg = getattr(transformers, name)(**{**SMALL, **kw}, attn_implementation=attn)
    model = getattr(transformers, {"Gemma3TextConfig": "Gemma3ForCausalLM"}.get(name, name.replace("Config", "ForCausalLM")))(cfg).eval()
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def token_ids(batch: int = 2, seq: int = 11) -> torch.Tensor:
    return torch.randint(0, SMALL["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(1))




@torch.no_grad()
def hf_logits(hf, ids):
    return hf(ids, use_cache=False).logits


@pytest.mark.parametrize("case", CASES)
@torch.no_grad()
def test_matches_transformers(case):
    hf = hf_model(case)
    state = hf.state_dict()  # (every name checked; Phi-3's merged projections split: split_merged)
    model = llama_from_tensors(LlamaConfig.from_hf(hf.config.to_dict()), state, dict.fromkeys(state, "hf"), "hf")
    ids = token_ids()
    assert rel_err(model(ids), hf_logits(hf, ids)) <= TOL[torch.float32]
    rope = hf.model.rotary_emb  # (LongRoPE's inv_freq: the set its last call took; kiln's: the short one)
    want = getattr(rope, "full_attention_inv_freq", None)  # (Gemma 3: a table per layer type)
    if want is not None:
        assert torch.equal(model.model.rotary_emb.local_inv_freq, rope.sliding_attention_inv_freq)
    else:
        want = getattr(rope, "original_inv_freq", rope.inv_freq)
    assert torch.equal(model.model.rotary_emb.inv_freq, want)
    assert "model.rotary_emb.inv_freq" not in model.state_dict()
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    assert tied == hf.config.tie_word_embeddings


@torch.no_grad()
def test_longrope_takes_the_short_factors_up_to_the_original_length():
    # 8 tokens (the original length): the short factors, as transformers picks them; 9: the long ones for all 9
    hf = hf_model("phi3-longrope")
    state = hf.state_dict()
    model = llama_from_tensors(LlamaConfig.from_hf(hf.config.to_dict()), state, dict.fromkeys(state, "hf"), "hf")
    ids = token_ids(seq=9)
    for n in (8, 9):
        assert rel_err(model(ids[:, :n]), hf_logits(hf, ids[:, :n])) <= TOL[torch.float32], n
    assert rel_err(model(ids)[:, :8], model(ids[:, :8])) > 1e-3  # (the two sets differ at those positions)
    rope = model.model.rotary_emb
    assert rope.attention_factor == pytest.approx((1 + math.log(8) / math.log(8)) ** 0.5)


@torch.no_grad()
def test_sliding_window_is_applied():
    hf = hf_model("mistral-window4")
    model = LlamaForCausalLM(LlamaConfig.from_hf(hf.config.to_dict())).eval()
    model.load_state_dict(hf.state_dict())
    ids = token_ids(seq=11)
    windowed = model(ids)
    model.model.sliding_window = None
    assert rel_err(model(ids), windowed) > 1e-3  # seq 11 > window 4, so the mask must matter


def test_llama3_rope_matches_transformers_at_llama_3_2_1b():
    cfg = LlamaConfig(**get("llama-3.2-1b").config)
    hf_cfg = transformers.LlamaConfig(
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_parameters={**cfg.rope_scaling, "rope_theta": cfg.rope_theta},
    )
    hf_inv_freq, scale = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg)
    assert scale == 1.0
    assert torch.equal(rope_inv_freq(cfg), hf_inv_freq)
    plain = rope_inv_freq(LlamaConfig(**{**get("llama-3.2-1b").config, "rope_scaling": None}))
    assert not torch.equal(plain, hf_inv_freq)


@pytest.mark.parametrize("case", ["llama", "llama-llama3rope-tied", "qwen2-tied", "phi3-window4"])
@torch.no_grad()
def test_load_saved_checkpoint(case, tmp_path):
    hf = hf_model(case)
    hf.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "model.safetensors")
    assert ("lm_head.weight" in saved) != hf.config.tie_word_embeddings  # tied checkpoints omit lm_head
    model = load_llama(tmp_path)
    ids = token_ids()
    assert rel_err(model(ids), hf_logits(hf, ids)) <= TOL[torch.float32]
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == hf.config.tie_word_embeddings
    assert not model.training


@torch.no_grad()
def test_load_sharded_checkpoint(tmp_path):
    hf = hf_model("llama-llama3rope-tied")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    ids = token_ids()
    assert rel_err(load_llama(tmp_path)(ids), hf_logits(hf, ids)) <= TOL[torch.float32]


@torch.no_grad()
def test_load_bfloat16_matches_transformers(tmp_path):
    hf_model("llama-llama3rope-tied").save_pretrained(tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16, attn_implementation="sdpa")
    model = load_llama(tmp_path, dtype=torch.bfloat16)
    assert model.model.norm.weight.dtype == torch.bfloat16
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # as HF's from_pretrained keeps it
    ids = token_ids()
    assert rel_err(model(ids), hf_logits(hf.eval(), ids)) <= TOL[torch.bfloat16]


def _drop_norm(t):
    del t["model.norm.weight"]


def _add_extra(t):
    t["model.extra.weight"] = torch.zeros(3)


def _reshape_norm(t):
    t["model.norm.weight"] = torch.ones(5)


@pytest.mark.parametrize(
    "corrupt, names",
    [
        (_drop_norm, ["missing", "model.norm.weight", "model.safetensors"]),
        (_add_extra, ["unexpected", "model.extra.weight", "model.safetensors"]),
        (_reshape_norm, ["shape", "model.norm.weight", "(5,)"]),
    ],
)
def test_bad_checkpoint_names_the_tensor(corrupt, names, tmp_path):
    hf_model("llama").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    corrupt(tensors)
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        load_llama(tmp_path)
    assert all(n in str(err.value) for n in names), str(err.value)


def test_untied_checkpoint_without_lm_head_is_an_error(tmp_path):
    hf_model("llama").save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="lm_head.weight"):
        load_llama(tmp_path)


def test_shard_missing_a_listed_tensor(tmp_path):
    hf_model("llama").save_pretrained(tmp_path, max_shard_size="20KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    shard = tmp_path / weight_map["model.norm.weight"]
    tensors = load_file(shard)
    del tensors["model.norm.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="model.norm.weight"):
        load_llama(tmp_path)


def test_missing_in_sharded_checkpoint_names_the_index(tmp_path):
    hf_model("llama").save_pretrained(tmp_path, max_shard_size="20KB")
    index = tmp_path / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    shard = tmp_path / doc["weight_map"].pop("model.norm.weight")
    index.write_text(json.dumps(doc))
    tensors = load_file(shard)
    del tensors["model.norm.weight"]
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['model.norm.weight'\] in .*model.safetensors.index.json"):
        load_llama(tmp_path)


def test_from_hf_legacy_rope_scaling_and_defaults():
    hf = {"model_type": "llama", **SMALL, "rope_theta": 500000, "max_position_embeddings": 512}
    hf["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    cfg = LlamaConfig.from_hf({**hf, "some_unknown_key": 1})
    assert cfg.rope_theta == 500000.0 and cfg.head_dim == 16
    assert cfg.rope_scaling["original_max_position_embeddings"] == 512  # HF falls back to max_position_embeddings
    mistral = LlamaConfig.from_hf({"model_type": "mistral", **SMALL})
    assert mistral.sliding_window == 4096  # MistralConfig's default when the key is absent
    smol = LlamaConfig.from_hf({"model_type": "smollm3", **SMALL, "num_hidden_layers": 8})
    assert smol.rope_theta == 2e6 and smol.tie_word_embeddings and smol.no_rope_layers == [1, 1, 1, 0] * 2  # SmolLM3Config's
    # Gemma 3's config.json as transformers 4 wrote it: no layer_types, the pattern, the two bases, the global scaling
    gemma3 = LlamaConfig.from_hf({"model_type": "gemma3_text", **SMALL, "num_hidden_layers": 6, "sliding_window_pattern": 3,
                                  "rope_theta": 1e6, "rope_local_base_freq": 1e4, "sliding_window": 512,
                                  "rope_scaling": {"rope_type": "linear", "factor": 8.0}, "query_pre_attn_scalar": 64})
    assert gemma3.sliding_layers == [1, 1, 0, 1, 1, 0] and gemma3.layer_window == 512 and gemma3.local_rope_theta == 1e4
    assert gemma3.rope_theta == 1e6 and gemma3.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert gemma3.attention_multiplier == 0.125 and gemma3.head_dim == 256 and gemma3.qk_norm and gemma3.sandwich_norms
    gemma2 = LlamaConfig.from_hf({"model_type": "gemma2", **SMALL, "num_hidden_layers": 4})  # Gemma2Config's defaults
    assert gemma2.sliding_layers == [1, 0, 1, 0] and gemma2.attn_logit_softcapping == 50.0
    assert gemma2.final_logit_softcapping == 30.0 and not gemma2.qk_norm and gemma2.local_rope_theta is None
    gemma = LlamaConfig.from_hf({"model_type": "gemma", **SMALL, "hidden_act": "gelu"})  # (GemmaConfig's legacy value)
    assert gemma.hidden_act == "gelu_pytorch_tanh" and gemma.gemma_norms and gemma.tie_word_embeddings


@pytest.mark.parametrize(
    "hf, name",
    [
        ({"model_type": "gpt2", **SMALL}, "gpt2"),
        ({"model_type": "llama", **SMALL, "rope_scaling": {"rope_type": "longrope", "short_factor": [1.0]}}, "long_factor"),
        ({"model_type": "phi3", **SMALL, "rope_parameters": {"partial_rotary_factor": 0.1}}, "partial_rotary_factor"),
        ({"model_type": "llama", **SMALL, "rope_parameters": {"partial_rotary_factor": 0.5}}, "supported for phi3"),
        ({"model_type": "llama", **SMALL, "rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "dynamic"),
        ({"model_type": "llama", **SMALL, "hidden_act": "gelu"}, "gelu"),
        ({"model_type": "qwen2", **SMALL, "use_sliding_window": True}, "use_sliding_window"),
        ({"model_type": "gemma3_text", **SMALL, "attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),
        ({"model_type": "gemma2", **SMALL, "use_bidirectional_attention": True}, "use_bidirectional_attention"),
        ({"model_type": "gemma3", **SMALL}, "gemma3 config without a text_config"),
        ({"model_type": "gemma3_text", **SMALL, "hidden_activation": "relu"}, "relu"),
    ],
)
def test_from_hf_rejects_unsupported(hf, name):
    with pytest.raises(ValueError, match=name):
        LlamaConfig.from_hf(hf)


@torch.no_grad()
def test_export_dynamic_batch_and_seq():
    spec = get("llama-tiny")
    model = spec.build()
    prog = torch.export.export(
        model, (), spec.example_inputs(batch=2, seq=5), dynamic_shapes=export_dims(spec.dynamic()), strict=False
    )
    for batch, seq in [(3, 9), (1, 1)]:
        inputs = spec.example_inputs(batch=batch, seq=seq, seed=1)
        assert rel_err(prog.module()(**inputs), model(**inputs)) <= TOL[torch.float32]
