"""What every one-process benchmark here measures of a system: first call (compile / plan) time, the median
of triton.testing.do_bench, peak memory, and the relative error of the output vs a float32 reference."""
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
