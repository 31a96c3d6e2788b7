"""The whole pipeline on real models: HF Llama-family decoders and diffusers' DiT get every fusion the
issue names, numbers stay within float32 tolerance of eager, the report says so, and any pass can be
switched off by name."""

import pytest
import torch
import transformers
from diffusers import DiTTransformer2DModel

import kiln
from kiln.ir.graph import Node
from kiln.passes.pipeline import PASS_NAMES
from kiln.testing import TOL, perturbed, rel_err

LLAMA = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
LLM_DIMS = {"input_ids": {0: "batch", 1: "seq"}}
DIT_DIMS = {k: {0: "batch"} for k in ("hidden_states", "timestep", "class_labels")}


def hf_llm(kind="Llama", attn="sdpa", **kw):
    torch.manual_seed(0)
    cfg = getattr(transformers, f"{kind}Config")(**{**LLAMA, **kw}, attn_implementation=attn)
    return perturbed(getattr(transformers, f"{kind}ForCausalLM")(cfg))


def ids(batch, seq, seed=1):
    return torch.randint(0, LLAMA["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def dit(tie=False, **kw):
    torch.manual_seed(0)
    cfg = dict(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=3, sample_size=8,
               patch_size=2, num_embeds_ada_norm=10)
    model = perturbed(DiTTransformer2DModel(**{**cfg, **kw}))
    if tie:  # as in real checkpoints converted to diffusers: every block holds a copy of one embedder
        state = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(state)
    return model


def dit_inputs(batch, size=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {"hidden_states": torch.randn(batch, 4, size, size, generator=g), "timestep": torch.randint(0, 1000, (batch,), generator=g),
            "class_labels": torch.randint(0, 10, (batch,), generator=g)}


def matmuls(graph):
    """The matmuls on weights (not e.g. RoPE's inv_freq @ positions, a MATMUL in some transformers versions)."""
    return [n for n in graph.nodes if n.op in ("LINEAR", "GEMM", "MATMUL") and n.inputs[1].op == "WEIGHT"]


def source(n: Node) -> Node:
    """Through slices / reshapes / permutes to the op that computed a value."""
    while n.op in ("SLICE", "RESHAPE", "PERMUTE", "ROPE"):
        n = n.inputs[0]
    return n


# ----------------------------------------------------------------------------- Llama family


@pytest.mark.parametrize("kind,attn", [("Llama", "sdpa"), ("Llama", "eager"), ("Mistral", "sdpa"), ("Qwen2", "eager")])
def test_llm_gets_every_fusion_and_keeps_its_numbers(kind, attn):
    model = hf_llm(kind, attn)
    m = kiln.compile(model, (ids(2, 7),), dynamic=LLM_DIMS)
    g, rep = m.graph, m.report().to_dict()
    layers = LLAMA["num_hidden_layers"]
    after = rep["ops_after"]
    # every RMSNorm fused (2 per layer + the final one), nothing of the decomposed form left
    assert after.get("RMSNORM") == 2 * layers + 1 and not {"POW", "RSQRT", "MEAN"} & set(after)
    # attention and RoPE fused: one ATTENTION (GQA on the un-repeated k/v) and two ROPE per layer
    assert after.get("ATTENTION") == layers and after.get("ROPE") == 2 * layers and "SOFTMAX" not in after
    attns = [n for n in g.nodes if n.op == "ATTENTION"]
    assert all(n.attrs["gqa"] for n in attns)
    # Q/K/V merged: q, k and v of each attention come from one matmul
    for a in attns:
        assert len({source(i) for i in a.inputs[:3]}) == 1, a
    # gate/up merged with the silu(gate) * up epilogue, o_proj / down_proj carry the residual add
    glu = [n for n in g.nodes if n.op == "GEMM" and n.attrs["glu"]]
    assert len(glu) == layers and all(n.attrs["act"] == "silu" for n in glu)
    assert sum(n.op == "GEMM" and n.attrs["residual"] for n in g.nodes) == 2 * layers
    assert len(matmuls(g)) == 4 * layers + 1  # qkv, o, gate/up, down per layer + lm_head
    assert rep["passes"]["fuse_horizontal_gemm"]["rewritten"] == 2 * layers
    # numbers: another batch and length than the capture
    for shape in [(1, 5), (3, 12)]:
        x = ids(*shape, seed=shape[1])
        with torch.no_grad():
            assert rel_err(m(x).logits, model(x).logits) <= TOL[torch.float32]


def test_kilns_own_llama_gets_the_same_fusions():
    from kiln.models.registry import get

    spec = get("llama-tiny")
    model = spec.build()
    m = kiln.compile(model, (), spec.example_inputs(batch=2), dynamic=spec.dynamic())
    after = m.report().ops_after
    cfg = spec.model_config()
    assert after.get("RMSNORM") == 2 * cfg.num_hidden_layers + 1 and after.get("ROPE") == 2 * cfg.num_hidden_layers
    assert sum(n.op == "GEMM" and n.attrs["glu"] for n in m.graph.nodes) == cfg.num_hidden_layers
    x = spec.example_inputs(batch=3, seed=5)
    with torch.no_grad():
        assert rel_err(m(**x), model(**x)) <= TOL[torch.float32]


# ----------------------------------------------------------------------------- DiT


@pytest.mark.parametrize("tie", [True, False], ids=["tied-embedder", "untied"])
def test_small_dit_keeps_its_numbers(tie):
    model = dit(tie)
    m = kiln.compile(model, (), dit_inputs(2), dynamic=DIT_DIMS)
    after = m.report().ops_after
    assert after.get("LAYERNORM_MODULATE") == 2 * 3 + 1 and "LAYERNORM" not in after
    for batch in (1, 4):
        x = dit_inputs(batch, seed=batch)
        with torch.no_grad():
            assert rel_err(m(**x).sample, model(**x).sample) <= TOL[torch.float32]


XL_HIDDEN = 16  # dit_xl's width


def _width_of_widest(graph) -> int:
    return max(n.inputs[1].shape[0] for n in matmuls(graph))


@pytest.fixture(scope="module")
def dit_xl():
    """DiT-XL/2's structure at 256x256 (latent 32): 28 layers, random weights, captured once per tying; 2 heads
    (hidden XL_HIDDEN, not XL's 1152: the passes' rewrites do not depend on the width, and the two compiles take a third of the time)."""
    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=XL_HIDDEN // 2, in_channels=4, out_channels=8, num_layers=28,
                                  sample_size=32, patch_size=2, num_embeds_ada_norm=1000).eval()
    x = dit_inputs(2, size=32)
    untied = kiln.compile(model, (), x, dynamic=DIT_DIMS, config=kiln.CompileConfig(verify=False))
    state = model.transformer_blocks[0].norm1.emb.state_dict()
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(state)
    tied = kiln.compile(model, (), x, dynamic=DIT_DIMS, config=kiln.CompileConfig(verify=False))
    return {"tied": tied, "untied": untied}


def test_dit_xl_tied_embedder_is_computed_once_and_adaln_is_one_gemm(dit_xl):
    m = dit_xl["tied"]
    before, after = m.report().ops_before, m.report().ops_after
    assert before["SIN"] == 29 and after["SIN"] == 1 and after["COS"] == 1  # one sinusoidal projection instead of 28 (+1 for the final layer)
    assert before["EMBEDDING"] == 29 and after["EMBEDDING"] == 1  # one class-embedding lookup (the final layer reuses block 0's)
    emb_mlp = [n for n in matmuls(m.graph) if n.inputs[1].shape == (XL_HIDDEN, 256)]
    assert len(emb_mlp) == 1  # one timestep MLP instead of 28
    # the 28 adaLN projections (6 x hidden each) read one conditioning vector: one GEMM (with the final layer's)
    assert _width_of_widest(m.graph) >= 28 * 6 * XL_HIDDEN
    assert after["LAYERNORM_MODULATE"] == 2 * 28 + 1 and "LAYERNORM" not in after  # every LayerNorm + modulate
    assert after["ATTENTION"] == 28


def test_dit_xl_untied_shares_the_projection_and_merges_the_timestep_layers(dit_xl):
    m = dit_xl["untied"]
    after = m.report().ops_after
    assert after["SIN"] == 1 and after["COS"] == 1
    first_layers = [n for n in matmuls(m.graph) if n.inputs[1].shape[1] == 256]  # timestep_embedder.linear_1: 256 -> hidden
    assert len(first_layers) == 1 and first_layers[0].inputs[1].shape[0] == 28 * XL_HIDDEN
    assert after["LAYERNORM_MODULATE"] == 2 * 28 + 1


# ----------------------------------------------------------------------------- switching passes off


FUSED_BY = {  # pass -> what its absence leaves visible in the Llama graph
    "fuse_norm": lambda ops, g: "RMSNORM" not in ops and "RSQRT" in ops,
    "fuse_attention": lambda ops, g: "ROPE" not in ops,
    "fuse_horizontal_gemm": lambda ops, g: len(matmuls(g)) == 7 * 2 + 1,
    "fuse_epilogue": lambda ops, g: "GEMM" not in ops,
    "cse": lambda ops, g: len({n.attrs["name"] for n in g.nodes if n.op == "WEIGHT" and "norm" in n.attrs["name"]}) == 5,
}


@pytest.mark.parametrize("name", list(FUSED_BY))
def test_a_disabled_pass_provably_does_nothing(name):
    model = hf_llm()
    with torch.no_grad():
        for mod in model.modules():  # equal norm weights, so cse has something to merge when it runs
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.fill_(1.5)
    m = kiln.compile(model, (ids(2, 7),), dynamic=LLM_DIMS, config=kiln.CompileConfig(disable=[name]))
    rep = m.report().to_dict()
    assert rep["passes"][name]["enabled"] is False and rep["passes"][name]["rewritten"] == 0
    assert FUSED_BY[name](rep["ops_after"], m.graph)
    assert all(p["enabled"] for n, p in rep["passes"].items() if n != name)
    with torch.no_grad():
        x = ids(2, 9)
        assert rel_err(m(x).logits, model(x).logits) <= TOL[torch.float32]


def test_every_pass_is_in_the_report_in_pipeline_order():
    m = kiln.compile(hf_llm(), (ids(2, 7),), dynamic=LLM_DIMS)
    assert tuple(m.report().to_dict()["passes"]) == PASS_NAMES
