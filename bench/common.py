"""What every one-process benchmark here measures of a system: first call (compile / plan) time, the median
of triton.testing.do_bench, peak memory, and the relative error of the output vs a float32 reference."""
import json
import os
import time

import torch
import triton.testing as tt

from kiln.testing import rel_err


def measure(fn, want: torch.Tensor) -> dict:
    """``fn()`` returns the output tensor to compare with ``want`` (the fp32 reference)."""
    torch._dynamo.reset()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    t0 = time.time()
    with torch.no_grad():
        o = fn()
    torch.cuda.synchronize()
    first = time.time() - t0
    err = rel_err(o.float(), want)  # now: a CUDA-graph output (reduce-overhead) is overwritten by the next run
    with torch.no_grad():
        ms = tt.do_bench(fn, warmup=25, rep=200, return_mode="median")
    return {"ms": ms, "first_call_s": first, "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30, "rel_err_vs_fp32": err}


def graphed_ms(fn, replays: int = 10, rep: int = 60) -> float:
    """One call of ``fn`` in ms with launch cost out, as in kiln's plans: run once (compiles), captured ``replays`` times
    in one CUDA graph, the median of triton.testing.do_bench (``rep`` ms) over the graph's replay / ``replays``."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(replays):
            fn()
    return tt.do_bench(graph.replay, warmup=10, rep=rep, return_mode="median") / replays


def kernels_launched(plan) -> dict:
    """What one run of the plan's calls puts on the GPU, outside its CUDA graph (empty on the CPU): kernels (and memsets
    / copies) launched, the sum of their device times per step (against the replayed step's time: the rest is gaps
    between kernels), and the kernels by total time (name, count per step, us per step)."""
    if not torch.cuda.is_available():
        return {}
    from torch.profiler import ProfilerActivity, profile

    runs = 3
    for call in plan.calls:  # (warm: nothing compiles or allocates under the profiler)
        call.run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(runs):
            for call in plan.calls:
                call.run()
        torch.cuda.synchronize()
    events = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    us = lambda e: getattr(e, "device_time", None) or getattr(e, "cuda_time", 0.0)  # noqa: E731 (torch renamed it)
    by_name: dict[str, list] = {}
    for e in events:
        by_name.setdefault(e.name[:90], []).append(us(e))
    top = sorted(by_name.items(), key=lambda kv: -sum(kv[1]))
    return {"kernels": len(events) // runs, "kernel_us": sum(map(us, events)) / runs,
            "top": [[name, len(t) / runs, round(sum(t) / runs, 2)] for name, t in top[:25]]}


def report_problems(wrong=(), failed=None) -> None:
    """Print the cases whose output was wrong and those that failed to compile or run (the tuner's ``failed``)."""
    for name in wrong:
        print(f"  WRONG {name}")
    for name, why in (failed or {}).items():
        print(f"  failed {name}: {why}")


def write_json(res: dict, filename: str) -> None:
    """``res`` as $OUT/``filename`` (the working directory without $OUT)."""
    with open(os.path.join(os.environ.get("OUT", "."), filename), "w") as fh:
        json.dump(res, fh, indent=1)
