"""Quality of kiln's quantization (weight-only, FP8, W8A8) on a real small model: /work/shared/models/pyllama (a 5.2M-parameter
Llama trained on Python source, bf16 weights; see its README), through kiln on the CPU (reference backend).

For each mode (bf16 weights, w8a16, w4a16 rounding, w4a16 GPTQ; group 128, the LM head at 8 bits as
CompileConfig.quantize_lm_head's default quantizes it; GPTQ with the LM head at 4 bits too, and with it kept in bf16;
fp8; w8a8 with the searched smoothing and without, and with its LM head kept in bf16):
- held-out perplexity: tokens [0, EVAL_TOKENS) of heldout.npy in windows of 512 (the README's figure: 49.4 in
  fp32 compute, transformers eager), next-token NLL over every window position but the last;
- greedy generation of a Python prompt (``def read_config(path):\\n    ``) by kiln's generator (bf16 compute), how
  many of its first tokens equal the bf16 model's, and the top-1 agreement with the bf16 model along the bf16
  model's continuation (teacher-forced, float32: unlike the first divergence, not thrown by one near tie).
Calibration (GPTQ's Hessians, SmoothQuant's strengths, every mode's measured errors): 16 windows of 256 held-out tokens far from the
evaluated range ([CALIB_START, CALIB_START + 4096)). Compute is float32 on the model's bf16 weights (cast exactly),
so the perplexity deltas are the quantization's alone.

Usage: python3 bench/quality.py [--tokens 20480] [--modes bf16,w4a16,...] [--json quality.json]; tests/bench/test_quality.py runs it on
a shorter range.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

MODEL = Path("/work/shared/models/pyllama")
MODES = {  # name -> CompileConfig fields; "bf16": the weights as they are
    "bf16": {}, "w8a16": dict(quantize="w8a16"), "w4a16": dict(quantize="w4a16"),
    "w4a16+head": dict(quantize="w4a16", quantize_lm_head=True), "w4a16-gptq": dict(quantize="w4a16-gptq"),
    "w4a16-gptq+head": dict(quantize="w4a16-gptq", quantize_lm_head=True),
    "w4a16-gptq-head16": dict(quantize="w4a16-gptq", quantize_lm_head=False),
    "fp8": dict(quantize="fp8"), "w8a8": dict(quantize="w8a8"), "w8a8-nosmooth": dict(quantize="w8a8", quantize_smoothing="off"),
    "w8a8-head16": dict(quantize="w8a8", quantize_lm_head=False),
    "fp8-blocks": dict(quantize="fp8", quantize_act_blocks=128),
    "w8a8-blocks": dict(quantize="w8a8", quantize_act_blocks=128),
}
WINDOW, EVAL_TOKENS = 512, 20480
CALIB_START, CALIB_WINDOWS, CALIB_LEN = 96_000, 16, 256
PROMPT = "def read_config(path):\n    "


def heldout() -> torch.Tensor:
    import numpy as np

    return torch.from_numpy(np.load(MODEL / "heldout.npy").astype("int64"))


def calibration(tokens: torch.Tensor, windows: int = CALIB_WINDOWS) -> list[list[int]]:
    """``windows`` windows of 256 held-out tokens, far from the evaluated range."""
    return tokens[CALIB_START:CALIB_START + windows * CALIB_LEN].reshape(windows, CALIB_LEN).tolist()


def config(mode: dict):
    import kiln

    return kiln.CompileConfig(backend="reference", device="cpu", **mode)


def compile_lm(mode: dict, calib: list[list[int]]):
    """kiln's Llama (input_ids [B, S] -> logits [B, S, V]) on the reference backend, float32 compute, quantized by mode."""
    import kiln
    from kiln.models.llama import load_llama

    model = load_llama(MODEL, dtype=torch.float32)
    ex = torch.zeros(2, 16, dtype=torch.long)
    calls = [{"input_ids": torch.tensor([ids])} for ids in calib]
    return kiln.compile(model, (), {"input_ids": ex}, dynamic={"input_ids": {0: ("batch", 1, 8), 1: ("seq", 1, WINDOW)}},
                        config=config(mode), calibration=calls if mode else None)


@torch.no_grad()
def perplexity(compiled, tokens: torch.Tensor, n_tokens: int, batch: int = 4) -> float:
    """exp(mean NLL) of tokens [0, n_tokens) in windows of WINDOW, every position predicting the next."""
    windows = tokens[:n_tokens // WINDOW * WINDOW].reshape(-1, WINDOW)
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i:i + batch]
        lp = compiled(input_ids=w).float().log_softmax(-1)  # [B, S, V]
        total -= float(lp[:, :-1].gather(-1, w[:, 1:, None]).sum())
        count += w[:, 1:].numel()
    return math.exp(total / count)


def generate(mode: dict, calib: list[list[int]], new_tokens: int = 32):
    """Greedy continuation of PROMPT by kiln's generator (bf16 weights and compute, reference backend)."""
    from kiln.llm.generator import Generator

    g = Generator.from_pretrained(MODEL, dtype=torch.bfloat16, max_seq=256, batch_buckets=(1,), config=config(mode),
                                  calibration=calib if mode else None)
    r = g.generate(PROMPT, max_new_tokens=new_tokens)
    return r.tokens[0], r.texts[0], g


@torch.no_grad()
def top1(compiled, seq: list[int], n: int) -> torch.Tensor:
    """The model's argmax next token at each of the last ``n`` positions of ``seq`` given the tokens before it."""
    logits = compiled(input_ids=torch.tensor([seq]))[0]  # [S, V]
    return logits[len(seq) - n - 1:-1].argmax(-1)


def quantized_gemms(compiled) -> list[str]:
    """The report's line per quantized weight (its shape, format, method and measured output error), and per smoothed
    GEMM input its strength."""
    passes = compiled.report().to_dict()["passes"]
    return [n for name in ("smooth", "quantize_weights", "quantize_acts") for n in passes.get(name, {}).get("notes", [])]


def run(n_tokens: int = EVAL_TOKENS, modes=tuple(MODES), new_tokens: int = 32, calib_windows: int = CALIB_WINDOWS,
        texts: bool = True) -> dict:
    """Perplexity and (``texts``) greedy text of each of ``modes`` (names of MODES, "bf16" first for the deltas)."""
    tokens = heldout()
    calib = calibration(tokens, calib_windows)
    res = {"model": str(MODEL), "eval_tokens": n_tokens // WINDOW * WINDOW, "window": WINDOW,
           "calibration": f"heldout[{CALIB_START}:{CALIB_START + calib_windows * CALIB_LEN}]", "modes": {}}
    seq, pred = None, {}
    for name in modes:
        t0 = time.perf_counter()
        lm = compile_lm(MODES[name], calib)
        compile_s = time.perf_counter() - t0
        ppl = perplexity(lm, tokens, n_tokens)
        r = res["modes"][name] = {"perplexity": ppl, "compile_s": compile_s, "quantized": quantized_gemms(lm) if MODES[name] else []}
        if texts:
            r["tokens"], r["text"], g = generate(MODES[name], calib, new_tokens)
            seq = seq or g.tokenizer.encode(PROMPT) + r["tokens"]  # the first mode's (bf16's) continuation
            pred[name] = top1(lm, seq, new_tokens)
        print(f"{name:>15}  ppl {ppl:8.3f}  compile {compile_s:5.1f} s  {r.get('text', '')!r}", flush=True)
    base = res["modes"][next(iter(res["modes"]))]
    for name, r in res["modes"].items():
        r["ppl_delta"] = r["perplexity"] / base["perplexity"] - 1
        if texts:
            r["same_first_tokens"] = next((i for i, (a, b) in enumerate(zip(r["tokens"], base["tokens"])) if a != b),
                                          min(len(r["tokens"]), len(base["tokens"])))
            r["top1_agreement"] = float((pred[name] == pred[next(iter(pred))]).double().mean())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tokens", type=int, default=EVAL_TOKENS, help="held-out tokens evaluated (windows of 512)")
    ap.add_argument("--json", default=os.path.join(os.environ.get("OUT", "/tmp"), "quality.json"))
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, bf16 first for the deltas (of {', '.join(MODES)})")
    a = ap.parse_args()
    modes = a.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        ap.error(f"unknown mode(s) {', '.join(unknown)}; choose from {', '.join(MODES)}")
    res = run(a.tokens, tuple(modes))
    for name, r in res["modes"].items():
        print(f"{name:>15}  ppl {r['perplexity']:.3f} ({r['ppl_delta']:+.2%})  same first tokens {r['same_first_tokens']}  "
              f"top-1 agreement {r['top1_agreement']:.0%}")
    with open(a.json, "w") as fh:
        json.dump(res, fh, indent=1)
    print("wrote", a.json)


if __name__ == "__main__":
    main()
