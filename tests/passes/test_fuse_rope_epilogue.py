"""passes.fuse_rope_epilogue: ROPE(q), ROPE(k) on views of a merged QKV AQGEMM's output become the AQGEMM's rope.

The reference computes the unfused formula (``check_pass``: equal in float64); the kernels plan of a tiny Llama in fp8
and w8a8 gives the unfused plan's output within a rounding, with the ROPE launches gone. Then every case where it must
not fire, with its reason."""
import pytest
import torch

import kiln
from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.quant import quantize_rows
from kiln.passes.fuse_rope_epilogue import fuse_rope_epilogue
from kiln.testing import check_pass, rel_err

B, S, K, D, H, KV = 2, 6, 32, 8, 4, 2


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def qkv_block(gen, permute=True, per_sample=False, k_readers=("ATTENTION",), q_end=H * D, tables_axis=1,
              tables_d=D):
    """x -> merged QKV AQGEMM (fp8) -> q / k / v slices -> [B, S, heads, D] (-> [B, heads, S, D]) -> ROPE(q), ROPE(k)
    -> causal GQA ATTENTION. ``k_readers``: what reads ROPE(k) ("ATTENTION", "OUTPUT", "ADD"); ``q_end``: q's slice
    end (short of H * D: a gap before k's); ``tables_axis``: cos / sin's size-1 axis (1 as HF's [B, 1, S, D]; 2 for
    the unpermuted views), ``tables_d`` their last dim (1: broadcast over D)."""
    g = Graph()
    x = g.add_input("x", (B, S, K), "float64")
    n = (H + 2 * KV) * D
    wq, ws = quantize_rows(rand(gen, n, K) / K ** 0.5, "fp8")
    h = g.add("AQGEMM", [x, g.add_weight("qkv.qweight", wq), g.add_weight("qkv.wscales", ws)], format="fp8")
    shape = [B if per_sample else 1, 1, S, tables_d]
    shape[1], shape[tables_axis] = shape[tables_axis], 1
    cos, sin = (g.add_input(name, tuple(shape), "float64") for name in ("cos", "sin"))

    def view(start, end, rope):
        t = g.add("SLICE", [h], axis=2, start=start, end=end, step=1)
        t = g.add("RESHAPE", [t], shape=(B, S, (end - start) // D, D))
        if permute:
            t = g.add("PERMUTE", [t], perm=(0, 2, 1, 3))
        return g.add("ROPE", [t, cos, sin]) if rope else t
    q = view(0, q_end, True)
    k = view(H * D, (H + KV) * D, True)
    v = view((H + KV) * D, n, False)
    if not permute:
        q, k, v = (g.add("PERMUTE", [t], perm=(0, 2, 1, 3)) for t in (q, k, v))
    outs = []
    if q_end == H * D:
        outs.append(g.add("ATTENTION", [q, k, v], causal=True, gqa=True, scale=D ** -0.5))
    else:
        outs += [g.add("ATTENTION", [t, t, u], causal=True, scale=D ** -0.5) for t, u in ((q, q), (k, v))]
    if "OUTPUT" in k_readers:
        outs.append(k)
    if "ADD" in k_readers:  # (as a decode step's ROPE(k) is written into the KV cache)
        outs.append(g.add("ADD", [k, k]))
    g.set_outputs(outs, [f"o{i}" for i in range(len(outs))])
    return g


def inputs(per_sample=False, tables_axis=1, tables_d=D, seed=1):
    gen = torch.Generator().manual_seed(seed)
    pos = torch.arange(S, dtype=torch.float64)[None, :] + (torch.arange(B)[:, None] if per_sample else 0)
    f = pos[..., None] / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    e = torch.cat((f, f), -1)[:, None]  # [B or 1, 1, S, D]
    if tables_axis == 2:
        e = e.transpose(1, 2)
    e = e[..., :tables_d]
    return [rand(gen, B, S, K), e.cos(), e.sin()]


def the(g: Graph, op: str) -> list:
    return [n for n in g.nodes if n.op == op]


@pytest.mark.parametrize("permute", [True, False])
@pytest.mark.parametrize("per_sample", [False, True])
def test_q_and_k_rope_fold_into_the_qkv_gemm_exactly(permute, per_sample):
    gen = torch.Generator().manual_seed(0)
    axis = 1 if permute else 2
    stats, g, ref = check_pass(fuse_rope_epilogue, lambda: qkv_block(gen, permute, per_sample, tables_axis=axis),
                               inputs(per_sample, axis), gen)
    assert stats.rewritten == 1 and stats.declined == []
    assert ref.histogram()["ROPE"] == 2 and "ROPE" not in g.histogram()
    (aq,) = the(g, "AQGEMM")
    assert (aq.attrs["rope_dim"], aq.attrs["rope_end"]) == (D, (H + KV) * D)
    assert [list(t.shape) for t in aq.inputs[-2:]] == [[B if per_sample else 1, S, D]] * 2
    # the attention reads q and k as views of the GEMM's output, as it reads v
    (att,) = the(g, "ATTENTION")
    assert all(a.op in ("PERMUTE", "RESHAPE") for a in att.inputs[:3])


@pytest.mark.parametrize("case, reason", [
    (dict(k_readers=("ATTENTION", "OUTPUT")), "its output or a ROPE's is a graph output"),
    (dict(q_end=H * D - D), "ROPE %rope_1 rotates columns [32, 48): not whole heads of 8 following column 24"),
    (dict(k_readers=("ATTENTION", "ADD")), "ROPE %rope_1 is read by ['ADD', 'ATTENTION'] (not only ATTENTION)"),
    (dict(tables_d=1), "cos / sin [1, 1, 6, 1] vary over the heads or not over the head dims"),
])
def test_declines_with_its_reason(case, reason):
    gen = torch.Generator().manual_seed(0)
    stats, g, _ = check_pass(fuse_rope_epilogue, lambda: qkv_block(gen, **case), inputs(tables_d=case.get("tables_d", D)), gen)
    assert stats.rewritten == 0 and [d["reason"] for d in stats.declined] == [reason]
    assert all(not n.attrs["rope_dim"] for n in the(g, "AQGEMM"))


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", ["fp8", "w8a8"])
def test_the_kernels_plan_of_a_tiny_llama(pipeline_models, mode):
    """The tiny Llama compiled with and without the pass (kernels backend, the Triton interpreter): the ROPE launches
    gone, each QKV AQGEMM rotating its q and k, the logits within a float32 rounding of the unfused plan's."""
    hf_llm, ids, dims = pipeline_models["llama"]
    calib = [(ids(1, 32, seed=10 + s),) for s in range(2)]
    models = [kiln.compile(hf_llm(), (ids(2, 7),), dynamic=dims, calibration=calib,
                           config=kiln.CompileConfig(quantize=mode, backend="kernels", disable=off))
              for off in ((), ("fuse_rope_epilogue",))]
    fused, plain = models
    assert "ROPE" not in fused.graph.histogram() and plain.graph.histogram()["ROPE"] == 4
    assert sum(bool(n.attrs["rope_dim"]) for n in the(fused.graph, "AQGEMM")) == 2
    assert fused.report().to_dict()["passes"]["fuse_rope_epilogue"]["rewritten"] == 2
    x = ids(2, 11, seed=5)
    with torch.no_grad():
        got, want = fused(x).logits, plain(x).logits
    assert rel_err(got, want) <= 1e-5
    assert rel_err(got, interpret(fused.graph, [x])[0]) <= 1e-4


@pytest.mark.interpreter
@pytest.mark.parametrize("gemm", ["triton-tma", "triton-aqgemm", "int-mm"])
def test_each_qkv_candidate_rotates(pipeline_models, gemm):
    """The fused w8a8 graph's plan with each kind of QKV candidate forced: the TMA template (two accumulators of the
    heads' halves), the pointer template (``rope_tile``) and torch._int_mm + the in-place ``rope_columns`` kernel, each
    giving the reference's logits."""
    from kiln.codegen.tuning import Tuner
    from kiln.runtime.executor import Executor
    from kiln.runtime.target import Target
    hf_llm, ids, dims = pipeline_models["llama"]
    calib = [(ids(1, 32, seed=10 + s),) for s in range(2)]
    graph = kiln.compile(hf_llm(), (ids(2, 7),), dynamic=dims, calibration=calib,
                         config=kiln.CompileConfig(quantize="w8a8")).graph
    x = ids(2, 11, seed=5)
    tuner = Tuner(force={"gemm": gemm, "attention": "sdpa"})
    ex = Executor(graph, Target.from_config(kiln.CompileConfig(backend="kernels"), tuner=tuner))
    got = ex.run([x])[0]
    assert rel_err(got, interpret(graph, [x])[0]) <= 1e-4
    assert ex.plans[0].describe()["choices"].get(f"gemm:{gemm}", 0) >= 2  # (the two QKV GEMMs among them)
