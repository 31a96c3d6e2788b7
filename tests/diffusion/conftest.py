"""Tiny diffusers pipelines for the pipeline tests: a 2-layer DiT / PixArt transformer on 8x8 latents, a tiny VAE
(16 px images), a tiny T5 encoder with a word-level tokenizer built in memory (no files, no network), weights nudged
off diffusers' zero / one inits (which would hide mistakes)."""
import math

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

# facebook/DiT-XL-2-256's scheduler; PixArt-alpha's (DPM-Solver++ 2M)
DIT_SCHEDULER = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "clip_sample": False,
                 "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": True, "steps_offset": 0}
PIXART_SCHEDULER = {"algorithm_type": "dpmsolver++", "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                    "lambda_min_clipped": -math.inf, "lower_order_final": True, "num_train_timesteps": 1000, "solver_order": 2,
                    "solver_type": "midpoint", "timestep_spacing": "linspace", "use_karras_sigmas": False}
SCHEDULERS = {  # name: (diffusers class, config)
    "ddim": ("DDIMScheduler", DIT_SCHEDULER),
    "dpm": ("DPMSolverMultistepScheduler", PIXART_SCHEDULER),
    "euler": ("EulerDiscreteScheduler", {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
}
TINY_VAE = dict(block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=16)
WORDS = ["<pad>", "</s>", "<unk>"] + [f"w{i}" for i in range(61)]


def nudged(model, seed):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def scheduler(name):
    cls, config = SCHEDULERS[name]
    return getattr(diffusers, cls).from_config(config)


def tiny_vae(seed=1):
    torch.manual_seed(seed)
    blocks = len(TINY_VAE["block_out_channels"])
    vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                                  **TINY_VAE)
    return nudged(vae, seed)


def tiny_dit_pipeline(scheduler_name="ddim", num_classes=1000):
    """diffusers' DiTPipeline hard-codes the null class 1000: the tiny DiT keeps 1000 classes (a 1001-row table)."""
    torch.manual_seed(0)
    tr = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                                         sample_size=8, patch_size=2, num_embeds_ada_norm=num_classes)
    return diffusers.DiTPipeline(nudged(tr, 0), tiny_vae(), scheduler(scheduler_name))


def t5_tokenizer():
    """A word-level fast tokenizer that ends every text with </s> and pads with <pad>, as T5's does."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


class MicroConditioned(diffusers.PixArtTransformer2DModel):
    """A transformer with PixArt-α 1024's micro-conditions at the tiny size: diffusers' pipeline passes resolution and
    aspect ratio only at sample size 128, so this fills them in as it would there (16 x 16 px images)."""

    def forward(self, hidden_states, *args, added_cond_kwargs=None, **kw):
        if added_cond_kwargs is None or added_cond_kwargs.get("resolution") is None:
            n, dtype = hidden_states.shape[0], hidden_states.dtype
            added_cond_kwargs = {"resolution": torch.tensor([16, 16]).repeat(n, 1).to(dtype),
                                 "aspect_ratio": torch.tensor([1.0]).repeat(n, 1).to(dtype)}
        return super().forward(hidden_states, *args, added_cond_kwargs=added_cond_kwargs, **kw)


def tiny_pixart_pipeline(scheduler_name="dpm", micro_conditions=False):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    te = T5EncoderModel(T5Config(vocab_size=len(WORDS), d_model=12, d_kv=4, d_ff=24, num_layers=2, num_heads=3,
                                 relative_attention_num_buckets=8, relative_attention_max_distance=16,
                                 feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    cls = MicroConditioned if micro_conditions else diffusers.PixArtTransformer2DModel
    # inner dim 12: the micro-conditions embed to inner // 3 each, 2 of resolution and 1 of aspect ratio make it again
    tr = cls(num_attention_heads=2, attention_head_dim=6, in_channels=4, out_channels=8, num_layers=2,
             cross_attention_dim=12, caption_channels=12, sample_size=8, patch_size=2, norm_type="ada_norm_single",
             use_additional_conditions=micro_conditions)
    return diffusers.PixArtAlphaPipeline(tokenizer=t5_tokenizer(), text_encoder=nudged(te, 2), vae=tiny_vae(),
                                         transformer=nudged(tr, 3), scheduler=scheduler(scheduler_name))


def diffusers_images(pipe, seed=0, **kw):
    """diffusers' own images ("pt"), seeded as kiln's seed= seeds (PixArt: at the tiny size, no resolution binning)."""
    if isinstance(pipe, diffusers.PixArtAlphaPipeline):
        kw.update(use_resolution_binning=False, clean_caption=False, max_sequence_length=MAX_LENGTH)
    pipe.set_progress_bar_config(disable=True)
    return pipe(generator=torch.Generator("cpu").manual_seed(seed), output_type="pt", **kw).images


MAX_LENGTH = 10  # PixArt's tokens per prompt here (diffusers: 120)


def image_psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of images in [0, 1]: 10 log10(1 / mean((a - b)^2)), float64."""
    mse = float(((a.double() - b.double()) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _cached(build):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = build(name)
        return cache[name]
    return get


@pytest.fixture(scope="session")
def dit():
    """dit(scheduler name) -> (diffusers DiTPipeline, kiln DiTPipeline compiled from it, up to 4 images per call)."""
    import kiln.diffusion

    def build(name):
        pipe = tiny_dit_pipeline(name)
        return pipe, kiln.diffusion.DiTPipeline.from_diffusers(pipe, max_batch=4)
    return _cached(build)


@pytest.fixture(scope="session")
def pixart():
    """pixart(scheduler name) -> (diffusers PixArtAlphaPipeline, kiln PixArtPipeline); "<name>+micro": a transformer
    that takes resolution and aspect ratio (PixArt-α 1024's micro-conditions)."""
    import kiln.diffusion

    def build(name):
        sched, _, micro = name.partition("+")
        pipe = tiny_pixart_pipeline(sched, micro_conditions=bool(micro))
        return pipe, kiln.diffusion.PixArtPipeline.from_diffusers(pipe, max_batch=4, max_sequence_length=MAX_LENGTH)
    return _cached(build)


@pytest.fixture(scope="session")
def reference_images():
    """reference_images(diffusers pipe, seed=0, **call) -> diffusers' own "pt" images."""
    return diffusers_images


@pytest.fixture(scope="session")
def quantized(dit, pixart):
    """quantized(kind, mode, calibration=None) -> kiln pipeline compiled with CompileConfig(quantize=mode) from the diffusers
    pipeline of dit("ddim") (kind "dit") or pixart("dpm") (kind "pixart"); calibration: a tuple of class labels / prompts."""
    import kiln
    import kiln.diffusion

    cache = {}

    def get(kind, mode, calibration=None):
        key = (kind, mode, calibration)
        if key not in cache:
            pipe = (dit("ddim") if kind == "dit" else pixart("dpm"))[0]
            cls, kw = (kiln.diffusion.DiTPipeline, {}) if kind == "dit" else \
                (kiln.diffusion.PixArtPipeline, dict(max_sequence_length=MAX_LENGTH))
            cache[key] = cls.from_diffusers(pipe, max_batch=4, config=kiln.CompileConfig(quantize=mode),
                                            calibration=None if calibration is None else list(calibration), **kw)
        return cache[key]
    return get


@pytest.fixture(scope="session")
def psnr():
    """psnr(a, b) -> the PSNR in dB of images in [0, 1] (``image_psnr``)."""
    return image_psnr
