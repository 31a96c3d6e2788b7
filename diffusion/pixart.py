"""Text-conditioned sampling with PixArt-α, as diffusers' ``PixArtAlphaPipeline`` samples:

    kp = kiln.diffusion.PixArtPipeline.from_diffusers(pipe)          # or .from_pretrained(dir), .load("pixart.kiln")
    kp(prompt="a red fox in snow", num_inference_steps=20, guidance_scale=4.5, seed=0, output_type="pt").images

The T5 text encoder is a kiln graph too: the prompts and the negative prompt (diffusers' default "") are tokenized
(padded to ``max_sequence_length`` tokens, 120) and encoded as one batch of 2B. Each denoising step runs the
negative prompt's embeddings, then the prompt's, as one batch of 2B through the transformer (diffusers' order), with
the micro-conditions (resolution, aspect ratio) of a transformer that uses them (PixArt-α 1024). Prompts are
lower-cased and stripped as diffusers does with ``clean_caption=False`` (its caption cleaning needs bs4 and ftfy;
it is not done here). Images come at the transformer's native size (diffusers' default height and width).
"""
from __future__ import annotations

import torch

from ..api import compile as kiln_compile
from ..config import CompileConfig
from ..errors import InputError, KilnError
from .pipelines import (CALIBRATION_CALLS, CALIBRATION_SEED, DTYPES, Pipeline, PipelineOutput, batches, calibration_calls,
                        compile_step, compile_vae, example_batch, float_config, on_device, quantizes, scheduler_config,
                        step_structure)
from .schedulers import make_scheduler
from .steps import PixArtStep, TextEncode


class PixArtPipeline(Pipeline):
    """A compiled PixArt-α sampling pipeline (see the module docstring). ``spec``: ``max_length`` (tokens per prompt),
    ``image_size`` [H, W], ``micro_conditions`` (the transformer takes resolution and aspect ratio)."""

    KIND = "pixart"

    @classmethod
    def from_diffusers(cls, pipe, *, max_batch: int = 8, max_sequence_length: int = 120,
                       config: CompileConfig | None = None, calibration=None) -> "PixArtPipeline":
        """Compile a diffusers ``PixArtAlphaPipeline`` in memory (transformer, T5 encoder, VAE, scheduler config and
        tokenizer), on the device of its transformer; latents in the text encoder's dtype, as diffusers makes them.
        ``config.quantize`` quantizes the step graph (the transformer; the T5 encoder and the VAE stay float),
        calibrated on the prompts ``calibration`` (strings, in calls of 2, with the empty negative prompt) or, by default,
        on prompts of random tokens, with random latents and timesteps (``pipelines.calibration_calls``)."""
        tr, te, vae = pipe.transformer, pipe.text_encoder, pipe.vae
        C, out = tr.config.in_channels, tr.config.out_channels
        if out not in (C, 2 * C):
            raise KilnError(f"the transformer has {out} output channels for {C} latent channels; kiln's PixArt pipeline "
                            f"takes {C} (epsilon) or {2 * C} (epsilon and learned sigma)")
        if max_batch < 1 or max_sequence_length < 1:
            raise KilnError(f"max_batch and max_sequence_length must be at least 1, got {max_batch}, {max_sequence_length}")
        scheduler = make_scheduler(scheduler_config(pipe.scheduler))
        structure = step_structure(scheduler)
        size, factor = tr.config.sample_size, 2 ** (len(vae.config.block_out_channels) - 1)
        spec = dict(kind=cls.KIND, scheduler=dict(scheduler.config, _class_name=scheduler.NAME), latent_shape=[C, size, size],
                    dtype=str(te.dtype).removeprefix("torch."), max_batch=int(max_batch),
                    max_length=int(max_sequence_length), image_size=[size * factor] * 2,
                    micro_conditions=bool(tr.use_additional_conditions), **structure)
        module = PixArtStep(tr, latent_channels=C, **structure).eval()
        text = cls._compile_text(te, spec, config)
        calls, about = cls._calibration(calibration, text, pipe.tokenizer, spec, scheduler) if quantizes(config, calibration) \
            else (None, "")
        conditioning = cls._example_conditioning(spec, te.config.d_model, te.dtype, tr.device)
        step = compile_step(module, spec, scheduler, conditioning, tuple(conditioning), config, calls, about)
        return cls({"step": step, "vae": compile_vae(vae, spec, config), "text_encoder": text}, spec, pipe.tokenizer)

    @staticmethod
    def _calibration(calibration, text_encoder, tokenizer, spec: dict, scheduler) -> tuple[list[dict], str]:
        """Step calls of the given prompts, else of CALIBRATION_CALLS x b prompts of random tokens (each as long as a
        random 1 .. max_length - 1 tokens), with the empty negative prompt; what they are, in words."""
        g, b = torch.Generator().manual_seed(CALIBRATION_SEED), example_batch(spec)
        if tokenizer is None:
            raise KilnError("the pipeline has no tokenizer: its step graph cannot be calibrated on prompts")
        if calibration is None:
            special = set(tokenizer.all_special_ids)
            vocab = torch.tensor([i for i in range(tokenizer.vocab_size) if i not in special])
            lengths = torch.randint(1, max(2, spec["max_length"]), (CALIBRATION_CALLS * b,), generator=g).tolist()
            prompts = [tokenizer.decode(vocab[torch.randint(0, len(vocab), (n,), generator=g)].tolist()) for n in lengths]
            what = "prompts of random tokens"
        else:
            prompts, what = PixArtPipeline._prompts(calibration, "")[0], "the given prompts"
        conditionings = [encode_text(text_encoder, tokenizer, spec, p, [""] * len(p)) for p in batches(prompts, b)]
        calls = calibration_calls(spec, scheduler, conditionings, g)
        return calls, (f"{len(calls)} step calls of {what}, {b} per call, with the empty negative prompt and random latents "
                       f"at random timesteps (seed {CALIBRATION_SEED}{'; no calibration given' if calibration is None else ''})")

    @staticmethod
    def _example_conditioning(spec: dict, width: int, dtype: torch.dtype, device) -> dict:
        """Example values of the step's text (and micro-condition) inputs."""
        L, B = spec["max_length"], example_batch(spec)
        embeds, mask = torch.zeros(B, L, width, dtype=dtype, device=device), torch.ones(B, L, dtype=torch.int64, device=device)
        cond = {"prompt_embeds": embeds, "prompt_mask": mask, "negative_embeds": embeds.clone(), "negative_mask": mask.clone()}
        if spec["micro_conditions"]:
            cond.update(resolution=torch.ones(B, 2, dtype=dtype, device=device), aspect_ratio=torch.ones(B, 1, dtype=dtype, device=device))
        return cond

    @staticmethod
    def _compile_text(te, spec: dict, config: CompileConfig | None):
        """The T5 encoder on (input_ids, attention_mask) [N, max_length], N in 1 .. 2 max_batch (prompts and negatives);
        never quantized (``float_config``)."""
        device = next(te.parameters()).device
        ids = torch.zeros(2, spec["max_length"], dtype=torch.int64, device=device)
        rows = ("batch", 1, 2 * spec["max_batch"])
        return kiln_compile(TextEncode(te).eval(), (ids, torch.ones_like(ids)), dynamic={"input_ids": {0: rows}, "attention_mask": {0: rows}},
                            config=on_device(float_config(config), device))

    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype | None = None, device=None, **kw) -> "PixArtPipeline":
        """A diffusers PixArt-α pipeline directory: loaded with diffusers' and transformers' model code, then compiled
        (``kw``: as :meth:`from_diffusers`)."""
        from diffusers import PixArtAlphaPipeline

        pipe = PixArtAlphaPipeline.from_pretrained(str(path), torch_dtype=dtype)
        return cls.from_diffusers(pipe.to(device) if device is not None else pipe, **kw)

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt="", num_inference_steps: int = 20, guidance_scale: float = 4.5,
                 seed: int | None = None, generator=None, output_type: str = "pil", callback=None) -> PipelineOutput:
        """Images of ``prompt`` (a string or a list), diffusers' defaults and noise: ``seed=N`` draws what
        ``generator=torch.Generator("cpu").manual_seed(N)`` draws in diffusers."""
        prompts, negatives = self._prompts(prompt, negative_prompt)
        generator = self.check_call(len(prompts), num_inference_steps, guidance_scale, output_type, seed, generator)
        conditioning = self.encode_prompt(prompts, negatives)
        latents = self.denoise(conditioning, len(prompts), num_inference_steps, guidance_scale, generator, callback)
        return PipelineOutput(self.decode(latents, output_type))

    def encode_prompt(self, prompts: list[str], negatives: list[str]) -> dict:
        """The step's text inputs: T5 embeddings [B, L, D] and token masks [B, L] of the prompts and the negatives."""
        if self.tokenizer is None:
            raise InputError("this pipeline has no tokenizer: it cannot encode text", hint="save it with its tokenizer")
        return encode_text(self.text_encoder, self.tokenizer, self.spec, prompts, negatives)

    @staticmethod
    def _prompts(prompt, negative_prompt) -> tuple[list[str], list[str]]:
        prompts = [prompt] if isinstance(prompt, str) else list(prompt) if isinstance(prompt, (list, tuple)) else None
        if not prompts or not all(isinstance(p, str) and p.strip() for p in prompts):
            raise InputError(f"prompt={prompt!r}: give a non-empty string or a list of them", hint='prompt="a red fox in snow"')
        negatives = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else list(negative_prompt)
        if len(negatives) != len(prompts) or not all(isinstance(n, str) for n in negatives):
            raise InputError(f"negative_prompt: give a string, or one string per prompt ({len(prompts)})")
        return prompts, negatives


def encode_text(text_encoder, tokenizer, spec: dict, prompts: list[str], negatives: list[str]) -> dict:
    """The step's text inputs of B prompts and B negatives: T5 embeddings [B, L, D] and token masks [B, L] (the compiled
    ``text_encoder``), and the micro-conditions of a transformer that takes them."""
    B, L, device, dtype = len(prompts), spec["max_length"], text_encoder.device, DTYPES[spec["dtype"]]
    texts = [t.lower().strip() for t in prompts + negatives]
    tokens = tokenizer(texts, padding="max_length", max_length=L, truncation=True, add_special_tokens=True, return_tensors="pt")
    ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
    hidden = text_encoder(ids, mask)  # [2B, L, D]
    cond = {"prompt_embeds": hidden[:B], "prompt_mask": mask[:B], "negative_embeds": hidden[B:], "negative_mask": mask[B:]}
    if spec["micro_conditions"]:  # diffusers: torch.tensor([height, width]), [height / width], per image
        H, W = spec["image_size"]
        cond["resolution"] = torch.tensor([[H, W]], dtype=dtype, device=device).repeat(B, 1)
        cond["aspect_ratio"] = torch.tensor([[H / W]], dtype=dtype, device=device).repeat(B, 1)
    return cond
