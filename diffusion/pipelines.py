"""What DiT and PixArt sampling share: building the graphs, the denoising loop over one plan, images, artifacts.

A pipeline is kiln graphs (``steps.py``): the denoising step, the VAE decode and, for text-conditioned models,
the T5 text encoder. A call draws the initial noise exactly as diffusers' ``randn_tensor`` does, binds the step
graph's plan once (latents, step index 0, the schedule's tables, the conditioning, zeroed scheduler state) and
replays it once per step: each replay (one CUDA graph on the GPU) reads the step index on the device and writes
the latents, the state and the index back into its input buffers, so Python only counts the steps and nothing
waits on the host until the image is read. Then one VAE replay gives the image in [0, 1].

Noise that a scheduler adds per step (DDPM, DDIM with eta > 0) is drawn up front from the call's generator, one
draw of the latents' shape per step after the initial noise, as diffusers' PixArt pipeline draws it (diffusers'
DiT pipeline passes no generator to its scheduler: its DDPM noise is not reproducible), and copied into the
step's noise buffer before each replay (a device copy).

The ``.kiln`` artifact of a pipeline holds the graphs as named components (``step``, ``vae``, ``text_encoder``),
the pipeline's spec (the scheduler's diffusers config, latent shape, dtype, ...) in the manifest under
``pipeline``, and a tokenizer's files as data; it loads without diffusers (the scheduler is kiln's).

Quantization (``CompileConfig(quantize="fp8" | "w8a8" | ...)``) applies to the step graph alone, i.e. to the
transformer's GEMMs, where a sampling call spends its time (S steps of a compute-bound forward on the CFG batch).
The VAE decoder and the text encoder compile from the same config without it (``float_config``): the VAE runs once
per call and is convolution-bound (its only GEMMs are one attention block's projections), so quantizing it would
cost image quality for no time; the T5 encoder also runs once per call, a small share of it beside S transformer
steps, and its activations carry T5's well-known large outliers. A quantized step graph is calibrated (the data
W8A8's smoothing search and GPTQ need, and on which every mode measures each GEMM's error) on ``CALIBRATION_CALLS``
step calls of random conditioning (class labels; prompts of random tokens through the float text encoder), or on
the conditioning the caller gives, each with random latents at a random step of the schedule, drawn from a fixed seed
(``calibration_calls``); the step graph's report says what it was calibrated on.
"""
from __future__ import annotations

import dataclasses
import math
import tempfile
from pathlib import Path

import torch

from ..api import CompiledModel
from ..api import compile as kiln_compile
from ..api import load as kiln_load
from ..config import CompileConfig
from ..errors import ArtifactError, InputError, KilnError
from ..ir.types import torch_dtype
from ..llm.generator import _tokenizer_from_files
from ..runtime import artifact
from .schedulers import COLUMNS, Schedule, Scheduler, make_scheduler
from .steps import VAEDecode

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
OUTPUT_TYPES = ("pil", "pt", "np")
# step counts whose schedules together use every coefficient column a schedule of any length uses (a column can
# vanish for a short schedule: DDIM's eps weight for 1 step, DPM-Solver++'s second-order weight for <= 2 steps)
_PROBE_STEPS = (1, 2, 3, 4, 10, 25, 50)
_STATE = (("p_delta", "x0_prev"), ("p_noise", "noise"))  # the column that needs a state input, its name
CALIBRATION_CALLS = 4  # step calls of the example batch a quantized step graph calibrates on when none are given
CALIBRATION_SEED = 0


@dataclasses.dataclass
class PipelineOutput:
    """``images``: [B, 3, H, W] in [0, 1] ("pt", the VAE's dtype), PIL images ("pil"), [B, H, W, 3] float32 in
    [0, 1] (numpy, "np"), as diffusers' ``ImagePipelineOutput``."""
    images: object


def step_structure(scheduler: Scheduler) -> dict:
    """What a step graph is compiled for: the coefficient columns a schedule of any length uses, the x0 clip and
    the output dtype rule (all fixed by the scheduler config; the tables' values are inputs of the graph)."""
    T = scheduler.config["num_train_timesteps"]
    schedules = []
    for n in sorted({min(n, T) for n in _PROBE_STEPS}):
        try:
            schedules.append(scheduler.set_timesteps(n))
        except KilnError:  # a step count this config cannot schedule (no call can ask for it either)
            continue
    if not schedules:
        raise KilnError(f"{scheduler.NAME}: no step count in {_PROBE_STEPS} gives a finite schedule with this config")
    used = {name for s in schedules for name in s.terms}
    return {"terms": [c for c in COLUMNS if c in used], "clip": schedules[0].clip, "output_dtype": schedules[0].output_dtype}


def scheduler_config(scheduler) -> dict:
    """A diffusers scheduler's config as plain data, with its class name (an in-memory config lacks it)."""
    return {**scheduler.config, "_class_name": type(scheduler).__name__}


def randn(shape: tuple, generator, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """diffusers' ``randn_tensor``: drawn on the generator's device when that is the CPU (else on ``device``), per
    sample from a list of generators, then moved to ``device``."""
    if isinstance(generator, list) and len(generator) == 1:
        generator = generator[0]
    first = generator[0] if isinstance(generator, list) else generator
    on_cpu = first is not None and first.device.type == "cpu"
    where = "cpu" if on_cpu else device
    # drawn on the CPU for a GPU: into pinned memory, so the copy does not make the host wait (the same values)
    pin = on_cpu and torch.device(device).type == "cuda"
    if isinstance(generator, list):
        draws = [torch.randn((1, *shape[1:]), generator=g, device=where, dtype=dtype) for g in generator]
        return torch.cat(draws, out=torch.empty(shape, dtype=dtype, pin_memory=True) if pin else None).to(device, non_blocking=pin)
    return torch.randn(shape, generator=generator, device=where, dtype=dtype, pin_memory=pin).to(device, non_blocking=pin)


def padded(schedule: Schedule, spec: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The schedule's table and timesteps padded to the training length T (one step graph for every step count)."""
    T, S = spec["scheduler"]["num_train_timesteps"], schedule.num_steps
    table = torch.zeros((T, len(COLUMNS)), dtype=schedule.table.dtype, device=device)
    table[:S] = schedule.table
    timesteps = torch.zeros(T, dtype=schedule.timesteps.dtype, device=device)
    timesteps[:S] = schedule.timesteps
    return table, timesteps


def step_inputs(latents: torch.Tensor, schedule: Schedule, guidance: float, conditioning: dict, spec: dict,
                tables: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """The step graph's inputs for a call: the schedule's ``padded`` table and timesteps (``tables``: computed once
    already), the step index 0, the guidance scale as a 0-d float32, zeroed scheduler state. (Device work only: no
    copy from the host, which would make the host wait.)"""
    dev = latents.device
    table, timesteps = tables if tables is not None else padded(schedule, spec, dev)
    state = {name: torch.zeros_like(latents, dtype=schedule.table.dtype if name == "x0_prev" else latents.dtype)
             for term, name in _STATE if term in spec["terms"]}
    return {"latents": latents, "step": torch.zeros((), dtype=torch.int64, device=dev), "table": table, "timesteps": timesteps,
            "guidance": torch.full((), float(guidance), dtype=torch.float32, device=dev), **conditioning, **state}


def example_batch(spec: dict) -> int:
    """The batch the graphs are captured at: 2 (a dynamic dim is captured above 1), 1 when max_batch is 1 (static)."""
    return min(2, spec["max_batch"])


def compile_step(module: torch.nn.Module, spec: dict, scheduler: Scheduler, conditioning: dict,
                 batched: tuple[str, ...] | dict[str, int], config: CompileConfig | None,
                 calibration: list[dict] | None = None, about: str = "") -> CompiledModel:
    """The step module captured at the example batch (``conditioning``: example values) with a dynamic batch
    (1 .. max_batch) on the latents, the state and the ``batched`` conditioning inputs (names: their dim 0 is the
    batch; or a dict name -> the batch's dim). ``calibration``: step calls
    (``calibration_calls``) for ``config.quantize``, described by ``about`` in the report's notes."""
    param = next(module.parameters())
    latents = torch.zeros(example_batch(spec), *spec["latent_shape"], dtype=DTYPES[spec["dtype"]], device=param.device)
    schedule = scheduler.set_timesteps(min(25, scheduler.config["num_train_timesteps"]), param.device)
    inputs = step_inputs(latents, schedule, 1.0, conditioning, spec)
    batch = ("batch", 1, spec["max_batch"])
    dims = {**dict.fromkeys(("latents", *(n for _, n in _STATE if n in inputs)), 0),
            **(batched if isinstance(batched, dict) else dict.fromkeys(batched, 0))}
    dynamic = {name: {dim: batch} for name, dim in dims.items()}
    step = kiln_compile(module, (), inputs, dynamic=dynamic, config=on_device(config, param.device), calibration=calibration)
    if calibration:
        step.report().notes.append(f"{config.quantize} calibrated on {about}")
    return step


def compile_vae(vae: torch.nn.Module, spec: dict, config: CompileConfig | None) -> CompiledModel:
    """``VAEDecode(vae)`` captured at the example batch with a dynamic batch; never quantized (``float_config``)."""
    param = next(vae.parameters())
    z = torch.randn(example_batch(spec), *spec["latent_shape"], generator=torch.Generator().manual_seed(0)).to(param.device, param.dtype)
    return kiln_compile(VAEDecode(vae).eval(), (z,), dynamic={"latents": {0: ("batch", 1, spec["max_batch"])}},
                        config=on_device(float_config(config), param.device))


def on_device(config: CompileConfig | None, device: torch.device) -> CompileConfig:
    """A copy of ``config`` (one per graph), running where the module's weights are unless it names a device."""
    config = dataclasses.replace(config) if config is not None else CompileConfig()
    config.device = config.device or str(device)
    return config


def float_config(config: CompileConfig | None) -> CompileConfig | None:
    """``config`` without quantization: what the VAE decoder and the text encoder compile with (module docstring)."""
    return dataclasses.replace(config, quantize=None) if config is not None and config.quantize is not None else config


def quantizes(config: CompileConfig | None, calibration) -> bool:
    """Whether ``config`` quantizes the step graph (which then calibrates); ``calibration`` without it is refused."""
    quantized = config is not None and config.quantize is not None
    if calibration is not None and not quantized:
        raise KilnError("calibration= calibrates the step graph's quantization, and config.quantize is not set",
                        hint='set CompileConfig(quantize="fp8" / "w8a8" / ...), or leave calibration out')
    return quantized


def calibration_calls(spec: dict, scheduler: Scheduler, conditionings: list[dict], generator: torch.Generator) -> list[dict]:
    """Step-graph calls to calibrate a quantized step on, one per entry of ``conditionings`` (one call's conditioning
    inputs, batch b each): latents x ~ N(0, 1) / input_scale[i] (the spread of a sample at step i: sigma_i^2 + 1 for
    Euler, 1 otherwise) at a random step i of a min(25, T)-step schedule, call k of n drawing i from the k-th n-th of
    it (every noise level seen); guidance 1 and zeroed state, which reach no GEMM."""
    first = next(iter(conditionings[0].values()))  # [b, ...]
    schedule = scheduler.set_timesteps(min(25, scheduler.config["num_train_timesteps"]), first.device)
    S, n = schedule.num_steps, len(conditionings)
    calls = []
    for k, conditioning in enumerate(conditionings):
        i = (k * S + int(torch.randint(0, S, (), generator=generator))) // n
        b = next(iter(conditioning.values())).shape[0]
        x = torch.randn((b, *spec["latent_shape"]), generator=generator, dtype=torch.float64)
        x = x / float(schedule.table[i, COLUMNS.index("input_scale")])
        call = step_inputs(x.to(first.device, DTYPES[spec["dtype"]]), schedule, 1.0, conditioning, spec)
        call["step"].fill_(i)
        calls.append(call)
    return calls


def batches(items: list, size: int) -> list[list]:
    """``items`` in consecutive batches of at most ``size``."""
    return [items[k:k + size] for k in range(0, len(items), size)]


class Pipeline:
    """A compiled sampling pipeline: ``models`` (CompiledModels by component name: step, vae[, text_encoder]),
    ``spec`` (plain data, stored in the artifact: kind, the scheduler's diffusers config, latent_shape [C, h, w],
    dtype of the latents, max_batch, the step graph's schedule structure: terms, clip, output_dtype), and for
    text-conditioned pipelines a tokenizer. Built by a subclass's ``from_diffusers`` / ``from_pretrained`` or
    by :meth:`load`."""

    KIND = ""

    def __init__(self, models: dict[str, CompiledModel], spec: dict, tokenizer=None):
        self.models = dict(models)
        self.step, self.vae, self.text_encoder = models["step"], models["vae"], models.get("text_encoder")
        self.spec = spec
        self.scheduler = make_scheduler(spec["scheduler"])
        self.dtype = DTYPES[spec["dtype"]]
        self.latent_shape = tuple(spec["latent_shape"])
        self.max_batch = int(spec["max_batch"])
        self.tokenizer = tokenizer
        self._names = [n.attrs["name"] for n in self.step.graph.inputs]
        self._schedules: dict[int, tuple] = {}  # by step count: the schedule and its padded tables, on the device (read only)

    @property
    def device(self) -> torch.device:
        return self.step.device

    # -- a call -------------------------------------------------------------------------------------------
    def check_call(self, batch: int, num_inference_steps, guidance_scale, output_type: str, seed, generator):
        """InputError for a call outside what the pipeline takes; returns the generator to draw noise from."""
        if not 1 <= batch <= self.max_batch:
            raise InputError(f"{batch} images in one call; this pipeline was compiled for 1 to {self.max_batch}",
                             hint="split the call, or compile with a larger max_batch")
        T = self.scheduler.config["num_train_timesteps"]
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= T:
            raise InputError(f"num_inference_steps={num_inference_steps!r}: it must be an int in [1, {T}]")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale):
            raise InputError(f"guidance_scale={guidance_scale!r}: it must be a finite number (> 1 guides, <= 1 samples "
                             "the conditional prediction alone)")
        if output_type not in OUTPUT_TYPES:
            raise InputError(f"output_type={output_type!r}: it must be one of {', '.join(map(repr, OUTPUT_TYPES))}")
        if seed is not None and generator is not None:
            raise InputError("give seed= or generator=, not both")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
                raise InputError(f"seed={seed!r}: it must be an int >= 0")
            return torch.Generator("cpu").manual_seed(seed)
        if isinstance(generator, list) and len(generator) not in (1, batch):
            raise InputError(f"{len(generator)} generators for {batch} images", hint="give one generator, or one per image")
        return generator

    def _scheduled(self, num_inference_steps: int) -> tuple[Schedule, tuple[torch.Tensor, torch.Tensor]]:
        """The scheduler's schedule of ``num_inference_steps`` on the device and its ``padded`` tables, computed once per
        step count: host work (float64 tables, copies to the device) that a call would otherwise do while the GPU waits
        for its first step."""
        s = self._schedules.get(num_inference_steps)
        if s is None:
            if len(self._schedules) >= 16:
                self._schedules.clear()
            schedule = self.scheduler.set_timesteps(num_inference_steps, self.device)
            s = self._schedules[num_inference_steps] = (schedule, padded(schedule, self.spec, self.device))
        return s

    def denoise(self, conditioning: dict, batch: int, num_inference_steps: int, guidance_scale: float, generator=None,
                callback=None, before_step=None) -> torch.Tensor:
        """The latents [B, C, h, w] after ``num_inference_steps`` steps from diffusers' initial noise: one replay of the
        step graph's plan per step. ``callback(i, num_steps)`` runs after step i is enqueued; ``before_step(i,
        buffers)`` before it (``buffers``: the plan's input buffers by name)."""
        schedule, tables = self._scheduled(num_inference_steps)
        extra = set(schedule.terms) - set(self.spec["terms"])
        if extra:
            raise KilnError(f"internal error: a {num_inference_steps}-step schedule uses {', '.join(sorted(extra))}, which "
                            "the step graph was not compiled for")
        latents = randn((batch, *self.latent_shape), generator, self.device, self.dtype) * schedule.init_noise_sigma
        noises = ([randn(latents.shape, generator, self.device, self.dtype) for _ in range(schedule.num_steps)]
                  if "p_noise" in self.spec["terms"] else None)
        # diffusers samples without guidance at a scale <= 1: here the combine with weight 1, the conditional half
        inputs = step_inputs(latents, schedule, guidance_scale if guidance_scale > 1 else 1.0, conditioning, self.spec, tables)
        flat = self.step.signature.flatten((), inputs)
        plan = self.step.executor.plan_for(flat)
        plan.bind(flat)
        buffers = dict(zip(self._names, plan.input_buffers))  # updated in place by every replay
        for i in range(schedule.num_steps):
            if noises is not None:
                buffers["noise"].copy_(noises[i])
            if before_step is not None:
                before_step(i, buffers)
            plan.replay()
            if i == 0:  # checked while the device runs the first step (the plan's buffers are all it wrote)
                self.step.check_source()
            if callback is not None:
                callback(i, schedule.num_steps)
        return buffers["latents"]

    def decode(self, latents: torch.Tensor, output_type: str = "pt"):
        """The VAE's image of ``latents`` in [0, 1], as ``output_type`` asks."""
        images = self.vae(latents.to(torch_dtype(self.vae.graph.inputs[0].dtype)))  # [B, 3, H, W]
        if output_type == "pt":
            return images
        arr = images.permute(0, 2, 3, 1).float().cpu().numpy()  # [B, H, W, 3]
        if output_type == "np":
            return arr
        from PIL import Image

        return [Image.fromarray(a) for a in (arr * 255).round().astype("uint8")]

    # -- artifacts ----------------------------------------------------------------------------------------
    def save(self, path, overwrite: bool = False) -> str:
        """One ``.kiln`` file: every graph as a named component, the spec, the tokenizer's files (data only)."""
        components = {name: m.as_component() for name, m in self.models.items()}
        files = tokenizer_files(self.tokenizer) if self.tokenizer is not None else None
        return artifact.save_components(path, components, extra={"pipeline": self.spec}, files=files, overwrite=overwrite)

    @classmethod
    def load(cls, path, device=None, backend=None) -> "Pipeline":
        """A pipeline saved with :meth:`save`; no diffusers needed."""
        manifest = read_manifest(path)
        spec = manifest["pipeline"]
        if cls.KIND and spec.get("kind") != cls.KIND:
            raise ArtifactError(f"{path}: check 'pipeline' failed: it holds a {spec.get('kind')!r} pipeline, not {cls.KIND!r}",
                                hint="load it with kiln.diffusion.load, which picks the class")
        models = {name: kiln_load(path, device=device, backend=backend, component=name) for name in manifest["components"]}
        files = next(iter(models.values())).files
        tok_files = {k.removeprefix("tokenizer/"): v for k, v in files.items() if k.startswith("tokenizer/")}
        return cls(models, spec, _tokenizer_from_files(tok_files) if tok_files else None)


def read_manifest(path) -> dict:
    """The manifest of a pipeline artifact (ArtifactError for any other file)."""
    zf, manifest = artifact.read_manifest(path)
    zf.close()
    spec = manifest.get("pipeline")
    if not isinstance(spec, dict) or not isinstance(manifest.get("components"), dict):
        raise ArtifactError(f"{path}: check 'pipeline' failed: the artifact is not a diffusion pipeline",
                            hint="run a plain model with kiln.load / `kiln run`; save a pipeline with DiTPipeline.save "
                                 "or `kiln compile --pipeline`")
    return manifest


def tokenizer_files(tokenizer) -> dict[str, bytes]:
    """A transformers tokenizer's saved files (JSON, text, sentencepiece model) as data members ``tokenizer/<name>``."""
    files = {}
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        for f in sorted(Path(d).iterdir()):
            if f.is_file() and f.suffix in (".json", ".txt", ".model"):
                files["tokenizer/" + f.name] = f.read_bytes()
    return files
