"""Llama-3.2-1B shape (HF transformers LlamaForCausalLM, bf16, random weights, tied embeddings), one prefill
forward of SEQ tokens at batch 1: kiln vs eager vs torch.compile, in ONE process. Median ms of
triton.testing.do_bench, first-call / compile time, peak memory, relative error of the logits vs an fp32
eager reference. Usage: python3 bench/llama_prefill.py [--modes eager,default,max-autotune-no-cudagraphs]
[--seqs 512]. Writes $OUT/llama_prefill.json."""
import argparse
import json
import os
import time

import torch
import triton
from transformers import LlamaConfig, LlamaForCausalLM

from common import measure

import kiln

ap = argparse.ArgumentParser()
ap.add_argument("--modes", default="eager,default")
ap.add_argument("--seqs", default="512")
a = ap.parse_args()
out = os.environ.get("OUT", "/tmp")
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "runs": []}

cfg = LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                  num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                  tie_word_embeddings=True, rope_theta=500000.0, attn_implementation="sdpa")
torch.manual_seed(0)
with torch.device("cuda"):
    model = LlamaForCausalLM(cfg).eval()
seqs = [int(s) for s in a.seqs.split(",")]
ids = {s: torch.randint(0, cfg.vocab_size, (1, s), device="cuda", generator=torch.Generator("cuda").manual_seed(s)) for s in seqs}
with torch.no_grad():
    want = {s: model(ids[s], use_cache=False).logits for s in seqs}
m16 = model.to(torch.bfloat16)


def hf(x):
    return m16(x, use_cache=False).logits


for s in seqs:
    x = ids[s]
    t0 = time.time()
    compiled = kiln.compile(m16, (x,), config=kiln.CompileConfig())
    res[f"kiln_compile_s_seq{s}"] = time.time() - t0
    for mode in ["kiln"] + a.modes.split(","):
        if mode == "kiln":
            def f(x):
                return compiled(x).logits
        elif mode == "eager":
            f = hf
        else:
            f = torch.compile(hf, mode=mode)
        run = {"seq": s, "batch": 1, "system": mode, **measure(lambda: f(x), want[s])}
        if mode == "kiln":
            run["compile_s"] = res[f"kiln_compile_s_seq{s}"]
            run["executor"] = compiled.executor.describe()
        res["runs"].append(run)
        print({k: v for k, v in run.items() if k != "executor"}, flush=True)
    base = {r["system"]: r["ms"] for r in res["runs"] if r["seq"] == s}
    res[f"speedup_seq{s}"] = {k: base[k] / base["kiln"] for k in base if k != "kiln"}
with open(os.path.join(out, "llama_prefill.json"), "w") as fh:
    json.dump(res, fh, indent=1)
print(json.dumps({k: v for k, v in res.items() if k != "runs"}, indent=1))
