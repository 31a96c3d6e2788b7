"""Decode GEMM bandwidth on the GPU: cuBLAS (F.linear) against kiln's skinny template on bf16, int8 and int4
weights, at Llama-3.2-1B / Llama-3.1-8B decode shapes, M = 1 and 16 rows, bf16 activations.

Decode is bound by reading each weight once per token, so the figure of merit is the effective bandwidth
(weight bytes, scales included, + activation bytes read and written) / time against the H200's 4.8 TB/s.
A measurement is the median of triton.testing.do_bench over the replay of ONE CUDA graph that calls the
kernel on ``copies`` distinct weights (together several times the 60 MB L2, as a model's layers are), divided
by ``copies``: every call reads its weight from HBM, and no Python or launch overhead is timed. Every
configuration of ``skinny.configs`` is timed; the best, the default (the first) and all are reported.

    python bench/decode_gemm.py --out decode_gemm.json [--m 1 16] [--shapes "1b qkv" "8b down + residual"]

Weights: int8 per output channel (group = K) and int4 in groups of 128, both symmetric, rounded to nearest
from a random bf16 weight; scales float16. Each kernel's relative error against a float32 reference of its
own (dequantized) weight is reported too.
"""
import argparse
import json
import math

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from kiln.codegen.kernels.qgemm import dequantize
from kiln.codegen.kernels.skinny import _chunking, _split_k, _workspace_fits, configs, counter_bytes, skinny_gemm, workspace_bytes

# (name, K, weight rows N, epilogue): the decode GEMMs of Llama-3.2-1B and Llama-3.1-8B
SHAPES = [
    ("1b gate/up glu", 2048, 16384, {"act": "silu", "glu": True}),  # (the 1B's by bytes per step)
    ("1b down + residual", 8192, 2048, {"residual": True}),
    ("1b lm head", 2048, 128256, {}),
    ("1b qkv", 2048, 3072, {}),
    ("1b o + residual", 2048, 2048, {"residual": True}),
    ("8b qkv", 4096, 6144, {}),
    ("8b gate/up glu", 4096, 28672, {"act": "silu", "glu": True}),
    ("8b down + residual", 14336, 4096, {"residual": True}),
]
# --sweep: GEMV tiles (BLOCK_N, BLOCK_K, num_warps, num_stages) beyond skinny.TILES, each at split-K as skinny picks
# it, twice and half that: what the template can reach at the 1B decode shapes (bf16, M = 1)
SWEEP_TILES = [(16, 256, 2, 4), (16, 256, 4, 4), (16, 512, 4, 3), (16, 512, 4, 4), (16, 512, 8, 3), (16, 1024, 4, 3),
               (16, 1024, 8, 3), (32, 128, 4, 4), (32, 128, 4, 6), (32, 256, 4, 3), (32, 256, 4, 4), (32, 256, 4, 5),
               (32, 256, 8, 3), (32, 256, 8, 4), (32, 512, 8, 2), (32, 512, 8, 3), (64, 128, 4, 3), (64, 128, 8, 4),
               (64, 256, 8, 3)]
ROTATE_BYTES = 512 << 20  # weight bytes cycled through in one graph: over 8x the H200's L2
BF16 = torch.bfloat16


def quantize(w: torch.Tensor, bits: int, group: int) -> dict:
    """Symmetric round-to-nearest in kiln's format: skinny_gemm's weight keywords."""
    n, k = w.shape
    wg = w.float().view(n, k // group, group)
    scales = wg.abs().amax(-1).clamp_min(1e-8) / (2 ** (bits - 1) - 1)  # [N, K / group]
    q = (wg / scales[..., None]).round().add(2 ** (bits - 1)).clamp(0, 2 ** bits - 1).to(torch.uint8).view(n, k)
    if bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)  # byte j: k = 2j low nibble, k = 2j + 1 high nibble
    return dict(qweight=q.contiguous(), scales=scales.to(torch.float16), zeros=None, bits=bits, group=group)


def weight_bytes(kw: dict) -> int:
    return sum(t.numel() * t.element_size() for key, t in kw.items() if isinstance(t, torch.Tensor))


def graph_us(calls: list) -> float:
    """Median microseconds of one call, from one CUDA graph replaying all of ``calls``."""
    for call in calls:  # compile and warm up outside the capture
        call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    ms = do_bench(graph.replay, warmup=10, rep=100, return_mode="median")
    return ms * 1e3 / len(calls)


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second: the achievable ceiling."""
    a = torch.empty(2 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=5, rep=50, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def case_operands(m: int, k: int, n: int, epi: dict, copies: int, make_weight):
    """x, ``copies`` weights (as skinny_gemm keywords), outputs and residual for one shape."""
    n_out = n // 2 if epi.get("glu") else n
    x = torch.randn(m, k, device="cuda", dtype=BF16)
    weights = [make_weight() for _ in range(copies)]
    outs = [torch.empty(m, n_out, device="cuda", dtype=BF16) for _ in range(copies)]
    res = torch.randn(m, n_out, device="cuda", dtype=BF16) if epi.get("residual") else None
    return x, weights, outs, res


def reference(x, kw: dict, epi: dict, res):
    w = kw["w"].float() if "w" in kw else dequantize(kw["qweight"], kw["scales"], kw["zeros"], kw["bits"], kw["group"])
    h = F.linear(x.float(), w)
    if epi.get("glu"):
        g, u = h.chunk(2, -1)
        h = F.silu(g) * u
    return h + res.float() if res is not None else h


def sweep_configs(m: int, n: int, k: int, glu: bool) -> list[dict]:
    """--sweep's configurations of a bf16 weight: every SWEEP_TILES entry at skinny's split-K, twice and half it."""
    out = []
    for bn, bk, warps, stages in SWEEP_TILES:
        if glu:
            bn, bk = (bn // 2, bk) if bn > 16 else (bn, bk // 2)
        bk = min(bk, max(32, triton.next_power_of_2(k)))
        s0 = _split_k(m, n, k, None, glu, bn, bk)
        for split in sorted({s0, max(1, s0 // 2), 2 * s0}):
            split = _chunking(k, split, bk)[0]
            if not _workspace_fits(m, n, k, None, split):
                continue
            c = dict(BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, DOT=m > 1, num_warps=warps, num_stages=stages)
            if split > 1:
                c["REDUCE"] = "last"
            if c not in out:
                out.append(c)
    return out


def bench_skinny(m, k, n, epi, make_weight, peak, sweep: bool = False) -> dict:
    """Every configuration of one weight kind at one shape (``sweep``: also SWEEP_TILES'): times, bandwidth, error of
    the best."""
    probe = make_weight()
    wbytes = weight_bytes(probe)
    copies = max(1, math.ceil(ROTATE_BYTES / wbytes))
    x, weights, outs, res = case_operands(m, k, n, epi, copies, make_weight)
    bits, glu, act = probe.get("bits"), epi.get("glu", False), epi.get("act", "none")
    act_bytes = x.numel() * 2 + outs[0].numel() * 2 * (2 if res is not None else 1)
    rows = []
    todo = configs(m, n, k, bits, glu)
    todo += [c for c in (sweep_configs(m, n, k, glu) if sweep else []) if c not in todo]
    for i, c in enumerate(todo):
        ws = torch.empty(max(1, workspace_bytes(m, n, k, bits, glu, config=c)), dtype=torch.uint8, device="cuda")
        # zeroed once, left zero by every call (as planned): no memset inside the timed graph
        cnt = torch.zeros(max(1, counter_bytes(m, n, k, bits, glu, config=c)), dtype=torch.uint8, device="cuda")
        calls = [lambda kw=kw, o=o: skinny_gemm(x, residual=res, act=act, glu=glu, out=o, workspace=ws, counters=cnt,
                                                config=c, **kw)
                 for kw, o in zip(weights, outs)]
        us = graph_us(calls)
        rows.append(dict(config=c, us=us, GBps=(wbytes + act_bytes) / us * 1e-3))
        if sweep:
            print(f"    {i + 1}/{len(todo)} {c}: {us:.2f} us {rows[-1]['GBps']:.0f} GB/s", flush=True)
    best = min(rows, key=lambda row: row["us"])
    got = skinny_gemm(x, residual=res, act=act, glu=glu, config=best["config"], **weights[0])
    err = float((got.float() - reference(x, weights[0], epi, res)).norm() / reference(x, weights[0], epi, res).norm())
    return dict(weight_bytes=wbytes, copies=copies, best_us=best["us"], best_config=best["config"], GBps=best["GBps"],
                pct_peak=100 * best["GBps"] * 1e9 / peak, default_us=rows[0]["us"], rel_err=err, configs=rows)


def bench_cublas(m, k, n, epi, peak) -> dict:
    """F.linear alone, and F.linear followed by the epilogue in eager torch."""
    wbytes = n * k * 2
    copies = max(1, math.ceil(ROTATE_BYTES / wbytes))
    x, weights, _, res = case_operands(m, k, n, epi, copies, lambda: dict(w=torch.randn(n, k, device="cuda", dtype=BF16) * k ** -0.5))
    n_out = n // 2 if epi.get("glu") else n

    def with_epilogue(w):
        h = F.linear(x, w)
        if epi.get("glu"):
            g, u = h.chunk(2, -1)
            h = F.silu(g) * u
        return h + res if res is not None else h
    us = graph_us([lambda w=kw["w"]: F.linear(x, w) for kw in weights])
    us_epi = graph_us([lambda w=kw["w"]: with_epilogue(w) for kw in weights]) if epi else us
    gbps = (wbytes + (x.numel() + m * n) * 2) / us * 1e-3
    return dict(us=us, GBps=gbps, pct_peak=100 * gbps * 1e9 / peak, with_epilogue_us=us_epi, n_out=n_out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON results path")
    p.add_argument("--m", type=int, nargs="+", default=[1, 16], help="rows (decode batch), each <= 16")
    p.add_argument("--shapes", nargs="+", default=None, help=f"names among: {', '.join(s[0] for s in SHAPES)}")
    p.add_argument("--sweep", action="store_true", help="bf16 only, every SWEEP_TILES configuration too")
    p.add_argument("--peak", type=float, default=4.8e12, help="HBM bandwidth the percentages refer to, bytes/s")
    args = p.parse_args()
    shapes = [s for s in SHAPES if args.shapes is None or s[0] in args.shapes]
    res = dict(device=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__, peak_GBps=args.peak / 1e9,
               copy_GBps=copy_bandwidth() / 1e9, rotate_bytes=ROTATE_BYTES, results=[])
    print(f"{res['device']}: device copy {res['copy_GBps']:.0f} GB/s", flush=True)
    for name, k, n, epi in shapes:
        for m in args.m:
            torch.manual_seed(0)
            row = dict(name=name, M=m, K=k, N=n, epilogue=epi, cublas=bench_cublas(m, k, n, epi, args.peak))
            kinds = dict(bf16=lambda: dict(w=torch.randn(n, k, device="cuda", dtype=BF16) * k ** -0.5),
                         int8=lambda: quantize(torch.randn(n, k, device="cuda", dtype=BF16), 8, k),
                         int4_g128=lambda: quantize(torch.randn(n, k, device="cuda", dtype=BF16), 4, 128))
            if args.sweep:
                kinds = {"bf16": kinds["bf16"]}
            for kind, make in kinds.items():
                row[kind] = bench_skinny(m, k, n, epi, make, args.peak, sweep=args.sweep)
                torch.cuda.empty_cache()
            res["results"].append(row)
            print(f"{name:20s} M={m:2d}  cuBLAS {row['cublas']['us']:7.1f} us {row['cublas']['pct_peak']:5.1f}%  " + "  ".join(
                f"{kind} {row[kind]['best_us']:7.1f} us {row[kind]['pct_peak']:5.1f}% (default {row[kind]['default_us']:.1f})"
                for kind in kinds), flush=True)
            with open(args.out, "w") as f:  # after every row: a run cut short still leaves its figures
                json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
