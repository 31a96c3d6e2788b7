"""Diffusion sampling end to end on the GPU, ONE process, bf16, random weights of the real configs (written inline;
DiT's per-block timestep / class embedders tied, as converted checkpoints hold them, since session 9):

- DiT-XL/2 256 px: CFG 4.0, 25 DDIM steps, VAE decode (the SD VAE), 1 and 8 images;
- PixArt-α 512 px (``--models pixart``) and 1024 px (``pixart1024``, micro-conditions): 20 DPM-Solver++ steps, CFG 4.5,
  the T5-XXL text encoding included, 1 image (a word-level stand-in tokenizer: the machine has no sentencepiece model;
  tokenizing is host work of microseconds either way).

Systems: kiln's pipeline (``kiln.diffusion``: one CUDA graph replay per step), with ``--quantize`` also kiln's pipeline
with its step graph quantized in each mode given (fp8, w8a8: calibrated on random conditioning; the VAE and T5 stay
bf16), diffusers eager, diffusers with the transformer under torch.compile (each ``--compile-modes`` entry). Per system
and batch: the first call (kiln: plans, tuning and CUDA graph captures; torch.compile: its compile), then the median
of ``--repeat`` calls, each from ``pipe(...)`` to the image on the device (synchronized); kiln's compile times apart;
PSNR of each system's images against diffusers' eager bf16 images with the same seed (the issue's bar: >= 30 dB), and
of the quantized pipelines' against the bf16 kiln pipeline's (the quantization issue's goal: >= 25 dB).
Usage: python3 bench/diffusion.py [--models dit,pixart,pixart1024] [--batches 1,8] [--repeat 5]
[--compile-modes default,reduce-overhead]
[--quantize fp8,w8a8] [--ab-tma N] [--ab-blaslt] [--out $OUT/diffusion.json]
       python3 bench/diffusion.py --smoke   (tiny configs on the CPU in float32, 3 steps: checks the script runs)"""
import argparse
import json
import math
import os
import statistics
import time

import diffusers
import torch
import triton

import kiln
import kiln.diffusion
from kiln.diffusion.presets import tie_embedders

# facebook/DiT-XL-2-256: transformer/config.json, scheduler/scheduler_config.json; stabilityai/sd-vae-ft-ema
DIT = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, sample_size=32,
           patch_size=2, num_embeds_ada_norm=1000, norm_type="ada_norm_zero", activation_fn="gelu-approximate")
DDIM = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", clip_sample=False, num_train_timesteps=1000,
            prediction_type="epsilon", set_alpha_to_one=True, steps_offset=0)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
              sample_size=256, scaling_factor=0.18215, down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4)
# PixArt-alpha/PixArt-XL-2-512x512: transformer, scheduler; google/t5-v1_1-xxl's encoder
PIXART = dict(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28, sample_size=64,
              patch_size=2, cross_attention_dim=1152, caption_channels=4096, norm_type="ada_norm_single", norm_eps=1e-6,
              norm_elementwise_affine=False, num_embeds_ada_norm=1000, activation_fn="gelu-approximate", attention_bias=True)
DPM = dict(algorithm_type="dpmsolver++", beta_start=0.0001, beta_end=0.02, beta_schedule="linear", lambda_min_clipped=-math.inf,
           lower_order_final=True, num_train_timesteps=1000, solver_order=2, solver_type="midpoint", timestep_spacing="linspace",
           prediction_type="epsilon", use_karras_sigmas=False)
T5_XXL = dict(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu",
              relative_attention_num_buckets=32, relative_attention_max_distance=128, layer_norm_epsilon=1e-6,
              is_encoder_decoder=False)
# --smoke: the same architectures at toy sizes (8x8 latents, 16 px images, 64-word vocabulary), 3 steps
SMOKE = dict(DIT=dict(DIT, num_attention_heads=2, attention_head_dim=8, num_layers=2, sample_size=8),
             SD_VAE=dict(SD_VAE, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, sample_size=16,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2),
             PIXART=dict(PIXART, num_attention_heads=2, attention_head_dim=6, num_layers=2, sample_size=8, cross_attention_dim=12,
                         caption_channels=12),
             T5_XXL=dict(T5_XXL, vocab_size=64, d_model=12, d_kv=4, d_ff=24, num_layers=2, num_heads=3,
                         relative_attention_num_buckets=8, relative_attention_max_distance=16))


def randomized(module, seed: int, std: float = 0.02):
    """``module`` on DEV in DTYPE, every parameter nudged by std * N(0, 1) (off zero-initialised adaLN / outputs)."""
    g = torch.Generator(DEV).manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters() if std else ():
            p.add_(torch.randn(p.shape, device=DEV, generator=g) * std)
    return module.to(DTYPE).eval()


def sd_vae(seed=2):
    with torch.device(DEV):
        return randomized(diffusers.AutoencoderKL(**SD_VAE), seed)


def dit_pipeline():
    with torch.device(DEV):
        tr = randomized(diffusers.DiTTransformer2DModel(**DIT), 1)
    tie_embedders(tr)  # one timestep / class embedder, as real (converted) checkpoints hold: bench/dit.py's model too
    return diffusers.DiTPipeline(tr, sd_vae(), diffusers.DDIMScheduler.from_config(DDIM))


def stand_in_tokenizer():
    """A word-level fast tokenizer over T5's vocabulary size ("w0" ... ), ending texts with </s> and padding, as T5's."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    words = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(T5_XXL["vocab_size"] - 3)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def pixart_pipeline(sample_size: int | None = None):
    """PixArt-α at 512 px, or with ``sample_size`` 128 the 1024 px model (its transformer takes the resolution and
    aspect-ratio micro-conditions)."""
    from transformers import T5Config, T5EncoderModel

    with torch.device(DEV):
        te = T5EncoderModel(T5Config(**T5_XXL))
        tr = diffusers.PixArtTransformer2DModel(**dict(PIXART, **({"sample_size": sample_size} if sample_size else {})))
    scheduler = diffusers.DPMSolverMultistepScheduler.from_config(DPM)
    # T5 keeps transformers' random init (nothing zero in it): nudged by 0.01 its q weights (init std (4096 * 64)**-0.5 =
    # 0.002) grew 5x, its attention scores (T5 does not scale q k) 25x, and softmax saturated: bf16 rounding then moved
    # the embeddings 55% from float32 in diffusers itself, and diffusers' float32 images sat 13 dB from its bf16 ones
    # (session 9, bench/pixart_diag.py), which made the PSNR bar meaningless
    return diffusers.PixArtAlphaPipeline(tokenizer=stand_in_tokenizer(), text_encoder=randomized(te, 3, std=0.0),
                                         vae=sd_vae(), transformer=randomized(tr, 4), scheduler=scheduler)


def psnr(got: torch.Tensor, want: torch.Tensor) -> float:
    mse = float(((got.double() - want.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def sync() -> None:
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, repeat: int) -> tuple[torch.Tensor, float, float]:
    """(images, first call s, median steady-state ms) of ``fn()`` -> images on the device."""
    sync()
    t0 = time.perf_counter()
    images = fn()
    sync()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return images, first, statistics.median(times)


def bench(a, name: str, pipe, kiln_cls, calls: dict, res: dict) -> None:
    """Every system on every call of ``calls`` (batch -> pipeline kwargs); results appended to res["runs"]."""
    pipe.set_progress_bar_config(disable=True)
    extra = dict(use_resolution_binning=False, clean_caption=False) if kiln_cls is kiln.diffusion.PixArtPipeline else {}

    def diffusers_images(kw):
        return pipe(**kw, **extra, generator=torch.Generator("cpu").manual_seed(0), output_type="pt").images
    want = {}
    for batch, kw in calls.items():
        images, first, ms = timed(lambda: diffusers_images(kw), a.repeat)
        want[batch] = images.float()
        record(res, name, batch, "diffusers eager", first, ms, images, want[batch])
    float_images = bench_kiln(a, name, pipe, kiln_cls, calls, res, want, None, {})
    if a.ab_tma is not None:  # the same with N of the TMA-fed attention's configs among the candidates (its plans built so)
        from kiln.codegen import lower_attention
        keep, lower_attention.TMA_ATTENTION_CONFIGS = lower_attention.TMA_ATTENTION_CONFIGS, a.ab_tma
        try:
            bench_kiln(a, name, pipe, kiln_cls, calls, res, want, None, {}, label=f"kiln tma={a.ab_tma}")
        finally:
            lower_attention.TMA_ATTENTION_CONFIGS = keep
    if a.ab_blaslt:  # the same without cuBLASLt's other algorithms among the GEMM candidates (codegen/blaslt.py)
        from kiln.codegen import blaslt
        keep, blaslt.ENABLED = blaslt.ENABLED, False
        try:
            bench_kiln(a, name, pipe, kiln_cls, calls, res, want, None, {}, label="kiln blaslt=off")
        finally:
            blaslt.ENABLED = keep
    for mode in filter(None, a.quantize.split(",")):
        bench_kiln(a, name, pipe, kiln_cls, calls, res, want, mode, float_images)
    eager = pipe.transformer
    for mode in filter(None, a.compile_modes.split(",")):
        torch._dynamo.reset()
        pipe.transformer = torch.compile(eager, mode=mode)
        for batch, kw in calls.items():
            try:  # (a peer mode that fails is recorded, not the end of the run: kiln's figures are already in res)
                images, first, ms = timed(lambda: diffusers_images(kw), a.repeat)
            except Exception as e:
                res.setdefault("peer_errors", {})[f"{name} bs{batch} torch.compile({mode})"] = f"{type(e).__name__}: {e}"[:500]
                print(f"{name} {batch}: torch.compile({mode}) failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
                break
            record(res, name, batch, f"diffusers + torch.compile({mode})", first, ms, images, want[batch])
    pipe.transformer = eager
    if DEV.type == "cuda":
        torch.cuda.empty_cache()


def bench_kiln(a, name, pipe, kiln_cls, calls, res, want, mode, float_images, label=None) -> dict:
    """kiln's pipeline (its step graph quantized in ``mode``, or not) compiled and timed on every call; its images by
    batch. A quantized one is compared with ``float_images`` (the unquantized kiln pipeline's) too. ``label``: the
    system's name (default "kiln", "kiln MODE")."""
    system = label or ("kiln" if mode is None else f"kiln {mode}")
    sync()
    t0 = time.perf_counter()
    kp = kiln_cls.from_diffusers(pipe, max_batch=max(calls), config=kiln.CompileConfig(quantize=mode))
    res[f"{name}_{system.replace(' ', '_')}_compile_s"] = time.perf_counter() - t0
    print(f"{name}: {system} compile {time.perf_counter() - t0:.1f} s", flush=True)
    if mode is not None:
        res[f"{name}_{mode}_notes"] = kp.step.report().notes + [f"{op}: {n}" for op, n in kp.step.graph.histogram().items()
                                                                 if op in ("AQGEMM", "QGEMM")]
    out = {}
    for batch, kw in calls.items():
        images, first, ms = timed(lambda: kp(**kw, seed=0, output_type="pt").images, a.repeat)
        out[batch] = images.float()
        more = {} if mode is None else {"psnr_vs_kiln_bf16": psnr(out[batch], float_images[batch])}
        plan = kp.step.executor.describe()["plans"][-1] if DEV.type == "cuda" else None
        record(res, name, batch, system, first, ms, images, want[batch], plan, more)
    return out


def record(res, name, batch, system, first, ms, images, want, executor=None, more=None) -> None:
    run = {"model": name, "batch": batch, "system": system, "ms": ms, "first_call_s": first,
           "psnr_vs_diffusers_bf16": psnr(images.float(), want), **(more or {})}
    if executor is not None:
        run["step_plan"] = executor
        run["attention"] = {k: v for k, v in executor["choices"].items() if k.startswith("attention")}
    res["runs"].append(run)
    print({k: v for k, v in run.items() if k != "step_plan"}, flush=True)


def speedups(res: dict) -> None:
    """Per model and batch: kiln's (bf16) speedup over every other system, and each quantized kiln pipeline's over it."""
    for model in {r["model"] for r in res["runs"]}:
        for batch in {r["batch"] for r in res["runs"] if r["model"] == model}:
            ms = {r["system"]: r["ms"] for r in res["runs"] if r["model"] == model and r["batch"] == batch}
            res[f"speedup_{model}_bs{batch}"] = {k: v / ms["kiln"] for k, v in ms.items() if not k.startswith("kiln")}
            res[f"quantized_speedup_{model}_bs{batch}"] = {k: ms["kiln"] / v for k, v in ms.items() if k.startswith("kiln ")}
            print(model, batch, "kiln speedup", res[f"speedup_{model}_bs{batch}"], "other kiln pipelines' over kiln",
                  res[f"quantized_speedup_{model}_bs{batch}"], flush=True)


def parse_args():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="dit,pixart")
    ap.add_argument("--batches", default="1,8", help="images per call for DiT (PixArt: 1)")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--compile-modes", default="default,reduce-overhead",
                    help="torch.compile modes for the transformer ('' for none; reduce-overhead, CUDA graphs, is the fair "
                         "peer of kiln's step replays)")
    ap.add_argument("--quantize", default="", help="kiln pipelines with the step graph quantized too: fp8, w8a8 ('' for none)")
    ap.add_argument("--ab-tma", type=int, default=None, metavar="N",
                    help="also kiln's pipeline with N TMA-fed attention configs offered (lower_attention.TMA_ATTENTION_CONFIGS)")
    ap.add_argument("--ab-blaslt", action="store_true",
                    help="also kiln's pipeline without cuBLASLt's other algorithms offered (codegen/blaslt.py, nvmath-python)")
    ap.add_argument("--smoke", action="store_true", help="tiny configs on the CPU in float32, 3 steps: checks the script runs")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "/tmp"), "diffusion.json"))
    a = ap.parse_args()
    if a.smoke:  # (torch.compile on the CPU would time the C++ compiler)
        a.batches, a.repeat, a.compile_modes = "1,2", 1, ""
        globals().update(SMOKE)
    return a


def main() -> None:
    global DEV, DTYPE
    a = parse_args()
    DEV, DTYPE = (torch.device("cpu"), torch.float32) if a.smoke else (torch.device("cuda"), torch.bfloat16)
    steps = 3 if a.smoke else None
    res = {"device": "cpu" if a.smoke else torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "diffusers": diffusers.__version__, "smoke": a.smoke, "runs": []}
    models = a.models.split(",")
    if "dit" in models:
        labels = [207, 360, 387, 974, 88, 979, 417, 279]
        bench(a, "dit-xl-2-256", dit_pipeline(), kiln.diffusion.DiTPipeline,
              {b: dict(class_labels=labels[:b], num_inference_steps=steps or 25, guidance_scale=4.0)
               for b in map(int, a.batches.split(","))}, res)
    prompt = " ".join(f"w{i * 37 % min(32000, T5_XXL['vocab_size'] - 3)}" for i in range(24))  # 25 tokens with </s>, padded to 120
    for model, size in (("pixart", None), ("pixart1024", 2 * PIXART["sample_size"])):
        if model in models:
            name = "pixart-alpha-512" if size is None else "pixart-alpha-1024"
            bench(a, name, pixart_pipeline(size), kiln.diffusion.PixArtPipeline,
                  {1: dict(prompt=prompt, num_inference_steps=steps or 20, guidance_scale=4.5)}, res)
    speedups(res)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
