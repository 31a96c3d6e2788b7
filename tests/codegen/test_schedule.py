"""Kernel grouping: a partition of the nodes, in topological order, that runs (pointwise groups as generated
Triton kernels under TRITON_INTERPRET=1, the rest by reference ops) to the reference interpreter's numbers,
on a synthetic graph and on the optimized graphs of HF Llama tiny and diffusers DiT tiny."""

import pytest
import torch

import kiln
from kiln.codegen.schedule import (execute, norm_prologue, rope_kv_core, rope_kv_parts, rope_norm, rope_norm_parts, schedule,
                                   summary)
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


def rope_kv_graph(case: str) -> tuple[Graph, list]:
    """ROPE(q), ROPE(k) -> INDEX_COPY into a k cache, v -> INDEX_COPY into a v cache, ATTENTION over both (a Llama
    layer's decode between the QKV GEMM and attention, GQA 4 / 2 heads), with one thing that breaks the pattern, or
    with Qwen3's RMSNORMs over each head of q and k before RoPE (taken into the group where RoPE alone reads them), or
    Gemma 3's (float16 q and k cast to float32, normalised with a float32 weight, cast back)."""
    B, H, KV, T, D, S = 2, 4, 2, 3, 10, 7
    g = Graph()
    dt = "float16" if "in float32" in case else "float32"
    q, k, v = (g.add_input(name, (B, h, T, D), dt) for name, h in (("q", H), ("k", KV), ("v", KV)))
    cos, sin = g.add_input("cos", (B, 1, T, D), dt), g.add_input("sin", (B, 1, T, D), dt)
    slots = g.add_input("slots", (T,), "int64")
    kc, vc = g.add_input("k_cache", (B, KV, S, D), dt), g.add_input("v_cache", (B, KV, S, D), dt)
    k_sin = g.add("NEG", (sin,)) if case == "k roped with other angles" else sin
    if "in float32" in case:
        w = g.add_weight("q_norm.weight", torch.linspace(0.5, 2.0, D))
        q = g.add("ADD", (q, q)) if case == "q normed in float32 after an add" else q  # (the add joins q's chain's kernel)
        q = g.add("CAST", (g.add("RMSNORM", (g.add("CAST", (q,), dtype="float32"), w), eps=1e-6),), dtype=dt)
        k = g.add("CAST", (g.add("RMSNORM", (g.add("CAST", (k,), dtype="float32"),), eps=1e-5),), dtype=dt)
    elif case.startswith("q and k normed") or case in ("a norm read twice", "a norm with a residual"):
        w = g.add_weight("q_norm.weight", torch.linspace(0.5, 2.0, D))
        q = g.add("RMSNORM", (q, w), eps=1e-6)
        if case == "a norm with a residual":  # NORM(k + r): not a per-head norm the rope_kv kernel applies
            k = g.add("RMSNORM", (k, w, v), eps=1e-5, residual=True)
        else:
            k = g.add("RMSNORM", (k,), eps=1e-5)
    qr, kr = g.add("ROPE", (q, cos, sin)), g.add("ROPE", (k, cos, k_sin))
    k_new = g.add("INDEX_COPY", (kc, slots, kr), axis=2)
    v_new = g.add("INDEX_COPY", (vc, slots, v), axis=2)
    y = g.add("ATTENTION", (qr, k_new, v_new), gqa=True)
    g.set_outputs([y, k_new, v_new] + ([kr] if case == "roped k also an output" else [q] if case == "a norm read twice" else []))
    g.verify()
    gen = torch.Generator().manual_seed(4)
    inputs = [torch.randn(B, H, T, D, generator=gen), torch.randn(B, KV, T, D, generator=gen), torch.randn(B, KV, T, D, generator=gen),
              torch.randn(B, 1, T, D, generator=gen), torch.randn(B, 1, T, D, generator=gen), torch.tensor([5, 0, 2]),
              torch.randn(B, KV, S, D, generator=gen), torch.randn(B, KV, S, D, generator=gen)]
    return g, [x if x.dtype == torch.int64 else x.to(getattr(torch, dt)) for x in inputs]


@pytest.mark.parametrize("case", ["fuse", "roped k also an output", "k roped with other angles", "q and k normed",
                                  "q and k normed in float32", "q normed in float32 after an add", "a norm read twice",
                                  "a norm with a residual"])
def test_rope_kv_groups_the_ropes_and_cache_writes_attention_reads(case):
    g, inputs = rope_kv_graph(case)
    groups = compare(g, inputs)
    if case == "q and k normed":
        fused = groups[-2]
        assert kinds(groups) == ["rope_kv", "attention"]
        assert [n.op for n in fused.nodes] == ["RMSNORM"] * 2 + ["ROPE", "ROPE", "INDEX_COPY", "INDEX_COPY"]
        assert rope_kv_core(fused) == tuple(fused.nodes[2:]) and fused.outputs == [fused.nodes[2]] + fused.nodes[4:]
        parts = rope_kv_parts(fused)
        check_partition(g, [grp for grp in groups if grp is not fused][:-1] + parts + groups[-1:])
        assert [[n.op for n in p.nodes] for p in parts] == [["RMSNORM"], ["RMSNORM"], ["ROPE"], ["INDEX_COPY"], ["INDEX_COPY"], ["ROPE"]]
    elif case == "q and k normed in float32":  # Gemma 3: each chain (CAST, RMSNORM, CAST) was one kernel; now in the group
        fused = groups[-2]
        assert kinds(groups) == ["rope_kv", "attention"]
        assert [n.op for n in fused.nodes] == ["CAST", "RMSNORM", "CAST"] * 2 + ["ROPE", "ROPE", "INDEX_COPY", "INDEX_COPY"]
        assert [rope_norm_parts(rope_norm(r))[0].attrs["name"] for r in rope_kv_core(fused)[:2]] == ["q", "k"]
        parts = rope_kv_parts(fused)
        check_partition(g, [grp for grp in groups if grp is not fused][:-1] + parts + groups[-1:])
        assert [[n.op for n in p.nodes] for p in parts][:2] == [["CAST", "RMSNORM", "CAST"]] * 2
    elif case == "q normed in float32 after an add":  # q's chain shares its kernel with the add: it stays there
        assert [n.op for n in groups[-2].nodes] == ["CAST", "RMSNORM", "CAST", "ROPE", "ROPE", "INDEX_COPY", "INDEX_COPY"]
        assert [n.op for grp in groups if grp.kind == "pointwise" for n in grp.nodes] == ["ADD", "CAST", "RMSNORM", "CAST"]
    elif case == "a norm with a residual":
        assert [n.op for n in groups[-2].nodes] == ["RMSNORM", "ROPE", "ROPE", "INDEX_COPY", "INDEX_COPY"]
        assert groups[-2].nodes[0].inputs[0].attrs["name"] == "q"
    elif case == "a norm read twice":  # q's norm is also an output: it stays a kernel of its own, k's joins the group
        assert [n.op for n in groups[-2].nodes] == ["RMSNORM", "ROPE", "ROPE", "INDEX_COPY", "INDEX_COPY"]
        assert [n.op for grp in groups if grp.kind == "pointwise" for n in grp.nodes] == ["RMSNORM"]
    elif case == "fuse":
        assert kinds(groups) == ["rope_kv", "attention"]
        fused = groups[-2]
        assert [n.op for n in fused.nodes] == ["ROPE", "ROPE", "INDEX_COPY", "INDEX_COPY"]
        assert fused.outputs == [fused.nodes[0]] + fused.nodes[2:]  # roped k stays inside
        parts = rope_kv_parts(fused)
        check_partition(g, [grp for grp in groups if grp is not fused][:-1] + parts + groups[-1:])
        assert [p.kind for p in parts] == ["pointwise", "reference", "reference", "pointwise"]
    else:
        assert "rope_kv" not in kinds(groups) and kinds(groups).count("reference") == 2  # today's groups


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
