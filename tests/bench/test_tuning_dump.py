"""bench/tuning_dump.py: a cache's GEMM decisions with their candidates' times, fastest first, and the failed ones with
their reasons, filtered by weight rows."""
import subprocess
import sys
from pathlib import Path

from kiln.codegen.cache import Cache, key

SCRIPT = Path(__file__).parents[2] / "bench" / "tuning_dump.py"


def test_dump_lists_each_gemm_decision_fastest_first(tmp_path):
    cache = Cache(tmp_path)
    gate_up = {"kind": "gemm", "what": {"op": "QGEMM", "x": [1, 4096], "qweight": [28672, 4096], "bits": 8, "norm": {}},
               "choice": "triton-skinny-norm:a", "ms": {"triton-skinny:b": 0.0401, "triton-skinny-norm:a": 0.0388},
               "extra_launches": {"triton-skinny:b": 1}, "failed": {"triton-skinny:c": "output on random inputs differs"}}
    other = {"kind": "gemm", "what": {"op": "GEMM", "x": [1, 4096], "w": [4096, 4096]}, "choice": "cublas",
             "ms": {"cublas": 0.01}}
    attention = {"kind": "attention", "what": {"op": "ATTENTION"}, "choice": "sdpa", "ms": {"sdpa": 0.01}}
    for name, value in (("a", gate_up), ("b", other), ("c", attention)):
        cache.put_json("tuning", key("test", name), value)
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--rows", "28672"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out[0].startswith("QGEMM x [1, 4096] weight [28672, 4096] bits 8 norm -> triton-skinny-norm:a")
    assert out[1].split() == ["38.80", "us", "triton-skinny-norm:a"]
    assert out[2].split() == ["40.10", "us", "triton-skinny:b", "+1"]
    assert out[3].split() == ["failed", "triton-skinny:c:", "output", "on", "random", "inputs", "differs"]
    assert len(out) == 4


def test_dump_refined_lists_each_decision_made_again_in_a_plan(tmp_path):
    cache, k = Cache(tmp_path), key("test", "qkv")
    cache.put_json("tuning", k, {"kind": "gemm", "what": {"op": "QGEMM", "x": [1, 2048], "qweight": [3072, 2048], "bits": 4,
                                                           "norm": {}}, "choice": "a", "ms": {"a": 0.008, "b": 0.009}})
    cache.put_json("refined", k, {"choice": "b", "alone": "a", "step_delta_us": {"b": -3.5, "c": 1.25}, "step_ms": 0.6})
    out = subprocess.run([sys.executable, str(SCRIPT), str(tmp_path), "--refined"], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["QGEMM x [1, 2048] weight [3072, 2048] bits 4 norm alone -> a | in the step -> b",
                   "       -3.50 us  b", "       +1.25 us  c"]
