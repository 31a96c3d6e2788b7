"""The graphs a diffusion pipeline compiles, as modules of tensors: one denoising step, the VAE decode, the text encoder.

A denoising step is ONE graph: the classifier-free-guidance batch, the transformer, the guidance combine and the
scheduler's update, reading the step index from a device tensor and writing the new latents, the scheduler's state
and the step index back into its own inputs (``Graph.updates``). Replaying its plan S times samples; no value is
read on the host between steps:

    step i:  x_in = input_scale[i] * x                                    [B, C, h, w]  (Euler; x itself otherwise)
             m2   = transformer(cat(x_in, x_in), t[i], conditioning)      [2B, C', h, w]
             eps  = uncond + g * (cond - uncond)                          [B, C, h, w]  (the first C channels of m2:
                                                                                         learned-sigma channels dropped)
             x, state = scheduler update(eps, i, x, state); i += 1        (kiln.diffusion.schedulers.Schedule.step)

The schedule's table [T, 8] and timesteps [T] are inputs (rows past the S steps of a call unused), so one graph
and one plan per batch size serve every step count. ``g`` is a 0-d float32 input: like diffusers' Python float,
it does not promote bf16 model outputs.
"""
from __future__ import annotations

import torch
from torch import nn

from .schedulers import Schedule


def cfg_labels(class_labels: torch.Tensor, null_class: int) -> torch.Tensor:
    """A class-conditional CFG batch's labels [2B]: the labels, then the null label (the embedding's extra row)."""
    return torch.cat([class_labels, torch.full_like(class_labels, null_class)])


class DenoisingStep(nn.Module):
    """What every step shares: the guidance combine and the scheduler update (subclasses call the transformer).

    ``terms`` / ``clip`` / ``output_dtype``: the schedule's structure (fixed by the scheduler config, see
    ``schedulers.Schedule``); ``latent_channels``: C; ``cond_first``: the conditional half comes first in the CFG
    batch (DiT: labels then the null label; PixArt: the negative prompt first)."""

    def __init__(self, transformer: nn.Module, latent_channels: int, terms: tuple[str, ...], clip: float | None,
                 output_dtype: str, cond_first: bool):
        super().__init__()
        self.transformer = transformer
        self.latent_channels, self.cond_first = latent_channels, cond_first
        self.terms, self.clip, self.output_dtype = tuple(terms), clip, output_dtype

    def update(self, latents, step, table, timesteps, guidance, x0_prev, noise, predict) -> torch.Tensor:
        """One step in place: ``predict(x_in [2B, C, h, w], t [2B]) -> [2B, C', h, w]`` is the transformer call.
        Returns the new latents too (a graph returns tensors)."""
        schedule = Schedule(timesteps, 1.0, table, self.terms, self.clip, self.output_dtype)
        x_in = schedule.scale_input(latents, step)
        t = timesteps.index_select(0, step.reshape(1)).expand(2 * latents.shape[0])  # [2B]
        out = predict(torch.cat([x_in, x_in]), t)[:, : self.latent_channels]
        first, second = out.chunk(2)
        cond, uncond = (first, second) if self.cond_first else (second, first)
        eps = uncond + guidance * (cond - uncond)  # [B, C, h, w]
        state = tuple(s for s in (x0_prev, noise) if s is not None)  # the order of Schedule.state_names
        prev, new_state = schedule.step(eps, step, latents, state)
        latents.copy_(prev)
        if x0_prev is not None:
            x0_prev.copy_(new_state[0])
        step.add_(1)
        return prev


class DiTStep(DenoisingStep):
    """A class-conditional DiT step (diffusers' DiTPipeline): the CFG batch is the labels, then the null label
    ``null_class`` (the embedding table's extra row)."""

    def __init__(self, transformer: nn.Module, null_class: int, **kw):
        super().__init__(transformer, cond_first=True, **kw)
        self.null_class = null_class

    def forward(self, latents, step, table, timesteps, guidance, class_labels, x0_prev=None, noise=None):
        labels = cfg_labels(class_labels, self.null_class)  # [2B]
        return self.update(latents, step, table, timesteps, guidance, x0_prev, noise,
                           lambda x, t: self.transformer(x, timestep=t, class_labels=labels).sample)


class HoistedDiTStep(DenoisingStep):
    """A DiT step whose conditioning is precomputed (``dit_conditioning``): ``modulation`` [K, 2, B, W] holds the
    modulation rows of K steps, of which step ``step`` reads row ``step % K``; ``transformer`` is the transformer's
    ``dit_conditioning.transformer_view``. No class labels: they are in the rows."""

    def __init__(self, transformer: nn.Module, **kw):
        super().__init__(transformer, cond_first=True, **kw)

    def forward(self, latents, step, table, timesteps, guidance, modulation, x0_prev=None, noise=None):
        K, _, B, W = modulation.shape
        row = modulation.index_select(0, step.remainder(K).reshape(1)).reshape(2 * B, W)  # labels' rows, then null's
        return self.update(latents, step, table, timesteps, guidance, x0_prev, noise,
                           lambda x, t: self.transformer(x, timestep=row, class_labels=None).sample)


class PixArtStep(DenoisingStep):
    """A text-conditioned PixArt step (diffusers' PixArtAlphaPipeline): the CFG batch is the negative prompt's
    embeddings, then the prompt's ([B, L, D] each, with their [B, L] token masks). ``resolution`` [B, 2] and
    ``aspect_ratio`` [B, 1]: the micro-conditions of a transformer that uses them (PixArt-α 1024), else None."""

    def __init__(self, transformer: nn.Module, **kw):
        super().__init__(transformer, cond_first=False, **kw)

    def forward(self, latents, step, table, timesteps, guidance, prompt_embeds, prompt_mask, negative_embeds, negative_mask,
                resolution=None, aspect_ratio=None, x0_prev=None, noise=None):
        embeds = torch.cat([negative_embeds, prompt_embeds])  # [2B, L, D]
        mask = torch.cat([negative_mask, prompt_mask])  # [2B, L]
        extra = {"resolution": None if resolution is None else torch.cat([resolution, resolution]),
                 "aspect_ratio": None if aspect_ratio is None else torch.cat([aspect_ratio, aspect_ratio])}
        return self.update(latents, step, table, timesteps, guidance, x0_prev, noise,
                           lambda x, t: self.transformer(x, encoder_hidden_states=embeds, encoder_attention_mask=mask,
                                                         timestep=t, added_cond_kwargs=extra).sample)


class VAEDecode(nn.Module):
    """latents [B, C, h, w] -> image [B, 3, H, W] in [0, 1]: ``(vae.decode(z / scaling_factor) / 2 + 0.5).clamp(0, 1)``."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae
        self.scaling_factor = float(vae.config.scaling_factor)

    def forward(self, latents):
        image = self.vae.decode(latents / self.scaling_factor).sample
        return (image / 2 + 0.5).clamp(0, 1)


class TextEncode(nn.Module):
    """A transformers T5 encoder as a function of (input_ids [N, L], attention_mask [N, L]) -> hidden states [N, L, D]."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids, attention_mask=attention_mask)[0]
