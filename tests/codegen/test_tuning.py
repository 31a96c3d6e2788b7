"""codegen/tuning.py: candidates are timed round-robin, a failing one is recorded and never chosen, the fastest wins."""
import os
import threading
import time

import pytest
import torch

from kiln.codegen.tuning import L2_FLUSH_BYTES, Tuner, launches, time_candidates, timed_as, warm_in_parallel, with_launches


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


def test_decode_gemms_are_timed_with_cold_weights():
    """A GEMM of a few rows (decode: its weight streamed from HBM once a step) asks for a cold measurement; a GEMM of
    many rows does not. On the CPU a cold measurement times as a warm one."""
    from kiln.codegen import lower

    w = torch.randn(48, 32)
    for m, cold in ((1, True), (16, True), (64, False)):
        x, out = torch.randn(m, 32), torch.empty(m, 48)
        attrs = dict(act="none", glu=False, bias=False, gate=False, residual=False)
        what, candidates = lower.gemm([x, w], attrs, out, None, torch.device("cpu"))
        assert (what.get("weights") == "cold") == cold, (m, what)
        assert any(name.startswith("triton-skinny") for name in candidates) == cold
    calls = []
    ms, failed = time_candidates({"a": _sleeper(2, calls), "b": _sleeper(1, calls)}, torch.device("cpu"), cold=True)
    assert ms["b"] < ms["a"] and not failed


def test_a_candidate_timed_as_two_runs_reports_one_runs_time():
    calls = []
    # its timing: two runs of 4 ms, so a run's time is the plain 4 ms candidate's (undivided: 2x). A loaded machine
    # oversleeps by d ms a sleep (a 1 ms sleep measured 2 ms in a clean clone's make test): (8 + d) / 2 against 4 + d
    # stays within 0.7-1.3 for d up to ~6 ms; undivided it is above 1.5 for d up to 4
    slow = timed_as(_sleeper(1, calls), _sleeper(8, calls), runs=2)
    ms, failed = time_candidates({"slow": slow, "plain": _sleeper(4, calls)}, torch.device("cpu"))
    assert not failed and 0.7 < ms["slow"] / ms["plain"] < 1.3


def test_cold_weights_or_a_cold_cache_are_measured_cold(monkeypatch):
    from kiln.codegen import tuning

    seen = []
    monkeypatch.setattr(tuning, "time_candidates", lambda c, d, cold=False, check=None, behind=None: (seen.append(cold) or ({"a": 1.0}, {})))
    for what, cold in (({"weights": "cold"}, True), ({"cache": "cold"}, True), ({}, False)):
        Tuner.measure("gemm", what, {"a": lambda: None}, torch.device("cpu"))
        assert seen[-1] == cold, what


def test_a_decode_decision_charges_extra_launches(monkeypatch):
    """A decode decision (cold weights, or a decode attention) adds EXTRA_LAUNCH_MS per launch past a candidate's first
    to its measured time, and records which were charged; other decisions take the fastest as timed."""
    import kiln.codegen.tuning as tuning

    monkeypatch.setattr(tuning, "EXTRA_LAUNCH_MS", 20.0)  # (sleeps on the CPU: far above their noise)
    calls = []
    cands = {"one-launch": _sleeper(8, calls), "two-launch": with_launches(_sleeper(2, calls), 2)}
    assert launches(cands["one-launch"]) == 1 and launches(cands["two-launch"]) == 2
    for what, choice in (({"weights": "cold"}, "one-launch"), ({"decode": 4}, "one-launch"), ({}, "two-launch")):
        d = Tuner.measure("gemm", what, cands, torch.device("cpu"))
        assert d["choice"] == choice and d["ms"]["two-launch"] < d["ms"]["one-launch"]
        assert d.get("extra_launches") == ({"two-launch": 1} if what else None)


@pytest.mark.gpu
def test_cold_timing_on_cuda():
    """A cold sample is one run after L2 is overwritten: a GEMV of a 16 MB weight (L2-resident when warm) measures
    positive, finite times either way, and the flush buffer goes when the measurement ends."""
    w = torch.randn(4096, 2048, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 2048, device="cuda", dtype=torch.bfloat16)
    before = torch.cuda.memory_allocated()
    for cold in (False, True):
        ms, failed = time_candidates({"mm": lambda: x @ w.T}, torch.device("cuda"), cold=cold)
        assert not failed and 0 < ms["mm"] < 10, (cold, ms)
    # (torch keeps a cuBLAS workspace per stream, the capture streams' too: 32 MiB each on an H200, not the flush's)
    assert torch.cuda.memory_allocated() < before + L2_FLUSH_BYTES // 2


def test_warm_in_parallel_runs_every_candidate_once_at_the_same_time():
    """The candidates run concurrently (three wait for each other at a barrier), each once; an error is left to
    the timer; one thread runs nothing (the timer compiles serially then)."""
    barrier, ran = threading.Barrier(3, timeout=10), []

    def meet(name):
        def fn():
            barrier.wait()
            ran.append(name)
        return fn
    warm_in_parallel({"a": meet("a"), "b": meet("b"), "c": meet("c"), "broken": _broken}, threads=4)
    assert sorted(ran) == ["a", "b", "c"]
    warm_in_parallel({"a": meet("a"), "b": meet("b")}, threads=1)
    assert len(ran) == 3


def test_survey_records_what_it_cannot_answer_and_keeps_nothing(tmp_path):
    """While surveying, choose answers a decision it has (memory, cache, artifact, forced) as usual and any other with
    its first candidate, recorded once per key; nothing runs, is stored, persisted or counted. Afterwards the same
    questions are answered, measured and counted as if there had been no survey."""
    from kiln.codegen.cache import Cache, fingerprint, key

    cpu, calls = torch.device("cpu"), []
    cands = lambda: {"cublas": _sleeper(5, calls), "triton:1": _sleeper(1, calls)}  # noqa: E731
    what = lambda m: {"op": "GEMM", "x": [m]}  # noqa: E731
    cache = Cache(tmp_path)
    Tuner(cache).choose("gemm", what(1), cands(), cpu)  # cached on disk
    artifact = {key("tuning", "gemm", what(2), fingerprint(cpu)): {"kind": "gemm", "what": what(2), "choice": "cublas"}}
    t = Tuner(cache, decisions=artifact, force={"conv": "cudnn"})
    t.choose("gemm", what(3), cands(), cpu)  # in memory
    counts, decisions, seconds, n = dict(t.counts), dict(t.decisions), t.seconds, len(calls)
    first, again = cands(), cands()
    with t.surveying() as survey:
        assert t.choose("gemm", what(4), first, cpu) == "cublas"  # unknown: provisional
        assert t.choose("gemm", what(4), again, cpu) == "cublas"
        assert [t.choose("gemm", what(m), cands(), cpu) for m in (1, 2, 3)] == ["triton:1", "cublas", "triton:1"]
        assert t.choose("conv", {"op": "CONV"}, {"torch": _broken, "cudnn-nhwc": _broken}, cpu) == "cudnn-nhwc"
    assert len(calls) == n and t.counts == counts and t.decisions == decisions and t.seconds == seconds
    assert cache.get_json("tuning", key("tuning", "gemm", what(4), fingerprint(cpu))) is None
    assert list(survey.values()) == [("gemm", what(4), first, cpu)]  # the first of equal keys
    assert [t.choose("gemm", what(m), cands(), cpu) for m in (1, 2, 3, 4)] == ["triton:1", "cublas", "triton:1", "triton:1"]
    assert {k: t.counts[k] - counts[k] for k in t.counts} == {"measured": 1, "cache": 1, "artifact": 1, "memory": 1, "forced": 0}


def test_survey_is_for_cuda_and_compiles_nothing_on_the_cpu():
    from kiln.codegen.tuning import compile_ahead

    assert not Tuner().surveys(torch.device("cpu")) and Tuner(survey=True).surveys(torch.device("cpu"))
    assert not Tuner(survey=False).surveys(torch.device("cuda"))
    ran = []
    assert compile_ahead({"k": ("gemm", {}, {"a": lambda: ran.append(1)}, torch.device("cpu"))}, [lambda: ran.append(2)],
                         torch.device("cpu")) is None
    assert ran == []


# ----------------------------------------------------------------------------- outputs compared (OutputCheck)


def _gemm_candidates(x, w, out, counters=None):
    # candidates adding x @ w to out (a residual written over): right, right within rounding, wrong, NaN, failing
    seen = []

    def right():
        if counters is not None:
            seen.append(int(counters.sum()))
            counters.add_(1)  # (left non-zero: the check zeroes it before each candidate)
        out.add_(x @ w)
    return seen, {"library": right, "close": lambda: out.add_(x @ w * (1 + 1e-3)), "wrong": lambda: out.add_(x @ w * 1.5),
                  "nan": lambda: out.fill_(float("nan")), "broken": _broken}


def test_output_check_refuses_candidates_whose_outputs_differ(monkeypatch):
    import kiln.codegen.tuning as tuning

    gen = torch.Generator().manual_seed(0)
    x, w, res, counters = torch.full((4, 8), 7.0), torch.randn(8, 3, generator=gen), torch.full((4, 3), 5.0), torch.zeros(2)
    seen, cands = _gemm_candidates(x, w, res, counters)
    check = tuning.OutputCheck((x, res), res, (counters,))
    refused = check.refusals(cands, torch.device("cpu"))
    assert set(refused) == {"wrong", "nan"} and "differs from library's: relative error" in refused["wrong"], refused
    assert seen == [0] and (x == 7.0).all() and (res == 5.0).all() and (counters == 0).all()  # all restored
    # in the timing: only where CHECK_OUTPUTS says (not on the CPU by default)
    ms, failed = time_candidates(cands, torch.device("cpu"), check=check)
    assert set(ms) == {"library", "close", "wrong", "nan"} and set(failed) == {"broken"}
    monkeypatch.setattr(tuning, "CHECK_OUTPUTS", "always")
    ms, failed = time_candidates(cands, torch.device("cpu"), check=check)
    assert set(ms) == {"library", "close"} and set(failed) == {"wrong", "nan", "broken"}
    assert failed["broken"] == "RuntimeError: out of shared memory"


def test_output_check_compares_nothing_against_a_non_finite_reference():
    from kiln.codegen.tuning import OutputCheck

    x, w, out = torch.randn(4, 8), torch.randn(8, 3), torch.empty(4, 3)
    cands = {"inf": lambda: out.fill_(float("inf")), "right": lambda: torch.mm(x, w, out=out)}
    assert OutputCheck((x,), out).refusals(cands, torch.device("cpu")) == {}


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
def test_gpu_output_check_refuses_only_a_wrong_candidate(bits):
    # a one-row QGEMM (the 8B's qkv shape, a residual written over) on the GPU: every candidate the tuner has for it
    # (IDOT's PTX among them at 4 bits) agrees with cuBLAS on the dequantized weight; one writing zeros is refused
    from kiln.codegen import lower
    from kiln.codegen.kernels import skinny
    from kiln.codegen.tuning import OutputCheck
    from kiln.ir.quant import quantize_rtn

    k, n, dev = 4096, 6144, torch.device("cuda")
    qw = quantize_rtn(torch.randn(n, k, generator=torch.Generator().manual_seed(0)) * k ** -0.5, bits, 128 if bits == 4 else k, True)
    x, res = torch.randn(1, k, device=dev, dtype=torch.bfloat16), torch.randn(1, n, device=dev, dtype=torch.bfloat16)
    args = [x, qw.qweight.to(dev), qw.scales.to(dev), res]
    attrs = dict(act="none", glu=False, bits=bits, group=qw.group, zeros=False, bias=False, gate=False, residual=True,
                 static_w=True)
    ws = torch.empty(max(lower.workspace_bytes("QGEMM", attrs, [1, k], list(qw.qweight.shape), torch.bfloat16, dev), 4),
                     dtype=torch.uint8, device=dev)
    counters = torch.zeros(max(lower.counter_bytes("QGEMM", attrs, [1, k], list(qw.qweight.shape), torch.bfloat16, dev), 4),
                           dtype=torch.uint8, device=dev)
    _, cands = lower.qgemm(args, attrs, res, None, dev, (ws, counters))
    idot = [lower.config_name("triton-skinny", c) for c in skinny.configs(1, n, k, bits, group=qw.group) if c.get("IDOT")]
    assert set(idot) <= set(cands) and bool(idot) == (bits == 4)
    cands["wrong"] = res.zero_
    before = (x.clone(), res.clone())
    check = lower.output_check("QGEMM", args, attrs, res, None, (ws, counters), {id(t) for t in args[1:3]})
    assert isinstance(check, OutputCheck) and [id(t) for t in check.inputs] == [id(x), id(res)]
    refused = check.refusals(cands, dev)
    assert set(refused) == {"wrong"}, refused
    assert torch.equal(x, before[0]) and torch.equal(res, before[1]) and not counters.any()


def test_output_check_that_cannot_write_its_inputs_warns_and_compares_nothing():
    from kiln.codegen.tuning import OutputCheck

    with torch.inference_mode():
        x = torch.randn(4, 8)  # (an inference tensor: no in-place update outside inference mode)
    out = torch.empty(4, 3)
    with pytest.warns(UserWarning, match="outputs were not compared"):
        assert OutputCheck((x,), out).refusals({"zeros": out.zero_, "ones": lambda: out.fill_(1.0)}, torch.device("cpu")) == {}


def test_candidates_timed_behind_a_predecessor_report_their_own_time():
    """``behind``: each sample runs the predecessor first, and its median is taken off every candidate's."""
    calls = []
    ms, failed = time_candidates({"a": _sleeper(2, calls), "b": _sleeper(6, calls)}, torch.device("cpu"), cold=True,
                                 behind=_sleeper(8, calls))
    assert not failed and 1 < ms["a"] < 4 and 4 < ms["b"] < 9, ms  # (8 ms of predecessor off each)
    assert calls[-2:] == [8, 6]  # the predecessor before each candidate's run


def test_behind_mb_keys_cold_decode_decisions_apart(monkeypatch):
    """tuning.BEHIND_MB: a cold decode decision is keyed with it (a choice made behind a predecessor is never replayed
    as one made alone); other decisions keep their key. On the CPU the candidates are still timed alone."""
    from kiln.codegen import tuning

    cold, warm = {"op": "GEMM", "weights": "cold"}, {"op": "GEMM", "x": [64]}
    assert tuning.behind_key(cold) == cold
    monkeypatch.setattr(tuning, "BEHIND_MB", 32)
    assert tuning.behind_key(cold) == dict(cold, behind_mb=32) and tuning.behind_key(warm) == warm
    assert tuning.behind_key({"cache": "cold"})["behind_mb"] == 32  # (a decode attention)
    t = Tuner()
    calls = []
    assert t.choose("gemm", cold, {"slow": _sleeper(3, calls), "fast": _sleeper(1, calls)}, torch.device("cpu")) == "fast"
    (d,) = t.decisions.values()
    assert d["what"]["behind_mb"] == 32 and tuning._behind(d["what"], torch.device("cpu")) is None


@pytest.mark.parametrize("dev", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_stream_reads_every_whole_step_of_its_buffer(dev):
    """pdl.stream (BEHIND_MB's predecessor): program p XORs its slice of whole BLOCK-word steps into out[p]."""
    from kiln.codegen.kernels import pdl

    dev = torch.device(dev)
    if dev.type == "cpu" and torch.cuda.is_available() and not os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("the CPU case runs under the Triton interpreter")
    programs = pdl.stream_programs(dev)
    buf = torch.randint(-2 ** 31, 2 ** 31 - 1, (programs * pdl.STREAM_BLOCK * 2 + 5,), dtype=torch.int32, device=dev)
    out = torch.empty(programs, dtype=torch.int32, device=dev)
    pdl.stream(buf, out)
    slices = buf[:programs * pdl.STREAM_BLOCK * 2].view(programs, -1).cpu()
    want = slices[:, 0].clone()
    for j in range(1, slices.shape[1]):
        want ^= slices[:, j]
    assert torch.equal(out.cpu(), want)
    with pytest.raises(ValueError, match="less than a"):
        pdl.stream(buf[:programs], out)


@pytest.mark.gpu
def test_gpu_candidates_timed_behind_the_stream():
    """tuning.BEHIND_MB on the GPU: a one-row GEMV's candidates timed behind pdl.stream (PDL-launched), its time taken
    off: every candidate gets a positive time, at most what it takes alone plus a few microseconds."""
    from kiln.codegen import lower, tuning

    dev, k, n = torch.device("cuda"), 2048, 4096
    x, w = torch.randn(1, k, device=dev, dtype=torch.bfloat16), torch.randn(n, k, device=dev, dtype=torch.bfloat16)
    out = torch.empty(1, n, device=dev, dtype=torch.bfloat16)
    attrs = dict(act="none", glu=False, bias=False, gate=False, residual=False)
    what, cands = lower.gemm([x, w], attrs, out, None, dev)
    behind = tuning._behind(dict(what, behind_mb=16), dev)
    alone, failed = time_candidates(cands, dev, cold=True)
    chained, failed_behind = time_candidates(cands, dev, cold=True, behind=behind)
    assert not failed_behind and set(chained) == set(alone)
    assert all(0 < chained[c] <= alone[c] + 0.005 for c in chained), (alone, chained)
