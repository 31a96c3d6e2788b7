"""passes.fuse_horizontal_gemm: N GEMMs on one input -> one GEMM on concatenated weights + one SLICE each.

Four checks per case: sites fired, op counts before/after, float64 parity before vs after (reference
interpreter), and cases where it must not fire. Then the real graphs: HF Llama (Q/K/V, gate/up) and
diffusers DiT (Q/K/V per block; the timestep-MLP first layers once they read one shared projection)."""

import pytest
import torch

from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.serialize import graph_from_json, graph_to_json
from kiln.ir.types import sym
from kiln.passes.fuse_horizontal_gemm import fuse_horizontal_gemm
from kiln.testing import TOL, rel_err

import kiln

NO_PASSES = kiln.CompileConfig(disable=("fuse_epilogue", "fuse_horizontal_gemm", "cse", "fold_norm_weight"))  # the test runs the pass itself

SEQ = sym("seq")


def copy(g: Graph) -> Graph:
    return graph_from_json(graph_to_json(g), weights=dict(g.weights))


def rand(*shape, seed=[0]):
    seed[0] += 1
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed[0]), dtype=torch.float64)


def new_graph(hidden=8) -> tuple[Graph, object]:
    g = Graph()
    g.symbols = {"seq": (1, 64)}
    return g, g.add_input("x", (2, SEQ, hidden), "float64")


def linear(g, x, name, out, bias=True, in_features=None):
    w = g.add_weight(f"{name}.weight", rand(out, in_features or x.shape[-1]))
    b = [g.add_weight(f"{name}.bias", rand(out))] if bias else []
    return g.add("LINEAR", [x, w, *b])


def run_pass(g: Graph):
    """(stats, before histogram, after histogram) with float64 parity of before vs after checked."""
    before = copy(g)
    stats = fuse_horizontal_gemm(g)
    g.verify()
    inputs = [rand(*[5 if not isinstance(d, int) else d for d in i.shape]) for i in g.inputs]
    for got, want in zip(interpret(g, inputs, compute_dtype=torch.float64), interpret(before, inputs, compute_dtype=torch.float64)):
        assert rel_err(got, want) <= TOL[torch.float64]
    return stats, before.histogram(), g.histogram()


def reasons(stats) -> list[str]:
    return [d["reason"].split(":")[0].split(" (")[0] for d in stats.declined]


# ----------------------------------------------------------------------------- synthetic graphs


def test_qkv_different_widths_keep_graph_order():
    g, x = new_graph()
    q, k, v = linear(g, x, "attn.q_proj", 8), linear(g, x, "attn.k_proj", 4), linear(g, x, "attn.v_proj", 4)
    g.set_outputs([g.add("MUL", [q, q]), k, v], ["qq", "k", "v"])
    stats, before, after = run_pass(g)
    assert stats.rewritten == 1 and stats.declined == []
    assert before == {"LINEAR": 3, "MUL": 1} and after == {"LINEAR": 1, "SLICE": 3, "MUL": 1}
    fused = next(n for n in g.nodes if n.op == "LINEAR")
    assert fused.inputs[1].attrs["name"] == "attn.q_proj+k_proj+v_proj.weight" and fused.inputs[1].shape == (16, 8)
    assert fused.inputs[2].attrs["name"] == "attn.q_proj+k_proj+v_proj.bias"
    assert [(s.attrs["start"], s.attrs["end"], s.attrs["axis"]) for s in fused.users] == [(0, 8, 2), (8, 12, 2), (12, 16, 2)]
    assert "attn.q_proj.weight" not in g.weights  # the originals are gone with their GEMMs


def test_gate_up_keeps_silu_slice0_times_slice1():
    g, x = new_graph()
    gate, up = linear(g, x, "mlp.gate_proj", 12, bias=False), linear(g, x, "mlp.up_proj", 12, bias=False)
    g.set_outputs([g.add("MUL", [g.add("SILU", [gate]), up])], ["y"])
    stats, before, after = run_pass(g)
    assert stats.rewritten == 1
    assert before == {"LINEAR": 2, "SILU": 1, "MUL": 1} and after == {"LINEAR": 1, "SLICE": 2, "SILU": 1, "MUL": 1}
    silu = next(n for n in g.nodes if n.op == "SILU")
    mul = g.outputs[0]
    assert silu.inputs[0].op == "SLICE" and silu.inputs[0].attrs["start"] == 0 and mul.inputs[1].attrs["start"] == 12
    fused = silu.inputs[0].inputs[0]
    assert len(fused.inputs) == 2 and fused.inputs[1].attrs["name"] == "mlp.gate_proj+up_proj.weight"


def test_mixed_bias_and_matmul_join_one_gemm():
    """A bias-free LINEAR gets a zero bias; MATMUL(x, W[in, out]) joins with W transposed at compile time."""
    g, x = new_graph()
    a = linear(g, x, "a", 5)
    b = linear(g, x, "b", 3, bias=False)
    c = g.add("MATMUL", [x, g.add_weight("c.weight", rand(8, 6))])
    g.set_outputs([a, b, c], ["a", "b", "c"])
    stats, before, after = run_pass(g)
    assert stats.rewritten == 1
    assert before == {"LINEAR": 2, "MATMUL": 1} and after == {"LINEAR": 1, "SLICE": 3}
    fused = g.outputs[0].inputs[0]
    assert fused.inputs[1].shape == (14, 8) and fused.inputs[2].shape == (14,)
    assert torch.equal(g.weights[fused.inputs[2].attrs["name"]][5:], torch.zeros(9, dtype=torch.float64))


def test_many_consumers_one_gemm_per_input():
    """DiT after CSE, shape-alike: one conditioning vector read by 28 adaLN projections (+ the final
    layer's), and one sinusoidal projection read by every block's timestep-MLP first layer."""
    g = Graph()
    t = g.add_input("t_freq", (3, 8), "float64")
    c = g.add("SILU", [g.add_input("c", (3, 8), "float64")])
    outs = []
    for i in range(28):
        h = g.add("SILU", [linear(g, t, f"blocks.{i}.norm1.emb.timestep_embedder.linear_1", 8)])
        outs += [linear(g, h, f"blocks.{i}.norm1.emb.timestep_embedder.linear_2", 8), linear(g, c, f"blocks.{i}.norm1.linear", 6 * 8)]
    outs.append(linear(g, c, "proj_out_1", 2 * 8))
    g.set_outputs(outs)
    stats, before, after = run_pass(g)
    assert stats.rewritten == 2
    assert reasons(stats) == ["single consumer"] * 28  # the linear_2 layers each read their own SILU
    assert before["LINEAR"] == 28 * 3 + 1 and after["LINEAR"] == 28 + 2 and after["SLICE"] == 28 * 2 + 1
    widths = sorted(n.shape[-1] for n in g.nodes if n.op == "LINEAR" and n.inputs[0] in (t, c))
    assert widths == [28 * 8, 28 * 6 * 8 + 2 * 8]
    assert "blocks.0..27(28).norm1.emb.timestep_embedder.linear_1.weight" in g.weights


def test_no_width_cap_dit_xl_adaln():
    """DiT-XL/2: 28 projections 1152 -> 6 * 1152 into one GEMM of width 193536 (in-features kept small here)."""
    g = Graph()
    c = g.add_input("c", (2, 4), "float64")
    g.set_outputs([linear(g, c, f"transformer_blocks.{i}.norm1.linear", 6 * 1152) for i in range(28)])
    stats, before, after = run_pass(g)
    assert stats.rewritten == 1 and after == {"LINEAR": 1, "SLICE": 28}
    assert next(n for n in g.nodes if n.op == "LINEAR").shape == (2, 28 * 6 * 1152)


# ----------------------------------------------------------------------------- must not fire


def test_single_consumer_and_dependent_chain():
    """x -> L1 -> L2: L2 reads L1's output, not x; each GEMM is alone on its input."""
    g, x = new_graph()
    l1 = linear(g, x, "l1", 8)
    l2 = linear(g, l1, "l2", 8)
    g.set_outputs([l2])
    stats, before, after = run_pass(g)
    assert stats.rewritten == 0 and before == after == {"LINEAR": 2}
    assert reasons(stats) == ["single consumer"] * 2


def test_input_that_depends_on_another_candidate_is_not_merged():
    """L1(x), L2(x), L3(x') with x' = f(L1(x)): L1 and L2 merge; L3 must stay apart (merging it would
    make the GEMM read its own output) and the graph stays acyclic."""
    g, x = new_graph()
    l1, l2 = linear(g, x, "l1", 8), linear(g, x, "l2", 8)
    x2 = g.add("ADD", [x, g.add("SILU", [l1])])
    l3 = linear(g, x2, "l3", 8, in_features=8)
    g.set_outputs([l2, l3])
    stats, before, after = run_pass(g)
    assert stats.rewritten == 1
    assert before == {"LINEAR": 3, "SILU": 1, "ADD": 1} and after == {"LINEAR": 2, "SLICE": 2, "SILU": 1, "ADD": 1}
    assert g.outputs[1].op == "LINEAR" and g.outputs[1].inputs[0].op == "ADD"
    g.toposort()  # raises on a cycle


def test_cycle_guard_backs_up_the_stored_weight_rule(monkeypatch):
    """L1(x) and L2(x, W2) with W2 = f(L1(x)): the stored-weight rule already declines L2; with that rule
    switched off, the reachability guard must still refuse to merge them (the merged GEMM would read its own output)."""
    import kiln.passes.fuse_horizontal_gemm as mod

    monkeypatch.setattr(mod, "_why_not", lambda graph, n: None)
    g, x = new_graph()
    l1 = linear(g, x, "l1", 8)
    w2 = g.add("MEAN", [g.add("MATMUL", [g.add("PERMUTE", [l1], perm=(0, 2, 1)), l1])], axes=(0,), keepdim=False)  # [8, 8] from L1
    l2 = g.add("LINEAR", [x, w2])
    g.set_outputs([l2])
    stats, before, after = run_pass(g)
    assert stats.rewritten == 0 and before == after
    assert [(d["reason"].split(":")[0], d["node"]) for d in stats.declined] == [("would create a cycle", l1.name)]


def test_computed_weight_is_declined():
    """A weight computed at run time (x-dependent, or not a WEIGHT node) cannot be concatenated at compile time."""
    g, x = new_graph()
    stored = linear(g, x, "stored", 8)
    w = g.add("MUL", [g.add_weight("w", rand(8, 8)), g.add("MEAN", [x], axes=(0, 1, 2), keepdim=False)])
    computed = g.add("LINEAR", [x, w])
    computed_bias = g.add("LINEAR", [x, g.add_weight("w2", rand(8, 8)), g.add("EXP", [g.add_weight("b2", rand(8))])])
    g.set_outputs([stored, computed, computed_bias])
    stats, before, after = run_pass(g)
    assert stats.rewritten == 0 and before == after
    assert reasons(stats) == ["weight is computed", "bias is computed", "no other GEMM on this input can join it"]


def test_mixed_dtypes_are_not_merged():
    """A float32 and a float16 GEMM never share an input node (LINEAR's operands share one dtype), so
    the float16 branch through a CAST of x stays its own GEMM."""
    g = Graph()
    x = g.add_input("x", (3, 8), "float32")
    w32 = g.add_weight("a.weight", torch.randn(4, 8))
    w16 = g.add_weight("b.weight", torch.randn(4, 8).half())
    a = g.add("LINEAR", [x, w32])
    b = g.add("LINEAR", [g.add("CAST", [x], dtype="float16"), w16])
    g.set_outputs([a, b])
    stats = fuse_horizontal_gemm(g)
    g.verify()
    assert stats.rewritten == 0 and g.histogram() == {"LINEAR": 2, "CAST": 1}


def test_fused_weight_name_does_not_collide():
    g, x = new_graph()
    g.add_weight("p.a+b.weight", rand(3, 3))  # an unrelated weight already holds the natural name
    y = [linear(g, x, "p.a", 4, bias=False), linear(g, x, "p.b", 4, bias=False)]
    g.set_outputs(y + [g.add("MATMUL", [g.add_input("z", (3, 3), "float64"), g.add_weight("p.a+b.weight", None)])])
    stats, _, _ = run_pass(g)
    assert stats.rewritten == 1 and "p.a+b.weight_2" in g.weights


# ----------------------------------------------------------------------------- models


def _hf_llama(**kw):
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, attn_implementation="sdpa", **kw)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # HF zero-inits biases and ones-inits norms: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _rerun(compiled):
    """A fresh executor on the rewritten graph (the compiled one planned the graph before the pass)."""
    from kiln.api import CompiledModel

    return CompiledModel(compiled.graph, compiled.signature, compiled.config, compiled.report())


@pytest.mark.parametrize("kw", [{}, dict(attention_bias=True, mlp_bias=True)], ids=["llama", "llama-bias"])
@torch.no_grad()
def test_hf_llama_qkv_and_gate_up(kw):
    import kiln

    hf = _hf_llama(**kw)
    ids = torch.randint(0, 128, (2, 11), generator=torch.Generator().manual_seed(1))
    compiled = kiln.compile(hf, (ids,), dynamic={"input_ids": {0: "batch", 1: "seq"}}, config=NO_PASSES)
    g = compiled.graph
    assert g.histogram()["LINEAR"] == 7 * 2 + 1
    stats = fuse_horizontal_gemm(g)
    g.verify()
    assert stats.rewritten == 2 * 2  # per layer: q/k/v and gate/up
    assert g.histogram()["LINEAR"] == 4 * 2 + 1
    assert reasons(stats) == ["single consumer"] * (2 * 2 + 1)  # o_proj, down_proj per layer; lm_head
    fused = {n.inputs[1].attrs["name"]: n for n in g.nodes if n.op == "LINEAR" and "+" in n.inputs[1].attrs["name"]}
    names = ("self_attn.q_proj+k_proj+v_proj.weight", "mlp.gate_proj+up_proj.weight")
    assert set(fused) == {f"model.layers.{i}.{s}" for i in range(2) for s in names}
    assert fused["model.layers.0.self_attn.q_proj+k_proj+v_proj.weight"].shape[-1] == 64 + 2 * 32
    assert all((len(n.inputs) == 3) == bool(kw) for n in fused.values())
    for silu in (n for n in g.nodes if n.op == "SILU"):  # silu(gate) reads slice 0 of the gate/up GEMM
        assert silu.inputs[0].op == "SLICE" and silu.inputs[0].attrs["start"] == 0
    assert rel_err(_rerun(compiled)(ids).logits, hf(ids).logits) <= TOL[torch.float32]


def _dit_compiled():
    import kiln
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    with torch.no_grad():  # ada_norm_zero zero-inits adaLN and output projections: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    g = torch.Generator().manual_seed(1)
    x = dict(hidden_states=torch.randn(3, 4, 8, 8, generator=g), timestep=torch.tensor([3, 500, 999]), class_labels=torch.tensor([1, 10, 4]))
    compiled = kiln.compile(model, (), x, dynamic={k: {0: "batch"} for k in x}, config=NO_PASSES)
    return model, x, compiled


def _weight_of(n) -> str:
    return n.inputs[1].attrs["name"]


@torch.no_grad()
def test_diffusers_dit():
    """Without CSE each block computes its own timestep projection and conditioning vector: only the
    attention Q/K/V of each block share an input. With the projections shared (what CSE does), every
    block's timestep-MLP first layer (and the final layer's recomputation of block 0's) joins one GEMM."""
    model, x, compiled = _dit_compiled()
    g = compiled.graph
    assert g.histogram()["LINEAR"] == 22
    stats = fuse_horizontal_gemm(g)
    g.verify()
    assert stats.rewritten == 2 and g.histogram()["LINEAR"] == 22 - 2 * 2
    assert {_weight_of(n) for n in g.nodes if n.op == "LINEAR" and "+" in _weight_of(n)} == \
        {f"transformer_blocks.{i}.attn1.to_q+to_k+to_v.weight" for i in range(2)}
    want = model(**x).sample
    assert rel_err(_rerun(compiled)(**x).sample, want) <= TOL[torch.float32]

    # what CSE will do: the per-block copies of the sinusoidal projection are one value; read the first
    lin1 = [n for n in g.nodes if n.op == "LINEAR" and _weight_of(n).endswith("timestep_embedder.linear_1.weight")]
    assert len(lin1) == 3 and len({n.inputs[0] for n in lin1}) == 3
    for n in lin1[1:]:
        g.set_input(n, 0, lin1[0].inputs[0])
    g.remove_dead()
    stats = fuse_horizontal_gemm(g)
    g.verify()
    assert stats.rewritten == 1 and g.histogram()["LINEAR"] == 18 - 2
    merged = next(n for n in g.nodes if n.op == "LINEAR" and "timestep_embedder.linear_1" in _weight_of(n))
    assert merged.shape[-1] == 3 * 16 and len(merged.users) == 3
    assert rel_err(_rerun(compiled)(**x).sample, want) <= TOL[torch.float32]
