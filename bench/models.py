"""Models beside the Llama / DiT families, kiln vs eager vs torch.compile(mode="reduce-overhead") in ONE process:
BERT-base with a padding mask and GPT-2 small with its LM head, bf16, random weights of the real shapes, batch 8 x
512 (configurable). Median ms of triton.testing.do_bench, first call, peak memory, error vs an fp32 eager
reference; for kiln also the executor's choices and a profile of its top CUDA kernels (what a slowdown is made of).
Usage: python3 bench/models.py [--models bert,gpt2] [--batch 8] [--seq 512]. Writes $OUT/models.json."""
import argparse
import json
import os
import time

import torch
import triton
from common import measure
from torch.profiler import ProfilerActivity, profile
from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel

import kiln

ap = argparse.ArgumentParser()
ap.add_argument("--models", default="bert,gpt2")
ap.add_argument("--batch", type=int, default=8)
ap.add_argument("--seq", type=int, default=512)
a = ap.parse_args()
out = os.environ.get("OUT", "/tmp")
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "runs": []}


def bert():
    torch.manual_seed(0)
    model = BertModel(BertConfig(), add_pooling_layer=False).cuda().eval()
    ids = torch.randint(0, 30522, (a.batch, a.seq), device="cuda")
    mask = torch.ones(a.batch, a.seq, dtype=torch.long, device="cuda")
    mask[1::2, a.seq * 3 // 4:] = 0  # every other row padded by a quarter
    B, S = ("batch", 1, 64), ("seq", 1, 512)
    dims = {"input_ids": {0: B, 1: S}, "attention_mask": {0: B, 1: S}}
    return model, (ids,), {"attention_mask": mask}, dims, lambda o: o.last_hidden_state


def gpt2():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config()).cuda().eval()
    ids = torch.randint(0, 50257, (a.batch, a.seq), device="cuda")
    dims = {"input_ids": {0: ("batch", 1, 64), 1: ("seq", 1, 1024)}}
    return model, (ids,), {}, dims, lambda o: o.logits


def top_kernels(fn, n=15) -> list:
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:n]
    return [{"kernel": e.key[:120], "us_per_call": e.device_time_total / 5, "count": e.count // 5} for e in rows]


def run_model(name: str) -> None:
    model, args, kwargs, dims, pick = {"bert": bert, "gpt2": gpt2}[name]()
    with torch.no_grad():
        want = pick(model(*args, **kwargs)).float()
    model = model.to(torch.bfloat16)
    t0 = time.time()
    compiled = kiln.compile(model, args, kwargs, dynamic=dims)
    compile_s = time.time() - t0
    ro = torch.compile(model, mode="reduce-overhead")
    systems = {"kiln": lambda: pick(compiled(*args, **kwargs)), "eager": lambda: pick(model(*args, **kwargs)),
               "reduce-overhead": lambda: pick(ro(*args, **kwargs))}
    for system, fn in systems.items():
        run = {"model": name, "system": system, **measure(fn, want)}
        if system == "kiln":
            run["compile_s"] = compile_s
            run["executor"] = compiled.executor.describe()
            run["tuning"] = compiled.executor.tuner.to_json()["decisions"]  # each choice with every candidate's ms
            run["top_kernels"] = top_kernels(fn)
        res["runs"].append(run)
        print({k: v for k, v in run.items() if k not in ("executor", "top_kernels")}, flush=True)
    base = {r["system"]: r["ms"] for r in res["runs"] if r["model"] == name}
    res[f"speedup_{name}"] = {k: base[k] / base["kiln"] for k in base if k != "kiln"}
    print(name, res[f"speedup_{name}"], flush=True)


for name in a.models.split(","):
    run_model(name)
    torch.cuda.empty_cache()

with open(os.path.join(out, "models.json"), "w") as fh:
    json.dump(res, fh, indent=1)
