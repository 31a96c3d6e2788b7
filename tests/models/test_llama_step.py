"""kiln.models.llama.LlamaStep over a plain, int8 and fp8 KV cache, compiled by kiln (reference backend, float32),
against the same math written out in float64: a left-padded prefill with every position's logits, then a decode
step; the codes and scales the step writes against the format (kiln.ir.kv_quant) applied to float64 keys / values."""
import math

import pytest
import torch

import kiln
from kiln.ir.kv_quant import KV_DTYPES, quantize_kv
from kiln.llm.generator import cache_names, new_caches, step_dims, step_function, step_inputs
from kiln.models.llama import LlamaConfig, LlamaForCausalLM, LlamaStep
from kiln.testing import TOL, rel_err

CFG = dict(vocab_size=61, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
           num_key_value_heads=2, rms_norm_eps=1e-5)
MAX_SEQ = 8


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(**CFG)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norms and biases away from their init
    return m


def spec(kv):
    return dict(num_layers=CFG["num_hidden_layers"], kv_heads=CFG["num_key_value_heads"], head_dim=12, max_seq=MAX_SEQ,
                kv_cache_dtype=kv)


def compiled_step(model, kv):
    names = cache_names(CFG["num_hidden_layers"], kv)
    example = step_inputs(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, dtype=torch.long), 0,
                          new_caches(spec(kv), 2, torch.float32, "cpu"), MAX_SEQ, None)
    fn = step_function(LlamaStep(model, kv, all_logits=True), CFG["num_hidden_layers"], kv)
    return kiln.compile(fn, (), example, dynamic=step_dims(names, 2, MAX_SEQ), config=kiln.CompileConfig(backend="reference"))


def check_written(got_codes, got_scale, x, kv):
    """The cache slots the step wrote against the format applied to the float64 values x [B, Hk, T, hd]: equal codes
    but for rare neighbours (a rounding boundary within float32 noise), scales to float32 precision."""
    if kv is None:
        assert rel_err(got_codes, x) <= TOL[torch.float32]
        return
    want, scale = quantize_kv(x, kv)
    assert rel_err(got_scale, scale) <= TOL[torch.float32]
    g, w = got_codes.double(), want.double()
    step = 1.0 if kv == "int8" else w.abs().clamp_min(2.0 ** -6) * 2.0 ** -3  # one code apart
    assert torch.all((g - w).abs() <= step) and (g != w).double().mean() <= 0.01


def reference(model, inputs: dict, kv) -> torch.Tensor:
    """LlamaStep's math in float64 (RoPE angles in float32, as HF's), logits [B, T, vocab]; checks the cache slots the
    step wrote and attends over the caches as written (the codes it rounded, dequantized in float64)."""
    cfg, w = model.config, {k: v.double() for k, v in model.state_dict().items()}
    ids, positions, slots, mask = (inputs[k] for k in ("input_ids", "positions", "slots", "mask"))
    B, T = ids.shape
    H, Hk, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    angles = positions[..., None].float() * model.model.rotary_emb.inv_freq.float()  # [B, T, hd / 2]
    emb = torch.cat((angles, angles), -1)
    cos, sin = emb.cos().double()[:, None], emb.sin().double()[:, None]

    def rope(t):
        return t * cos + torch.cat((-t[..., hd // 2:], t[..., :hd // 2]), -1) * sin

    def rms(t, name):
        return w[name] * t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + cfg.rms_norm_eps)

    x = w["model.embed_tokens.weight"][ids]
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, p + "input_layernorm.weight")
        q, k, v = (h @ w[p + f"self_attn.{n}_proj.weight"].T for n in "qkv")
        q = rope(q.view(B, T, H, hd).transpose(1, 2))
        k, v = rope(k.view(B, T, Hk, hd).transpose(1, 2)), v.view(B, T, Hk, hd).transpose(1, 2)
        kv_read = []
        for name, t in (("k", k), ("v", v)):
            codes, scale = inputs[f"{name}_cache_{i}"], inputs.get(f"{name}_scale_{i}")
            check_written(codes[:, :, slots], None if scale is None else scale[:, :, slots], t, kv)
            kv_read.append(codes.double() * (scale.double()[..., None] if scale is not None else 1))
        K, V = (t.repeat_interleave(H // Hk, 1) for t in kv_read)
        s = (q @ K.transpose(-1, -2) / math.sqrt(hd)).masked_fill(~mask, -math.inf)
        y = (torch.softmax(s, -1) @ V).transpose(1, 2).reshape(B, T, H * hd)
        x = x + y @ w[p + "self_attn.o_proj.weight"].T
        h = rms(x, p + "post_attention_layernorm.weight")
        g, u = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (torch.nn.functional.silu(g) * u) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, "model.norm.weight") @ w["lm_head.weight"].T


@pytest.mark.parametrize("kv", [None, *KV_DTYPES])
def test_prefill_and_decode_match_the_float64_math(model, kv):
    m = compiled_step(model, kv)
    caches = new_caches(spec(kv), 2, torch.float32, "cpu")
    pad = torch.tensor([0, 2])  # row 1's prompt is 3 tokens, left-padded to 5
    prompt = torch.tensor([[5, 17, 3, 40, 9], [0, 0, 22, 8, 31]])
    for ids, slot0 in ((prompt, 0), (torch.tensor([[12], [50]]), 5)):
        inputs = step_inputs(ids, pad, slot0, caches, MAX_SEQ, None)
        outs = m.run(list(inputs.values()))
        logits = next(o for o in outs if o.dim() == 3)  # [B, T, vocab]; the others are the updated caches
        assert logits.shape == (2, ids.shape[1], CFG["vocab_size"])
        if kv is not None:
            assert all(caches[n].dtype == (KV_DTYPES[kv] if "cache" in n else torch.float32) for n in caches)
        want = reference(model, inputs, kv)  # the caches now hold what the step wrote
        assert rel_err(logits[0], want[0]) <= TOL[torch.float32] and rel_err(logits[1, -1], want[1, -1]) <= TOL[torch.float32]


def test_all_logits_is_a_flag_off_by_default(model):
    caches = new_caches(spec("int8"), 2, torch.float32, "cpu")
    twin = {n: t.clone() for n, t in caches.items()}
    ids = torch.tensor([[5, 17, 3], [1, 2, 3]])
    args = [step_inputs(ids, torch.zeros(2, dtype=torch.long), 0, c, MAX_SEQ, None) for c in (caches, twin)]
    names = cache_names(CFG["num_hidden_layers"], "int8")
    with torch.no_grad():
        last = LlamaStep(model, "int8")(*(args[0][k] for k in ("input_ids", "positions", "slots", "mask")), tuple(caches[n] for n in names))
        every = LlamaStep(model, "int8", all_logits=True)(*(args[1][k] for k in ("input_ids", "positions", "slots", "mask")),
                                                           tuple(twin[n] for n in names))
    assert last.shape == (2, CFG["vocab_size"]) and every.shape == (2, 3, CFG["vocab_size"])
    assert rel_err(every[:, -1], last) <= TOL[torch.float32]  # (the same rows; the matmuls may block them differently)
    assert all(torch.equal(caches[n], twin[n]) for n in names)
    with pytest.raises(ValueError, match="KV-cache dtype"):
        LlamaStep(model, "int4")
