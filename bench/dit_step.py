"""The DiT-XL/2 256 pipeline's denoising step at a batch of images, kiln's plan with and without the TMA-fed attention
(``--ab tma``) or cuBLASLt's other algorithms (``--ab blaslt``: codegen/blaslt.py) among its candidates, or with its warm
GEMM decisions made again in the step (``--ab refine``: KILN_REFINE=all against the default), one process:
the step's replay (do_bench medians, the arms' replays in interleaved rounds), its kernels by time and its timeline by
role. Why: at 8 images (CFG batch 16) the pipeline measured the same with the TMA kernel as with SDPA (session 38,
H100: 214.0 / 213.9 ms) although the kernel alone is 28.6 us against SDPA + copy's 42.3 (bench/attn.py). Usage:
python3 bench/dit_step.py [--images 8] [--ab tma|blaslt|refine]. Writes $OUT/dit_step.json."""
import argparse
import json
import os
import statistics

import torch
import triton.testing as tt

from kiln.codegen import blaslt, lower_attention
from kiln.diffusion import presets
from kiln.diffusion.pipelines import padded, step_inputs

from common import kernels_launched
from step_timeline import step_timeline, summary

ap = argparse.ArgumentParser()
ap.add_argument("--images", type=int, default=8)
ap.add_argument("--ab", choices=("tma", "blaslt", "refine"), default="tma", help="the arms: with / without that among the candidates")
a = ap.parse_args()
DEV, BF16 = torch.device("cuda"), torch.bfloat16
ROUNDS = 15
pipe = presets.diffusers_pipeline("dit-xl-2-256", dtype=BF16, device=DEV)
r = {"device": torch.cuda.get_device_name(), "images": a.images, "arms": {}}
plans = {}
SWITCH = {"tma": (lower_attention, "TMA_ATTENTION_CONFIGS", lower_attention.TMA_ATTENTION_CONFIGS, 0),
          "blaslt": (blaslt, "ENABLED", blaslt.ENABLED, False), "refine": (None, "KILN_REFINE", "all", "cuda")}[a.ab]


def switch(value):
    """Set the A/B's switch to ``value`` (a module attribute, or for refine the environment variable); what it was."""
    where, name = SWITCH[:2]
    if where is None:
        keep = os.environ.get(name, "cuda")
        os.environ[name] = value
    else:
        keep = getattr(where, name)
        setattr(where, name, value)
    return keep


for value in SWITCH[2:]:
    keep = switch(value)
    try:
        kp = presets.compile_pipeline(pipe, max_batch=a.images)
        labels = [207 + i for i in range(a.images)]
        kp(class_labels=labels, num_inference_steps=2, guidance_scale=4.0, seed=0, output_type="pt")
        schedule = kp.scheduler.set_timesteps(25, DEV)
        latents = torch.randn((a.images, *kp.latent_shape), device=DEV, dtype=kp.dtype)
        lab, timesteps = kp._labels(labels), padded(schedule, kp.spec, DEV)[1]
        inputs = step_inputs(latents, schedule, 4.0, kp.step_conditioning(lab, timesteps), kp.spec)
        flat = kp.step.signature.flatten((), inputs)
        plan = kp.step.executor.plan_for(flat)
        plan.bind(flat)
    finally:
        switch(keep)
    plans[f"{a.ab}={value}"] = (kp, plan)  # (kp keeps the plan's buffers alive)
# the arms' replays interleaved, round by round (clocks drift over a run: session 38's arms timed one after the other
# differed by 134 us a step in the same GEMM kernels), then each arm's median over the rounds
rounds = {name: [] for name in plans}
for _ in range(ROUNDS):
    for name, (_, plan) in plans.items():
        rounds[name].append(tt.do_bench(plan.replay, warmup=2, rep=20, return_mode="median"))
for name, (_, plan) in plans.items():
    arm = {"step_ms": statistics.median(rounds[name]), "rounds_ms": rounds[name], "choices": plan.describe().get("choices"),
           "kernels": kernels_launched(plan), "timeline": step_timeline(plan), "refine": plan.stats.refine}
    r["arms"][name] = arm
    print(f"{name}: step {arm['step_ms'] * 1e3:.1f} us (median of {ROUNDS} interleaved rounds); {summary(arm['timeline'])}")
    if arm["refine"]:
        print(f"  refined in the step ({arm['refine']['seconds']:.1f} s): {arm['refine']['steps']}")
    k = arm["kernels"]
    if k:
        print(f"  {k['kernels']} kernels, {k['kernel_us']:.0f} us of kernels")
        for kname, n, t in k["top"][:10]:
            print(f"  {t:8.1f} us  x{n:5.1f}  {kname[:100]}")
out = os.path.join(os.environ.get("OUT", "/tmp"), "dit_step.json")
with open(out, "w") as f:
    json.dump(r, f, indent=1, default=str)
print("wrote", out)
