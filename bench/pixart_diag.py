"""Where kiln's PixArt-α pipeline leaves diffusers' images (bench/diffusion.py measured 18 dB on the H200 at 512 px, bf16,
random weights; the issue's bar is 30 dB): the T5 embeddings, then whole pipelines with the text encoder swapped.
Session 9's answer: the random T5 (then nudged by 0.01, bench/diffusion.py) was chaotic in bf16 in diffusers itself.

    python3 bench/pixart_diag.py [--smoke]

Prints and writes ($OUT/pixart_diag.json): the relative error of kiln's T5 embeddings (and diffusers' bf16 ones) against
T5 in float32; PSNR against diffusers' bf16 pipeline of: kiln's pipeline, diffusers fed kiln's embeddings, diffusers in
float32 (the bf16 noise level); PSNR of kiln's pipeline against diffusers fed kiln's embeddings."""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
import diffusion as D  # noqa: E402  (bench/diffusion.py: the configs and pipelines)

import kiln.diffusion  # noqa: E402
from kiln.numerics import rel_err  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "pixart_diag.json"))
    a = ap.parse_args()
    if a.smoke:
        D.__dict__.update(D.SMOKE)
    D.DEV, D.DTYPE = (torch.device("cpu"), torch.float32) if a.smoke else (torch.device("cuda"), torch.bfloat16)
    steps = 3 if a.smoke else 20
    prompt = " ".join(f"w{i * 37 % min(32000, D.T5_XXL['vocab_size'] - 3)}" for i in range(24))
    pipe = D.pixart_pipeline()
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=steps, guidance_scale=4.5, use_resolution_binning=False, clean_caption=False, output_type="pt")
    res = {}

    def run(**more):
        return pipe(**kw, **more, generator=torch.Generator("cpu").manual_seed(0)).images.float()
    want = run(prompt=prompt)
    kp = kiln.diffusion.PixArtPipeline.from_diffusers(pipe, max_batch=1)
    got = kp(prompt=prompt, num_inference_steps=steps, guidance_scale=4.5, seed=0, output_type="pt").images.float()
    res["psnr_kiln"] = D.psnr(got, want)
    # the T5 embeddings: kiln's and diffusers' (bf16) against float32
    pe, pm, ne, nm = pipe.encode_prompt(prompt, True, negative_prompt="", device=D.DEV, clean_caption=False,
                                        max_sequence_length=120)
    cond = kp.encode_prompt([prompt], [""])
    te32 = pipe.text_encoder.float()
    ids = pipe.tokenizer([prompt.lower().strip(), ""], padding="max_length", max_length=120, truncation=True,
                         add_special_tokens=True, return_tensors="pt")
    with torch.no_grad():
        ref = te32(ids.input_ids.to(D.DEV), attention_mask=ids.attention_mask.to(D.DEV))[0]
    pipe.text_encoder.to(D.DTYPE)
    m = ids.attention_mask.to(D.DEV).bool()
    for name, (p, n) in {"diffusers": (pe, ne), "kiln": (cond["prompt_embeds"], cond["negative_embeds"])}.items():
        res[f"t5_{name}_prompt_rel_err"] = rel_err(p[0][m[0]], ref[0][m[0]])
        res[f"t5_{name}_negative_rel_err"] = rel_err(n[0][m[1]], ref[1][m[1]])
    res["masks_equal"] = bool(torch.equal(pm.cpu(), cond["prompt_mask"].cpu()) and torch.equal(nm.cpu(), cond["negative_mask"].cpu()))
    # diffusers' pipeline fed kiln's embeddings (and masks): the text encoder's share of the difference
    got2 = run(negative_prompt=None, prompt_embeds=cond["prompt_embeds"], prompt_attention_mask=cond["prompt_mask"],
               negative_prompt_embeds=cond["negative_embeds"], negative_prompt_attention_mask=cond["negative_mask"])
    res["psnr_diffusers_with_kiln_t5"] = D.psnr(got2, want)
    res["psnr_kiln_vs_diffusers_with_kiln_t5"] = D.psnr(got, got2)  # the step graphs and VAE alone, on equal embeddings
    # diffusers in float32: the bf16 noise level
    pipe.to(torch.float32)
    res["psnr_diffusers_fp32"] = D.psnr(run(prompt=prompt), want)
    print(json.dumps(res, indent=1), flush=True)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)


if __name__ == "__main__":
    main()
