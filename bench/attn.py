"""Attention at the diffusion transformers' shapes (head dim 72), as a plan runs it: each candidate ATTENTION's
tuner offers (SDPA into a fresh tensor, then copied into the plan's buffer: the kernel SDPA picks, and its
FlashAttention-2 and memory-efficient kernels by their aten ops; kiln's Triton template per launch configuration, with
the head dim as 64 + 16 lanes (SPLIT) and padded to 128, and p v split too (SPLIT_V: 64 lanes and a window of v's last
16); kiln's TMA-fed kernel (attention_tma.py) per configuration; SDPA on q, k, v zero-padded to head dim 80 / 96 / 128;
PixArt's cross-attention also with a padding mask) captured 20 times in one CUDA graph, do_bench median of a replay /
20, and its error against float32. bf16 (the JSON names the GPU). Usage: python3 bench/attn.py [--smoke] [--quick]
[--tma] [--only WORDS] (--smoke: float16 under the Triton interpreter, tiny shapes, no graphs; --quick: SDPA's default
kernel only; --tma: SDPA's default and the TMA-fed kernel, in its loop forms where offered; --only "1024,llama": the
shapes whose names hold one of the words). Writes $OUT/attn.json."""
import argparse
import json
import os

a = argparse.ArgumentParser()
a.add_argument("--smoke", action="store_true")
a.add_argument("--quick", action="store_true", help="SDPA's default kernel only (not its other kernels, nor padded)")
a.add_argument("--only", default="", help="comma-separated words: the shapes whose names hold one of them")
a.add_argument("--tma", action="store_true", help="SDPA's default kernel and the TMA-fed kernel only (not the template)")
a = a.parse_args()
if a.smoke:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kiln.codegen.kernels import attention as ta  # noqa: E402
from kiln.codegen.kernels import attention_tma as tma  # noqa: E402
from kiln.testing import rel_err  # noqa: E402

from common import graphed_ms  # noqa: E402

DEV = "cpu" if a.smoke else "cuda"
DT = torch.float16 if a.smoke else torch.bfloat16
REPS = 20
# name -> (batch x heads as [B, H], query rows, key rows, keys attended, kv heads, head dim, causal): self-attention
# unless the keys differ; keys attended < key rows: a [B, 1, 1, Sk] padding bias (0 / -inf) as PixArt's pipeline passes
# for its text tokens; the last: Llama-3.2-1B's prefill of 2048 tokens (issue 14's prefill)
SHAPES = {"dit-xl-2 256, 1 image (CFG 2)": (2, 16, 256, 256, 256, 16, 72, False),
          "dit-xl-2 256, 8 images (CFG 16)": (16, 16, 256, 256, 256, 16, 72, False),
          "pixart 512 self (CFG 2)": (2, 16, 1024, 1024, 1024, 16, 72, False),
          "pixart 512 cross, 120 tokens": (2, 16, 1024, 120, 120, 16, 72, False),
          "pixart 512 cross, 120 tokens, 24 attended (mask)": (2, 16, 1024, 120, 24, 16, 72, False),
          "pixart 1024 self (CFG 2)": (2, 16, 4096, 4096, 4096, 16, 72, False),
          "llama-3.2-1b prefill 2048 (causal, 32 / 8 heads, d 64)": (1, 32, 2048, 2048, 2048, 8, 64, True)}
if a.smoke:
    SHAPES = {"tiny": (1, 2, 20, 20, 20, 2, 72, False), "tiny, mask": (1, 2, 20, 20, 13, 2, 72, False),
              "tiny, causal gqa": (1, 4, 20, 20, 20, 2, 64, True)}
if a.only:
    SHAPES = {name: shape for name, shape in SHAPES.items() if any(w in name for w in a.only.split(","))}


def graphed(fn):
    """``fn`` REPS times in one CUDA graph: the replay's median / REPS, in us (on the CPU: one call's)."""
    if a.smoke:
        fn()
        return 0.0
    return graphed_ms(fn, REPS, rep=100) * 1e3


rows = []
for name, (b, h, sq, sk, attended, hk, d, causal) in SHAPES.items():
    # q, k, v as a fused projection leaves them: [B, S, H + 2 Hk, D], each viewed as [B, H, S, D]
    proj = torch.randn(b, sq, h + 2 * hk, d, device=DEV, dtype=DT)
    kv = torch.randn(b, sk, 2 * hk, d, device=DEV, dtype=DT) if sk != sq else proj[:, :, h:]
    q, k, v = proj[:, :, :h].transpose(1, 2), kv[:, :, :hk].transpose(1, 2), kv[:, :, hk:].transpose(1, 2)
    gqa = dict(gqa=True) if hk != h else {}
    mask = None
    if attended < sk:
        mask = torch.zeros(b, 1, 1, sk, device=DEV, dtype=DT)
        mask[..., attended:] = float("-inf")
    want = ta.reference(q.float(), k.float(), v.float(), None if mask is None else mask.float(), causal=causal, **gqa)
    out = torch.empty(b, h, sq, d, device=DEV, dtype=DT)
    cands = {} if a.smoke else {"sdpa + copy": lambda: out.copy_(F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=hk != h))}
    if not (a.smoke or a.quick or mask is not None or causal):
        cands |= {
            "sdpa flash-2 + copy": lambda: out.copy_(torch.ops.aten._scaled_dot_product_flash_attention(q, k, v)[0]),
            "sdpa efficient + copy": lambda: out.copy_(
                torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, False)[0])}
    # the head dim padded with zeros to a width SDPA's kernels are tuned for (q k^T unchanged; v's zero columns give zero
    # outputs, dropped), scale still 1 / sqrt(72): "pre-padded", as a plan whose projection wrote padded buffers; "with
    # pads", the three pads in each call
    for dp in () if a.smoke or a.quick or mask is not None or causal else (80, 96, 128):
        qp, kp, vp = (F.pad(t, (0, dp - d)) for t in (q, k, v))
        cands[f"sdpa pad {dp} pre-padded + copy"] = (
            lambda qp=qp, kp=kp, vp=vp: out.copy_(F.scaled_dot_product_attention(qp, kp, vp, scale=d ** -0.5)[..., :d]))
        cands[f"sdpa pad {dp} with pads + copy"] = (lambda dp=dp: out.copy_(F.scaled_dot_product_attention(
            *(F.pad(t, (0, dp - d)) for t in (q, k, v)), scale=d ** -0.5)[..., :d]))
    sms = torch.cuda.get_device_properties(0).multi_processor_count if not a.smoke else 132
    cfgs = ta.configs(sq, b * h, sms) if not a.smoke else [ta.INTERPRET_CONFIG]
    forms = ((True, False, "64+16"), (False, False, "pad 128"), (True, True, "64+16, pv 64+16")) if d == 72 else ((True, True, ""),)
    for c in [] if a.tma else cfgs:
        for split, split_v, form in forms:
            tag = f"kiln {c.get('BLOCK_M')}x{c.get('BLOCK_N')} w{c.get('num_warps', '-')} s{c.get('num_stages', '-')} {form}".strip()
            cands[tag] = (lambda c=c, split=split, split_v=split_v: ta.attention(
                q, k, v, mask, causal, out=out, config=None if a.smoke else c, split_d=split, split_v=split_v, **gqa))
    def tma_attention(c, heavy_first=tma.HEAVY_FIRST):
        first, tma.HEAVY_FIRST = tma.HEAVY_FIRST, heavy_first
        try:
            return tma.attention(q, k, v, causal, out=out, config=c, mask=mask)
        finally:
            tma.HEAVY_FIRST = first
    for c in [tma.INTERPRET_CONFIG] if a.smoke else tma.configs():
        tag = "kiln tma {BLOCK_M}x{BLOCK_N} w{num_warps} s{num_stages}".format(**c)
        cands[tag] = lambda c=c: tma_attention(c)
        for form in tma.forms(q, v, mask)[1:]:  # (the kernel's other loop form: AHEAD)
            cands[tag + " " + "+".join(form).lower()] = lambda c=dict(c, **form): tma_attention(c)
        if causal:  # (the query tiles in order, not the heaviest first)
            cands[tag + " in order"] = lambda c=c: tma_attention(c, heavy_first=False)
    for tag, fn in cands.items():
        try:
            us = graphed(fn)
            fn()
            err = rel_err(out.float(), want)
        except Exception as e:  # (a config that does not compile: recorded, the others go on)
            rows.append({"shape": name, "candidate": tag, "failed": f"{type(e).__name__}: {str(e)[:120]}"})
            continue
        rows.append({"shape": name, "candidate": tag, "us": round(us, 2), "err": float(f"{err:.3g}")})
    best = sorted((r for r in rows if r["shape"] == name and "us" in r), key=lambda r: r["us"])
    print(name, "first:", cfgs[0], flush=True)
    for r in best[:6]:
        print(f"  {r['us']:8.2f} us  err {r['err']:.2e}  {r['candidate']}", flush=True)
    for r in best:
        if r["candidate"].startswith("sdpa") and r not in best[:6]:
            print(f"  {r['candidate']} {r['us']:.2f} us")
out_path = os.path.join(os.environ.get("OUT", "/tmp"), "attn.json")
with open(out_path, "w") as f:
    json.dump({"device": torch.cuda.get_device_name() if not a.smoke else "cpu", "rows": rows}, f, indent=1)
print("wrote", out_path)
