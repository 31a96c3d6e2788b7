"""diffusers pipelines to compile, by name or directory: what ``kiln compile --pipeline`` builds.

A built-in name gives a DiT pipeline of that registry model's transformer config with random weights, a VAE of
the matching shape (random too) and DiT-XL/2's DDIM scheduler config; a directory is a diffusers pipeline
checkpoint (``model_index.json`` names DiTPipeline or PixArtAlphaPipeline). Either way diffusers' model code
builds the modules; the compiled artifact does not need it.
"""
from __future__ import annotations

import json
import os

import torch

from ..config import CompileConfig
from ..errors import KilnError
from ..models import registry
from .dit import DiTPipeline
from .pipelines import Pipeline
from .pixart import PixArtPipeline

# facebook/DiT-XL-2-256's scheduler/scheduler_config.json
DIT_SCHEDULER = {"_class_name": "DDIMScheduler", "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                 "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon", "set_alpha_to_one": True,
                 "steps_offset": 0, "trained_betas": None}
# the VAE of each latent size: stabilityai/sd-vae-ft-ema's architecture (8x: 32x32 latents -> 256 px) for DiT-XL/2, a
# 4x one with few channels for the tiny model (8x8 latents -> 32 px)
SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4,
              sample_size=256, scaling_factor=0.18215)
TINY_VAE = dict(block_out_channels=(32, 32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=32,
                scaling_factor=0.18215)
VAES = {"dit-tiny": TINY_VAE, "dit-xl-2-256": SD_VAE}
CLASSES = {"DiTPipeline": DiTPipeline, "PixArtAlphaPipeline": PixArtPipeline}


def diffusers_pipeline(name: str | None = None, weights: str | None = None, dtype: torch.dtype = torch.float32, seed: int = 0,
                       device=None):
    """A diffusers pipeline: from the directory ``weights``, else the built-in ``name`` with random weights."""
    if weights is not None:
        return _from_directory(weights, dtype, device)
    if name not in VAES:
        raise KilnError(f"--pipeline builds {', '.join(VAES)} with random weights, not {name!r}",
                        hint="or give --weights DIR: a diffusers DiT / PixArt-α pipeline directory")
    import diffusers

    spec = registry.get(name)
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        transformer = diffusers.DiTTransformer2DModel(**spec.config)
        vae_config = VAES[name]
        blocks = len(vae_config["block_out_channels"])
        vae = diffusers.AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                                      **vae_config)
    with torch.no_grad():  # off diffusers' zero inits (adaLN-Zero), so that every path carries signal
        for p in transformer.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * registry.INIT_STD)
    tie_embedders(transformer)
    scheduler = diffusers.DDIMScheduler.from_config(DIT_SCHEDULER)
    if dtype != torch.float32:  # (diffusers warns about any .to(dtype), even float32's)
        transformer, vae = transformer.to(dtype), vae.to(dtype)
    return diffusers.DiTPipeline(transformer.to(device).eval(), vae.to(device).eval(), scheduler)


def tie_embedders(transformer) -> None:
    """Every block's timestep / class embedder (``norm1.emb``) made block 0's, in place, as in real DiT checkpoints:
    DiT has one of each, which the conversion to diffusers copies into every block (kiln's CSE then computes it once a
    step; 28 independent random ones would cost a step 27 timestep MLPs and label lookups that no real model runs)."""
    blocks = transformer.transformer_blocks
    if all(hasattr(b.norm1, "emb") for b in blocks):
        state = blocks[0].norm1.emb.state_dict()
        for block in blocks[1:]:
            block.norm1.emb.load_state_dict(state)


def _from_directory(path: str, dtype: torch.dtype, device):
    index = os.path.join(path, "model_index.json")
    if not os.path.exists(index):
        raise KilnError(f"{path}: no model_index.json; --weights with --pipeline takes a diffusers pipeline directory")
    with open(index) as f:
        name = json.load(f).get("_class_name")
    if name not in CLASSES:
        raise KilnError(f"{path}: a {name} directory; kiln compiles {', '.join(CLASSES)}")
    import diffusers

    pipe = getattr(diffusers, name).from_pretrained(path, torch_dtype=dtype)
    return pipe.to(device) if device is not None else pipe


def compile_pipeline(pipe, max_batch: int = 8, config: CompileConfig | None = None) -> Pipeline:
    """kiln's pipeline of a diffusers DiT or PixArt-α pipeline."""
    cls = CLASSES.get(type(pipe).__name__)
    if cls is None:
        raise KilnError(f"kiln compiles {', '.join(CLASSES)}, not a {type(pipe).__name__}")
    return cls.from_diffusers(pipe, max_batch=max_batch, config=config)
