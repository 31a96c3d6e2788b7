"""Compute-bound quantization on the GPU, in ONE process: kiln bf16 vs kiln fp8 vs kiln w8a8 (SmoothQuant, searched
strength) vs eager bf16, on
- DiT-XL/2 256x256 (diffusers DiTTransformer2DModel, random weights, tied adaLN embedders as in converted
  checkpoints), batch 1 and 8; w8a8 calibrates on 4 x 2 random latents / timesteps / classes;
- a Llama-3.2-1B-shape prefill (HF LlamaForCausalLM, random weights, tied embeddings) of 2048 tokens at batch 1; w8a8
  calibrates on 4 windows of 512 random tokens.
Per run: median ms (triton.testing.do_bench), first call, peak memory, relative error vs the fp32 eager model; per
quantized mode its speedup over kiln bf16, its error over kiln bf16's, and the compile report's per-GEMM notes.
The issue's targets: DiT fp8 batch 8 <= 3.0 ms, batch 1 <= 1.5 ms, error <= 2x bf16's; prefill fp8 >= 1.6x, w8a8
>= 1.4x kiln bf16.

Usage: python3 bench/fp8.py [--parts dit,llm] [--batches 1,8] [--seq 2048] [--modes bf16,fp8,w8a8[,w8a8-head16,fp8-rope0]] [--out PATH]
       python3 bench/fp8.py --smoke        (tiny models on the CPU: checks the script runs)
Writes --out (default $OUT/fp8.json) after every measured run, so a timeout keeps what was measured."""
import argparse
import json
import os
import statistics
import time

import torch

import kiln
from kiln.testing import DIT_DYNAMIC, dit_inputs, dit_xl2, rel_err

DIT_CALIB, LLM_CALIB = 4, 4  # calibration calls (DiT: 2 samples each; LLM: 512 tokens each)


def save(res: dict, path: str) -> None:
    with open(path, "w") as fh:
        json.dump(res, fh, indent=1)


def measure(fn, want: torch.Tensor, device: str) -> dict:
    """common.measure on CUDA; on the CPU (--smoke) the median of a few timed calls."""
    if device == "cuda":
        from common import measure as cuda_measure

        return cuda_measure(fn, want)
    t0 = time.time()
    with torch.no_grad():
        o = fn()
        first = time.time() - t0
        times = []
        for _ in range(3):
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return {"ms": statistics.median(times), "first_call_s": first, "rel_err_vs_fp32": rel_err(o.float(), want)}


def notes(compiled) -> list[str]:
    passes = compiled.report().to_dict()["passes"]
    return [f"{name}: {n}" for name in ("smooth", "quantize_acts") for n in passes.get(name, {}).get("notes", [])]


def gemm_choices(compiled) -> list[dict]:
    """The tuner's decision for every distinct quantized GEMM shape: the candidates' ms and any that failed (and why);
    ``out_codes``: its output stored as the next AQGEMM's codes (format, smoothed) in the same call."""
    tuner = compiled.executor.tuner
    return [{"x": d["what"].get("x"), "w": d["what"].get("w"), "act": d["what"].get("act"), "glu": d["what"].get("glu"),
             "out_codes": d["what"].get("out_codes"), "choice": d["choice"], "ms": d["ms"], **({"failed": d["failed"]} if "failed" in d else {})}
            for d in (tuner.decisions.values() if tuner else []) if d["what"].get("op") == "AQGEMM"]


def kernel_breakdown(compiled) -> dict:
    """Where the last plan's time goes (common.kernels_launched: kernels, their summed device time, the top ones; and
    step_timeline: each role's share of the replayed call)."""
    from common import kernels_launched

    from step_timeline import step_timeline, summary

    k = kernels_launched(compiled.executor.plans[-1])
    print(f"    {k.get('kernels')} kernels, {k.get('kernel_us', 0):.0f} us of kernels a call:", flush=True)
    for name, count, us in k.get("top", [])[:14]:
        print(f"      {us:8.1f} us  x{count:g}  {name}", flush=True)
    if (t := step_timeline(compiled.executor.plans[-1])):  # (inside the CUDA graph: each role's share of the call)
        k["timeline"] = t
        print("    " + summary(t), flush=True)
    return k


def config(mode: str) -> kiln.CompileConfig:
    """``bf16``, ``fp8``, ``w8a8``; ``+head`` after a mode quantizes the output head (a DiT's proj_out in w8a8),
    ``-head16`` keeps it float (by default both modes quantize an LLM's LM head); ``-blocks`` before those: the MLP's
    second GEMM reads its codes with a scale per token and 128 features (CompileConfig.quantize_act_blocks); ``-rope0``
    at the very end: q's and k's RoPE left as kernels of their own (the fuse_rope_epilogue pass off)."""
    off = {"disable": ["fuse_rope_epilogue"]} if mode.endswith("-rope0") else {}
    mode = mode.removesuffix("-rope0")
    base = mode.removesuffix("+head").removesuffix("-head16")
    head = {"quantize_lm_head": True} if mode.endswith("+head") else {"quantize_lm_head": False} if mode.endswith("-head16") else {}
    blocks = {"quantize_act_blocks": 128} if base.endswith("-blocks") else {}
    base = base.removesuffix("-blocks")
    return kiln.CompileConfig(quantize=None if base == "bf16" else base, **head, **blocks, **off)


def summarize(res: dict, part: str, key: str) -> None:
    """Per (part, key value): each quantized mode's speedup and error ratio against kiln bf16."""
    runs = [r for r in res["runs"] if r["part"] == part]
    for v in sorted({r[key] for r in runs}):
        by = {r["system"]: r for r in runs if r[key] == v}
        if "kiln-bf16" in by:
            base = by["kiln-bf16"]
            res[f"{part}_{key}{v}"] = {s: {"speedup_vs_kiln_bf16": base["ms"] / r["ms"], "err_vs_kiln_bf16": r["rel_err_vs_fp32"] /
                                           max(base["rel_err_vs_fp32"], 1e-30)} for s, r in by.items() if s != "kiln-bf16"}


def tiny_dit(device):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        m = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=1000).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return m


def bench_dit(a, res: dict, device: str, dtype) -> None:
    model = tiny_dit(device) if a.smoke else dit_xl2(tied=True, device=device)
    size = model.config.sample_size

    def inputs(bs, dt, seed=None):
        x = dit_inputs(bs, dt, device=device, seed=seed)
        x["hidden_states"] = x["hidden_states"][..., :size, :size].contiguous()
        return x

    batches = [int(b) for b in a.batches.split(",")]
    with torch.no_grad():
        want = {bs: model(**inputs(bs, torch.float32)).sample for bs in batches}
    m = model.to(dtype)
    calib = [inputs(2, dtype, seed=100 + s) for s in range(DIT_CALIB)]
    for mode in a.modes.split(","):
        t0 = time.time()
        compiled = kiln.compile(m, (), inputs(2, dtype), dynamic=DIT_DYNAMIC, config=config(mode),
                                calibration=calib if mode.startswith("w8a8") else None)
        res[f"dit_compile_s_{mode}"] = time.time() - t0
        res[f"dit_notes_{mode}"] = notes(compiled)
        for bs in batches:
            x = inputs(bs, dtype)
            run = {"part": "dit", "batch": bs, "system": f"kiln-{mode}", **measure(lambda: compiled(**x).sample, want[bs], device)}
            if device == "cuda":
                run["executor"] = compiled.executor.describe()["plans"][-1]
                run["kernels"] = kernel_breakdown(compiled)
                print("  choices:", run["executor"]["choices"], flush=True)
            run["aqgemm_tuning"] = gemm_choices(compiled)
            res["runs"].append(run)
            save(res, a.out)
            print({k: v for k, v in run.items() if k not in ("executor", "aqgemm_tuning", "kernels")}, flush=True)
            for d in run["aqgemm_tuning"]:
                print("   ", d, flush=True)
    for bs in batches:
        x = inputs(bs, dtype)
        res["runs"].append({"part": "dit", "batch": bs, "system": "eager-bf16", **measure(lambda: m(**x).sample, want[bs], device)})
    summarize(res, "dit", "batch")


def bench_llm(a, res: dict, device: str, dtype) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(vocab_size=512, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2) if a.smoke else dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                                                             num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8)
    cfg = LlamaConfig(**shape, max_position_embeddings=4096, tie_word_embeddings=True, rope_theta=500000.0, attn_implementation="sdpa")
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).eval()
    g = torch.Generator(device=device).manual_seed(0)
    ids = torch.randint(0, cfg.vocab_size, (1, a.seq), device=device, generator=g)
    calib = [(torch.randint(0, cfg.vocab_size, (1, 512), device=device, generator=g),) for _ in range(LLM_CALIB)]
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
    m = model.to(dtype)
    for mode in a.modes.split(","):
        t0 = time.time()
        compiled = kiln.compile(m, (ids,), dynamic={"input_ids": {1: ("seq", 1, 4096)}}, config=config(mode),
                                calibration=calib if mode.startswith("w8a8") else None)
        res[f"llm_compile_s_{mode}"] = time.time() - t0
        res[f"llm_notes_{mode}"] = notes(compiled)
        run = {"part": "llm", "seq": a.seq, "system": f"kiln-{mode}", **measure(lambda: compiled(ids).logits, want, device)}
        run["aqgemm_tuning"] = gemm_choices(compiled)
        if device == "cuda":
            run["executor"] = compiled.executor.describe()["plans"][-1]
            run["kernels"] = kernel_breakdown(compiled)
            print("  choices:", run["executor"]["choices"], flush=True)
        res["runs"].append(run)
        save(res, a.out)
        print({k: v for k, v in run.items() if k not in ("aqgemm_tuning", "kernels", "executor")}, flush=True)
        for d in run["aqgemm_tuning"]:
            print("   ", d, flush=True)
    res["runs"].append({"part": "llm", "seq": a.seq, "system": "eager-bf16",
                        **measure(lambda: m(ids, use_cache=False).logits, want, device)})
    summarize(res, "llm", "seq")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="dit,llm")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--modes", default="bf16,fp8,w8a8")
    ap.add_argument("--smoke", action="store_true", help="tiny models on the CPU (float32): checks that the script runs")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "fp8.json"))
    a = ap.parse_args()
    if a.smoke:
        a.seq = min(a.seq, 32)
    device = "cpu" if a.smoke else "cuda"
    dtype = torch.float32 if a.smoke else torch.bfloat16
    res = {"device": "cpu" if a.smoke else torch.cuda.get_device_name(), "torch": torch.__version__, "smoke": a.smoke, "runs": []}
    if "dit" in a.parts:
        bench_dit(a, res, device, dtype)
    if "llm" in a.parts:
        bench_llm(a, res, device, dtype)
    save(res, a.out)
    print(json.dumps({k: v for k, v in res.items() if k != "runs" and "notes" not in k}, indent=1))
    print("wrote", a.out)


if __name__ == "__main__":
    main()
