"""DiT-XL/2 256x256 (diffusers DiTTransformer2DModel, bf16, random weights, every block's norm1.emb tied as in
real converted checkpoints): kiln vs eager vs torch.compile, in ONE process. Median ms of
triton.testing.do_bench, first-call / compile time, peak memory, relative error vs an fp32 eager reference.
Usage: python3 bench/dit.py [--modes eager,default,max-autotune-no-cudagraphs] [--batches 1,8]. Writes $OUT/dit.json."""
import argparse
import json
import os
import time

import torch
import triton

from common import measure

import kiln
from kiln.testing import DIT_DYNAMIC, dit_inputs, dit_xl2

ap = argparse.ArgumentParser()
ap.add_argument("--modes", default="eager,default,max-autotune-no-cudagraphs")
ap.add_argument("--batches", default="1,8")
a = ap.parse_args()
out = os.environ.get("OUT", "/tmp")
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "runs": []}

model = dit_xl2(tied=True, device="cuda")
ref32 = model  # fp32 reference, then bf16 for everything measured
dims = DIT_DYNAMIC


def inputs(bs, dtype):
    return dit_inputs(bs, dtype)


batches = [int(b) for b in a.batches.split(",")]
want = {}
with torch.no_grad():
    for bs in batches:
        want[bs] = ref32(**inputs(bs, torch.float32)).sample
m16 = model.to(torch.bfloat16)

t0 = time.time()
compiled = kiln.compile(m16, (), inputs(2, torch.bfloat16), dynamic=dims, config=kiln.CompileConfig(verify=False))
res["kiln_compile_s"] = time.time() - t0
rep = compiled.report().to_dict()
res["kiln_ops_before"], res["kiln_ops_after"] = sum(rep["ops_before"].values()), sum(rep["ops_after"].values())
print("kiln compile", round(res["kiln_compile_s"], 1), "s", flush=True)

for bs in batches:
    x = inputs(bs, torch.bfloat16)
    for mode in ["kiln"] + a.modes.split(","):
        f = (lambda **kw: compiled(**kw)) if mode == "kiln" else m16 if mode == "eager" else torch.compile(m16, mode=mode)
        run = {"batch": bs, "system": mode, **measure(lambda: f(**x).sample, want[bs])}
        if mode == "kiln":
            run["executor"] = compiled.executor.describe()["plans"][-1]
        res["runs"].append(run)
        print({k: v for k, v in run.items() if k != "executor"}, flush=True)
    base = {r["system"]: r["ms"] for r in res["runs"] if r["batch"] == bs}
    res[f"speedup_bs{bs}"] = {k: base[k] / base["kiln"] for k in base if k != "kiln"}
with open(os.path.join(out, "dit.json"), "w") as fh:
    json.dump(res, fh, indent=1)
print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))
