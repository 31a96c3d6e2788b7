"""kiln.runtime.kernel_plan with the tuner comparing a GEMM's candidates' outputs on random inputs (tuning.OutputCheck):
a candidate that computes something else is refused with its error and never chosen, though it is the fastest; the
example inputs and the residuals written over hold what they held, so the plan's outputs are the reference's."""
import importlib.util
from pathlib import Path

import pytest
import torch

import kiln
from kiln.codegen import lower, tuning
from kiln.codegen.tuning import Tuner
from kiln.ir.interpret import interpret
from kiln.runtime.executor import Executor
from kiln.runtime.target import Target
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter

_spec = importlib.util.spec_from_file_location("_test_inplace", Path(__file__).parent / "test_kernel_plan_inplace.py")
_inplace = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_inplace)


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "kiln-cache"))


def _with_a_wrong_candidate(monkeypatch):
    # every GEMM also gets "triton-skinny:wrong", which writes zeros (a kernel compiled wrong): faster than any other
    real = lower.skinny

    def skinny(x, weight, epilogue_ops, attrs, out, workspace, device, norm=None):
        return {**real(x, weight, epilogue_ops, attrs, out, workspace, device, norm), "triton-skinny:wrong": out.zero_}
    monkeypatch.setattr(lower, "skinny", skinny)


@pytest.mark.parametrize("check", ["always", "never"])
def test_a_wrong_candidate_is_refused(monkeypatch, check):
    monkeypatch.setattr(tuning, "CHECK_OUTPUTS", check)
    _with_a_wrong_candidate(monkeypatch)
    g, _ = _inplace._chain()  # four GEMMs, two written over their residuals
    x = torch.randn(5, 24)
    tuner = Tuner()
    ex = Executor(g, Target.from_config(kiln.CompileConfig(backend="kernels"), tuner=tuner))
    got = [ex.run([x]) for _ in range(2)]
    gemms = [d for d in tuner.decisions.values() if d["kind"] == "gemm"]
    assert len(gemms) >= 2
    if check == "never":  # (the same plan without the comparison: the wrong candidate is timed like the others)
        assert all("triton-skinny:wrong" in d["ms"] for d in gemms)
        return
    for d in gemms:
        assert d["choice"] != "triton-skinny:wrong" and "triton-skinny:wrong" not in d["ms"]
        assert "differs from cublas's: relative error 1.00e+00" in d["failed"]["triton-skinny:wrong"], d
        assert not any(name != "triton-skinny:wrong" for name in d.get("failed", {})), d  # (the right ones all agree)
    want = interpret(g, [x])
    for outs in got:
        for a, b in zip(outs, want):
            assert rel_err(a, b) <= TOL[b.dtype]


def test_a_wrong_quantized_candidate_is_refused(monkeypatch, pipeline_models):
    # a tiny Llama in w8a8: its AQGEMMs read codes a producer writes (their codes and scales filled at random for the
    # comparison) or quantize x themselves; a fast wrong candidate in each is refused, the output stays the reference's
    monkeypatch.setattr(tuning, "CHECK_OUTPUTS", "always")
    real = lower.aqgemm

    def aqgemm(args, attrs, out, *rest, **kw):
        what, cands = real(args, attrs, out, *rest, **kw)
        return what, {**cands, "wrong": out.zero_}
    monkeypatch.setattr(lower, "aqgemm", aqgemm)
    hf_llm, ids, dims = pipeline_models["llama"]
    calib = [(ids(1, 32, seed=10 + s),) for s in range(2)]
    graph = kiln.compile(hf_llm(), (ids(2, 7),), dynamic=dims, config=kiln.CompileConfig(quantize="w8a8"), calibration=calib).graph
    tuner = Tuner(force={"attention": "sdpa"})
    ex = Executor(graph, Target.from_config(kiln.CompileConfig(backend="kernels"), tuner=tuner))
    x = [ids(2, 12, seed=24)]
    got = ex.run(x)[0]
    aq = [d for d in tuner.decisions.values() if d["what"].get("op") == "AQGEMM"]
    assert aq and all(d["choice"] != "wrong" and "differs from" in d["failed"]["wrong"] for d in aq), aq
    assert all(set(d["failed"]) == {"wrong"} for d in aq)
    assert rel_err(got, interpret(graph, x)[0]) <= 1e-4
