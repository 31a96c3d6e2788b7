"""Decode speed of weight-only quantized LLMs through kiln's generator, in ONE process (H200).

Models (transformers LlamaForCausalLM, random bf16 weights, real shapes): Llama-3.2-1B at batch 1 and 16, Llama-3.1-8B
at batch 1. Modes: bf16, w8a16 (int8 per channel, the LM head too), w4a16 (int4, groups of 128, rounding: calibration
changes the numbers, not the speed; the LM head int8), and w4a16-gptq for its compile time (issue 13: the 1B's cold
compile with GPTQ calibration <= 60 s): GPTQ on CALIB_WINDOWS windows of CALIB_LEN random token ids (the weights are
random too: the time is the figure, not the error); run it alone with fresh caches for the cold figure
(bench/gpu.sh gptq_1b). Per (model, batch, mode): decode tokens/s (prompt 128, 256 new tokens, greedy;
best of 3 after a first run that plans, tunes and captures the bucket), that first run's seconds, the compile's
seconds, the bytes of GEMM weights a decode step reads and the implied fraction of the measured copy bandwidth.
Usage: python3 bench/llm_quant.py [--models 1b,8b] [--modes bf16,w8a16,w4a16,w4a16-gptq]. Writes --out ($OUT/llm_quant.json)."""
import argparse
import json
import os
import time

import torch
import triton
from transformers import LlamaConfig, LlamaForCausalLM

import kiln

P, GEN = 128, 256
SHAPES = {
    "1b": (dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0), (1, 16)),
    "8b": (dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0), (1,)),
}
MODES = {"bf16": None, "w8a16": "w8a16", "w4a16": "w4a16", "w4a16-gptq": "w4a16-gptq"}
CALIB_WINDOWS, CALIB_LEN = 16, 256  # w4a16-gptq's calibration: 4096 tokens, >= every GEMM's K (8192 rows for down)


def copy_bandwidth() -> float:
    """Bytes / s of a 1 GiB device-to-device copy (read + write), the decode limit's denominator."""
    x = torch.empty(2 ** 29, dtype=torch.bfloat16, device="cuda")
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), return_mode="median")
    return 2 * x.numel() * 2 / (ms * 1e-3)


def gemm_weight_bytes(graph) -> int:
    """Bytes of the weights GEMM / QGEMM nodes read (what a decode step streams; the embedding is only gathered)."""
    names = {i.attrs["name"] for n in graph.nodes if n.op in ("GEMM", "LINEAR", "QGEMM", "MATMUL")
             for i in n.inputs[1:] if i.op == "WEIGHT"}
    return sum(graph.weights[k].numel() * graph.weights[k].element_size() for k in names)


def decode(g, rows: list[list[int]], new_tokens: int = GEN) -> dict:
    """First run (plans, tunes, captures this bucket), then the best decode tokens/s of 3 runs."""
    sync = torch.cuda.synchronize if g.device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    g.generate(rows, max_new_tokens=new_tokens)
    sync()
    first = time.perf_counter() - t0
    r = min((g.generate(rows, max_new_tokens=new_tokens) for _ in range(3)), key=lambda r: r.decode_s)
    return {"decode_tok_s": len(rows) * r.decode_steps / r.decode_s, "first_run_s": first, "prefill_ms": r.prefill_s * 1e3}


def bench_model(name: str, modes: list[str], bandwidth: float) -> dict:
    shape, batches = SHAPES[name]
    torch.manual_seed(0)
    with torch.device("cuda"):
        m = LlamaForCausalLM(LlamaConfig(**shape, max_position_embeddings=4096)).to(torch.bfloat16).eval()
    prompt = torch.randint(0, shape["vocab_size"], (max(batches), P), generator=torch.Generator().manual_seed(0)).tolist()
    res = {}
    calib = torch.randint(0, shape["vocab_size"], (CALIB_WINDOWS, CALIB_LEN), generator=torch.Generator().manual_seed(1)).tolist()
    for mode in modes:
        t0 = time.perf_counter()
        g = kiln.from_hf(m, max_seq=max(P + GEN, CALIB_LEN), batch_buckets=batches, eos_token_id=[], quantize=MODES[mode],
                         calibration=calib if mode.endswith("gptq") else None)
        compile_s = time.perf_counter() - t0
        nbytes = gemm_weight_bytes(g.compiled.graph)
        for bs in batches:
            r = decode(g, prompt[:bs])
            r.update(compile_s=compile_s, gemm_weight_GB=nbytes / 1e9,
                     limit_tok_s=bs * bandwidth / nbytes, fraction_of_limit=r["decode_tok_s"] / (bs * bandwidth / nbytes))
            res[f"{name}_bs{bs}_{mode}"] = r
            print(f"{name} bs{bs} {mode}: {r['decode_tok_s']:.0f} tok/s ({r['fraction_of_limit']:.0%} of {r['limit_tok_s']:.0f}), "
                  f"first run {r['first_run_s']:.1f} s, compile {compile_s:.1f} s", flush=True)
        res[f"{name}_{mode}_executor"] = g.compiled.executor.describe()
        del g
        torch.cuda.empty_cache()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="1b,8b")
    ap.add_argument("--modes", default="bf16,w8a16,w4a16", help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "llm_quant.json"))
    a = ap.parse_args()
    unknown = [m for m in a.modes.split(",") if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    bw = copy_bandwidth()
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "prompt": P,
           "new_tokens": GEN, "copy_bandwidth_TB_s": bw / 1e12}
    for name in a.models.split(","):
        res.update(bench_model(name, a.modes.split(","), bw))
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print(json.dumps({k: v for k, v in res.items() if not k.endswith("_executor")}, indent=1))


if __name__ == "__main__":
    main()
