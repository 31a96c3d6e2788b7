"""bench/quality.py on a shorter held-out range: the shared pyllama model (real weights) through kiln on the CPU,
held-out perplexity of every quantize mode against its bf16 weights (w8a16 within +0.5%, w4a16 GPTQ within +3%
and better than rounding; fp8 within +1%, w8a8 with the searched smoothing within +3% and better than unsmoothed) and
greedy Python continuations that stay Python. Skipped when the model is absent (it
is not part of the repository)."""
import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("_quality", Path(__file__).parents[2] / "bench" / "quality.py")
Q = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(Q)

pytestmark = pytest.mark.skipif(not (Q.MODEL / "model.safetensors").exists(), reason=f"{Q.MODEL} is absent")


@pytest.fixture(scope="module")
def quality():
    pytest.importorskip("transformers")
    # 8 windows of 512 evaluated, 8 x 256 calibration tokens (2048 rows: more than K = 768 of down_proj)
    return Q.run(n_tokens=8 * Q.WINDOW, modes=("bf16", "w8a16", "w4a16", "w4a16-gptq"), new_tokens=16, calib_windows=8)


def test_perplexity_per_mode(quality):
    m = quality["modes"]
    # measured on tokens [0, 4096), 8 x 256 calibration tokens: bf16 62.69; w8a16 +0.1%, w4a16 rounding +2.0%, GPTQ +0.7%
    assert m["w8a16"]["ppl_delta"] <= 0.005, m["w8a16"]
    assert m["w4a16-gptq"]["ppl_delta"] <= 0.03, m["w4a16-gptq"]
    assert m["w4a16-gptq"]["perplexity"] < m["w4a16"]["perplexity"]
    assert len(m["w4a16-gptq"]["quantized"]) == len(m["w8a16"]["quantized"]) == 17  # + the LM head at 8 bits
    assert sum("-> 8-bit" in n for n in m["w4a16-gptq"]["quantized"]) == 1


def test_greedy_continuations_stay_python(quality):
    m = quality["modes"]
    # mostly the same tokens as the bf16 model: top-1 agreement along its 16-token continuation (measured: w8a16 16 / 16,
    # w4a16 and GPTQ 15 / 16; the first divergence is no measure: w8a16 none, rounding at token 4, GPTQ at 3 or 26 as
    # its calibration's float rounding tips one near tie)
    for name in ("w8a16", "w4a16", "w4a16-gptq"):
        assert m[name]["top1_agreement"] >= (0.9 if name == "w8a16" else 0.8), (name, m[name])
    for name, r in m.items():
        text = r["text"]
        assert all(c.isprintable() or c.isspace() for c in text) and "\ufffd" not in text, (name, text)
        assert len(set(r["tokens"])) >= 4, (name, r["tokens"])  # not one token repeated
        assert any(w in text for w in ("if ", "return", "raise", "path")), (name, text)


@pytest.fixture(scope="module")
def compute_bound():
    pytest.importorskip("transformers")
    # perplexity only (no generation): 8 windows of 512 evaluated, 8 x 256 calibration tokens
    return Q.run(n_tokens=8 * Q.WINDOW, modes=("bf16", "fp8", "w8a8", "w8a8-nosmooth"), calib_windows=8, texts=False)


def test_fp8_and_w8a8_perplexity(compute_bound):
    m = compute_bound["modes"]
    # measured on tokens [0, 4096): bf16 62.69; fp8 +0.66%, w8a8 searched smoothing +0.01%, unsmoothed +0.11% (LM head int8)
    assert m["fp8"]["ppl_delta"] <= 0.01, m["fp8"]
    assert m["w8a8"]["ppl_delta"] <= 0.03, m["w8a8"]
    assert m["w8a8"]["perplexity"] < m["w8a8-nosmooth"]["perplexity"]
    # every GEMM, the LM head too, each with its measured error; smoothing notes per GEMM input
    notes = m["w8a8"]["quantized"]
    assert sum("-> w8a8: output error" in n for n in notes) == 17 and sum("strength" in n or "not smoothed" in n for n in notes) > 0
    assert sum("-> fp8: output error" in n for n in m["fp8"]["quantized"]) == 17
