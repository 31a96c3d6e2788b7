"""Decode speed over a quantized KV cache (int8 / fp8 e4m3 codes + a float32 scale per token and kv head) against the
bf16 cache, through kiln's generator, in ONE process (H200).

Model: the Llama-3.2-1B shape (transformers LlamaForCausalLM, random bf16 weights). Per context C (a power of two:
the prompt, C random tokens, is one prefill of exactly C slots) and batch B: decode tokens/s of NEW new tokens,
greedy, best of 3 after a first run that plans, tunes and captures the buckets (bench/llm_quant.py's ``decode``).
The cache holds C + NEW slots (max_seq), and a decode step reads all of them, so the KV bytes a step reads grow with
B * (C + NEW) while the weight bytes stay: at long contexts and large batches the cache dominates, which is where
int8 / fp8 (about half the bytes of bf16) pay. Each row has: decode tok/s, the first run's seconds, prefill ms, the
compile's seconds, the GEMM weight and KV-cache bytes a decode step reads, the implied bandwidth-limit tok/s
(measured copy bandwidth) and the speedup over the bf16 cache at the same (C, B).

Usage: python3 bench/llm_kv.py [--contexts 128,2048,8192] [--batches 1,16,64] [--kv bf16,int8,fp8]; writes
$OUT/llm_kv.json after every generator (a run cut short keeps what it measured). ``--smoke``: a tiny Llama on whatever
device there is (the CPU: reference backend), contexts 16 / 64, batches 1 / 4, 8 new tokens: checks the script runs.
"""
import argparse
import json
import os
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llm_quant import SHAPES, copy_bandwidth, decode, gemm_weight_bytes  # noqa: E402

import kiln  # noqa: E402

NEW = 128
SMOKE = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=True)
KV = {"bf16": None, "int8": "int8", "fp8": "fp8"}


def kv_bytes(g, batch: int) -> int:
    """Bytes of the KV cache (codes and scales) of a batch bucket: what a decode step's attentions read."""
    return sum(t.numel() * t.element_size() for t in g.caches(batch).values())


def bench_context(m, context: int, batches: list[int], kv: str, new: int, bandwidth: float | None) -> dict:
    """One generator (cache of context + new slots) for every batch; a row per batch."""
    prompt = torch.randint(0, m.config.vocab_size, (max(batches), context), generator=torch.Generator().manual_seed(0)).tolist()
    t0 = time.perf_counter()
    g = kiln.from_hf(m, max_seq=context + new, batch_buckets=batches, eos_token_id=[], kv_cache_dtype=KV[kv])
    compile_s = time.perf_counter() - t0
    weights = gemm_weight_bytes(g.compiled.graph)
    rows = {}
    for bs in batches:
        r = decode(g, prompt[:bs], new)
        cache = kv_bytes(g, bs)
        r.update(compile_s=compile_s, gemm_weight_GB=weights / 1e9, kv_cache_GB=cache / 1e9)
        if bandwidth:
            r.update(limit_tok_s=bs * bandwidth / (weights + cache))
        rows[f"ctx{context}_bs{bs}_{kv}"] = r
        print(f"context {context} bs {bs} {kv}: {r['decode_tok_s']:.0f} tok/s, KV {cache / 1e9:.2f} GB + weights "
              f"{weights / 1e9:.2f} GB per step, first run {r['first_run_s']:.1f} s, compile {compile_s:.1f} s", flush=True)
    rows[f"ctx{context}_{kv}_executor"] = g.compiled.executor.describe()
    return rows


def speedups(res: dict) -> None:
    """Each quantized row's decode tok/s over the bf16 cache's at the same (context, batch)."""
    for key, r in list(res.items()):
        base = res.get(key.rsplit("_", 1)[0] + "_bf16")
        if isinstance(r, dict) and "decode_tok_s" in r and isinstance(base, dict) and "decode_tok_s" in base:
            r["speedup_vs_bf16_cache"] = r["decode_tok_s"] / base["decode_tok_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", default="128,2048,8192")
    ap.add_argument("--batches", default="1,16,64")
    ap.add_argument("--kv", default=",".join(KV))
    ap.add_argument("--smoke", action="store_true", help="a tiny Llama, small contexts: checks the script (CPU is fine)")
    a = ap.parse_args()
    cuda = torch.cuda.is_available()
    shape = SMOKE if a.smoke else SHAPES["1b"][0]
    contexts = [16, 64] if a.smoke else [int(c) for c in a.contexts.split(",")]
    if any(c < 16 or c & (c - 1) for c in contexts):  # a prompt of C tokens is then a prefill of exactly C slots
        ap.error(f"contexts must be powers of two >= 16, got {contexts}")
    batches = [1, 4] if a.smoke else [int(b) for b in a.batches.split(",")]
    new = 8 if a.smoke else NEW
    torch.manual_seed(0)
    with torch.device("cuda" if cuda else "cpu"):
        m = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=max(contexts) + new)).to(torch.bfloat16).eval()
    bw = copy_bandwidth() if cuda else None
    res = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__, "new_tokens": new,
           "copy_bandwidth_TB_s": bw / 1e12 if bw else None, "shape": shape}
    out = os.path.join(os.environ.get("OUT", "/tmp"), "llm_kv.json")
    for context in contexts:
        for kv in a.kv.split(","):
            res.update(bench_context(m, context, batches, kv, new, bw))
            speedups(res)
            with open(out, "w") as fh:
                json.dump(res, fh, indent=1)
            if cuda:
                torch.cuda.empty_cache()
    print(json.dumps({k: v for k, v in res.items() if not k.endswith("_executor")}, indent=1))


if __name__ == "__main__":
    main()
