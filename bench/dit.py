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
import triton.testing as tt
from diffusers import DiTTransformer2DModel

import kiln
from kiln.testing import rel_err

ap = argparse.ArgumentParser()
ap.add_argument("--modes", default="eager,default")
ap.add_argument("--batches", default="1,8")
a = ap.parse_args()
out = os.environ.get("OUT", "/tmp")
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "runs": []}

torch.manual_seed(0)
model = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                              sample_size=32, patch_size=2, num_embeds_ada_norm=1000).eval()
with torch.no_grad():  # ada_norm_zero zero-inits the modulation: perturb everything, as the peer script does
    for p in model.parameters():
        p.add_(torch.randn_like(p) * 0.02)
src = model.transformer_blocks[0].norm1.emb.state_dict()
for blk in model.transformer_blocks[1:]:
    blk.norm1.emb.load_state_dict(src)
ref32 = model.to("cuda")  # fp32 reference, then bf16 for everything measured
dims = {k: {0: "batch"} for k in ("hidden_states", "timestep", "class_labels")}


def inputs(bs, dtype):
    g = torch.Generator(device="cuda").manual_seed(bs)
    return {"hidden_states": torch.randn(bs, 4, 32, 32, device="cuda", generator=g).to(dtype),
            "timestep": torch.randint(0, 1000, (bs,), device="cuda", generator=g),
            "class_labels": torch.randint(0, 1000, (bs,), device="cuda", generator=g)}


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
        torch._dynamo.reset()
        torch.cuda.reset_peak_memory_stats()
        f = (lambda **kw: compiled(**kw)) if mode == "kiln" else m16 if mode == "eager" else torch.compile(m16, mode=mode)
        t0 = time.time()
        with torch.no_grad():
            o = f(**x).sample
        torch.cuda.synchronize()
        first = time.time() - t0
        with torch.no_grad():
            ms = tt.do_bench(lambda: f(**x), warmup=25, rep=200, return_mode="median")
        run = {"batch": bs, "system": mode, "ms": ms, "first_call_s": first, "peak_mem_GiB": torch.cuda.max_memory_allocated() / 2**30,
               "rel_err_vs_fp32": rel_err(o.float(), want[bs])}
        res["runs"].append(run)
        print(run, flush=True)
    base = {r["system"]: r["ms"] for r in res["runs"] if r["batch"] == bs}
    res[f"speedup_bs{bs}"] = {k: base[k] / base["kiln"] for k in base if k != "kiln"}
with open(os.path.join(out, "dit.json"), "w") as fh:
    json.dump(res, fh, indent=1)
print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))
