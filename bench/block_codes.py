"""Block-scaled activation codes between two quantized GEMMs, against the row-scaled path the plans run today (GPU).

An MLP's second GEMM (the 1B's down projection, DiT's fc2) reads codes of the first one's output. With one scale a row
(per token) that output must be complete before any code is written: the first GEMM stores it in bf16 (the GLU's gate
/ up product [M, 2N], or fc1's GELU output) and a second kernel reads it back to quantize it (epilogue_codes.py after a
library GEMM, or quantize_rows.py). With a scale per row and 128 columns (tma_gemm's ``codes=(fmt, 128)``, DeepSeek-V3's
1 x 128 blocks) the first GEMM's epilogue writes the codes itself and the second scales each K step's product by its
block's scales (``xs_group=128``).

Per pair, format and row count: each stage alone inside a CUDA graph of REPLAYS calls (do_bench medians, us a call),
every config of the Triton kernels, the best of each path summed; and the error of the second GEMM's output against
the float64 chain (x -> first GEMM -> its epilogue -> second GEMM) for both paths.

Usage: python3 bench/block_codes.py [--out PATH]     writes $OUT/block_codes.json"""
import argparse
import json
import os

import torch
import triton

from kiln.codegen import lower
from kiln.codegen.kernels import aqgemm as taq
from kiln.codegen.kernels import epilogue_codes as tec
from kiln.codegen.kernels import quantize_rows as tqr
from kiln.codegen.kernels import tma_gemm as ttma
from kiln.ir.quant import dequantize_rows, quantize_rows
from kiln.testing import rel_err

from common import graphed_ms

PAIRS = [  # (name, M, K, N (first GEMM's output columns, after GLU), N2 (second's), act, glu)
    ("1b prefill gate/up -> down", 2048, 2048, 8192, 2048, "silu", True),
    ("dit b2 fc1 -> fc2", 512, 1152, 4608, 1152, "gelu_tanh", False),
    ("dit b8 fc1 -> fc2", 2048, 1152, 4608, 1152, "gelu_tanh", False),
    ("dit b16 fc1 -> fc2", 4096, 1152, 4608, 1152, "gelu_tanh", False),
]
GROUP = 128
REPLAYS = 10


SMOKE = False  # --smoke: tiny pairs on the CPU under the interpreter, each candidate run once (the script's logic)


def bench(fn) -> float:
    if SMOKE:
        fn()
        return 1.0
    return graphed_ms(fn, REPLAYS) * 1e3


def best(cands: dict, row: dict, stage: str) -> tuple:
    """Time each candidate (name -> fn), record them under row[stage]; (us, name) of the fastest."""
    times = row.setdefault(stage, {})
    for name, fn in cands.items():
        try:
            times[name] = bench(fn)
        except Exception as e:  # noqa: BLE001
            row.setdefault("errors", {})[f"{stage} {name}"] = f"{type(e).__name__}: {e}"[:200]
    return min((v, k) for k, v in times.items())


def configs(m: int, dtype, glu: bool = False) -> list[dict]:
    if SMOKE:  # one small tile for the interpreter, its K step and column tile both one GROUP
        return [dict(BLOCK_M=16, BLOCK_N=GROUP, BLOCK_K=GROUP, GROUP_M=2, num_warps=4, num_stages=2)]
    return ttma.configs(m, dtype, glu)


def pconfigs(m: int, glu: bool = False) -> list[dict]:
    """aqgemm.py's pointer template's configs (the interpreter: the smoke one)."""
    return configs(m, None, glu) if SMOKE else taq.configs(m, glu)


def label(c: dict) -> str:
    return "x".join(str(c[v]) for v in ("BLOCK_M", "BLOCK_N", "BLOCK_K")) + f" w{c['num_warps']} s{c['num_stages']}"


def one(name, m, k, n, n2, act, glu, fmt) -> dict:
    g = torch.Generator(device="cpu" if SMOKE else "cuda").manual_seed(0)
    dev, bf = ("cpu", torch.float16) if SMOKE else ("cuda", torch.bfloat16)
    x = torch.randn(m, k, device=dev, dtype=bf, generator=g)
    w1 = torch.randn(2 * n if glu else n, k, device=dev, dtype=bf, generator=g) / k ** 0.5
    b1 = None if glu else torch.randn(n, device=dev, dtype=bf, generator=g) * 0.1
    w2 = torch.randn(n2, n, device=dev, dtype=bf, generator=g) / n ** 0.5
    qx, sx = tqr.quantize_rows(x, fmt)
    q1, s1 = quantize_rows(w1, fmt)
    q2, s2 = quantize_rows(w2, fmt)
    row = {"pair": name, "fmt": fmt, "m": m, "k": k, "n": n, "n2": n2}
    epi = dict(bias=b1, act=act, glu=glu)
    # the row path: the first GEMM's output y in bf16, then its codes by a second kernel
    y = torch.empty(m, n, device=dev, dtype=bf)
    hq, hs = torch.empty(m, n, device=dev, dtype=qx.dtype), torch.empty(m, device=dev, dtype=torch.float32)
    first = {f"tma {label(c)} + quantize_rows": (lambda c=c: (ttma.tma_gemm(qx, q1, sx, s1, out=y, config=c, **epi),
                                                             tqr.quantize_rows(y, fmt, out=(hq, hs))))
             for c in configs(m, qx.dtype, glu)}
    first.update({f"pointer {label(c)} + quantize_rows": (lambda c=c: (
        taq.aqgemm(qx, sx, q1, s1, out=y, config=c, **epi), tqr.quantize_rows(y, fmt, out=(hq, hs))))
        for c in pconfigs(m, glu)})
    if SMOKE:  # (no library GEMM on the CPU: the product in float, through the same epilogue kernel)
        first["float product + epilogue_codes"] = lambda: tec.epilogue_codes(
            (dequantize_rows(qx, sx) @ dequantize_rows(q1, s1).t()).to(bf), fmt, hq, hs, **epi)
    elif fmt == "fp8":
        first["scaled_mm + epilogue_codes"] = lambda: tec.epilogue_codes(
            torch._scaled_mm(qx, q1.t(), scale_a=sx.view(m, 1), scale_b=s1.view(1, -1), out_dtype=bf), fmt, hq, hs, **epi)
    else:
        first["int_mm + epilogue_codes"] = lambda: tec.epilogue_codes(
            torch._int_mm(qx, q1.t()), fmt, hq, hs, xs=sx, ws=s1, dtype=bf, **epi)
    out = torch.empty(m, n2, device=dev, dtype=bf)
    row_first = best(first, row, "row first")
    row["row first best"] = row_first
    first[row_first[1]]()
    row_second = best({f"tma {label(c)}": (lambda c=c: ttma.tma_gemm(hq, q2, hs, s2, out=out, config=c))
                       for c in configs(m, qx.dtype)}
                      | {f"pointer {label(c)}": (lambda c=c: taq.aqgemm(hq, hs, q2, s2, out=out, config=c))
                         for c in pconfigs(m)}, row, "row second")
    ttma.tma_gemm(hq, q2, hs, s2, out=out, config=configs(m, qx.dtype)[0])
    got_row = out.clone()
    # the block path: the first GEMM's epilogue writes codes with a scale per row and GROUP columns
    bq, bs = torch.empty(m, n, device=dev, dtype=qx.dtype), torch.empty(m, n // GROUP, device=dev, dtype=torch.float32)
    cs1 = [c for c in configs(m, qx.dtype, glu) if c["BLOCK_N"] % GROUP == 0]
    pcs1 = [c for c in pconfigs(m, glu) if c["BLOCK_N"] % GROUP == 0]
    blk_first = best({f"tma {label(c)} codes": (lambda c=c: ttma.tma_gemm(qx, q1, sx, s1, out=(bq, bs), config=c,
                                                                          codes=(fmt, GROUP), dtype=bf, **epi)) for c in cs1}
                     | {f"pointer {label(c)} codes": (lambda c=c: taq.aqgemm(qx, sx, q1, s1, out=(bq, bs), config=c,
                                                                             codes=(fmt, GROUP), dtype=bf, **epi))
                        for c in pcs1}, row, "block first")
    cs2 = [c for c in configs(m, qx.dtype) if GROUP % c["BLOCK_K"] == 0]
    pcs2 = [c for c in pconfigs(m) if GROUP % c["BLOCK_K"] == 0]
    library = {} if SMOKE else lower.scaled_mm_blocks(lambda: (bq, bs), q2, s2, (None, None, None),
                                                      dict(format=fmt, act="none", glu=False, act_group=GROUP), out,
                                                      out.device, (m, n, n2))
    blk_second = best({f"tma {label(c)} xs_group": (lambda c=c: ttma.tma_gemm(bq, q2, bs, s2, out=out, config=c,
                                                                              xs_group=GROUP)) for c in cs2}
                      | {f"pointer {label(c)} xs_group": (lambda c=c: taq.aqgemm(bq, bs, q2, s2, out=out, config=c,
                                                                                 xs_group=GROUP)) for c in pcs2}
                      | library, row, "block second")  # (+ cuBLASLt's 1 x 128 block recipe, fp8, where torch has it)
    # the pointer template's block path checked too (its first configs), against the TMA one's
    taq.aqgemm(qx, sx, q1, s1, out=(bq, bs), config=pcs1[0], codes=(fmt, GROUP), dtype=bf, **epi)
    taq.aqgemm(bq, bs, q2, s2, out=out, config=pcs2[0], xs_group=GROUP)
    got_ptr = out.clone()
    ttma.tma_gemm(qx, q1, sx, s1, out=(bq, bs), config=cs1[0], codes=(fmt, GROUP), dtype=bf, **epi)
    ttma.tma_gemm(bq, q2, bs, s2, out=out, config=cs2[0], xs_group=GROUP)
    got_blk = out.clone()
    # errors against the float64 chain
    h64 = x.double() @ w1.double().t()
    y64 = (torch.nn.functional.silu(h64[:, :n]) * h64[:, n:] if glu
           else torch.nn.functional.gelu(h64 + b1.double(), approximate="tanh"))
    want = y64 @ w2.double().t()
    row["err row"], row["err block"] = rel_err(got_row, want), rel_err(got_blk, want)
    row["err block pointer"] = rel_err(got_ptr, want)
    row["err codes row"] = rel_err(dequantize_rows(hq, hs, torch.float64), y64)
    row["err codes block"] = rel_err(dequantize_rows(bq, bs, torch.float64), y64)
    row["us row"], row["us block"] = row_first[0] + row_second[0], blk_first[0] + blk_second[0]
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "block_codes.json"))
    ap.add_argument("--smoke", action="store_true", help="tiny pairs on the CPU (TRITON_INTERPRET=1): the script runs")
    ap.add_argument("--pairs", default="", help="names' substrings, comma-separated (default: every pair)")
    a = ap.parse_args()
    global SMOKE, GROUP
    SMOKE = a.smoke
    GROUP = 32 if SMOKE else GROUP
    pairs = [p for p in PAIRS if not a.pairs or any(w in p[0] for w in a.pairs.split(","))]
    pairs = [(n, 32, 64, 256, 64, act, glu) for n, _, _, _, _, act, glu in pairs[:2]] if SMOKE else pairs
    device = "cpu (interpreter)" if SMOKE else torch.cuda.get_device_name()
    res = {"device": device, "torch": torch.__version__, "triton": triton.__version__, "rows": []}
    for p in pairs:
        for fmt in ("fp8", "int8"):
            r = one(*p, fmt)
            res["rows"].append(r)
            print(f"{r['pair']:28s} {fmt:4s} row {r['us row']:7.1f} us ({r['row first best'][1]} "
                  f"{r['row first best'][0]:.1f} + {min(r['row second'].values()):.1f})  block {r['us block']:7.1f} us "
                  f"({min(r['block first'].values()):.1f} + {min(r['block second'].values()):.1f})  "
                  f"err {r['err row']:.2e} / {r['err block']:.2e} (pointer {r['err block pointer']:.2e})  codes {r['err codes row']:.2e} / "
                  f"{r['err codes block']:.2e}", flush=True)
            for key, e in r.get("errors", {}).items():
                print(f"    {key}: {e}", flush=True)
            with open(a.out, "w") as fh:
                json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
