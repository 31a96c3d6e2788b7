"""codegen/compile_pool.py: record Triton launches without compiling them, compile them in worker processes into
Triton's cache, and the parent's own compile of the same launch is a cache hit. No GPU is needed: the end-to-end case
runs in a subprocess with the interpreter off and a compile-only driver for sm_90 (ptxas ships with Triton). The
pool's own cases use stand-in workers (a few lines of Python) for deaths, hangs and idle stops."""
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest

from kiln.codegen import compile_pool
from kiln.codegen.compile_pool import CompilePool, default_workers, workable

# (runs in a fresh process: TRITON_INTERPRET=0, so @triton.jit makes real JITFunctions; prints one JSON line)
E2E = textwrap.dedent('''
    import json, os, threading, time
    import torch, triton, triton.language as tl
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver
    from kiln.codegen import compile_pool
    driver.set_active(compile_pool.CompileOnlyDriver(GPUTarget("cuda", 90, 32)))
    import kiln.codegen.kernels.gemm as G
    from kiln.codegen.schedule import execute, schedule
    from kiln.ir.graph import Graph

    G.INTERPRET = True  # (only the launcher's CUDA-tensor check: the kernel is a real JITFunction, launched on CPU tensors)
    x, w = torch.randn(3, 72, dtype=torch.float16), torch.randn(37, 72, dtype=torch.float16)
    gemm = lambda: G.gemm(x, w, act="silu", config=G.configs(3)[0])
    g = Graph()
    a = g.add_input("a", (3, 37), "float32")
    g.set_outputs([g.add("MUL", (g.add("SIGMOID", (a,)), a))])
    pointwise = lambda: execute(g, schedule(g), [torch.randn(3, 37)])  # a generated kernel: _kiln_pointwise_<key>
    other = []  # a launch from another thread while recording compiles as usual

    def elsewhere():
        try:
            G.gemm(x, w, config=G.configs(3)[1])
            other.append("skipped")
        except RuntimeError as e:  # compiled, then the compile-only driver cannot launch it
            other.append("compiled" if "compile-only" in str(e) else str(e))
    threaded = lambda: [t.start() or t.join() for t in [threading.Thread(target=elsewhere)]]

    @triton.autotune([triton.Config({"BLOCK": 16})], key=["n"])
    @triton.jit
    def fill(p, n, BLOCK: tl.constexpr):
        tl.store(p + tl.arange(0, BLOCK), 1.0, mask=tl.arange(0, BLOCK) < n)
    autotuned = lambda: fill[(1,)](torch.empty(16), 16)  # refused while recording: nothing benchmarked, nothing kept

    def broken():
        gemm()
        raise RuntimeError("a candidate that fails after its launch")
    run_before = triton.runtime.autotuner.Autotuner.run
    jobs = compile_pool.record([gemm, autotuned, pointwise, gemm, broken, threaded])
    hook_restored = knobs.runtime.jit_cache_hook is None and triton.runtime.autotuner.Autotuner.run is run_before
    assert not fill.cache
    bogus = dict(jobs[0], qualname="no_such_kernel")
    pool = compile_pool.CompilePool(2)
    pool.start()  # the workers' environment names the first cache; the parent's moves before the jobs are sent
    os.environ["TRITON_CACHE_DIR"] += "-moved"
    stats = pool.compile(jobs + [bogus, dict(jobs[0], module="__main__")])
    files = lambda: sorted(os.listdir(knobs.cache.dir))
    before, hits = files(), []
    knobs.compilation.listener = lambda **kw: hits.append(kw["cache_hit"])
    for run in (gemm, pointwise):
        try:
            run()
        except RuntimeError as e:  # compiled (from the cache), then the compile-only driver cannot launch
            assert "compile-only" in str(e), e
    pool.close()
    print(json.dumps(dict(jobs=[(j["module"], j["qualname"]) for j in jobs], stats=stats, hits=hits, hook_restored=hook_restored,
                          other=other, same_files=files() == before, running=pool.running())))
''')


def test_record_compile_in_workers_then_cache_hit(tmp_path):
    """Two distinct launches recorded (a repeated one once, one from a callable that then fails), none compiled, an
    autotuned launch refused; another thread's launch compiles meanwhile; workers compile both for sm_90 into Triton's
    cache (the parent's as it is when the jobs are sent, not as it was when the workers started); a job they cannot do
    is a failure, a job from a user's module is left to the parent; the parent's own compiles of both launches are cache
    hits that add nothing to the cache."""
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton"), KILN_CACHE_DIR=str(tmp_path / "kiln"))
    t0 = time.perf_counter()
    (tmp_path / "e2e.py").write_text(E2E)  # (a file: Triton reads a kernel's source from it)
    r = subprocess.run([sys.executable, str(tmp_path / "e2e.py")], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    modules = sorted(m for m, _ in out["jobs"])
    assert len(out["jobs"]) == 2 and modules[0].startswith("_kiln_pointwise_") and modules[1] == "kiln.codegen.kernels.gemm", out
    assert out["hook_restored"] and out["other"] == ["compiled"]
    s = out["stats"]
    assert (s["kernels"], s["compiled"], s["failed"], s["left"]) == (4, 2, 1, 1), s
    assert any("AttributeError" in e for e in s["errors"]), s
    assert out["hits"] == [True, True] and out["same_files"], out
    assert out["running"] == 0
    assert time.perf_counter() - t0 < 300


# stand-in workers: reply ok to each job; exit without a reply; never reply
ECHO = [sys.executable, "-c", "import json, sys\nfor line in sys.stdin: print(json.dumps({'ok': True, 's': 0.5}), flush=True)"]
DIES = [sys.executable, "-c", "import sys; sys.stdin.readline(); sys.exit(3)"]
HANGS = [sys.executable, "-c", "import sys, time; sys.stdin.readline(); time.sleep(60)"]


def _jobs(n: int, module: str = "kiln.codegen.kernels.gemm") -> list[dict]:
    return [{"module": module, "qualname": "k", "file": None, "data": str(k), "target": {}} for k in range(n)]


def test_pool_spreads_jobs_and_stops_when_idle():
    pool = CompilePool(2, idle_s=0.5, command=ECHO)
    try:
        s = pool.compile(_jobs(5))
        assert (s["compiled"], s["failed"], s["workers"], s["worker_seconds"]) == (5, 0, 2, 2.5), s
        assert pool.running() == 2
        time.sleep(1.5)
        assert pool.running() == 0 and all(w.proc is None for w in pool.workers)  # stopped and reaped
        assert pool.compile(_jobs(1))["compiled"] == 1  # started again on demand
    finally:
        pool.close()
    assert pool.running() == 0


def test_a_dead_or_hung_worker_fails_its_job_and_is_replaced(monkeypatch):
    pool = CompilePool(1, command=DIES)
    try:
        s = pool.compile(_jobs(2))
        assert (s["compiled"], s["failed"]) == (0, 2) and s["errors"] == ["worker exited (3)"], s
        assert pool.workers[0].proc is None  # reaped, started anew for the second job
    finally:
        pool.close()
    monkeypatch.setattr(compile_pool, "JOB_TIMEOUT_S", 0.5)
    pool = CompilePool(1, command=HANGS)
    try:
        t0 = time.perf_counter()
        s = pool.compile(_jobs(1))
        assert s["errors"] == ["worker timed out"] and time.perf_counter() - t0 < 10, s
        assert pool.running() == 0
    finally:
        pool.close()


def test_only_kilns_kernels_go_to_workers():
    pool = CompilePool(1, command=DIES)
    s = pool.compile(_jobs(2, "__main__") + _jobs(1, "user_kernels"))
    assert (s["left"], s["failed"]) == (3, 0) and pool.running() == 0  # no worker started
    assert workable({"module": "_kiln_pointwise_ab12", "qualname": "kernel", "file": "/x/ab12.py"})
    assert not workable({"module": "_kiln_pointwise_ab12", "qualname": "kernel", "file": None})
    assert not workable({"module": "kiln.codegen.kernels.gemm", "qualname": "make.<locals>.kernel", "file": None})


@pytest.mark.parametrize("env,want", [("0", 0), ("3", 3), ("", min(16, (os.cpu_count() or 1) - 1))])
def test_worker_count(monkeypatch, env, want):
    monkeypatch.setenv("KILN_COMPILE_WORKERS", env)
    assert default_workers() == want
