"""One decode GEMV per configuration, for Nsight Compute: why the quantized GEMVs run far below the copy rate.

The Llama-3.2-1B gate/up projection (K 2048, 2 x 8192 rows, GLU) at one row of x, bf16 activations, on an int4 (groups of
128) and an int8 (per channel) weight, each configuration of ``skinny.configs`` launched once between
cudaProfilerStart / Stop after a warm-up (compiles outside the profiled range). Run under ncu, which flushes the caches
before each kernel (the plan streams its weights from HBM too):

    ncu --profile-from-start off --clock-control none --section SpeedOfLight --section WarpStateStats \\
        --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis python3 bench/gemv_ncu.py

(bench/gpu.sh stage ``ncu_gemv``). Without ncu it prints each configuration's time (CUDA events, one cold call after
a 256 MB write), so the script checks itself anywhere there is a GPU. ``--shape 8b``: the Llama-3.1-8B gate/up (K 4096,
2 x 14336 rows); ``--bits 4``: the int4 weight alone. The int4 weight's list includes skinny's MAGIC tiles (its group
given).
"""
import argparse

import torch

from kiln.codegen.kernels.skinny import configs, counter_bytes, skinny_gemm, workspace_bytes
from kiln.codegen.tuning import L2_FLUSH_BYTES
from kiln.ir.quant import quantize_rtn

SHAPES = {"1b": (2048, 16384), "8b": (4096, 28672)}  # gate/up: K, [gate; up] rows
K, N = SHAPES["1b"]


def case(bits: int):
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(N, K, generator=g, device="cuda") * K ** -0.5
    qw = quantize_rtn(w, bits, 128 if bits == 4 else K, True)
    x = torch.randn(1, K, generator=g, device="cuda").to(torch.bfloat16)
    kw = dict(qweight=qw.qweight, scales=qw.scales, zeros=qw.zeros, bits=bits, group=qw.group)
    return x, kw


def main() -> None:
    global K, N
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=list(SHAPES), default="1b")
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 8], choices=[4, 8])
    a = ap.parse_args()
    K, N = SHAPES[a.shape]
    runs = []
    for bits in a.bits:
        x, kw = case(bits)
        for c in configs(1, N, K, bits, glu=True, group=kw["group"]):
            ws = torch.empty(max(1, workspace_bytes(1, N, K, bits, True, config=c)), dtype=torch.uint8, device="cuda")
            cnt = torch.zeros(max(1, counter_bytes(1, N, K, bits, True, config=c)), dtype=torch.uint8, device="cuda")
            call = (lambda x=x, kw=kw, c=c, ws=ws, cnt=cnt:  # noqa: E731
                    skinny_gemm(x, act="silu", glu=True, workspace=ws, counters=cnt, config=c, **kw))
            call()  # compiles here, outside the profiled range
            runs.append((bits, c, call))
    torch.cuda.synchronize()
    flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.int32, device="cuda")
    torch.cuda.cudart().cudaProfilerStart()
    for bits, c, call in runs:
        flush.zero_()
        torch.cuda._sleep(2_000_000)  # ~1 ms: the host launches the call meanwhile, so no launch time is timed
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        call()
        e.record()
        e.synchronize()
        print(f"int{bits} {c}: {s.elapsed_time(e) * 1e3:.1f} us (cold, one call)", flush=True)
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    main()
