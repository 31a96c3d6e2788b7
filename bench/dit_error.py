"""Where DiT-XL/2's bf16 error comes from: kiln variants (a pass off, a kernel choice forced, the per-op reference
backend) and torch.compile, each against the fp32 eager model, same inputs, one process.
Usage: python3 bench/dit_error.py [--batch 8] [--no-inductor]. Writes $OUT/dit_error.json."""
import argparse
import json
import os
import time

import torch

import kiln
from kiln.testing import DIT_DYNAMIC, dit_inputs, dit_xl2, rel_err

ap = argparse.ArgumentParser()
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--no-inductor", action="store_true")
a = ap.parse_args()

model = dit_xl2(tied=True, device="cuda")
with torch.no_grad():
    want = model(**dit_inputs(a.batch, torch.float32)).sample
m16 = model.to(torch.bfloat16)
x = dit_inputs(a.batch)

VARIANTS = {
    "kiln": {},
    "gemm cublas only (no cuBLASLt epilogues)": {"kernels": {"gemm": "cublas"}},
    "no fuse_epilogue": {"disable": ("fuse_epilogue",)},
    "no fuse_norm": {"disable": ("fuse_norm",)},
    "no fuse_horizontal_gemm": {"disable": ("fuse_horizontal_gemm",)},
    "reference backend (per-op torch)": {"backend": "reference"},
}
res = {"device": torch.cuda.get_device_name(), "batch": a.batch, "rel_err_vs_fp32": {}}
with torch.no_grad():
    res["rel_err_vs_fp32"]["eager"] = rel_err(m16(**x).sample.float(), want)
    for name, cfg in VARIANTS.items():
        t0 = time.time()
        m = kiln.compile(m16, (), dit_inputs(2), dynamic=DIT_DYNAMIC, config=kiln.CompileConfig(**cfg))
        res["rel_err_vs_fp32"][name] = rel_err(m(**x).sample.float(), want)
        print(name, round(time.time() - t0, 1), "s", res["rel_err_vs_fp32"][name], flush=True)
        del m
    if not a.no_inductor:
        res["rel_err_vs_fp32"]["torch.compile default"] = rel_err(torch.compile(m16)(**x).sample.float(), want)
with open(os.path.join(os.environ.get("OUT", "/tmp"), "dit_error.json"), "w") as fh:
    json.dump(res, fh, indent=1)
print(json.dumps(res, indent=1))
