"""Where a DiT-XL/2 256 sampling call's time goes (H200, bf16, random weights, one image, CFG batch 2, 25 DDIM steps).

Measures, in one process: the whole call (``kp(...)``, to the image on the device); one denoising step alone (the
step plan's CUDA-graph replay, do_bench); the VAE decode alone; the transformer alone at the CFG batch, compiled by
kiln as a bare model; and, for the step graph built without CUDA graphs, the profiler's top CUDA kernels of three
steps (what a replay runs). Usage: python3 bench/diffusion_profile.py. Writes $OUT/diffusion_profile.json."""
import json
import os
import statistics
import time

import torch
import triton.testing as tt

import kiln
from kiln.diffusion import presets
from kiln.diffusion.pipelines import step_inputs

from common import kernels_launched

DEV, BF16 = torch.device("cuda"), torch.bfloat16
OUT = os.path.join(os.environ.get("OUT", "/tmp"), "diffusion_profile.json")
r = {"device": torch.cuda.get_device_name()}
pipe = presets.diffusers_pipeline("dit-xl-2-256", dtype=BF16, device=DEV)
kp = presets.compile_pipeline(pipe, max_batch=1)


def call():
    out = kp(class_labels=[207], num_inference_steps=25, guidance_scale=4.0, seed=0, output_type="pt").images
    torch.cuda.synchronize()
    return out


call()
times = []
for _ in range(5):
    t0 = time.perf_counter()
    call()
    times.append((time.perf_counter() - t0) * 1e3)
r["call_ms"] = statistics.median(times)

# one step alone: the plan bound as denoise binds it, replayed (the step index advances; the schedule table has T rows)
schedule = kp.scheduler.set_timesteps(25, DEV)
latents = torch.randn((1, *kp.latent_shape), device=DEV, dtype=kp.dtype)
labels, timesteps = kp._labels([207]), step_inputs(latents, schedule, 4.0, {}, kp.spec)["timesteps"]
inputs = step_inputs(latents, schedule, 4.0, kp.step_conditioning(labels, timesteps), kp.spec)
if kp.conditioning is not None:  # the hoisted conditioning's call alone (once a call)
    start = torch.zeros((), dtype=torch.int64, device=DEV)
    r["conditioning_ms"] = tt.do_bench(lambda: kp.conditioning(timesteps, start, labels), warmup=5, rep=50, return_mode="median")
flat = kp.step.signature.flatten((), inputs)
plan = kp.step.executor.plan_for(flat)
plan.bind(flat)
r["step_ms"] = tt.do_bench(plan.replay, warmup=5, rep=50, return_mode="median")
r["step_plan"] = plan.describe()
# the step's kernels (its calls run outside the CUDA graph under the profiler): launches, their summed device time (the
# rest of step_ms is gaps between kernels in the replay) and the top kernels by time
r["step_kernels"] = kernels_launched(plan)
r["vae_ms"] = tt.do_bench(lambda: kp.vae(latents), warmup=5, rep=50, return_mode="median")

# the transformer alone at the CFG batch (2), kiln and eager
x = torch.randn(2, 4, 32, 32, device=DEV, dtype=BF16)
t = torch.tensor([500, 500], device=DEV)
y = torch.tensor([207, 1000], device=DEV)
with torch.no_grad():
    r["transformer_eager_ms"] = tt.do_bench(lambda: pipe.transformer(x, timestep=t, class_labels=y), warmup=5, rep=50,
                                            return_mode="median")
    m = kiln.compile(pipe.transformer, (x,), {"timestep": t, "class_labels": y})
    r["transformer_kiln_ms"] = tt.do_bench(lambda: m(x, timestep=t, class_labels=y), warmup=5, rep=50, return_mode="median")
    r["transformer_plan"] = m.executor.describe()

# the step graph's kernels, run without a CUDA graph under the profiler
kp2 = presets.compile_pipeline(pipe, max_batch=1, config=kiln.CompileConfig(cuda_graphs=False))
kp2(class_labels=[207], num_inference_steps=3, guidance_scale=4.0, seed=0, output_type="pt")
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    kp2(class_labels=[207], num_inference_steps=3, guidance_scale=4.0, seed=0, output_type="pt")
    torch.cuda.synchronize()
table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30)
print(table)
r["profile_top30"] = table
sk = r["step_kernels"]
if sk:
    print(f"step: {r['step_ms'] * 1e3:.0f} us replayed, {sk['kernels']} kernels, {sk['kernel_us']:.0f} us of kernels")
    for name, n, t in sk["top"]:
        print(f"  {t:8.1f} us  x{n:5.1f}  {name}")
print({k: v for k, v in r.items() if k not in ("profile_top30", "transformer_plan", "step_plan", "step_kernels")})
with open(OUT, "w") as f:
    json.dump(r, f, indent=1, default=str)
print("wrote", OUT)
