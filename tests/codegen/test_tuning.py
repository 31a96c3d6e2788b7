"""codegen/tuning.py: candidates are timed round-robin, a failing one is recorded and never chosen, the fastest wins."""
import time

import pytest
import torch

from kiln.codegen.tuning import Tuner, time_candidates


def _sleeper(ms: float, calls: list):
    def run():
        calls.append(ms)
        time.sleep(ms / 1e3)
    return run


def _broken():
    raise RuntimeError("out of shared memory\nmore detail")


def test_round_robin_timing_and_failures():
    calls = []
    ms, failed = time_candidates({"slow": _sleeper(6, calls), "fast": _sleeper(1, calls), "broken": _broken}, torch.device("cpu"))
    assert set(ms) == {"slow", "fast"} and ms["fast"] < ms["slow"]
    assert failed == {"broken": "RuntimeError: out of shared memory"}
    assert calls[-2:] == [6, 1]  # samples alternate between the candidates


def test_tuner_chooses_the_fastest_and_remembers():
    t = Tuner()
    calls = []
    cands = {"cublas": _sleeper(5, calls), "triton:1": _sleeper(1, calls)}
    assert t.choose("gemm", {"op": "GEMM", "x": [3]}, cands, torch.device("cpu")) == "triton:1"
    n = len(calls)
    assert t.choose("gemm", {"op": "GEMM", "x": [3]}, cands, torch.device("cpu")) == "triton:1" and len(calls) == n
    assert t.counts["measured"] == 1 and t.counts["memory"] == 1 and t.seconds > 0
    with pytest.raises(RuntimeError, match="no gemm implementation ran"):
        t.choose("gemm", {"op": "GEMM", "x": [4]}, {"broken": _broken}, torch.device("cpu"))
