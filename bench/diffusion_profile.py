"""Where a DiT-XL/2 256 sampling call's time goes (H200, bf16, random weights, one image, CFG batch 2, 25 DDIM steps).

Measures, in one process: the whole call (``kp(...)``, to the image on the device); one denoising step alone (the
step plan's CUDA-graph replay, do_bench); the VAE decode alone; the transformer alone at the CFG batch, compiled by
kiln as a bare model; and, for the step graph built without CUDA graphs, the profiler's top CUDA kernels of three
steps (what a replay runs); the call's host timeline (when step 0 is enqueued: the GPU idles until then) and its top
host functions (cProfile). Usage: python3 bench/diffusion_profile.py. Writes $OUT/diffusion_profile.json."""
import cProfile
import io
import json
import os
import pstats
import statistics
import time

import torch
import triton.testing as tt

import kiln
from kiln.diffusion import presets
from kiln.diffusion.pipelines import padded, randn, step_inputs

from common import kernels_launched
from step_timeline import step_timeline, summary

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

# the host's timeline of one call (the device idles until step 0 is enqueued), then its top host functions
marks = []
t0 = time.perf_counter()
kp(class_labels=[207], num_inference_steps=25, guidance_scale=4.0, seed=0, output_type="pt",
   callback=lambda i, n: marks.append(time.perf_counter()))
t1 = time.perf_counter()
torch.cuda.synchronize()
t2 = time.perf_counter()
r["host"] = {"to_step0_enqueued_ms": (marks[0] - t0) * 1e3, "steps_1_24_enqueued_ms": (marks[-1] - marks[0]) * 1e3,
             "decode_enqueued_ms": (t1 - marks[-1]) * 1e3, "then_device_ms": (t2 - t1) * 1e3}
print("host timeline:", {k: round(v, 3) for k, v in r["host"].items()})
prof = cProfile.Profile()
prof.enable()
kp(class_labels=[207], num_inference_steps=25, guidance_scale=4.0, seed=0, output_type="pt")
prof.disable()
torch.cuda.synchronize()
text = io.StringIO()
pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(40)
r["host_profile"] = text.getvalue()
print("\n".join(line[:160] for line in r["host_profile"].splitlines()[:52]))

# one step alone: the plan bound as denoise binds it, replayed (the step index advances; the schedule table has T rows)
schedule = kp.scheduler.set_timesteps(25, DEV)
latents = torch.randn((1, *kp.latent_shape), device=DEV, dtype=kp.dtype)
labels, timesteps = kp._labels([207]), padded(schedule, kp.spec, DEV)[1]
inputs = step_inputs(latents, schedule, 4.0, kp.step_conditioning(labels, timesteps), kp.spec)
if kp.conditioning is not None:  # the hoisted conditioning's call alone (once a call)
    start = torch.zeros((), dtype=torch.int64, device=DEV)
    r["conditioning_ms"] = tt.do_bench(lambda: kp.conditioning(timesteps, start, labels), warmup=5, rep=50, return_mode="median")
flat = kp.step.signature.flatten((), inputs)
plan = kp.step.executor.plan_for(flat)
plan.bind(flat)


def host_us(fn, n=20):
    """The host's time in ``fn`` (us, median of n; the device drained before each, so no call waits on earlier work)."""
    ts = []
    for _ in range(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e6)
    return round(statistics.median(ts), 1)


# the host pieces of a call before step 0 is enqueued
gen = torch.Generator("cpu")
r["host_pieces_us"] = {
    "labels": host_us(lambda: kp._labels([207])),
    "noise": host_us(lambda: randn((1, *kp.latent_shape), gen.manual_seed(0), DEV, kp.dtype)),
    "step_inputs": host_us(lambda: step_inputs(latents, schedule, 4.0, {}, kp.spec, kp._scheduled(25)[1])),
    "flatten": host_us(lambda: kp.step.signature.flatten((), inputs)),
    "plan_for": host_us(lambda: kp.step.executor.plan_for(flat)),
    "bind": host_us(lambda: plan.bind(flat)),
    "check_source": host_us(kp.step.check_source),
    "replay": host_us(plan.replay),
}
if kp.conditioning is not None:
    r["host_pieces_us"]["conditioning_call"] = host_us(lambda: kp.conditioning(timesteps, start, labels))
print("host pieces (us):", r["host_pieces_us"])


def call_breakdown():
    """Host us spent in each piece during one call, up to step 0's enqueue and in all (the pieces wrapped in place)."""
    import kiln.diffusion.pipelines as pl
    acc, undo = {}, []

    def wrap(obj, name, label):
        f = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                acc[label] = acc.get(label, 0.0) + (time.perf_counter() - t) * 1e6
        setattr(obj, name, timed)
        undo.append((obj, name, f))
    for obj, name in ((kp, "_labels"), (kp, "check_call"), (kp, "_table"), (pl, "randn"), (pl, "step_inputs"),
                      (kp.step.signature, "flatten"), (kp.step.executor, "plan_for"), (plan, "bind"), (plan, "replay"),
                      (kp.step, "check_source"), (kp, "decode")) + (((kp.conditioning, "run"),) if kp.conditioning else ()):
        wrap(obj, name, name if obj is not kp.conditioning else "conditioning.run")
    marks = []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    kp(class_labels=[207], num_inference_steps=25, guidance_scale=4.0, seed=0, output_type="pt",
       callback=lambda i, n: marks.append((time.perf_counter(), dict(acc))))
    torch.cuda.synchronize()
    for obj, name, f in reversed(undo):
        setattr(obj, name, f)
    t1, at0 = marks[0]
    return {"to_step0_enqueued_us": round((t1 - t0) * 1e6, 1), "pieces_to_step0_us": {k: round(v, 1) for k, v in at0.items()},
            "pieces_in_call_us": {k: round(v, 1) for k, v in acc.items()}}


try:
    call_breakdown()
    r["call_breakdown"] = call_breakdown()
except Exception as e:  # (a diagnostic: the measurements below still run)
    r["call_breakdown"] = f"{type(e).__name__}: {e}"
print("call breakdown:", r["call_breakdown"])
r["step_ms"] = tt.do_bench(plan.replay, warmup=5, rep=50, return_mode="median")
r["step_plan"] = plan.describe()
# the step's kernels (its calls run outside the CUDA graph under the profiler): launches, their summed device time (the
# rest of step_ms is gaps between kernels in the replay) and the top kernels by time
r["step_kernels"] = kernels_launched(plan)
r["step_timeline"] = step_timeline(plan)  # (inside the CUDA graph: each role's share of the replayed step)
print("step timeline:", summary(r["step_timeline"]))
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
print({k: v for k, v in r.items() if k not in ("profile_top30", "host_profile", "transformer_plan", "step_plan", "step_kernels")})
with open(OUT, "w") as f:
    json.dump(r, f, indent=1, default=str)
print("wrote", OUT)
