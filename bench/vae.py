"""The SD VAE decoder (diffusers AutoencoderKL.decode with Stable Diffusion's architecture: block_out_channels
(128, 256, 512, 512), 2 layers per block, 32 groups; random weights, bf16) at latents 32x32 (256 px images) and
128x128 (1024 px), batch 1: kiln vs eager vs torch.compile (default, reduce-overhead), in ONE process. Median ms of
triton.testing.do_bench, first call / compile time, peak memory, relative error vs the float32 eager model, and
kiln's measured per-shape choices for its convs (cuDNN NCHW / channels-last / torch) and group norms (kiln / torch).
Usage: python3 bench/vae.py [--sizes 32,128] [--modes eager,default,reduce-overhead] [--out $OUT/vae.json]."""
import argparse
import json
import os
import time

import torch
import triton

from common import measure

import kiln
from kiln.testing import SD_VAE, VAEDecode, vae

ap = argparse.ArgumentParser()
ap.add_argument("--sizes", default="32,128", help="latent heights = widths")
ap.add_argument("--modes", default="eager,default,reduce-overhead")
ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "vae.json"))
a = ap.parse_args()
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
       "cudnn": torch.backends.cudnn.version(), "runs": [], "kiln_choices": {}}

model = vae(SD_VAE, noise=0.02, device="cuda")
sizes = [int(s) for s in a.sizes.split(",")]
z32 = {s: torch.randn(1, 4, s, s, device="cuda", generator=torch.Generator("cuda").manual_seed(s)) for s in sizes}
with torch.no_grad():
    want = {s: VAEDecode(model)(z).float() for s, z in z32.items()}  # the float32 reference
decode = VAEDecode(model.to(torch.bfloat16))


def kiln_choices(compiled) -> dict:
    """The tuner's conv and group norm decisions: shape -> chosen candidate and every candidate's ms."""
    out = {}
    for d in compiled.executor.tuner.decisions.values():
        if d["kind"] in ("conv", "group_norm", "conv_layout"):
            w = d["what"]
            out[f"{d['kind']} x{w['x']}" + (f" w{w['w']}" if "w" in w else "")] = {"choice": d["choice"], "ms": d["ms"]}
    return out


for s in sizes:
    z = z32[s].bfloat16()
    t0 = time.time()
    compiled = kiln.compile(decode, (z,), config=kiln.CompileConfig(verify=False))
    compile_s = time.time() - t0
    print(f"latents {s}x{s}: kiln compile {compile_s:.1f} s", flush=True)
    for mode in ["kiln"] + a.modes.split(","):
        f = compiled if mode == "kiln" else decode if mode == "eager" else torch.compile(decode, mode=mode)
        run = {"latents": s, "image": 8 * s, "system": mode, **measure(lambda: f(z), want[s])}
        if mode == "kiln":
            run["compile_s"] = compile_s
            run["executor"] = compiled.executor.describe()["plans"][-1]
        res["runs"].append(run)
        print({k: v for k, v in run.items() if k != "executor"}, flush=True)
    res["kiln_choices"][f"{s}x{s}"] = kiln_choices(compiled)
    base = {r["system"]: r["ms"] for r in res["runs"] if r["latents"] == s}
    res[f"speedup_{8 * s}px"] = {k: base[k] / base["kiln"] for k in base if k != "kiln"}
    print("speedup", res[f"speedup_{8 * s}px"], flush=True)
    del compiled
    torch.cuda.empty_cache()

with open(a.out, "w") as fh:
    json.dump(res, fh, indent=1)
print("wrote", a.out)
