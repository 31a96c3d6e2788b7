"""The kernels backend on quantized graphs, CPU under TRITON_INTERPRET=1: a tiny HF Llama compiled with each
quantize mode runs its QGEMMs as the skinny template (<= 16 rows, split-K through the plan's workspace) or the
qgemm template (more rows), or dequantize-then-matmul, to the reference backend's numbers; the split-K workspace
is planned in the arena like any buffer (never overlapping a live value)."""
import pytest
import torch

import kiln
from kiln.codegen.tuning import Tuner
from kiln.ir.interpret import interpret
from kiln.runtime.executor import Executor
from kiln.runtime.memory import check_plan
from kiln.runtime.target import Target
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter

MODES = [dict(quantize="w8a16"), dict(quantize="w4a16", quantize_group=32, quantize_symmetric=False),
         dict(quantize="w4a16-gptq", quantize_group=32, quantize_lm_head=True)]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "kiln-cache"))


@pytest.fixture(scope="module")
def compiled(pipeline_models):
    hf_llm, ids, dims = pipeline_models["llama"]
    model = hf_llm()
    calib = [(ids(1, 48, seed=10 + s),) for s in range(3)]  # 144 rows >= K = 96
    return {m["quantize"]: kiln.compile(model, (ids(2, 7),), dynamic=dims, config=kiln.CompileConfig(**m), calibration=calib)
            for m in MODES}, ids


@pytest.mark.parametrize("mode", [m["quantize"] for m in MODES])
@pytest.mark.parametrize("force", ["triton", "dequant-cublas"])
def test_quantized_llama_on_the_kernels_backend(compiled, mode, force):
    models, ids = compiled
    graph = models[mode].graph
    n_q = graph.histogram()["QGEMM"]
    assert n_q == 9  # 2 layers x (qkv, o, gate/up, down) + the LM head (by default at 8 bits)
    ex = Executor(graph, Target.from_config(kiln.CompileConfig(backend="kernels"), tuner=Tuner(force={"gemm": force, "attention": "sdpa"})))
    for b, s in [(1, 1), (3, 5), (2, 12)]:  # 1, 15 rows: skinny; 24 rows: qgemm
        x = ids(b, s, seed=b * s)
        got, want = ex.run([x])[0], interpret(graph, [x])[0]
        assert got.shape == want.shape and rel_err(got, want) <= TOL[torch.float32], (b, s, rel_err(got, want))
    for plan, rows in zip(ex.plans, (1, 15, 24)):
        check_plan(plan.memory, plan.intervals)
        choices = plan.describe()["choices"]
        want_kind = "dequant-cublas" if force == "dequant-cublas" else "triton-skinny" if rows <= 16 else "triton-qgemm"
        # (a skinny GEMM after a norm folds the norm into its loads: triton-skinny-norm)
        assert choices.get(f"gemm:{want_kind}", 0) + choices.get(f"gemm:{want_kind}-norm", 0) >= n_q, choices
        # the split-K workspace: one per skinny GEMM group (the interpreter's candidates include a split-K config)
        assert len(plan.workspace) == (len([g for g in plan.groups if g.kind == "gemm"]) if rows <= 16 else 0)


SPLIT_K = {"gemm": "triton-skinny:16,32,2", "attention": "sdpa"}  # the interpreter's split-K skinny configuration


def test_workspace_is_planned_and_used(compiled):
    models, ids = compiled
    graph = models["w8a16"].graph
    ex = Executor(graph, Target.from_config(kiln.CompileConfig(backend="kernels"), tuner=Tuner(force=SPLIT_K)))
    x = ids(2, 3, seed=5)
    got, want = ex.run([x])[0], interpret(graph, [x])[0]
    assert rel_err(got, want) <= TOL[torch.float32]
    plan = ex.plans[0]
    assert plan.describe()["choices"] == {"gemm:triton-skinny": 9, "attention:sdpa": 2}
    keys = {key for key, _ in plan.workspace.values()}
    assert keys and keys <= set(plan.memory.offsets)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["w8a16", "w4a16"])
def test_quantized_llama_on_cuda(pipeline_models, mode):
    # bf16 on the GPU, CUDA graphs on, every candidate measured: decode rows (skinny, split-K) and a prefill (qgemm)
    hf_llm, ids, dims = pipeline_models["llama"]
    model = hf_llm().to("cuda", torch.bfloat16)
    m = kiln.compile(model, (ids(2, 7).cuda(),), dynamic=dims, config=kiln.CompileConfig(quantize=mode, quantize_group=32))
    ref = Executor(m.graph, Target.from_config(kiln.CompileConfig(backend="reference"), default_device="cuda"))
    forced = {f: Executor(m.graph, Target.from_config(kiln.CompileConfig(backend="kernels"), default_device="cuda",
                                                      tuner=Tuner(force={"gemm": f}))) for f in ("triton", "dequant-cublas")}
    errors = {}  # against the graph's float64 function, beside the per-op bf16 reference's own error
    for b, s in [(1, 1), (4, 1), (16, 1), (2, 40)]:
        x = ids(b, s, seed=b + s).cuda()
        exact = interpret(m.graph, [x], compute_dtype=torch.float64)[0]
        errors[b, s] = {"reference": rel_err(ref.run([x])[0].double(), exact), "tuned": rel_err(m.executor.run([x])[0].double(), exact),
                        **{f: rel_err(ex.run([x])[0].double(), exact) for f, ex in forced.items()}}
    # the kernels' bf16 error is at most the per-op reference's (which rounds every op's output to bf16), with slack
    # for a different order of rounding
    assert all(e[k] <= max(TOL[torch.bfloat16], 1.5 * e["reference"]) for e in errors.values() for k in e), errors
    for plan in m.executor.plans:
        d = plan.describe()
        assert d["cuda_graph"] and sum(n for c, n in d["choices"].items() if c.startswith("gemm:")) >= 9, d
