"""kiln.passes.canonicalize: ONNX's spellings -> the captured forms (x @ W [+ b] -> LINEAR, x * sigmoid(x) ->
SILU, the 3-d batched transpose -> one PERMUTE). Sites fired, op counts, float64 parity before vs after, and
the near misses it must leave alone."""

import torch

import kiln

from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.passes.canonicalize import canonicalize
from kiln.testing import TOL, rel_err

f32 = "float32"


def run_pass(g: Graph, inputs: list):
    """Run the pass; return its stats and the float64 outputs before and after."""
    before = interpret(g, inputs, compute_dtype=torch.float64)
    stats = canonicalize(g)
    g.verify()
    after = interpret(g, inputs, compute_dtype=torch.float64)
    for b, a in zip(before, after):
        assert a.dtype == b.dtype and rel_err(a, b) <= TOL[torch.float64]
    return stats


def rand(*shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- x @ W [+ b] -> LINEAR


def matmul_graph(w_shape=(8, 6), bias_shape=(6,)):
    """y1 = x @ W (+ b), y2 = z @ W: two readers of one [in, out] weight, as ONNX stores nn.Linear."""
    g = Graph()
    x, z = g.add_input("x", (2, 5, 8), f32), g.add_input("z", (3, 8), f32)
    w = g.add_weight("fc.weight", rand(*w_shape))
    y1 = g.add("MATMUL", [x, w])
    if bias_shape:
        y1 = g.add("ADD", [g.add_weight("fc.bias", rand(*bias_shape, seed=1)), y1])
    g.set_outputs([y1, g.add("MATMUL", [z, w])])
    return g, [rand(2, 5, 8, seed=2), rand(3, 8, seed=3)]


def test_matmul_with_weight_becomes_linear_on_one_transposed_copy():
    g, xs = matmul_graph()
    assert g.histogram() == {"MATMUL": 2, "ADD": 1}
    stats = run_pass(g, xs)
    assert stats.rules == {"matmul_weight_bias": 1, "matmul_weight": 1} and not stats.declined
    assert g.histogram() == {"LINEAR": 2}
    a, b = g.outputs
    assert len(a.inputs) == 3 and a.inputs[1] is b.inputs[1]  # the bias taken in; W^T stored once
    assert list(g.weights) == ["fc.bias", "fc.weight.T"] and g.weights["fc.weight.T"].shape == (6, 8)


def test_matmul_near_misses_are_left_alone():
    g, xs = matmul_graph(bias_shape=(1, 6))  # a [1, 6] "bias" is not LINEAR's [out]: the ADD stays
    stats = run_pass(g, xs)
    assert stats.rules == {"matmul_weight": 2}
    assert any("bias [1, 6]" in d["reason"] and d["rule"] == "matmul_weight_bias" for d in stats.declined)
    assert g.histogram() == {"LINEAR": 2, "ADD": 1}

    g = Graph()
    x = g.add_input("x", (2, 5, 8), f32)
    w3, act = g.add_weight("w3", rand(2, 8, 6)), g.add_input("w", (8, 6), f32)
    g.set_outputs([g.add("MATMUL", [x, w3]), g.add("MATMUL", [x, act])])  # a 3-d weight; an activation, not a weight
    stats = run_pass(g, [rand(2, 5, 8), rand(8, 6, seed=1)])
    assert stats.rewritten == 0 and g.histogram() == {"MATMUL": 2}
    assert [d["reason"] for d in stats.declined] == ["the weight w3 [2, 8, 6] is not 2-d"]


# ----------------------------------------------------------------------------- x * sigmoid(x) -> SILU


def test_x_times_sigmoid_x_becomes_silu():
    g = Graph()
    x, y = g.add_input("x", (4, 7), f32), g.add_input("y", (4, 7), f32)
    g.set_outputs([g.add("MUL", [g.add("SIGMOID", [x]), x]),   # sigmoid(x) * x: either operand order
                   g.add("MUL", [y, g.add("SIGMOID", [x])])])  # y * sigmoid(x): not SiLU
    assert g.histogram() == {"MUL": 2, "SIGMOID": 2}
    stats = run_pass(g, [rand(4, 7), rand(4, 7, seed=1)])
    assert stats.rules == {"silu": 1} and not stats.declined
    assert g.histogram() == {"SILU": 1, "MUL": 1, "SIGMOID": 1}


def test_a_shared_sigmoid_is_not_folded_into_silu():
    g = Graph()
    x = g.add_input("x", (4, 7), f32)
    s = g.add("SIGMOID", [x])
    g.set_outputs([g.add("MUL", [x, s]), s])
    stats = run_pass(g, [rand(4, 7)])
    assert stats.rewritten == 0 and "has other users" in stats.declined[0]["reason"]
    assert g.histogram() == {"MUL": 1, "SIGMOID": 1}


# ----------------------------------------------------------------------------- the 3-d batched transpose


def batched_transpose_graph(x_shape, flat, unflat):
    g = Graph()
    x = g.add_input("x", x_shape, f32)
    t = g.add("PERMUTE", [g.add("RESHAPE", [x], shape=flat)], perm=(0, 2, 1))
    g.set_outputs([g.add("RESHAPE", [t], shape=unflat)])
    return g, [rand(*x_shape)]


def test_flatten_transpose_unflatten_becomes_one_permute():
    # the dynamo exporter's k^T of repeat_kv: [B, Hk, n, S, D] -> [B*Hk*n, S, D] -> [.., D, S] -> [B, Hk*n, D, S]
    g, xs = batched_transpose_graph((2, 2, 3, 5, 8), (12, 5, 8), (2, 6, 8, 5))
    stats = run_pass(g, xs)
    assert stats.rules == {"batched_transpose": 1} and not stats.declined
    assert g.histogram() == {"RESHAPE": 1, "PERMUTE": 1}
    (out,) = g.outputs
    assert out.op == "PERMUTE" and out.attrs["perm"] == (0, 1, 3, 2) and out.inputs[0].shape == (2, 6, 5, 8)

    g, xs = batched_transpose_graph((2, 4, 5, 8), (8, 5, 8), (2, 4, 8, 5))  # same leading dims: no reshape left
    run_pass(g, xs)
    assert g.histogram() == {"PERMUTE": 1}


def test_a_reshape_across_the_last_two_dims_is_not_a_batched_transpose():
    g, xs = batched_transpose_graph((2, 4, 5, 8), (8, 8, 5), (2, 4, 5, 8))  # [5, 8] read as [8, 5]
    stats = run_pass(g, xs)
    assert stats.rewritten == 0 and g.histogram() == {"RESHAPE": 2, "PERMUTE": 1}
    assert "does not flatten only the leading dims" in stats.declined[0]["reason"]


def test_the_pass_runs_in_the_pipeline_and_can_be_switched_off():
    def fn(x, w):
        h = x @ w
        return h * torch.sigmoid(h)

    args = (rand(3, 8), rand(8, 5, seed=1))
    on = kiln.compile(fn, args)
    off = kiln.compile(fn, args, config=kiln.CompileConfig(disable=["canonicalize"]))
    assert on.report().to_dict()["passes"]["canonicalize"]["rules"] == {"silu": 1}
    assert "SIGMOID" not in on.report().ops_after and off.report().ops_after["SIGMOID"] == 1
    assert off.report().to_dict()["passes"]["canonicalize"]["enabled"] is False
    want = fn(*args)
    assert rel_err(on(*args), want) <= TOL[torch.float32] and rel_err(off(*args), want) <= TOL[torch.float32]
