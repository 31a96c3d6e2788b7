"""The ``kiln`` command: compile | run | generate | sample | bench | inspect.

Errors print as one clear message plus a hint, without a traceback (``KILN_DEBUG=1`` shows it).
Long phases show progress on stderr; results go to stdout.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

from rich.markup import escape

from ..errors import KilnError
from .common import _check_output, _check_weights, _emit_onnx, _parse_buckets, _parse_dims, _Progress, _torch_dtype, err, out
from .tools import cmd_bench, cmd_inspect, cmd_run


# ----------------------------------------------------------------------------- compile


def _check_compile_args(a) -> str:
    """Refuse options that do not fit together, and paths kiln cannot read or write, before any work; the output path."""
    if bool(a.source) == bool(a.model or a.weights):
        raise KilnError("give either a model file (.pt2 / .onnx), --model NAME or an LLM checkpoint's --weights DIR",
                        hint="kiln compile --model llama-tiny -o llama.kiln")
    if a.source and ((a.dim and not a.source.lower().endswith(".onnx")) or a.weights or a.static or a.generate):
        raise KilnError("--weights, --static and --generate apply to --model, and --dim to --model or an .onnx file's dims",
                        hint=f"compile {a.source} without them: a .pt2 program fixes its own dims")
    generate_only = [f for f, v in (("--max-seq", a.max_seq), ("--batch-buckets", a.batch_buckets), ("--kv-cache", a.kv_cache))
                     if v is not None]
    if generate_only and not a.generate:
        raise KilnError(f"{' and '.join(generate_only)} appl{'y' if len(generate_only) > 1 else 'ies'} only to a generator",
                        hint="add --generate to compile an LLM generator (KV cache)")
    if a.generate and (a.dim or a.static):
        raise KilnError("--generate sets its own dims: --dim and --static do not apply",
                        hint="batch sizes come from --batch-buckets, the sequence range from --max-seq")
    if a.static and a.dim:
        raise KilnError("--static fixes every dim, so --dim has nothing to range", hint="give one of them")
    _check_quantize_args(a)
    if a.weights:
        _check_weights(a.weights)
    name = a.model or os.path.basename(os.path.normpath(a.weights or ""))
    output = a.output or (os.path.splitext(os.path.basename(a.source))[0] if a.source else name) + ".kiln"
    _check_output(output, a.force, hint="use --force to replace it, or -o to write elsewhere")
    _check_output(a.emit_onnx, a.force)
    _check_output(a.report_json, True)
    return output


def _check_quantize_args(a) -> None:
    if a.calib and (a.source or not a.quantize):
        raise KilnError("--calib calibrates --quantize of a --model", hint="kiln compile --model NAME --quantize w4a16-gptq --calib FILE")
    if a.quantize and a.quantize.endswith("-gptq") and not a.calib:
        raise KilnError(f"--quantize {a.quantize} runs GPTQ, which needs calibration data: give --calib FILE",
                        hint="a text file, or token ids as .npy / .json; the rounding modes (w8a16, w4a16) need none")
    a.quantize_smoothing = _smoothing(a.quantize_smoothing)
    a.quantize_lm_head = _lm_head(a)
    if a.quantize == "w8a8" and a.quantize_smoothing != "off" and not a.calib and (a.source or _family(a.model) != "dit"):
        raise KilnError("--quantize w8a8 searches its smoothing on calibration data: give --calib FILE",
                        hint="a text file, or token ids as .npy / .json; or --quantize-smoothing off, or --quantize fp8 (no calibration)")
    if a.calib and not os.path.isfile(a.calib):
        raise KilnError(f"--calib {a.calib}: no such file")


def _smoothing(text: str):
    if text in ("search", "off"):
        return text
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 <= value <= 1:
        raise KilnError(f"--quantize-smoothing {text}: expected search, off or a strength in [0, 1]")
    return value


def _lm_head(a) -> bool | None:
    """``--quantize-lm-head`` as CompileConfig.quantize_lm_head: auto None, on True, off False."""
    if a.quantize_lm_head != "auto" and not a.quantize:
        raise KilnError(f"--quantize-lm-head {a.quantize_lm_head} applies to --quantize",
                        hint="kiln compile ... --quantize w4a16 --quantize-lm-head on")
    return {"auto": None, "on": True, "off": False}[a.quantize_lm_head]


def _family(model: str | None) -> str | None:
    from ..models import registry

    try:
        return registry.get(model).family if model else None
    except (KilnError, KeyError):  # (an unknown name is reported where the model is built)
        return None


DIT_CALIBRATION = 4  # random latents / timesteps / classes a DiT calibrates W8A8 on without --calib


def _dit_calibration(spec, dtype, seed: int) -> list[dict]:
    """A DiT's default calibration: DIT_CALIBRATION calls of 2 random latents, timesteps and class labels each."""
    return [spec.example_inputs(batch=2, dtype=dtype, seed=seed + 1000 + s) for s in range(DIT_CALIBRATION)]


def cmd_compile(a) -> int:
    import kiln

    if a.pipeline:
        return _compile_pipeline(a)
    output = _check_compile_args(a)
    dims = _parse_dims(a.dim, ranges=True)
    buckets = _parse_buckets(a.batch_buckets) if a.batch_buckets is not None else None
    progress = _Progress(a.quiet)
    config = kiln.CompileConfig(disable=tuple(a.disable_pass or ()), device=a.device, verify=a.verify, quantize=a.quantize,
                                quantize_group=None if a.quantize_group == "channel" else int(a.quantize_group), tp=a.tp,
                                quantize_smoothing=a.quantize_smoothing, quantize_lm_head=a.quantize_lm_head)
    if a.tp > 1:
        return _compile_shards(a, config, output, buckets, progress)
    if a.source:
        compiled = kiln.compile(a.source, dynamic=dims or None, config=config, report_hook=progress)
    else:
        from ..models import registry

        spec = registry.spec_for(a.model, a.weights)
        calib = _read_calibration(a.calib, spec) if a.calib else None
        dtype = _torch_dtype(a.dtype)
        if a.weights and spec.family == "llama" and _is_gptq(a.weights):  # its own codes: models/gptq.py
            if not a.generate:
                raise KilnError(f"{a.weights} is a quantized (GPTQ / AWQ) checkpoint: kiln compiles it as a generator",
                                hint="add --generate")
            return _compile_generator(a, spec, None, config, output, buckets, progress, calib)
        with progress.step(f"build {spec.name}" + (f" from {a.weights}" if a.weights else " (random weights)")):
            model = spec.build(weights=a.weights, dtype=dtype, seed=a.seed)
            if a.device:
                model = model.to(a.device)
            inputs = spec.example_inputs(batch=a.batch, seq=a.seq, dtype=dtype, seed=a.seed)
            if a.device:
                inputs = {k: v.to(a.device) for k, v in inputs.items()}
        dynamic = None if a.static else _with_ranges(spec.dynamic(), dims)
        config.tags["model"] = spec.name
        if a.generate:
            return _compile_generator(a, spec, model, config, output, buckets, progress, calib)
        calls = _token_calls(calib, a.weights, spec) if calib is not None else None
        default_calib = a.quantize == "w8a8" and calls is None and spec.family == "dit"
        if default_calib:
            calls = [{k: v.to(a.device) if a.device else v for k, v in c.items()} for c in _dit_calibration(spec, dtype, a.seed)]
        compiled = kiln.compile(model, (), inputs, dynamic=dynamic, config=config, report_hook=progress, calibration=calls)
        compiled.report().model["name"] = spec.name
        if default_calib:
            compiled.report().notes.append(f"w8a8 calibrated on {DIT_CALIBRATION} x 2 random latents / timesteps / class labels "
                                           "(no --calib given)")
    with progress.step(f"save {output}"):
        compiled.save(output, overwrite=a.force)
    if a.emit_onnx:
        _emit_onnx(compiled.graph, a.emit_onnx, progress)
    if a.report:
        out.print(compiled.report())
    if a.report_json:
        with open(a.report_json, "w") as f:
            json.dump(compiled.report().to_dict(), f, indent=1)
    size = os.path.getsize(output)
    out.print(escape(f"wrote {output} ({size / 2**20:.1f} MiB): {compiled!r}"))
    return 0


def _compile_shards(a, config, output: str, buckets, progress) -> int:
    """--tp N: each rank's shard compiled here, one after another, without a process group (sharding needs no
    communication), written as OUTPUT's shard files (``gen.rank0-of-2.kiln``, ...)."""
    import dataclasses

    from ..llm.generator import DEFAULT_BATCH_BUCKETS, Generator
    from ..models import registry
    from ..runtime.artifact import check_output_path, shard_path

    if a.source or not a.generate or a.calib:
        raise KilnError("--tp shards LLM generators: give --model with --generate (and no --calib)",
                        hint="compile a plain model without --tp")
    spec = registry.spec_for(a.model, a.weights)
    paths = [check_output_path(shard_path(output, r, a.tp), a.force, "use --force to replace it") for r in range(a.tp)]
    with progress.step(f"build {spec.name}" + (f" from {a.weights}" if a.weights else " (random weights)")):
        model = spec.build(weights=a.weights, dtype=_torch_dtype(a.dtype), seed=a.seed)
    for r, path in enumerate(paths):
        with progress.step(f"compile rank {r} of {a.tp}"):
            g = Generator.compile(model, max_seq=a.max_seq or 1024, batch_buckets=buckets or DEFAULT_BATCH_BUCKETS,
                                  config=dataclasses.replace(config, tp_rank=r), eos_token_id=_eos_of(a.weights), device=a.device)
        g.save(output, overwrite=a.force)
        out.print(escape(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB): rank {r} of {a.tp} of a generator for {spec.name}"))
    return 0


def _compile_generator(a, spec, model, config, output, buckets, progress, calibration=None) -> int:
    from ..llm.generator import DEFAULT_BATCH_BUCKETS, Generator, _load_tokenizer

    if spec.family != "llama":
        raise KilnError(f"--generate needs an LLM; {spec.name} is a {spec.family} model")
    buckets = buckets or list(DEFAULT_BATCH_BUCKETS)
    max_seq = a.max_seq if a.max_seq is not None else 1024
    tokenizer = _load_tokenizer(a.weights) if a.weights else None
    kv = a.kv_cache or config.kv_cache_dtype
    kw = dict(max_seq=max_seq, batch_buckets=buckets, tokenizer=tokenizer, config=config, eos_token_id=_eos_of(a.weights),
              calibration=calibration, kv_cache_dtype=a.kv_cache)
    with progress.step(f"compile the {spec.name} step graph (max_seq {max_seq}, batch buckets {buckets}{f', KV cache {kv}' if kv else ''})"
                       + (" from the checkpoint's codes" if model is None else "")):
        g = Generator.compile(model, **kw) if model is not None else \
            Generator.from_pretrained(a.weights, dtype=_torch_dtype(a.dtype), device=a.device, **kw)
    with progress.step(f"save {output}"):
        g.save(output, overwrite=a.force)
    if a.report:
        out.print(g.compiled.report())
    out.print(escape(f"wrote {output} ({os.path.getsize(output) / 2**20:.1f} MiB): a generator for {spec.name}"
                     + (", with its tokenizer" if tokenizer is not None else ", token ids in and out (no tokenizer)")))
    return 0


def _is_gptq(weights: str) -> bool:
    from ..models.gptq import gptq_config

    return os.path.isfile(os.path.join(weights, "config.json")) and gptq_config(weights) is not None


def _compile_pipeline(a) -> int:
    """``--pipeline``: a diffusion sampling pipeline (step graph, VAE decoder[, text encoder]) as one artifact; ``--quantize``
    quantizes the step graph alone, calibrated on random conditioning (``kiln.diffusion.pipelines``)."""
    import kiln

    from ..diffusion import presets

    output, max_batch = _check_pipeline_args(a)
    progress = _Progress(a.quiet)
    source = f"from {a.weights}" if a.weights else "(random weights)"
    with progress.step(f"build the diffusers pipeline {a.model or ''} {source}"):
        pipe = presets.diffusers_pipeline(a.model, a.weights, _torch_dtype(a.dtype), a.seed, a.device)
    config = kiln.CompileConfig(disable=tuple(a.disable_pass or ()), device=a.device, quantize=a.quantize,
                                quantize_group=None if a.quantize_group == "channel" else int(a.quantize_group),
                                quantize_smoothing=a.quantize_smoothing, quantize_lm_head=a.quantize_lm_head)
    quantized = f"; the step graph in {a.quantize}, calibrated on random latents, timesteps and conditioning" if a.quantize else ""
    with progress.step(f"compile the sampling pipeline (up to {max_batch} images per call{quantized})"):
        kp = presets.compile_pipeline(pipe, max_batch=max_batch, config=config)
    with progress.step(f"save {output}"):
        kp.save(output, overwrite=a.force)
    if a.report:
        for name, m in kp.models.items():
            out.print(f"[bold]{name}[/bold]")
            out.print(m.report())
    if a.report_json:
        with open(a.report_json, "w") as f:
            json.dump({name: m.report().to_dict() for name, m in kp.models.items()}, f, indent=1)
    parts = ", ".join(f"{name} in {m.config.quantize}" if m.config.quantize else name for name, m in kp.models.items())
    out.print(escape(f"wrote {output} ({os.path.getsize(output) / 2**20:.1f} MiB): a {kp.KIND} sampling pipeline ({parts}; "
                     f"{kp.scheduler.NAME}, {kp.spec['dtype']})"))
    return 0


def _check_pipeline_args(a) -> tuple[str, int]:
    """Refuse what --pipeline does not take, before any work; the output path and the most images per call."""
    if a.source or not (a.model or a.weights) or a.generate:
        raise KilnError("--pipeline takes --model NAME (random weights) or --weights DIR (a diffusers pipeline directory)",
                        hint="kiln compile --model dit-xl-2-256 --pipeline -o dit-pipe.kiln")
    if a.calib:
        raise KilnError("--calib does not apply to --pipeline: a quantized pipeline calibrates its step graph on random latents, "
                        "timesteps and class labels / prompts", hint="to calibrate on your own class labels or prompts, "
                        "compile in Python: DiTPipeline.from_diffusers(pipe, config=..., calibration=[207, 360, ...])")
    unused = [f for f, v in (("--max-seq", a.max_seq), ("--batch-buckets", a.batch_buckets), ("--kv-cache", a.kv_cache),
                             ("--static", a.static), ("--tp", a.tp != 1), ("--verify", a.verify), ("--emit-onnx", a.emit_onnx)) if v]
    if unused:
        raise KilnError(f"{', '.join(unused)} do{'es' if len(unused) == 1 else ''} not apply to --pipeline",
                        hint="a pipeline's one option of shape is --dim batch=1:N (images per call)")
    if a.weights:
        _check_weights(a.weights)
    output = a.output or f"{a.model or os.path.basename(os.path.normpath(a.weights))}-pipeline.kiln"
    _check_output(output, a.force, hint="use --force to replace it, or -o to write elsewhere")
    _check_output(a.report_json, True)
    a.quantize_smoothing = _smoothing(a.quantize_smoothing)
    a.quantize_lm_head = _lm_head(a)
    dims = _parse_dims(a.dim, ranges=True)
    if set(dims) - {"batch"}:
        raise KilnError(f"a pipeline's one dim is batch (images per call); got --dim {', '.join(sorted(set(dims) - {'batch'}))}")
    return output, dims.get("batch", (1, 8))[1]


def _read_calibration(path: str, spec):
    """--calib FILE: token ids from a .npy (1-d, or one row per item) or .json (a list of ids, or of lists), else
    the file's text."""
    if spec.family != "llama":
        raise KilnError(f"--calib calibrates LLMs on text or token ids; {spec.name} is a {spec.family} model",
                        hint="quantize it with a rounding mode (--quantize w8a16 / w4a16), which needs no calibration")
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npy":
            import numpy as np

            ids = np.load(path, allow_pickle=False)
            if ids.dtype.kind not in "iu" or ids.ndim not in (1, 2):
                raise ValueError(f"a {ids.ndim}-d array of {ids.dtype}; token ids are a 1-d or 2-d integer array")
            return [ids.astype("int64").tolist()] if ids.ndim == 1 else [row.astype("int64").tolist() for row in ids]
        if ext == ".json":
            with open(path) as fh:
                ids = json.load(fh)
            return [ids] if ids and isinstance(ids[0], int) else ids
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except (ValueError, OSError, UnicodeDecodeError) as e:
        raise KilnError(f"{path}: cannot read calibration data ({type(e).__name__}: {e})",
                        hint="give a text file, a .npy of token ids or a .json list of token ids") from None


def _token_calls(calib, weights: str | None, spec) -> list:
    """Calibration for a plain LLM compile: calls ``input_ids`` [1, T] of at most 256 tokens (and the model's length)."""
    import torch

    from ..llm.generator import _load_tokenizer

    if isinstance(calib, str):
        tokenizer = _load_tokenizer(weights) if weights else None
        if tokenizer is None:
            raise KilnError("a text --calib file needs a tokenizer (that of --weights)", hint="give token ids: a .npy or .json file")
        calib = [tokenizer.encode(calib)]
    window = min(256, spec.model_config().max_position_embeddings)
    return [{"input_ids": torch.tensor([ids[i:i + window]])} for ids in calib for i in range(0, len(ids), window)]


def _eos_of(weights: str | None):
    """The EOS token id(s) a checkpoint declares (generation_config.json, else config.json), or None."""
    if not weights:
        return None
    for f in ("generation_config.json", "config.json"):
        p = os.path.join(weights, f)
        if os.path.exists(p):
            with open(p) as fh:
                eos = json.load(fh).get("eos_token_id")
            if eos is not None:
                return eos
    return None


def cmd_generate(a) -> int:
    if a.tp > 1 and "RANK" not in os.environ:
        return _spawn_ranks(a.argv, a.tp)
    rank = _join_ranks(a)
    try:
        return _generate_on(a, rank)
    finally:
        _leave_ranks()


def _generate_on(a, rank: int) -> int:
    """``kiln generate`` on this process (rank ``rank`` of a tensor-parallel run: only rank 0 prints)."""
    import torch

    from ..llm.generator import Generator
    from ..llm.sampling import SamplingParams

    sampling = SamplingParams(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p, seed=a.seed)
    progress = _Progress(a.quiet)
    with progress.step(f"load {a.artifact}"):
        g = Generator.load(a.artifact, device=a.device)
    if a.prompt and a.ids:
        raise KilnError("give --prompt or --ids, not both")
    if a.ids:
        try:
            prompts = [[int(t) for t in ids.replace(",", " ").split()] for ids in a.ids]
        except ValueError:
            raise KilnError("--ids takes token ids separated by commas or spaces, e.g. --ids 1,15043,3186") from None
    elif a.prompt:
        if g.tokenizer is None:
            raise KilnError(f"{a.artifact} has no tokenizer: text prompts cannot be encoded", hint="give token ids with --ids")
        prompts = list(a.prompt)
    else:
        raise KilnError("nothing to generate from", hint='kiln generate ARTIFACT --prompt "..." (or --ids 1,2,3)')
    text = g.tokenizer is not None and len(prompts) == 1 and rank == 0
    t0 = time.perf_counter()
    first = None
    counts = [0] * len(prompts)
    results = [[] for _ in prompts]
    for step in g.stream(prompts, max_new_tokens=a.max_new_tokens, sampling=sampling, stop=a.stop or (), text=text):
        if first is None:
            first = time.perf_counter()
        for i, t in enumerate(step.tokens):
            if t is not None:
                counts[i] += 1
                results[i].append(t)
        if text:
            sys.stdout.write(step.texts[0])
            sys.stdout.flush()
    end = time.perf_counter()
    if text:
        sys.stdout.write("\n")
    elif rank == 0:
        for i, r in enumerate(results):
            shown = g.tokenizer.decode(r, skip_special_tokens=True) if g.tokenizer is not None else " ".join(map(str, r))
            out.print(escape(f"[{i}] {shown}"))
    if g.device.type == "cuda":
        torch.cuda.synchronize(g.device)
    n = sum(counts)
    decode = end - (first or end)
    if not a.quiet:
        err.print(f"[dim]{n} tokens for {len(prompts)} prompt(s): first token {((first or end) - t0) * 1e3:.1f} ms, then "
                  f"{(n - len(prompts)) / decode if decode > 0 else 0:.1f} tokens/s on {g.device}"
                  f"{f', KV cache {g.kv_cache_dtype}' if g.kv_cache_dtype else ''}[/dim]")
    return 0


def cmd_sample(a) -> int:
    """Sample images with a pipeline artifact and write them as PNG files."""
    from ..diffusion import load

    progress = _Progress(a.quiet)
    with progress.step(f"load {a.artifact}"):
        kp = load(a.artifact, device=a.device)
    kw = {k: v for k, v in (("num_inference_steps", a.steps), ("guidance_scale", a.guidance)) if v is not None}
    if kp.KIND == "dit":
        if a.prompt or not a.class_labels:
            raise KilnError(f"{a.artifact} is a class-conditional DiT pipeline: give --class N (ints in "
                            f"[0, {kp.spec['num_classes'] - 1}]){', not --prompt' if a.prompt else ''}",
                            hint="kiln sample dit.kiln --class 207")
        kw["class_labels"] = a.class_labels
    else:
        if a.class_labels or not a.prompt:
            raise KilnError(f"{a.artifact} is a text-to-image pipeline: give --prompt TEXT{', not --class' if a.class_labels else ''}",
                            hint='kiln sample pixart.kiln --prompt "a red fox in snow"')
        kw.update(prompt=a.prompt, negative_prompt=a.negative_prompt)
    n = len(a.class_labels or a.prompt)
    paths = _png_paths(a.output, n, a.force)
    t0 = time.perf_counter()
    images = _sample_with_bar(kp, kw, a.seed, a.quiet)
    seconds = time.perf_counter() - t0
    for image, path in zip(images, paths):
        image.save(path, format="PNG")
    w, h = images[0].size
    quantized = f", the step graph in {kp.step.config.quantize}" if kp.step.config.quantize else ""
    out.print(escape(f"wrote {', '.join(paths)} ({w}x{h}) in {seconds:.2f}s on {kp.device}{quantized}"))
    return 0


def _png_paths(output: str, n: int, force: bool) -> list[str]:
    """``output`` for one image; ``stem-0.png``, ``stem-1.png``, ... for several. Refuses to replace files unasked."""
    stem, ext = os.path.splitext(output)
    paths = [output] if n == 1 else [f"{stem}-{i}{ext or '.png'}" for i in range(n)]
    for p in paths:
        if os.path.exists(p) and not force:
            raise KilnError(f"{p} already exists", hint="use --force to replace it, or -o to write elsewhere")
        if not os.path.isdir(os.path.dirname(os.path.abspath(p))):
            raise KilnError(f"{p}: no such directory", hint="create it first, or -o a path in an existing directory")
    return paths


def _sample_with_bar(kp, kw: dict, seed: int, quiet: bool) -> list:
    """The pipeline's PIL images, with a progress bar over the denoising steps (it follows the device: each step
    is waited for, which the pipeline itself never does)."""
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    if quiet:
        return kp(seed=seed, output_type="pil", **kw).images
    cuda = kp.device.type == "cuda"
    bar = Progress(TextColumn("  denoising"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=err, transient=True)
    task = bar.add_task("steps", total=None)

    def advance(i: int, total: int) -> None:
        if i == 0:
            bar.start()  # (once the call's inputs are checked: an error prints alone)
        if cuda:
            torch.cuda.synchronize(kp.device)
        bar.update(task, completed=i + 1, total=total)
    try:
        return kp(seed=seed, output_type="pil", callback=advance, **kw).images
    finally:
        if bar.live.is_started:
            bar.stop()


def _spawn_ranks(argv: list, world: int) -> int:
    """``kiln generate --tp N``: this command again in N processes, one per rank, as torchrun would start them
    (RANK, WORLD_SIZE, MASTER_ADDR / PORT on localhost); rank 0 prints. The exit status is the first failing rank's."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world)}
    procs = [subprocess.Popen([sys.executable, "-m", "kiln", *argv], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(world)]
    codes = [p.wait() for p in procs]
    return next((c for c in codes if c), 0)


def _join_ranks(a) -> int:
    """Under torchrun (or --tp's processes): join the process group (NCCL on CUDA, else gloo), run on this rank's GPU;
    ranks other than 0 print nothing. Returns this process's rank (0 without one)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0
    import torch
    import torch.distributed as dist

    if a.tp not in (1, world):
        raise KilnError(f"--tp {a.tp}, but {world} ranks were started", hint=f"--tp {world}, or leave it out under torchrun")
    cuda = torch.cuda.is_available() and (a.device or "cuda").startswith("cuda")
    if cuda:
        a.device = a.device or f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(torch.device(a.device))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    if rank:
        a.quiet = True
        out.quiet = True
    return rank


def _leave_ranks() -> None:
    """Leave the process group ``_join_ranks`` joined, if any. Left to the interpreter's exit, gloo's threads were torn
    down under it now and then: "terminate called without an active exception", exit status -6 (about 1 run in 4
    of the README's `kiln generate --tp 2`)."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _with_ranges(dynamic: dict, ranges: dict) -> dict:
    seen = set()
    result = {}
    for arg, per in dynamic.items():
        result[arg] = {}
        for i, (name, lo, hi) in per.items():
            if name in ranges:
                lo, hi = ranges[name]
                seen.add(name)
            result[arg][i] = (name, lo, hi)
    unknown = set(ranges) - seen
    if unknown:
        names = sorted({n for per in dynamic.values() for n, _, _ in per.values()})
        raise KilnError(f"--dim names unknown dim(s) {', '.join(sorted(unknown))}; this model's dims are {', '.join(names)}")
    return result


# ----------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    from ..version import __version__

    p = argparse.ArgumentParser(prog="kiln", description="kiln: compile and run transformer models fast.")
    p.add_argument("--version", action="version", version=f"kiln {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{compile,run,generate,sample,bench,inspect}")
    for add in (_compile_parser, _run_parser, _generate_parser, _sample_parser, _bench_parser, _inspect_parser):
        add(sub)
    return p


def _compile_parser(sub) -> None:
    c = sub.add_parser("compile", help="compile a model into a .kiln artifact")
    c.add_argument("source", nargs="?", help="a .pt2 file written by torch.export.save, or an .onnx file (opset >= 17)")
    c.add_argument("--model", help="a built-in model: llama-tiny, llama-3.2-1b, dit-tiny, dit-xl-2-256")
    c.add_argument("--weights", metavar="DIR", help="HF / diffusers checkpoint directory for --model (default: random weights); "
                   "an LLM checkpoint (Llama, Mistral, Qwen2, Qwen3, Phi-3, Granite, OLMo 2) needs no --model")
    c.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    c.add_argument("--batch", type=int, default=1, help="example batch size (default 1)")
    c.add_argument("--seq", type=int, default=None, help="example sequence length for LLMs")
    c.add_argument("--static", action="store_true", help="fix every dim to the example's size")
    c.add_argument("--dim", action="append", metavar="NAME=MIN:MAX", help="range of a dynamic dim (repeatable)")
    c.add_argument("--disable-pass", action="append", metavar="NAME", help="switch a pass off (repeatable)")
    c.add_argument("--device", help="where the model runs (cpu, cuda)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("-o", "--output", help="artifact path (default: NAME.kiln)")
    c.add_argument("--force", action="store_true", help="replace an existing output file")
    c.add_argument("--report", action="store_true", help="print the compile report")
    c.add_argument("--report-json", metavar="PATH", help="write the compile report as JSON")
    c.add_argument("--verify", action="store_true", help="compare against eager on the example inputs")
    c.add_argument("--emit-onnx", metavar="PATH", help="also write the optimized graph as ONNX (fused ops in the 'kiln' domain)")
    c.add_argument("--generate", action="store_true",
                   help="an LLM generator: the prefill / decode step graph with a KV cache, and the tokenizer of --weights")
    c.add_argument("--kv-cache", choices=["int8", "fp8"], help="with --generate: a quantized KV cache (codes + a float32 scale "
                   "per token and kv head; default: the model's dtype)")
    c.add_argument("--max-seq", type=int, help="with --generate: KV cache length, prompt + new tokens (default 1024)")
    c.add_argument("--batch-buckets", help="with --generate: batch sizes compiled for (default 1,2,4,8,16)")
    c.add_argument("--quantize", choices=["w8a16", "w8a16-gptq", "w4a16", "w4a16-gptq", "fp8", "w8a8"],
                   help="weight-only quantization: int8 per channel / int4 groups, rounded or GPTQ (needs --calib); or weights "
                   "and activations in 8 bits for compute-bound GEMMs (DiT, prefill): fp8 (e4m3), w8a8 (int8 with SmoothQuant: "
                   "an LLM needs --calib, a DiT calibrates on random latents / timesteps / classes)")
    c.add_argument("--quantize-smoothing", default="search", metavar="search|off|A",
                   help="w8a8's SmoothQuant strength: searched per GEMM input (default), off, or a fixed value in [0, 1]")
    c.add_argument("--quantize-lm-head", default="auto", choices=["auto", "on", "off"],
                   help="the output head with --quantize: auto (default) quantizes it at 8 bits in w8a16 / w4a16 / fp8 and "
                   "an LM head in w8a8; on: at the mode's bits (4 in w4a16); off: kept in the model's dtype")
    c.add_argument("--quantize-group", default="128", choices=["32", "64", "128", "channel"],
                   help="input features per scale of 4-bit weights (default 128)")
    c.add_argument("--calib", metavar="FILE", help="calibration data for --quantize with --model: a text file (tokenized "
                   "with --weights' tokenizer), or token ids as .npy / .json")
    c.add_argument("--pipeline", action="store_true",
                   help="a diffusion sampling pipeline (denoising step graph, VAE decoder, scheduler; text encoder and "
                        "tokenizer for PixArt) of --model dit-tiny / dit-xl-2-256 or of --weights DIR (a diffusers "
                        "pipeline directory); --dim batch=1:N sets the most images per call (default 8); --quantize MODE "
                        "quantizes its step graph (the VAE and text encoder stay float), calibrated on random conditioning")
    c.add_argument("--tp", type=int, default=1, metavar="N", help="with --generate: tensor parallel over N GPUs; writes one "
                   "shard per rank, OUTPUT's name + .rankR-of-N.kiln (no process group needed)")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    c.set_defaults(fn=cmd_compile)


def _run_parser(sub) -> None:
    r = sub.add_parser("run", help="run an artifact on random or given inputs")
    r.add_argument("artifact")
    r.add_argument("--inputs", metavar="FILE", help=".safetensors file with one tensor per input name")
    r.add_argument("--dim", action="append", metavar="NAME=VALUE", help="size of a dynamic dim for random inputs")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--repeat", type=int, default=3, help="timed runs after the first (default 3)")
    r.add_argument("--device", help="run on this device instead of the artifact's")
    r.add_argument("--save-outputs", metavar="FILE", help="write the outputs to a .safetensors file")
    r.add_argument("--force", action="store_true", help="replace an existing --save-outputs file")
    r.add_argument("-q", "--quiet", action="store_true")
    r.set_defaults(fn=cmd_run)


def _generate_parser(sub) -> None:
    gen = sub.add_parser("generate", help="generate text (or token ids) with a generator artifact (compile --generate)")
    gen.add_argument("artifact")
    gen.add_argument("--prompt", action="append", help="a text prompt (repeat for a batch); needs the artifact's tokenizer")
    gen.add_argument("--ids", action="append", help="a prompt as token ids, e.g. 1,15043,3186 (repeatable)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop when the text contains this string (repeatable)")
    gen.add_argument("--device", help="run on this device instead of the artifact's")
    gen.add_argument("--tp", type=int, default=1, metavar="N", help="a tensor-parallel generator's N shards: starts N "
                     "processes, one per rank (or start them with torchrun --nproc-per-node N -m kiln generate ...)")
    gen.add_argument("-q", "--quiet", action="store_true")
    gen.set_defaults(fn=cmd_generate)


def _sample_parser(sub) -> None:
    s = sub.add_parser("sample", help="sample images with a pipeline artifact (compile --pipeline), PNG out")
    s.add_argument("artifact")
    s.add_argument("--class", dest="class_labels", type=int, action="append", metavar="N",
                   help="a class label for a DiT pipeline (repeat for several images)")
    s.add_argument("--prompt", action="append", help="a text prompt for a PixArt pipeline (repeat for several images)")
    s.add_argument("--negative-prompt", default="", help="PixArt's negative prompt (default: empty, as diffusers)")
    s.add_argument("--steps", type=int, help="denoising steps (default: the pipeline's, as diffusers: DiT 50, PixArt 20)")
    s.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: DiT 4.0, PixArt 4.5)")
    s.add_argument("--seed", type=int, default=0, help="noise seed, drawn as diffusers draws it (default 0)")
    s.add_argument("-o", "--output", default="sample.png", help="PNG path (several images: STEM-0.png, STEM-1.png, ...)")
    s.add_argument("--device", help="run on this device instead of the artifact's")
    s.add_argument("--force", action="store_true", help="replace existing PNG files")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    s.set_defaults(fn=cmd_sample)


def _bench_parser(sub) -> None:
    b = sub.add_parser("bench", help="time an artifact (kernels vs its per-op reference), JSON out")
    b.add_argument("artifact")
    b.add_argument("--dim", action="append", metavar="NAME=VALUE", help="size of a dynamic dim for random inputs")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--device", help="run on this device instead of the artifact's")
    b.add_argument("--backend", choices=["auto", "kernels", "reference"], help="how kiln runs it (default: the artifact's)")
    b.add_argument("--no-reference", dest="compare_reference", action="store_false",
                   help="skip timing the per-op torch reference")
    b.add_argument("--json", metavar="PATH", help="write the results as JSON")
    b.add_argument("--force", action="store_true", help="replace an existing --json file")
    b.add_argument("-q", "--quiet", action="store_true")
    b.set_defaults(fn=cmd_bench)


def _inspect_parser(sub) -> None:
    i = sub.add_parser("inspect", help="show an artifact's manifest, inputs and op histogram")
    i.add_argument("artifact")
    i.add_argument("--graph", action="store_true", help="print the IR")
    i.add_argument("--json", action="store_true", help="print the manifest as JSON")
    i.add_argument("--onnx", metavar="PATH", help="write the artifact's graph as ONNX (for Netron / onnxruntime)")
    i.add_argument("--force", action="store_true", help="replace an existing --onnx file")
    i.set_defaults(fn=cmd_inspect)


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _warning_printer(python_show):
    """``warnings.showwarning`` for the CLI: kiln's own warnings as one ``warning:`` line (Python's form names a file
    and line of kiln's source), others as ``python_show`` shows them."""
    def show(message, category, filename, lineno, file=None, line=None) -> None:
        if os.path.abspath(filename).startswith(_PACKAGE + os.sep):
            err.print(f"[yellow]warning:[/yellow] {escape(str(message))}", soft_wrap=True)
        else:
            python_show(message, category, filename, lineno, file, line)
    return show


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # (kiln generate --tp N runs this command again per rank)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warning_printer(warnings.showwarning)
            warnings.filterwarnings("default", module=r"kiln(\.|$)")  # (shown, once a place: the CLI's user reads them)
            if getattr(args, "device", None):
                from ..api import check_device

                check_device(args.device)  # before any work, and before a model is moved there
            return args.fn(args)
    except KilnError as e:
        if os.environ.get("KILN_DEBUG"):
            raise
        err.print(f"[red]error:[/red] {escape(e.message)}", soft_wrap=True)
        if e.hint:
            err.print(f"[dim]hint:[/dim] {escape(e.hint)}", soft_wrap=True)
        return 1
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except Exception as e:  # anything else is a kiln bug: say so in one line
        if os.environ.get("KILN_DEBUG"):
            raise
        err.print(f"[red]error:[/red] internal error: {escape(f'{type(e).__name__}: {e}')}", soft_wrap=True)
        err.print("[dim]hint:[/dim] rerun with KILN_DEBUG=1 for the traceback, and please report it")
        return 2


if __name__ == "__main__":
    sys.exit(main())
