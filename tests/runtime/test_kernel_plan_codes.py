"""The kernels plan with the activation quantizer fused into the kernels that produce the AQGEMMs' inputs (CPU under
TRITON_INTERPRET=1): a tiny DiT and a tiny Llama compiled with quantize="fp8" and "w8a8" give, with the fused form
forced, the output of the plan with it forced apart (the producer's kernel, then kiln's row quantizer), bit for bit,
with one launch fewer per fused quantizer; the codes and scales are planned in the arena like any buffer. The same for
an AQGEMM producing the next one's input (the MLP's hidden value): a library GEMM whose epilogue stores the codes
(w8a8's torch._int_mm runs on the CPU) against the epilogue storing the value for the row quantizer."""
import pytest
import torch

import kiln
from kiln.codegen.tuning import Tuner
from kiln.ir.interpret import interpret
from kiln.runtime.executor import Executor
from kiln.runtime.memory import check_plan
from kiln.runtime.target import Target
from kiln.testing import rel_err

pytestmark = pytest.mark.interpreter

# (fusible quantizers, AQGEMMs) of the tiny models. DiT (3 blocks): per block the modulated norms before QKV and the
# MLP, and the final modulated norm (fp8 only: w8a8 keeps the output head float); the attention output reaches its
# AQGEMM from another kernel; the per-sample GEMMs (adaLN projections, timestep embedder) stay float
# (quantize_acts.per_sample). Llama: the RMSNorms before QKV and gate/up, and before the LM head in fp8
FUSIBLE = {("dit", "fp8"): (7, 13), ("dit", "w8a8"): (6, 12), ("llama", "fp8"): (5, 9), ("llama", "w8a8"): (5, 9)}
# AQGEMMs whose output is the next AQGEMM's x, quantized in the first one's call: the MLP's hidden value (DiT: GELU,
# 3 blocks; Llama: SiLU-GLU, 2 layers)
CODED_GEMMS = {"dit": 3, "llama": 2}
FORCE = {"gemm": "triton-aqgemm", "attention": "sdpa"}


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kiln-cache"))


@pytest.fixture(scope="module")
def compiled(pipeline_models, compile_quantized):
    return compile_quantized(pipeline_models)


def run(graph, inputs, form: str):
    ex = Executor(graph, Target.from_config(kiln.CompileConfig(backend="kernels"), tuner=Tuner(force={**FORCE, "quantize": form})))
    return ex.run(inputs)[0], ex.plans[0]


@pytest.mark.parametrize("model", ["dit", "llama"])
@pytest.mark.parametrize("mode", ["fp8", "w8a8"])
def test_fused_quantizers_change_the_launch_count_only(compiled, model, mode):
    graph, inputs = compiled[model, mode]
    fusible, n_aq = FUSIBLE[model, mode]
    assert graph.histogram()["AQGEMM"] == n_aq
    (fused, p_fused), (separate, p_separate) = run(graph, inputs, "fused"), run(graph, inputs, "separate")
    assert torch.equal(fused, separate)
    # against the reference backend: the kernels' float32 scaling order and division differ from the reference's by an
    # ulp, which can move a code at a rounding tie (as in test_aqgemm.py)
    assert rel_err(fused, interpret(graph, inputs)[0]) <= 1e-4
    d_fused, d_separate = p_fused.describe(), p_separate.describe()
    assert sum(d_separate["launches"].values()) - sum(d_fused["launches"].values()) == fusible
    assert d_fused["choices"]["pointwise:fused"] == d_separate["choices"]["pointwise:separate"] == fusible
    # every AQGEMM reads codes: quantized by its producer, or by a launch of its own
    assert d_fused["launches"]["quantize"] == n_aq - fusible and d_separate["launches"]["quantize"] == n_aq
    assert d_fused["launches"]["gemm"] == d_separate["launches"]["gemm"] >= n_aq
    coded = CODED_GEMMS[model]
    for plan in (p_fused, p_separate):
        check_plan(plan.memory, plan.intervals)
        assert len(plan.codes) == fusible + coded and len(plan.quantizing) == n_aq - fusible - coded
        assert sum(n.op == "AQGEMM" for n in plan.codes) == coded
        assert {*plan.codes.values(), *plan.quantizing.values()} <= set(plan.memory.offsets)


class LibraryTuner(Tuner):
    """Takes torch._int_mm for every AQGEMM: with the epilogue storing codes where offered (``codes``), else as the
    epilogue storing the value (then the row quantizer); the fused pointwise quantizers throughout, SDPA, and every
    other choice's first candidate."""

    def __init__(self, codes: bool):
        super().__init__(force={"quantize": "fused", "attention": "sdpa"})
        self.codes = codes

    def choose(self, kind, what, candidates, device, check=None):
        if kind == "gemm" and "int-mm" in candidates:
            return "int-mm-codes" if self.codes and "int-mm-codes" in candidates else "int-mm"
        if kind not in self.force:  # nothing timed: two plans timed on a busy machine could choose other float GEMMs
            return next(iter(candidates))
        return super().choose(kind, what, candidates, device, check)


@pytest.mark.parametrize("model", ["dit", "llama"])
def test_library_epilogue_storing_codes(compiled, model):
    graph, inputs = compiled[model, "w8a8"]
    outs, plans = {}, {}
    for codes in (True, False):
        ex = Executor(graph, Target.from_config(kiln.CompileConfig(backend="kernels"), tuner=LibraryTuner(codes)))
        outs[codes], plans[codes] = ex.run(inputs)[0], ex.plans[0]
    assert torch.equal(outs[True], outs[False])
    d_codes, d_apart = plans[True].describe(), plans[False].describe()
    coded = CODED_GEMMS[model]
    assert d_codes["choices"].get("gemm:int-mm-codes") == coded
    assert d_apart["launches"]["quantize"] - d_codes["launches"].get("quantize", 0) == coded
    check_plan(plans[True].memory, plans[True].intervals)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["fp8", "w8a8"])
def test_dit_on_cuda_fused_and_apart(pipeline_models, mode):
    # bf16, CUDA graphs on: the fused form gives the separate form's output, bit for bit, and the tuner may take either
    dit, dit_inputs, dims = pipeline_models["dit"]
    model = dit().to("cuda", torch.bfloat16)
    def cuda(seed):
        return {k: (v.to("cuda", torch.bfloat16) if v.is_floating_point() else v.cuda()) for k, v in dit_inputs(2, seed=seed).items()}
    inputs, calib = cuda(7), [tuple(cuda(s).values()) for s in range(2)]
    m = kiln.compile(model, tuple(inputs.values()), dynamic=dims, config=kiln.CompileConfig(quantize=mode), calibration=calib)
    outs = {}
    for form in ("fused", "separate"):
        ex = Executor(m.graph, Target.from_config(kiln.CompileConfig(backend="kernels"), default_device="cuda",
                                                  tuner=Tuner(force={"quantize": form, "gemm": "triton-aqgemm"})))
        outs[form] = ex.run(list(inputs.values()))[0]
        assert ex.plans[0].describe()["cuda_graph"]
    assert torch.equal(outs["fused"], outs["separate"])
    # the tuner's kernels (cuBLASLt's scaled_mm / int_mm, other tiles) round differently by an ulp, and an ulp moves an
    # activation code at a rounding tie: the tuned output may differ from the forced one by up to the quantization
    # error itself, so it is held to that, against the float32 model
    with torch.no_grad():
        want = dit().to("cuda", torch.float32)(**{k: v.float() if v.is_floating_point() else v for k, v in inputs.items()})
    want = want.sample if hasattr(want, "sample") else want[0]
    tuned = m.executor.run(list(inputs.values()))[0]
    assert rel_err(tuned, want) <= 1.25 * rel_err(outs["fused"], want), (rel_err(tuned, want), rel_err(outs["fused"], want))
