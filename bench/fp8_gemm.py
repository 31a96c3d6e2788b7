"""FP8 / int8 GEMMs alone at DiT-XL/2 and Llama-3.2-1B-prefill shapes, H200, one process: where the quantized
path's time goes. Per shape: bf16 cuBLAS (F.linear) and kiln's bf16 Triton template; the per-token row quantizer
alone; kiln's AQGEMM template with EVERY config on pre-quantized codes; torch._scaled_mm (fp8) and torch._int_mm
(int8) on the same codes; the persistent TMA template (tma_gemm.py) with every config, on the codes and in bf16, and
its first config launched a program a tile. Each call is timed inside a CUDA graph of REPLAYS calls (launch cost out,
as in kiln's plans): medians of triton.testing.do_bench over the graph's replay / REPLAYS; TFLOP/s of the GEMM.

Usage: python3 bench/fp8_gemm.py [--out PATH]     writes $OUT/fp8_gemm.json"""
import argparse
import json
import os

import torch
import torch.nn.functional as F
import triton

from kiln.codegen.kernels import aqgemm as taq
from kiln.codegen.kernels import quantize_rows as tqr
from kiln.codegen.kernels import tma_gemm as ttma
from kiln.codegen.kernels.gemm import gemm
from kiln.ir.quant import quantize_rows

from common import graphed_ms

SHAPES = [  # (name, M, K, N, act, glu)
    ("dit b1 qkv", 256, 1152, 3456, "none", False),
    ("dit b1 fc1+gelu", 256, 1152, 4608, "gelu_tanh", False),
    ("dit b1 fc2", 256, 4608, 1152, "none", False),
    ("dit b8 qkv", 2048, 1152, 3456, "none", False),
    ("dit b8 proj", 2048, 1152, 1152, "none", False),
    ("dit b8 fc1+gelu", 2048, 1152, 4608, "gelu_tanh", False),
    ("dit b8 fc2", 2048, 4608, 1152, "none", False),
    ("dit adaLN b2", 2, 1152, 195840, "none", False),
    ("1b prefill qkv", 2048, 2048, 3072, "none", False),
    ("1b prefill gate/up glu", 2048, 2048, 16384, "silu", True),
    ("1b prefill down", 2048, 8192, 2048, "none", False),
]


REPLAYS = 10


def bench(fn) -> float:
    return graphed_ms(fn, REPLAYS)


def label(prefix: str, c: dict) -> str:
    return (prefix + " " + "x".join(str(c[v]) for v in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + f" w{c['num_warps']} s{c['num_stages']}"
            + ("" if c.get("PERSISTENT", True) else " a tile each"))


def tma_configs(m: int, dtype, glu: bool) -> list[dict]:
    cs = ttma.configs(m, dtype, glu)
    return cs + [dict(cs[0], PERSISTENT=False)] if cs else []


def one_shape(name, m, k, n, act, glu) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16, generator=g)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16, generator=g) / k ** 0.5
    flop = 2 * m * k * n
    row = {"name": name, "m": m, "k": k, "n": n, "act": act, "glu": glu, "ms": {}}
    ms = row["ms"]
    ms["bf16 cublas (no epilogue)"] = bench(lambda: F.linear(x, w))
    out = torch.empty(m, n // 2 if glu else n, device="cuda", dtype=torch.bfloat16)
    try:
        ms["bf16 kiln triton"] = bench(lambda: gemm(x, w, act=act, glu=glu, out=out))
    except Exception as e:  # noqa: BLE001
        row["bf16 kiln triton error"] = f"{type(e).__name__}: {e}"[:200]
    for c in tma_configs(m, x.dtype, glu):
        try:
            ms[label("bf16 tma", c)] = bench(lambda: ttma.tma_gemm(x, w, act=act, glu=glu, out=out, config=c))
        except Exception as e:  # noqa: BLE001
            row[label("bf16 tma", c) + " error"] = f"{type(e).__name__}: {e}"[:200]
    for fmt in ("fp8", "int8"):
        qw, sw = quantize_rows(w, fmt)
        qx, sx = tqr.quantize_rows(x, fmt)
        ms[f"{fmt} quantize_rows"] = bench(lambda: tqr.quantize_rows(x, fmt))
        for c in taq.configs(m, glu):
            key = label(f"{fmt} triton", c)
            try:
                ms[key] = bench(lambda: taq.aqgemm(qx, sx, qw, sw, act=act, glu=glu, out=out, config=c))
            except Exception as e:  # noqa: BLE001
                row[key + " error"] = f"{type(e).__name__}: {e}"[:200]
        for c in tma_configs(m, qx.dtype, glu):
            key = label(f"{fmt} tma", c)
            try:
                ms[key] = bench(lambda: ttma.tma_gemm(qx, qw, sx, sw, act=act, glu=glu, out=out, config=c))
            except Exception as e:  # noqa: BLE001
                row[key + " error"] = f"{type(e).__name__}: {e}"[:200]
        try:
            if fmt == "fp8":
                ms["fp8 scaled_mm (no epilogue)"] = bench(lambda: torch._scaled_mm(qx, qw.t(), scale_a=sx.view(m, 1), scale_b=sw.view(1, n),
                                                                                  out_dtype=torch.bfloat16))
            elif m > 16:
                ms["int8 int_mm (no epilogue)"] = bench(lambda: torch._int_mm(qx, qw.t()))
        except Exception as e:  # noqa: BLE001
            row[f"{fmt} library error"] = f"{type(e).__name__}: {e}"[:200]
    row["tflops"] = {key: flop / (v * 1e-3) / 1e12 for key, v in ms.items() if "quantize" not in key}
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "fp8_gemm.json"))
    a = ap.parse_args()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "shapes": []}
    for s in SHAPES:
        res["shapes"].append(one_shape(*s))
        r = res["shapes"][-1]
        best = {}
        for key, v in r["ms"].items():  # the best of each kind: bf16 / fp8 / int8 x library / template / tma
            kind = key.split(" ")[0] + " " + ("tma" if " tma" in key else "triton" if "triton" in key else key.split(" ", 1)[1])
            best[kind] = min(best.get(kind, (v, key)), (v, key))
        print(f"{r['name']:24s} " + "  ".join(f"{kind}={v * 1e3:.1f}us" for kind, (v, key) in best.items()), flush=True)
        for key in (key for key in r if key.endswith(" error")):
            print(f"    {key}: {r[key]}", flush=True)
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
