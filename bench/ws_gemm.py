"""Warp-specialized TMA GEMMs (triton 3.6's Hopper pass: ``tl.range(.., warp_specialize=True)`` on the K loop gives a
producer warpgroup for the TMA loads and two consumer warpgroups splitting the tile's rows, each its own instruction
stream) against tma_gemm.py's software-pipelined configs and cuBLAS, in ONE process, each call inside a CUDA graph of
REPLAYS calls (bench/fp8_gemm.py's timing): DiT-XL/2 (512 rows: one image's CFG batch; 4096: eight images) and the
Llama-3.2-1B prefill (2048 tokens), bf16 and fp8 operands; the 1B down projection on block-scaled codes (xs_group=128,
the consumer that lost 1.7x without warp specialization, NOTES session 39). Every config's output is checked against
the first config's of its operand kind (max error over max value <= 2e-2) before it is timed; one past that is
recorded as REFUSED, not timed.

Usage: python3 bench/ws_gemm.py [--shapes 1b,dit512,dit4096] [--out PATH]      writes $OUT/ws_gemm.json
       python3 bench/ws_gemm.py --smoke        (CPU interpreter, tiny shapes: checks the script runs)"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ["TRITON_INTERPRET"] = "1"

import triton  # noqa: E402

from kiln.codegen.kernels import tma_gemm as ttma  # noqa: E402
from kiln.ir.quant import quantize_rows  # noqa: E402

from common import graphed_ms  # noqa: E402

SHAPES = {  # (name, M, K, N, act, glu)
    "dit512": [("dit 512 qkv", 512, 1152, 3456, "none", False), ("dit 512 proj", 512, 1152, 1152, "none", False),
               ("dit 512 fc1+gelu", 512, 1152, 4608, "gelu_tanh", False), ("dit 512 fc2", 512, 4608, 1152, "none", False)],
    "dit4096": [("dit 4096 qkv", 4096, 1152, 3456, "none", False), ("dit 4096 fc1+gelu", 4096, 1152, 4608, "gelu_tanh", False),
                ("dit 4096 fc2", 4096, 4608, 1152, "none", False)],
    "1b": [("1b qkv", 2048, 2048, 3072, "none", False), ("1b gate/up glu", 2048, 2048, 16384, "silu", True),
           ("1b down", 2048, 8192, 2048, "none", False)],
}
REPLAYS = 10


def bench(fn) -> float:
    if SMOKE:
        fn()
        return 0.0
    return graphed_ms(fn, REPLAYS)


def label(c: dict) -> str:
    return (("WS " if c.get("WS") else "") + "x".join(str(c[v]) for v in ("BLOCK_M", "BLOCK_N"))
            + f" w{c.get('num_warps')} s{c.get('num_stages')}" + ("" if c.get("PERSISTENT", True) else " a tile each"))


def one_shape(name, m, k, n, act, glu, device) -> dict:
    g = torch.Generator(device=device).manual_seed(0)
    dt = torch.float16 if SMOKE else torch.bfloat16  # (the interpreter's tl.dot on bfloat16 is wrong)
    x = torch.randn(m, k, device=device, generator=g).to(dt)
    w = (torch.randn(n, k, device=device, generator=g) / k ** 0.5).to(dt)
    row = {"name": name, "m": m, "k": k, "n": n, "us": {}, "errors": {}}
    if device == "cuda":
        row["us"]["bf16 cublas (no epilogue)"] = bench(lambda: F.linear(x, w)) * 1e3
    operands = {"16-bit": (x, w, None, None, None)}
    qw, sw = quantize_rows(w.float(), "fp8")
    qx, sx = quantize_rows(x.float(), "fp8")
    operands["fp8"] = (qx, qw, sx, sw, None)
    if device == "cuda":
        row["us"]["fp8 scaled_mm (no epilogue)"] = bench(lambda: torch._scaled_mm(
            qx, qw.t(), scale_a=sx.view(m, 1), scale_b=sw.view(1, -1), out_dtype=torch.bfloat16)) * 1e3
    if name in ("1b down", "smoke"):  # the block-scaled consumer
        bq, bs = quantize_rows(x.float(), "fp8", group=128)
        operands["fp8 xs_group128"] = (bq, qw, bs, sw, 128)
    ref = {}
    for kind, (a, b, sa, sb, xg) in operands.items():
        configs = ttma.configs(m, a.dtype, glu) if device == "cuda" else [dict(ttma.INTERPRET_CONFIG)]
        ws = ttma.configs(m, a.dtype, glu, ws=True) if device == "cuda" else [dict(ttma.INTERPRET_CONFIG, WS=True)]
        ws += [dict(ws[0], PERSISTENT=False)]  # (a program a tile)
        for c in configs + ws:
            key = f"{kind} tma {label(c)}"
            try:
                run = (lambda c=c: ttma.tma_gemm(a, b, sa, sb, act=act, glu=glu, config=c, xs_group=xg)) if sa is not None \
                    else (lambda c=c: ttma.tma_gemm(a, b, act=act, glu=glu, config=c))
                y = run().float()
                if kind not in ref:
                    ref[kind] = y
                err = ((y - ref[kind]).abs().max() / ref[kind].abs().max().clamp_min(1e-6)).item()
                row["errors"][key] = err
                if err > 2e-2:
                    row["errors"][key + " REFUSED"] = err
                    continue
                row["us"][key] = bench(run) * 1e3
            except Exception as e:  # noqa: BLE001
                row["errors"][key] = f"{type(e).__name__}: {str(e).splitlines()[0]}"[:240]
    row["tflops"] = {key: 2 * m * k * n / (v * 1e-6) / 1e12 for key, v in row["us"].items() if v}
    return row


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="1b,dit512,dit4096")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "ws_gemm.json"))
    a = ap.parse_args()
    device = "cpu" if SMOKE else "cuda"
    shapes = [("smoke", 40, 256, 48, "none", False), ("smoke glu", 40, 64, 48, "silu", True)] if SMOKE else \
        [s for part in a.shapes.split(",") for s in SHAPES[part]]
    res = {"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "torch": torch.__version__,
           "triton": triton.__version__, "shapes": []}
    for s in shapes:
        r = one_shape(*s, device)
        res["shapes"].append(r)
        best = {}
        for key, v in r["us"].items():  # per operand kind: the library, the best config without WS, the best with
            kind = key.split(" tma ")[0] + (" tma WS" if " WS " in key else " tma" if " tma " in key else "")
            best[kind] = min(best.get(kind, (v, key)), (v, key))
        print(f"{r['name']:18s} " + "  ".join(f"{key}={v:.1f}us" for kind, (v, key) in sorted(best.items())), flush=True)
        for key, e in r["errors"].items():
            if isinstance(e, str) or key.endswith("REFUSED"):
                print(f"    {key}: {e}", flush=True)
        with open(a.out, "w") as fh:
            json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
