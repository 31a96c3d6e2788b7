"""Kernel grouping: a partition of the nodes, in topological order, that runs (pointwise groups as generated
Triton kernels under TRITON_INTERPRET=1, the rest by reference ops) to the reference interpreter's numbers,
on a synthetic graph and on the optimized graphs of HF Llama tiny and diffusers DiT tiny."""

import pytest
import torch

import kiln
from kiln.codegen.schedule import execute, norm_prologue, schedule, summary
from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.types import sym
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter  # CPU cases run under TRITON_INTERPRET=1; gpu-marked ones need it off


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kiln-cache"))


def check_partition(g: Graph, groups):
    """Every node in exactly one group; each group after the groups it reads; inputs / outputs exact."""
    where = {}
    for k, grp in enumerate(groups):
        for n in grp.nodes:
            assert n not in where, f"{n!r} in two groups"
            where[n] = k
    assert set(where) == set(g.nodes)
    for k, grp in enumerate(groups):
        members = set(grp.nodes)
        for n in grp.nodes:
            for i in n.inputs:
                assert where[i] <= k, f"{grp} reads %{i.name} from a later group"
                assert i in members or i in grp.inputs
        read_outside = {n for n in grp.nodes if n in g.outputs or any(where[u] != k for u in n.users)}
        assert set(grp.outputs) == read_outside
        if grp.kind == "pointwise":  # one domain: every output has the group's shape
            assert all(o.shape == grp.domain for o in grp.outputs)


def compare(g: Graph, inputs):
    groups = schedule(g)
    check_partition(g, groups)
    got = execute(g, groups, inputs)
    want = interpret(g, inputs)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and rel_err(a, b) <= TOL[torch.float32]
    return groups


def kinds(groups):
    return [grp.kind for grp in groups if grp.kind != "source"]


def test_synthetic_graph_groups_and_runs():
    """x -> LINEAR -> (+ bias chain, residual) -> RMSNORM, a view in the middle, a CUMSUM fallback, and an
    ADD that reads both a pointwise group and the GEMM fed by it (must not fuse: it would be a cycle)."""
    b, s = sym("batch"), 6
    g = Graph()
    g.symbols["batch"] = (1, 8)
    x = g.add_input("x", (b, s, 16), "float32")
    w = g.add_weight("w", torch.randn(24, 16))
    h = g.add("SILU", (g.add("MUL", (x, g.const(2.0))),))  # pointwise #1
    y = g.add("LINEAR", (h, w))  # gemm
    z = g.add("ADD", (g.add("SLICE", (y,), axis=2, start=0, end=16), h))  # view; ADD reads #1 and the gemm
    n = g.add("RMSNORM", (z, g.add_weight("nw", torch.randn(16))), eps=1e-6)
    c = g.add("CUMSUM", (n,), axis=1)  # reference
    out = g.add("SOFTMAX", (g.add("ADD", (c, n)),), axis=2)
    g.set_outputs([out, z])
    g.verify()
    groups = compare(g, [torch.randn(3, s, 16)])
    assert kinds(groups) == ["pointwise", "gemm", "view", "pointwise", "reference", "pointwise"]
    by_node = {n: grp for grp in groups for n in grp.nodes}
    assert by_node[z] is by_node[n] and by_node[z] is not by_node[h]  # no cycle through the gemm
    assert set(by_node[n].outputs) == {z, n}  # z is a graph output, n read by CUMSUM and the last ADD


def test_diamond_of_two_chains_is_one_kernel_and_widening_keeps_narrow_values_inside():
    g = Graph()
    x = g.add_input("x", (4, 37), "float32")
    t = g.add_input("t", (4, 1), "float32")
    gate = g.add("SIGMOID", (g.add("MUL", (t, g.const(3.0))),))  # [4, 1]: internal, read by the wide MUL only
    a = g.add("EXP", (x,))
    bb = g.add("TANH", (x,))
    g.set_outputs([g.add("MUL", (g.add("ADD", (a, bb)), gate))])
    groups = compare(g, [torch.randn(4, 37), torch.randn(4, 1)])
    assert kinds(groups) == ["pointwise"]
    # a narrow value that is also a graph output cannot join a wider kernel
    g.set_outputs(g.outputs + [gate])
    assert kinds(compare(g, [torch.randn(4, 37), torch.randn(4, 1)])).count("pointwise") == 2


def test_rows_too_long_for_one_tile_fall_back_to_reference():
    g = Graph()
    x = g.add_input("x", (2, 20000), "float32")
    g.set_outputs([g.add("SOFTMAX", (g.add("MUL", (x, g.const(0.5))),), axis=1)])
    assert kinds(schedule(g)) == ["pointwise", "reference"]


def norm_graph(case: str) -> Graph:
    """x -> RMSNORM -> LINEAR (+ a residual GEMM epilogue), with one thing that keeps the norm out of the GEMM."""
    g = Graph()
    x = g.add_input("x", (3, 40), "float32")
    r = g.add_input("r", (3, 24), "float32")
    src = g.add("EXP", (x,)) if case == "norm fused into its producer" else x
    nw = g.add_input("nw", (40,), "float32")
    nw = g.add("MUL", (nw, nw)) if case == "norm weight computed" else nw
    n = g.add("RMSNORM", (src, nw), eps=1e-5)
    y = g.add("GEMM", (n, g.add_weight("w", torch.randn(24, 40)), r), residual=True)
    outs = [y, n] if case == "norm also an output" else [g.add("TANH", (n,)), y] if case == "norm read twice" else [y]
    g.set_outputs(outs)
    g.verify()
    return g


@pytest.mark.parametrize("case", ["fold", "norm also an output", "norm read twice", "norm fused into its producer",
                                  "norm weight computed"])
def test_norm_prologue_joins_the_gemm_it_feeds_only(case):
    g = norm_graph(case)
    inputs = [torch.randn(3, 40), torch.randn(3, 24), torch.randn(40)]
    groups = compare(g, inputs)
    gemm = next(grp for grp in groups if grp.kind == "gemm")
    if case == "fold":
        assert [n.op for n in gemm.nodes] == ["RMSNORM", "GEMM"] and kinds(groups) == ["gemm"]
        p = norm_prologue(gemm)
        assert p.kind == "pointwise" and p.nodes == gemm.nodes[:1] and p.outputs == p.nodes and set(p.inputs) <= set(gemm.inputs)
        assert gemm.outputs == gemm.nodes[1:]  # the normalised x stays inside
    else:
        assert [n.op for n in gemm.nodes] == ["GEMM"] and norm_prologue(gemm) is None


# ----------------------------------------------------------------------------- real optimized graphs


def test_llama_tiny_optimized_graph(pipeline_models):
    hf_llm, ids, dims = pipeline_models["llama"]
    m = kiln.compile(hf_llm(), (ids(2, 7),), dynamic=dims)
    groups = compare(m.graph, [ids(3, 5, seed=2)])  # other sizes than compiled for: symbolic dims
    pw = [grp for grp in groups if grp.kind == "pointwise"]
    ops = {n.op for grp in pw for n in grp.nodes}
    assert "ROPE" in ops and "RMSNORM" not in ops
    # every norm (2 per layer and the final one) is the prologue of the GEMM reading it: QKV, gate/up, LM head
    assert [[n.op for n in grp.nodes] for grp in groups if norm_prologue(grp)] == [["RMSNORM", "LINEAR"], ["RMSNORM", "GEMM"]] * 2 + [
        ["RMSNORM", "LINEAR"]]
    assert sum(grp.kind == "attention" for grp in groups) == 2
    print(summary(groups))


def test_dit_tiny_optimized_graph(pipeline_models):
    dit, dit_inputs, dims = pipeline_models["dit"]
    m = kiln.compile(dit(), (), dit_inputs(2), dynamic=dims)
    inputs = dit_inputs(3, seed=2)
    groups = compare(m.graph, [inputs[i.attrs["name"]] for i in m.graph.inputs])
    chains = summary(groups)["pointwise"]
    # the gated residual feeds the modulated norm in one kernel: attn_out / c, * gate, + x, LN * (1 + s) + b
    assert any("MUL -> ADD -> LAYERNORM_MODULATE" in c for c in chains), chains
    print(summary(groups))
