"""Class-conditional sampling with a DiT (Peebles & Xie), as diffusers' ``DiTPipeline`` samples:

    kp = kiln.diffusion.DiTPipeline.from_diffusers(pipe)            # or .from_pretrained(dir), .load("dit.kiln")
    kp(class_labels=[207], num_inference_steps=25, guidance_scale=4.0, seed=0, output_type="pt").images

Classifier-free guidance runs the labels and the null label (the class embedding's extra row, ``num_classes``)
as one batch of 2B through the transformer; the guidance combine acts on the first C output channels (the
learned-sigma channels are dropped, as diffusers drops them); each step is one replay of the step graph. The
blocks' modulation comes from a conditioning graph run before steps 0, 32, 64, ... (``dit_conditioning``), so the
step graph does not read the adaLN weights every step.

With a scheduler that scales the model input (Euler), diffusers' DiTPipeline neither scales the initial noise by
``init_noise_sigma`` nor steps from the unscaled latents; kiln samples as the scheduler defines it (as diffusers'
PixArt pipeline does), so only there do its images differ from diffusers' DiT pipeline (DDIM, DDPM and DPM-Solver++
scale nothing).
"""
from __future__ import annotations

import torch

from ..api import compile as kiln_compile
from ..config import CompileConfig
from ..errors import InputError, KilnError
from .dit_conditioning import CONDITIONING_STEPS, DiTConditioning, hoistable, transformer_view, widths
from .pipelines import (CALIBRATION_CALLS, CALIBRATION_SEED, DTYPES, Pipeline, PipelineOutput, calibration_calls,
                        compile_step, compile_vae, example_batch, float_config, on_device, padded, quantizes,
                        scheduler_config, step_structure)
from .schedulers import make_scheduler
from .steps import DiTStep, HoistedDiTStep


class DiTPipeline(Pipeline):
    """A compiled DiT sampling pipeline (see the module docstring); ``spec["num_classes"]``: the labels it takes."""

    KIND = "dit"

    def __init__(self, models: dict, spec: dict, tokenizer=None):
        super().__init__(models, spec, tokenizer)
        self.conditioning = models.get("conditioning")  # None: the step graph computes its own conditioning
        self._starts: torch.Tensor | None = None  # the conditioning calls' first steps, 0, K, 2K, ...

    @classmethod
    def from_diffusers(cls, pipe, *, max_batch: int = 8, config: CompileConfig | None = None,
                       calibration=None, hoist_conditioning: bool = True) -> "DiTPipeline":
        """Compile a diffusers ``DiTPipeline`` in memory (its transformer, VAE and scheduler config), on the device and
        in the dtype of its transformer; ``max_batch``: the most images one call makes. ``config.quantize`` quantizes
        the step graph (the transformer; the VAE stays float), calibrated on the class labels ``calibration`` (ints, in
        calls of 2) or, by default, on random ones, with random latents and timesteps (``pipelines.calibration_calls``).
        ``hoist_conditioning``: the blocks' modulation is computed for 32 steps at a time by a graph of its own
        (``dit_conditioning``; never quantized), not by the step graph every step."""
        tr, vae = pipe.transformer, pipe.vae
        C, out = tr.config.in_channels, tr.config.out_channels
        if out not in (C, 2 * C):
            raise KilnError(f"the transformer has {out} output channels for {C} latent channels; kiln's DiT pipeline "
                            f"takes {C} (epsilon) or {2 * C} (epsilon and learned sigma)")
        if max_batch < 1:
            raise KilnError(f"max_batch must be at least 1, got {max_batch}")
        scheduler = make_scheduler(scheduler_config(pipe.scheduler))
        structure = step_structure(scheduler)
        num_classes = int(tr.config.num_embeds_ada_norm)
        spec = dict(kind=cls.KIND, scheduler=dict(scheduler.config, _class_name=scheduler.NAME),
                    latent_shape=[C, tr.config.sample_size, tr.config.sample_size], dtype=str(tr.dtype).removeprefix("torch."),
                    max_batch=int(max_batch), num_classes=num_classes, **structure)
        labels = torch.zeros(example_batch(spec), dtype=torch.int64, device=tr.device)
        calls, about = cls._calibration(calibration, spec, scheduler, tr.device) if quantizes(config, calibration) else (None, "")
        if not (hoist_conditioning and hoistable(tr)):
            module = DiTStep(tr, num_classes, latent_channels=C, **structure).eval()
            step = compile_step(module, spec, scheduler, {"class_labels": labels}, ("class_labels",), config, calls, about)
            return cls({"step": step, "vae": compile_vae(vae, spec, config)}, spec)
        width, out_width = widths(tr)
        spec.update(conditioning_steps=CONDITIONING_STEPS, conditioning_width=len(tr.transformer_blocks) * width + out_width)
        conditioning = DiTConditioning(tr, num_classes, CONDITIONING_STEPS).eval()
        if calls is not None:  # each call's modulation table, from its labels, as a call of the pipeline computes it
            with torch.no_grad():
                for call in calls:
                    i = int(call["step"])
                    call["modulation"] = conditioning(call["timesteps"], torch.tensor(i - i % CONDITIONING_STEPS),
                                                      call.pop("class_labels"))
        module = HoistedDiTStep(transformer_view(tr), latent_channels=C, **structure).eval()
        step = compile_step(module, spec, scheduler, {"modulation": cls._table(spec, labels.shape[0], tr.device)},
                            {"modulation": 2}, config, calls, about)
        return cls({"step": step, "vae": compile_vae(vae, spec, config),
                    "conditioning": compile_conditioning(conditioning, spec, scheduler, config, labels)}, spec)

    @staticmethod
    def _table(spec: dict, batch: int, device) -> torch.Tensor:
        """An (unfilled) modulation table [K, 2, batch, W] of the hoisted step graph."""
        return torch.empty((spec["conditioning_steps"], 2, batch, spec["conditioning_width"]), dtype=DTYPES[spec["dtype"]],
                           device=device)

    @staticmethod
    def _calibration(calibration, spec: dict, scheduler, device) -> tuple[list[dict], str]:
        """Step calls of the given class labels, else of CALIBRATION_CALLS x b random ones; what they are, in words."""
        g, b = torch.Generator().manual_seed(CALIBRATION_SEED), example_batch(spec)
        if calibration is None:
            labels = torch.randint(0, spec["num_classes"], (CALIBRATION_CALLS * b,), generator=g).to(device)
            what = "random class labels"
        else:
            labels, what = check_labels(calibration, spec["num_classes"], device), "the given class labels"
        calls = calibration_calls(spec, scheduler, [{"class_labels": c} for c in labels.split(b)], g)
        return calls, (f"{len(calls)} step calls of {what}, {b} per call, with random latents at random timesteps "
                       f"(seed {CALIBRATION_SEED}{'; no calibration given' if calibration is None else ''})")

    @classmethod
    def from_pretrained(cls, path, *, dtype: torch.dtype | None = None, device=None, **kw) -> "DiTPipeline":
        """A diffusers DiT pipeline directory (model_index.json, transformer/, vae/, scheduler/): loaded with diffusers'
        model code, then compiled (``kw``: as :meth:`from_diffusers`)."""
        from diffusers import DiTPipeline as DiffusersDiT

        pipe = DiffusersDiT.from_pretrained(str(path), torch_dtype=dtype)
        return cls.from_diffusers(pipe.to(device) if device is not None else pipe, **kw)

    @torch.no_grad()
    def __call__(self, class_labels, num_inference_steps: int = 50, guidance_scale: float = 4.0, seed: int | None = None,
                 generator=None, output_type: str = "pil", callback=None) -> PipelineOutput:
        """Images of the classes ``class_labels`` (ints in [0, num_classes)), diffusers' defaults and noise:
        ``seed=N`` draws what ``generator=torch.Generator("cpu").manual_seed(N)`` draws in diffusers."""
        labels = self._labels(class_labels)
        generator = self.check_call(len(labels), num_inference_steps, guidance_scale, output_type, seed, generator)
        if self.conditioning is None:
            latents = self.denoise({"class_labels": labels}, len(labels), num_inference_steps, guidance_scale, generator,
                                   callback)
        else:
            K = self.spec["conditioning_steps"]
            if self._starts is None:  # (device tensors: a host-made start would be a copy the host waits for mid-loop)
                T = self.scheduler.config["num_train_timesteps"]
                self._starts = torch.arange(0, T, K, dtype=torch.int64, device=self.device)

            def refresh(i, buffers):  # the next K steps' rows, before step K, 2K, ...
                if i % K == 0 and i > 0:
                    buffers["modulation"].copy_(self.conditioning(buffers["timesteps"], self._starts[i // K], labels))
            # steps 0 .. K-1's rows enqueued first: the device computes them while the host draws the noise and binds
            _, (_, timesteps) = self._scheduled(num_inference_steps)  # (the padded table and timesteps the step binds)
            first = self.conditioning(timesteps, self._starts[0], labels)
            latents = self.denoise({"modulation": first}, len(labels), num_inference_steps, guidance_scale, generator,
                                   callback, before_step=refresh)
        return PipelineOutput(self.decode(latents, output_type))

    def step_conditioning(self, labels: torch.Tensor, timesteps: torch.Tensor) -> dict:
        """The step graph's conditioning inputs for ``labels`` (as ``check_labels`` gives them) at steps 0 .. K-1 of the
        padded ``timesteps`` [T]: the labels, or the hoisted graph's modulation table of those steps."""
        if self.conditioning is None:
            return {"class_labels": labels}
        start = torch.zeros((), dtype=torch.int64, device=self.device)
        return {"modulation": self.conditioning(timesteps, start, labels).clone()}

    def _labels(self, class_labels) -> torch.Tensor:
        return check_labels(class_labels, self.spec["num_classes"], self.device)


def compile_conditioning(module: DiTConditioning, spec: dict, scheduler, config: CompileConfig | None,
                         labels: torch.Tensor):
    """The conditioning graph captured at the example ``labels`` with a dynamic batch; never quantized (modulation
    scales the whole residual stream)."""
    param = next(module.parameters())
    timesteps = padded(scheduler.set_timesteps(1, param.device), spec, param.device)[1]
    start = torch.zeros((), dtype=torch.int64, device=param.device)
    return kiln_compile(module, (), {"timesteps": timesteps, "start": start, "class_labels": labels},
                        dynamic={"class_labels": {0: ("batch", 1, spec["max_batch"])}},
                        config=on_device(float_config(config), param.device))


def check_labels(class_labels, num_classes: int, device) -> torch.Tensor:
    """``class_labels`` (an int, a list of ints, a tensor) as int64 [B] on ``device``; InputError for anything else,
    or a label outside [0, num_classes)."""
    labels = class_labels.flatten().tolist() if isinstance(class_labels, torch.Tensor) else class_labels
    labels = [labels] if isinstance(labels, int) else list(labels)
    n = num_classes
    if not labels:
        raise InputError("no class labels given", hint=f"class_labels=[207]: ints in [0, {n - 1}]")
    for label in labels:
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < n:
            raise InputError(f"class label {label!r} is not a class of this model: labels are ints in [0, {n - 1}]")
    return torch.tensor(labels, dtype=torch.int64, device=device)
