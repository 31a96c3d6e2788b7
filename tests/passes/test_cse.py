"""kiln.passes.cse: repeated subgraphs collapse (commutative operands in either order), weights equal by
content merge under one name, equal constants merge; and what must stay apart. Then diffusers' DiT: after
fold_constants + cse the sinusoidal timestep projection is computed once, and with the per-block copies of
the embedder tied (as in converted checkpoints) the embedding MLP is computed once too."""

import pytest
import torch
from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.serialize import graph_from_json, graph_to_json
from kiln.ir.types import sym
from kiln.passes.cse import cse
from kiln.testing import TOL, rel_err

SEQ = sym("seq")


def copy(g: Graph) -> Graph:
    return graph_from_json(graph_to_json(g), dict(g.weights))


def assert_same(before: Graph, after: Graph, *inputs):
    for want, got in zip(interpret(before, list(inputs), compute_dtype=torch.float64),
                         interpret(after, list(inputs), compute_dtype=torch.float64)):
        assert rel_err(got, want) <= TOL[torch.float64]


def run_cse(g: Graph):
    before = copy(g)
    stats = cse(g)
    g.verify()
    return stats, before


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def block(g, x, w1, w2, scale):
    """LINEAR -> SILU -> LINEAR, scaled by sin(x[:, :1] * 0.5): one 'layer' as a model repeats it."""
    h = g.add("LINEAR", [g.add("SILU", [g.add("LINEAR", [x, w1])]), w2])
    t = g.add("SIN", [g.add("MUL", [g.add("SLICE", [x], axis=1, start=0, end=1), g.const(scale)])])
    return g.add("MUL", [h, t])


def test_repeated_subgraphs_collapse():
    g = Graph()
    g.symbols = {"seq": (1, 64)}
    x = g.add_input("x", (SEQ, 6), "float64")
    w1, w2 = g.add_weight("w1", rnd(10, 6)), g.add_weight("w2", rnd(6, 10, seed=1))
    a, b = block(g, x, w1, w2, 0.5), block(g, x, w1, w2, 0.5)
    g.set_outputs([g.add("ADD", [a, b])])
    stats, before = run_cse(g)
    assert stats.rewritten == 8  # the second block's 7 nodes and its CONST
    assert before.histogram() == {"LINEAR": 4, "MUL": 4, "SILU": 2, "SLICE": 2, "SIN": 2, "ADD": 1}
    assert g.histogram() == {"LINEAR": 2, "MUL": 2, "SILU": 1, "SLICE": 1, "SIN": 1, "ADD": 1}
    out = g.outputs[0]
    assert out.inputs[0] is out.inputs[1]
    assert_same(before, g, rnd(5, 6, seed=2))


def test_weights_equal_by_content_merge():
    g = Graph()
    x = g.add_input("x", (3, 6), "float64")
    w = rnd(10, 6)
    copies = [g.add_weight(f"blocks.{i}.emb.weight", w.clone()) for i in range(4)]
    other = g.add_weight("other.weight", w + 1e-12)  # almost the same: stays apart
    twin = g.add_weight("blocks.0.emb.weight_f32", w.float())  # same values, other dtype: stays apart
    outs = [g.add("LINEAR", [x, c]) for c in copies] + [g.add("LINEAR", [x, other])]
    g.set_outputs(outs + [g.add("LINEAR", [g.add("CAST", [x], dtype="float32"), twin])])
    stats, before = run_cse(g)
    assert stats.rewritten == 6  # 3 weights, 3 LINEARs
    merged = "blocks.1.emb.weight, blocks.2.emb.weight, blocks.3.emb.weight"
    assert stats.notes == [f"weight blocks.0.emb.weight has the contents of 3 other(s), merged: {merged}"]
    assert set(g.weights) == {"blocks.0.emb.weight", "other.weight", "blocks.0.emb.weight_f32"}
    assert before.histogram() == {"LINEAR": 6, "CAST": 1} and g.histogram() == {"LINEAR": 3, "CAST": 1}
    assert len(set(g.outputs)) == 3
    assert_same(before, g, rnd(3, 6, seed=3))


def test_commutative_operands_match_swapped():
    g = Graph()
    x, y = g.add_input("x", (4,), "float64"), g.add_input("y", (4,), "float64")
    outs = [g.add("ADD", [x, y]), g.add("ADD", [y, x]), g.add("MUL", [y, x]), g.add("MUL", [x, y]),
            g.add("SUB", [x, y]), g.add("SUB", [y, x]), g.add("DIV", [x, y]), g.add("DIV", [y, x])]
    g.set_outputs(outs)
    stats, before = run_cse(g)
    assert stats.rewritten == 2
    assert g.histogram() == {"ADD": 1, "MUL": 1, "SUB": 2, "DIV": 2}
    assert g.outputs[0] is g.outputs[1] and g.outputs[2] is g.outputs[3]
    assert_same(before, g, rnd(4), rnd(4, seed=1))


def test_constants_merge_by_value_and_dtype():
    g = Graph()
    x = g.add_input("x", (4,), "float64")
    cs = [g.const(2.0), g.const(2.0), g.const(2), g.const(0.0), g.const(-0.0), g.const(True), g.const(1)]
    g.set_outputs([g.add("MUL", [x, c]) for c in cs])
    stats, before = run_cse(g)
    assert stats.rewritten == 2  # the second CONST(2.0), then the MUL reading it
    assert sum(n.op == "CONST" for n in g.nodes) == 6 and g.histogram() == {"MUL": 6}
    assert_same(before, g, rnd(4))


def test_different_attrs_and_inputs_stay_apart():
    g = Graph()
    x = g.add_input("x", (4, 4), "float64")
    x2 = g.add_input("x2", (4, 4), "float64")  # same type, another input: never merged
    outs = [g.add("SOFTMAX", [x], axis=0), g.add("SOFTMAX", [x], axis=1),
            g.add("SLICE", [x], axis=0, start=0, end=2), g.add("SLICE", [x], axis=1, start=0, end=2),
            g.add("CLAMP", [x], min=0.0), g.add("CLAMP", [x], min=-0.0),
            g.add("NEG", [x]), g.add("NEG", [x2])]
    g.set_outputs(outs)
    stats, before = run_cse(g)
    assert stats.rewritten == 0 and g.histogram() == before.histogram()
    assert len(g.inputs) == 2


# ----------------------------------------------------------------------------- diffusers DiT


DIT = {"num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "num_layers": 3, "sample_size": 8,
       "patch_size": 2, "num_embeds_ada_norm": 10}


def dit_graph(tied: bool):
    """Capture a tiny diffusers DiT with no pass run; returns (model, inputs, graph)."""
    import kiln
    from diffusers import DiTTransformer2DModel
    from kiln.config import CompileConfig
    from kiln.passes.pipeline import PASS_NAMES

    torch.manual_seed(0)
    model = DiTTransformer2DModel(**DIT).eval()
    with torch.no_grad():  # ada_norm_zero zero-inits adaLN and output projections: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        if tied:  # as in DiT checkpoints converted to diffusers: every block holds a copy of one embedder
            emb = model.transformer_blocks[0].norm1.emb.state_dict()
            for blk in model.transformer_blocks[1:]:
                blk.norm1.emb.load_state_dict(emb)
    g = torch.Generator().manual_seed(1)
    x = {"hidden_states": torch.randn(2, 4, 8, 8, generator=g), "timestep": torch.tensor([3, 999]),
         "class_labels": torch.tensor([1, 10])}
    dyn = {k: {0: "batch"} for k in x}
    compiled = kiln.compile(model, (), x, dynamic=dyn, config=CompileConfig(disable=PASS_NAMES))
    return model, x, compiled.graph


def optimize(graph: Graph):
    from kiln.passes.dce import dce
    from kiln.passes.fold_constants import fold_constants

    for p in (dce, fold_constants, cse):
        p(graph)
        graph.toposort()
        graph.verify()


def linears_of(graph: Graph, suffix: str):
    return [n for n in graph.nodes if n.op == "LINEAR" and n.inputs[1].attrs["name"].endswith(suffix)]


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def dit(request):
    model, x, graph = dit_graph(request.param)
    before = graph.histogram()
    optimize(graph)
    return request.param, model, x, before, graph


def test_dit_timestep_embedding_is_computed_once(dit):
    tied, _, _, before, g = dit
    layers = DIT["num_layers"]
    after = g.histogram()
    # diffusers computes the embedding in every block and once more for the output layer
    assert before["SIN"] == before["COS"] == before["EMBEDDING"] == layers + 1
    assert after["SIN"] == after["COS"] == 1
    # the timestep-MLP first layers all read the one sinusoidal projection
    first = linears_of(g, "timestep_embedder.linear_1.weight")
    assert len({n.inputs[0] for n in first}) == 1
    adaln = linears_of(g, "norm1.linear.weight")
    assert len(adaln) == layers
    per_block = 7 * layers + 2  # q, k, v, out, ff x2, adaLN; proj_out x2
    if tied:
        assert len(first) == 1 and after["EMBEDDING"] == 1
        assert after["LINEAR"] == per_block + 2
        assert len({n.inputs[0] for n in adaln}) == 1 and adaln[0].inputs[0].op == "SILU"  # one shared silu(emb)
    else:
        assert len(first) == layers and after["EMBEDDING"] == layers
        assert after["LINEAR"] == per_block + 2 * layers


def test_dit_optimized_graph_matches_eager(dit):
    _, model, x, _, g = dit
    with torch.no_grad():
        want = model(**x).sample
    got = interpret(g, [x["hidden_states"], x["timestep"], x["class_labels"]])[0]
    assert rel_err(got, want) <= TOL[torch.float32]
