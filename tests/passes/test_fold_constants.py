"""kiln.passes.fold_constants: weight-only subgraphs become new weights, no-op casts / reshapes / permutes /
expands / slices disappear, chains collapse; and what must stay (symbolic sizes, huge folds, inexact casts)."""

import torch
from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.serialize import graph_from_json, graph_to_json
from kiln.ir.types import sym
from kiln.passes.fold_constants import fold_constants
from kiln.testing import TOL, rel_err

BATCH = sym("batch")


def copy(g: Graph) -> Graph:
    return graph_from_json(graph_to_json(g), dict(g.weights))


def run64(g: Graph, *inputs) -> list[torch.Tensor]:
    return interpret(g, list(inputs), compute_dtype=torch.float64)


def assert_same(before: Graph, after: Graph, *inputs):
    for want, got in zip(run64(before, *inputs), run64(after, *inputs)):
        assert rel_err(got, want) <= TOL[torch.float64]


def fold(g: Graph):
    """Run the pass on ``g``; returns (stats, the graph as it was before)."""
    before = copy(g)
    stats = fold_constants(g)
    g.verify()
    return stats, before


def rnd(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed + len(shape))).to(dtype)


# ----------------------------------------------------------------------------- weight-only subgraphs


def test_weight_only_subgraphs_become_weights():
    g = Graph()
    g.symbols = {"batch": (1, 64)}
    x = g.add_input("x", (BATCH, 8), "float64")
    w = g.add_weight("proj.weight", rnd(16, 8))
    wq, wk = g.add_weight("attn.q.weight", rnd(8, 8, seed=1)), g.add_weight("attn.k.weight", rnd(4, 8, seed=2))
    scale = g.add_weight("norm.scale", rnd(16, seed=3))
    y = g.add("MATMUL", [x, g.add("PERMUTE", [w], perm=(1, 0))])  # x @ w^T
    y = g.add("MUL", [y, g.add("ADD", [g.const(1.0), scale])])  # * (1 + scale)
    qk = g.add("LINEAR", [x, g.add("CONCAT", [wq, wk], axis=0)])
    freqs = g.add("EXP", [g.add("MUL", [g.add("ARANGE", end=12, dtype="float64"), g.const(-0.25)])])
    qk = g.add("MUL", [qk, freqs])
    g.set_outputs([y, qk], ["y", "qk"])

    stats, before = fold(g)
    assert stats.rewritten == 4 and stats.declined == []
    assert before.histogram() == {"MUL": 3, "PERMUTE": 1, "MATMUL": 1, "ADD": 1, "LINEAR": 1, "CONCAT": 1, "EXP": 1, "ARANGE": 1}
    assert g.histogram() == {"MATMUL": 1, "MUL": 2, "LINEAR": 1}
    # readable names; the weights they came from are gone (nothing else reads them)
    assert {"proj.weight.permute", "norm.scale.add", "attn.concat"} <= set(g.weights)
    assert not {"proj.weight", "attn.q.weight", "norm.scale"} & set(g.weights)
    torch.testing.assert_close(g.weights["proj.weight.permute"], before.weights["proj.weight"].T, rtol=0, atol=0)
    assert g.weights["proj.weight.permute"].is_contiguous()
    assert_same(before, g, rnd(5, 8, seed=9))


def test_a_rank0_fold_is_a_const():
    g = Graph()
    x = g.add_input("x", (3,), "float64")
    s = g.add("MUL", [g.add("ADD", [g.const(2), g.const(3)]), g.const(0.5)])  # (2 + 3) * 0.5
    g.set_outputs([g.add("MUL", [x, s])])
    stats, before = fold(g)
    assert stats.rewritten == 1
    c = g.outputs[0].inputs[1]
    assert (c.op, c.attrs["value"]) == ("CONST", 2.5)
    assert before.histogram() == {"MUL": 2, "ADD": 1} and g.histogram() == {"MUL": 1}
    assert_same(before, g, rnd(3))


def test_a_huge_fold_is_declined_and_what_is_below_it_folds():
    g = Graph()
    x = g.add_input("x", (1024, 1024), "float32")
    w = g.add_weight("bias", torch.randn(1024, 1))
    wide = g.add("EXPAND", [g.add("PERMUTE", [w], perm=(1, 0))], shape=(1024, 1024))  # 4 KiB -> 4 MiB
    g.set_outputs([g.add("ADD", [x, wide])])
    stats, before = fold(g)
    assert stats.rewritten == 1  # the PERMUTE, not the EXPAND
    assert [d["reason"] for d in stats.declined] == ["folding would make a 4194304-byte tensor from 4096 bytes of weights"]
    assert stats.declined[0]["node"] == wide.name
    assert before.histogram() == {"PERMUTE": 1, "EXPAND": 1, "ADD": 1}
    assert g.histogram() == {"EXPAND": 1, "ADD": 1}
    assert_same(before, g, torch.randn(1024, 1024))


def test_symbolic_sizes_are_not_folded():
    g = Graph()
    g.symbols = {"batch": (1, 64)}
    x = g.add_input("x", (BATCH,), "float64")
    pos = g.add("MUL", [g.add("ARANGE", end=BATCH, dtype="float64"), g.const(2.0)])
    ones = g.add("FULL", shape=(BATCH,), value=1.0, dtype="float64")
    n = g.add("CAST", [g.add("ADD", [g.const(BATCH), g.const(1)])], dtype="float64")  # batch + 1: a per-call value
    g.set_outputs([g.add("ADD", [g.add("ADD", [g.add("MUL", [x, pos]), ones]), n])])
    stats, before = fold(g)
    assert stats.rewritten == 0 and stats.declined == []
    assert g.histogram() == before.histogram()
    assert_same(before, g, rnd(7))


# ----------------------------------------------------------------------------- no-ops and chains


def test_no_ops_are_removed():
    g = Graph()
    g.symbols = {"batch": (1, 64)}
    x = g.add_input("x", (BATCH, 4, 6), "float64")
    ys = [g.add("CAST", [x], dtype="float64"),
          g.add("RESHAPE", [x], shape=(BATCH, 4, 6)),
          g.add("PERMUTE", [x], perm=(0, 1, 2)),
          g.add("EXPAND", [x], shape=(BATCH, 4, 6)),
          g.add("SLICE", [x], axis=2, start=0, end=6),
          g.add("SLICE", [x], axis=0, start=0, end=BATCH)]  # the whole of a symbolic dim
    g.set_outputs(ys)
    stats, before = fold(g)
    assert stats.rewritten == 6
    assert len(before.histogram()) == 5 and g.histogram() == {}
    assert all(o is x for o in g.outputs)
    assert_same(before, g, rnd(3, 4, 6))


def test_chains_collapse():
    g = Graph()
    g.symbols = {"batch": (1, 64)}
    x = g.add_input("x", (BATCH, 4, 6), "float32")
    r = g.add("RESHAPE", [g.add("RESHAPE", [g.add("RESHAPE", [x], shape=(BATCH, 24))], shape=(BATCH, 2, 12))],
              shape=(BATCH, 3, 8))
    p = g.add("PERMUTE", [g.add("PERMUTE", [x], perm=(0, 2, 1))], perm=(2, 0, 1))  # [4, batch, 6]
    back = g.add("PERMUTE", [g.add("PERMUTE", [x], perm=(0, 2, 1))], perm=(0, 2, 1))  # x again
    round_trip = g.add("CAST", [g.add("CAST", [x], dtype="float64")], dtype="float32")  # exact: x again
    widen = g.add("CAST", [g.add("CAST", [g.add("CAST", [x], dtype="float16")], dtype="float32")], dtype="float64")
    e = g.add("EXPAND", [g.add("EXPAND", [g.add("RESHAPE", [x], shape=(1, BATCH, 4, 6))], shape=(2, BATCH, 4, 6))],
              shape=(5, 2, BATCH, 4, 6))
    g.set_outputs([r, p, back, round_trip, widen, e])
    stats, before = fold(g)
    # 2 RESHAPE merges, 2 PERMUTE merges, 1 CAST pair -> x, 1 CAST pair -> one CAST, 1 EXPAND merge
    assert stats.rewritten == 7
    assert before.histogram() == {"CAST": 5, "RESHAPE": 4, "PERMUTE": 4, "EXPAND": 2}
    assert g.histogram() == {"RESHAPE": 2, "PERMUTE": 1, "CAST": 2, "EXPAND": 1}
    r, p, back, round_trip, widen, e = g.outputs
    assert r.op == "RESHAPE" and r.inputs == (x,)
    assert p.op == "PERMUTE" and p.inputs == (x,) and p.attrs["perm"] == (1, 0, 2)
    assert back is x and round_trip is x
    # f32 -> f16 is lossy, f16 -> f32 -> f64 is not: the last two become one CAST to f64
    assert widen.op == "CAST" and widen.attrs["dtype"] == "float64" and widen.inputs[0].attrs["dtype"] == "float16"
    assert e.op == "EXPAND" and e.inputs[0].op == "RESHAPE"
    xv = torch.randn(3, 4, 6)
    assert_same(before, g, xv)
    for want, got in zip(interpret(before, [xv]), interpret(g, [xv])):  # and exactly, in the graph's own dtypes
        assert torch.equal(got, want)


def test_inexact_cast_chains_stay():
    g = Graph()
    x = g.add_input("x", (8,), "float32")
    i = g.add_input("i", (8,), "int64")
    bf = g.add("CAST", [g.add("CAST", [x], dtype="bfloat16")], dtype="float32")  # rounds to 8 bits of mantissa
    big = g.add("CAST", [g.add("CAST", [i], dtype="float64")], dtype="int64")  # int64 does not fit float64
    to_int = g.add("CAST", [g.add("CAST", [x], dtype="int32")], dtype="float32")  # truncates
    g.set_outputs([bf, big, to_int])
    stats, before = fold(g)
    assert stats.rewritten == 0
    assert g.histogram() == before.histogram() == {"CAST": 6}
    xv, iv = torch.tensor([1.001] * 8), torch.full((8,), 2**60 + 1)
    out = interpret(g, [xv, iv])
    assert not torch.equal(out[0], xv) and not torch.equal(out[1], iv)  # removing them would change the result
