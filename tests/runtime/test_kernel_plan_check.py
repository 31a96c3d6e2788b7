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
