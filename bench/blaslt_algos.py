"""Are cuBLASLt's other algorithms faster than the one torch's addmm gets at kiln's GEMM shapes? (an experiment)

torch.addmm / torch._addmm_activation call cuBLASLt with its heuristic's first algorithm; TunableOp cannot choose on
CUDA builds ("only the Default implementation"). kiln's blaslt candidates (codegen/blaslt.py, through nvmath-python)
plan the same cuBLASLt matmul with each of up to ``--limit`` algorithms the heuristic lists. Each is timed here as kiln
times plan candidates (``graphed_ms``: several calls in one CUDA graph, the replay's do_bench median / calls) and by
torch.profiler's kernel time, its output compared with torch's, at DiT-XL/2's 512 / 4096-row GEMMs, PixArt's 2048 /
8192 rows and the 1B prefill's. (Session 46's first runs planned with nvmath directly: bench/NOTES.md.)

    python bench/blaslt_algos.py [--only dit512] [--limit 8] [--out blaslt.json]
"""
import argparse
import json
import sys

import torch

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import graphed_ms  # noqa: E402

from kiln.codegen import blaslt  # noqa: E402

# name: (M, K, N, epilogue) with epilogue "bias", "gelu_bias" (cuBLASLt's GELU: the tanh form, DiT's) or "none"
DIT = {"qkv": (1152, 3456, "bias"), "o": (1152, 1152, "bias"), "fc1": (1152, 4608, "gelu_bias"), "fc2": (4608, 1152, "bias")}
LLAMA = {"qkv": (2048, 3072, "none"), "o": (2048, 2048, "none"), "gate/up": (2048, 16384, "none"), "down": (8192, 2048, "none")}
GROUPS = {
    "dit512": (512, DIT),  # DiT-XL/2 256 px, one image with CFG
    "dit4096": (4096, DIT),  # eight images
    "pixart2048": (2048, DIT),  # PixArt-alpha 512 px with CFG (hidden 1152, MLP 4608 as DiT-XL/2)
    "pixart8192": (8192, DIT),
    "llama2048": (2048, LLAMA),  # the 1B prefill
}


def torch_call(x, w, b, epi):
    if epi == "gelu_bias":
        return lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True)
    if epi == "bias":
        return lambda: torch.addmm(b, x, w.t())
    return lambda: torch.mm(x, w.t())


def kernel_us(fn, calls=20) -> float:
    """The mean device time of the kernels one call launches (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(getattr(e, "device_time", None) or e.cuda_time for e in evs) / calls


def shape_rows(m, k, n, epi):
    """torch's call and each of kiln's blaslt candidates (codegen/blaslt.py: the heuristic's algorithms, in place into
    one output) at one shape: graphed and kernel times, each output's error against torch's."""
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    ref_fn = torch_call(x, w, b, epi)
    ref = ref_fn().float()
    base_us = graphed_ms(ref_fn) * 1e3
    base_k = kernel_us(ref_fn)
    out = torch.empty(m, n, device="cuda", dtype=torch.bfloat16)
    act, bias = ("gelu_tanh", b) if epi == "gelu_bias" else ("none", b if epi == "bias" else None)
    rows = []
    for i, (name, call) in enumerate(blaslt.candidates(x, w, bias, act, False, out).items()):
        try:
            call()
            torch.cuda.synchronize()
        except Exception as e:  # an algorithm the heuristic listed but cannot run here
            rows.append({"i": i, "name": name, "error": f"{type(e).__name__}: {e}"[:200]})
            continue
        rows.append({"i": i, "name": name, "rel_err_vs_torch": ((out.float() - ref).abs().max() / ref.abs().max()).item(),
                     "us": graphed_ms(call) * 1e3, "kernel_us": kernel_us(call)})
    timed = [r for r in rows if "us" in r]
    best = min(timed, key=lambda r: r["us"]) if timed else None
    return {"torch_us": base_us, "torch_kernel_us": base_k, "torch_tflops": 2 * m * k * n / base_us / 1e6,
            "algorithms": len(rows), "best": best, "rows": rows}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", default=",".join(GROUPS), help="groups: " + ",".join(GROUPS))
    ap.add_argument("--limit", type=int, default=blaslt.LIMIT, help="algorithms asked of the heuristic a shape")
    ap.add_argument("--out", default="blaslt.json")
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("blaslt_algos: needs a CUDA device")
    if not blaslt.available(torch.device("cuda")):
        sys.exit("blaslt_algos: needs nvmath-python (pip install nvmath-python) and KILN_BLASLT unset")
    blaslt.LIMIT = a.limit
    result = {"device": torch.cuda.get_device_name(), "shapes": {}}
    for g in a.only.split(","):
        m, shapes = GROUPS[g]
        for name, (k, n, epi) in shapes.items():
            key = f"{g} {name} {m}x{k}->{n} {epi}"
            r = shape_rows(m, k, n, epi)
            result["shapes"][key] = r
            best = r["best"] or {}
            bu = best.get("us", float("nan"))
            print(f"{key:44s} torch {r['torch_us']:7.2f} us (kernel {r['torch_kernel_us']:6.2f}, "
                  f"{r['torch_tflops']:4.0f} TFLOP/s) | best of {r['algorithms']:2d}: {bu:7.2f} us "
                  f"(kernel {best.get('kernel_us', float('nan')):6.2f}; {best.get('name')} "
                  f"err {best.get('rel_err_vs_torch', float('nan')):.1e}) "
                  f"= {r['torch_us'] / bu:.3f}x", flush=True)
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
