"""kiln.runtime.kernel_plan: a GEMM whose residual nothing reads after it is written over that residual's buffer (no
copy of it into the output for cuBLAS's beta-add), with every candidate kind forced, against the reference
interpreter; and where the residual is read again, is an input or output, or is the GEMM's own x, it is not."""
import pytest
import torch

import kiln
from kiln.codegen.tuning import Tuner
from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.types import sym
from kiln.runtime.executor import Executor
from kiln.runtime.memory import check_plan
from kiln.runtime.target import Target
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter

# every GEMM candidate kind with a residual: cuBLAS + kiln's epilogue (its product must not land in the output),
# cuBLASLt's beta-add (addmm over the output itself), kiln's Triton template, the skinny (decode) template
FORCES = ["cublas", "cublaslt", "triton", "triton-skinny"]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "kiln-cache"))


def run(graph: Graph, inputs, force: str):
    ex = Executor(graph, Target.from_config(kiln.CompileConfig(backend="kernels"), tuner=Tuner(force={"gemm": force})))
    for _ in range(2):  # (a second call: the residuals written over are recomputed, not read stale)
        got = ex.run(inputs)
        for a, b in zip(got, interpret(graph, inputs)):
            assert a.shape == b.shape and rel_err(a, b) <= TOL[b.dtype], rel_err(a, b)
    plan = ex.plans[0]
    check_plan(plan.memory, plan.intervals)
    return plan


def _chain(dtype=torch.float32):
    """x -> a = GEMM(x) -> b = GEMM(tanh(a), residual a) -> c = GEMM(b, residual b) -> d = GEMM(tanh(c), residual c,
    gate, bias, SiLU) -> out = d * 2: b is written over a, d over c; c not over b (b is its x too)."""
    g = Graph()
    m = sym("m")
    g.symbols["m"] = (1, 64)
    x = g.add_input("x", (m, 24), str(dtype).removeprefix("torch."))
    gen = torch.Generator().manual_seed(0)
    w = [g.add_weight(f"w{i}", (torch.randn(24, 24, generator=gen) / 5).to(dtype)) for i in range(4)]
    bias = g.add_weight("bias", torch.randn(24, generator=gen).to(dtype))
    gate = g.add_weight("gate", torch.randn(24, generator=gen).to(dtype))
    a = g.add("GEMM", (x, w[0]))
    b = g.add("GEMM", (g.add("TANH", (a,)), w[1], a), residual=True)
    c = g.add("GEMM", (b, w[2], b), residual=True)  # (x is b too: not written over)
    d = g.add("GEMM", (g.add("TANH", (c,)), w[3], bias, gate, c), bias=True, gate=True, residual=True, act="silu")
    g.set_outputs([g.add("MUL", (d, g.const(2.0)))])
    return g, (a, b, c, d)


@pytest.mark.parametrize("force", FORCES)
@pytest.mark.parametrize("rows", [5, 40])  # (the skinny template takes up to 16 rows)
def test_a_residual_read_last_by_its_gemm_is_written_over(force, rows):
    g, (a, b, c, d) = _chain()
    plan = run(g, [torch.randn(rows, 24)], force)
    assert plan.inplace == {b: a, d: c}  # c's GEMM also reads b as its x
    ptr = {n: plan.env[n].data_ptr() for n in (a, b, c, d)}
    assert ptr[b] == ptr[a] and ptr[d] == ptr[c] != ptr[b]


def test_a_residual_read_again_an_input_or_an_output_keeps_its_buffer():
    g = Graph()
    x = g.add_input("x", (6, 24), "float32")
    gen = torch.Generator().manual_seed(1)
    w = [g.add_weight(f"w{i}", torch.randn(24, 24, generator=gen) / 5) for i in range(3)]
    a = g.add("GEMM", (x, w[0]))
    b = g.add("GEMM", (g.add("TANH", (a,)), w[1], a), residual=True)  # a is read again below
    c = g.add("GEMM", (g.add("TANH", (b,)), w[2], x), residual=True)  # a graph input
    e = g.add("GEMM", (g.add("TANH", (c,)), w[2], b), residual=True)  # b is a graph output
    g.set_outputs([g.add("ADD", (a, c)), b, e])
    for force in ("cublas", "cublaslt"):
        plan = run(g, [torch.randn(6, 24)], force)
        assert plan.inplace == {}


def test_the_tiny_llama_writes_its_residual_stream_in_place(pipeline_models):
    hf_llm, ids, dims = pipeline_models["llama"]
    m = kiln.compile(hf_llm(), (ids(2, 7),), dynamic=dims)
    for force in ("cublaslt", "triton"):
        plan = run(m.graph, [ids(3, 5, seed=2)], force)
        # o projection over the block's input, down projection over the o projection's sum: two a layer
        layers = sum(n.op == "ATTENTION" for n in m.graph.nodes)
        assert len(plan.inplace) == plan.describe()["inplace_residuals"] == 2 * layers
