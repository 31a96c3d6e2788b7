"""The pointwise / row-norm kernels of a DiT-XL/2 sampling step under other tiles (H200, bf16, one image, CFG 2).

run 1 of session 10 put 62 of them at 203 us of a 1.93 ms step, 3.3 us each for ~1.2 MB read and written (about half
their bandwidth bound). Each pointwise call of the step plan is timed as the tuner times a candidate (its own CUDA
graph of back-to-back runs, medians taken round-robin) under every (TILE_ELEMENTS, WARPS) policy of
``codegen/pointwise.py``, which ``launch`` reads when the call is captured. Prints the step's sum per policy and the
largest calls; writes $OUT/rows.json. Usage: python3 bench/rows.py"""
import json
import os

import torch

from kiln.codegen import pointwise
from kiln.codegen.tuning import time_candidates
from kiln.diffusion import presets
from kiln.diffusion.pipelines import padded, step_inputs

DEV = torch.device("cuda")
DEFAULT = (pointwise.TILE_ELEMENTS, pointwise.WARPS)
POLICIES = [DEFAULT] + [p for p in [(4096, (4, 8)), (2048, (4, 8)), (2048, (2, 8)), (4096, (8, 8)), (8192, (8, 8)),
                                    (1024, (2, 4))] if p != DEFAULT]

pipe = presets.diffusers_pipeline("dit-xl-2-256", dtype=torch.bfloat16, device=DEV)
kp = presets.compile_pipeline(pipe, max_batch=1)
schedule = kp.scheduler.set_timesteps(25, DEV)
latents = torch.randn((1, *kp.latent_shape), device=DEV, dtype=kp.dtype)
labels, timesteps = kp._labels([207]), padded(schedule, kp.spec, DEV)[1]
flat = kp.step.signature.flatten((), step_inputs(latents, schedule, 4.0, kp.step_conditioning(labels, timesteps), kp.spec))
plan = kp.step.executor.plan_for(flat)
plan.bind(flat)
calls = [c for c in plan.calls if c.kind == "pointwise"]


def under(policy, run):
    def fn():
        pointwise.TILE_ELEMENTS, pointwise.WARPS = policy
        try:
            run()
        finally:
            pointwise.TILE_ELEMENTS, pointwise.WARPS = DEFAULT
    return fn


rows, totals = [], {str(p): 0.0 for p in POLICIES}
for i, call in enumerate(calls):
    ms, failed = time_candidates({str(p): under(p, call.run) for p in POLICIES}, DEV)
    ops = "+".join(n.op for n in call.group.nodes)[:60]
    shape = [str(d) for d in call.group.outputs[0].shape]
    rows.append({"call": i, "ops": ops, "shape": shape, "us": {k: round(v * 1e3, 2) for k, v in ms.items()}, "failed": failed})
    for k, v in ms.items():
        totals[k] += v * 1e3
print(f"{len(calls)} pointwise calls a step (policy: TILE_ELEMENTS, WARPS)")
for k, v in sorted(totals.items(), key=lambda kv: kv[1]):
    print(f"  {v:8.1f} us  {k}")
for r in sorted(rows, key=lambda r: -r["us"].get(str(POLICIES[0]), 0))[:8]:
    best = min(r["us"], key=r["us"].get)
    print(f"  {r['us'].get(str(POLICIES[0]), float('nan')):6.2f} us now, best {r['us'][best]:6.2f} {best}  {r['shape']}  {r['ops']}")
out = os.path.join(os.environ.get("OUT", "/tmp"), "rows.json")
with open(out, "w") as f:
    json.dump({"device": torch.cuda.get_device_name(), "totals_us": totals, "calls": rows}, f, indent=1)
print("wrote", out)
