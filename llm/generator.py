"""LLM generation over a compiled step graph with an explicit, preallocated KV cache.

The model is ONE kiln graph, :class:`kiln.models.llama.LlamaStep`: (input_ids [B, T], positions [B, T],
slots [T], mask [B, 1, T, S], k_cache_0, v_cache_0, ...) -> logits [B, vocab] of the last position, writing
the step's keys and values into the caches in place. Prefill is a call with T = the padded prompt length,
decode a call with T = 1; each (batch bucket, T) is one shape bucket of the executor (one CUDA graph on
the GPU), so a decode step is one graph replay plus sampling.

Batches: prompts of different lengths are left-padded to a common length (a prefill bucket), so every
row writes the same cache slots at every step; row b's real tokens start at slot ``pad[b]``. Its positions
count from there, and its mask lets a query at slot s see keys in [pad[b], s] (and, for a sliding window,
no further back than the window); a padding query sees itself only, so no row of the softmax is empty.
The batch is padded up to a batch bucket with copies of the last prompt, whose tokens are dropped.
The caches of each batch bucket are allocated once and reused by every request of that size.
"""
from __future__ import annotations

import dataclasses
import numbers
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..api import SourceWatch, build, process_group
from ..api import load as kiln_load
from ..codegen.kernels import greedy as gk
from ..config import CompileConfig
from ..errors import ArtifactError, InputError, KilnError
from ..ir.kv_quant import KV_DTYPES
from ..models.gptq import GPTQConfig, gptq_config, load_gptq_llama
from ..models.llama import HF_MODEL_TYPES, LlamaConfig, llama_from_tensors, load_llama, longrope_original
from ..runtime.artifact import shard_path
from ..passes.report import Report
from .sampling import SamplingParams, make_generator, sample
from .step_capture import cache_names, capture_step, step_function  # noqa: F401  (step_function: importable from here, as before)

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16)
MIN_PREFILL_BUCKET = 16
# each step's tokens copied to the host on a side stream (``to_host``), so the next step, queued after the copy on the
# step's stream, does not wait for it. Measured on an H100 (bench/NOTES.md, session 36, one process): the step's stream's
# share of the greedy kernel and the copy 12.7 -> 4.6 us; the 1B at batch 1 w4a16 +1.4-1.6%, bf16 +0.6%
COPY_ASIDE = True


@dataclass
class Step:
    """What :meth:`Generator.stream` yields per position: the token of each prompt (None for a prompt that had
    already finished), why a prompt finished at this step ("eos" | "stop" | "length", else None), and with
    ``text=True`` the new text of each prompt since the previous step."""
    tokens: list[int | None]
    reasons: list[str | None]
    texts: list[str] | None = None


@dataclass
class Result:
    tokens: list[list[int]]  # the generated tokens of each prompt (the stop token included, stop strings too)
    texts: list[str] | None = None
    finish_reasons: list[str] = field(default_factory=list)  # "eos" | "stop" | "length"
    prefill_s: float = 0.0
    decode_s: float = 0.0
    decode_steps: int = 0


def new_caches(spec: dict, batch: int, dtype, device) -> dict[str, torch.Tensor]:
    """Zeroed KV caches for ``batch`` rows: k_cache_i / v_cache_i [batch, kv_heads, max_seq, head_dim] in ``dtype``,
    or, with ``spec["kv_cache_dtype"]`` "int8" / "fp8", codes of that format and k_scale_i / v_scale_i
    [batch, kv_heads, max_seq] float32 scales."""
    kv = spec.get("kv_cache_dtype")
    shape = (batch, spec["kv_heads"], spec["max_seq"], spec["head_dim"])
    codes = KV_DTYPES[kv] if kv is not None else dtype
    return {n: torch.zeros(shape if "cache" in n else shape[:-1], dtype=codes if "cache" in n else torch.float32, device=device)
            for n in cache_names(spec["num_layers"], kv)}


def step_dims(names: list[str], max_batch: int, max_seq: int, window_mask: bool = False) -> dict:
    """The step's dynamic dims (kiln.compile's ``dynamic``): batch in [1, max_batch] and seq, the step's tokens, in
    [1, max_seq]; ``names``: the cache inputs; ``window_mask``: the step takes one (Gemma 2 / 3)."""
    batch, seq = ("batch", 1, max_batch), ("seq", 1, max_seq)
    masks = ("mask", "window_mask") if window_mask else ("mask",)
    return {"input_ids": {0: batch, 1: seq}, "positions": {0: batch, 1: seq}, "slots": {0: seq},
            **{m: {0: batch, 2: seq} for m in masks}, **{n: {0: batch} for n in names}}


def kv_cache_note(spec: dict, dtype) -> str:
    """The report's line on the cache format: what one token costs per layer."""
    kv, d = spec.get("kv_cache_dtype"), spec["kv_heads"] * spec["head_dim"]
    plain = 2 * d * torch.empty((), dtype=dtype).element_size()
    if kv is None:
        return f"KV cache: {str(dtype).removeprefix('torch.')}, {plain} bytes per token per layer"
    return (f"KV cache: {kv} codes + float32 scales per (row, kv head, slot), {2 * d + 8 * spec['kv_heads']} bytes per token "
            f"per layer ({str(dtype).removeprefix('torch.')}: {plain})")


def step_inputs(ids: torch.Tensor, pad: torch.Tensor, slot0: int, caches: dict, max_seq: int, window: int | None,
                layer_window: int | None = None) -> dict:
    """The step's inputs for tokens ``ids`` [B, T] at cache slots slot0 .. slot0 + T - 1 of rows whose first real
    slot is ``pad`` [B] (see the module docstring for the positions and the mask); ``layer_window``: the sliding
    layers' window of a model that has full layers too (Gemma 2 / 3), whose mask is ``window_mask``."""
    B, T = ids.shape
    dev = ids.device
    slots = torch.arange(slot0, slot0 + T, device=dev)
    pad = pad.to(dev)
    positions = (slots[None, :] - pad[:, None]).clamp_min(0)
    keys = torch.arange(max_seq, device=dev)
    see = (keys[None, None, :] <= slots[None, :, None]) & (keys[None, None, :] >= pad[:, None, None])  # [B, T, S]
    itself = keys[None, None, :] == slots[None, :, None]  # a padding query sees itself: no empty softmax row

    def within(w):  # i - w < j <= i
        return see if w is None else see & (keys[None, None, :] > slots[None, :, None] - w)

    masks = {"mask": (within(window) | itself)[:, None]}
    if layer_window is not None:
        masks["window_mask"] = (within(layer_window) | itself)[:, None]
    return {"input_ids": ids, "positions": positions, "slots": slots, **masks, **caches}


# where the generator's greedy steps run codegen/kernels/greedy.py (tests add "cpu": the Triton interpreter runs it,
# in seconds a token at a real vocabulary, where torch.argmax takes microseconds)
GREEDY_KERNEL_DEVICES = ("cuda",)
CALIBRATION_WINDOW = 256  # tokens per calibration prefill (and at most the cache length)


def calibration_steps(calibration, tokenizer, spec: dict, dtype, device) -> list[dict]:
    """Calibration text / token ids as the step graph's prefill inputs: each item's tokens (text encoded with
    ``tokenizer``) cut into windows of CALIBRATION_WINDOW tokens (at most the cache), each window a batch-1
    prefill at slot 0, left-padded to its prefill bucket exactly as the generator's prefill pads a prompt."""
    plain = isinstance(calibration, (str, list, tuple)) or _is_array(calibration)  # (else any iterable of items)
    items = _prompt_list(calibration) if plain else list(calibration)  # (a 1-d tensor: one item, not one a token)
    max_seq = int(spec["max_seq"])
    window = min(CALIBRATION_WINDOW, max_seq)
    caches = new_caches(spec, 1, dtype, device)  # read only: the calibration run computes the updates out of place
    steps = []
    for k, item in enumerate(items):
        if isinstance(item, str):
            if tokenizer is None:
                raise KilnError(f"calibration item {k} is text, but there is no tokenizer", hint="give token ids")
            item = tokenizer.encode(item)
        ids = _token_ids(item, f"calibration item {k}")
        bad = [t for t in ids if not 0 <= t < spec["vocab_size"]]
        if bad:
            raise KilnError(f"calibration item {k} has token id {bad[0]} outside the vocabulary [0, {spec['vocab_size']})")
        for i in range(0, len(ids), window):
            piece = ids[i:i + window]
            T = _prefill_bucket(len(piece), max_seq)
            row = torch.tensor([[0] * (T - len(piece)) + piece], device=device)
            steps.append(step_inputs(row, torch.tensor([T - len(piece)]), 0, caches, max_seq, spec["sliding_window"],
                                     spec.get("layer_window")))
    if not steps:
        raise KilnError("the calibration data holds no tokens", hint="give text or token ids to calibrate on")
    return steps


def _is_array(x) -> bool:
    """A torch tensor or a numpy array (of token ids)."""
    return hasattr(x, "dtype") and hasattr(x, "shape") and hasattr(x, "reshape")


def _prompt_list(prompts) -> list:
    """A request's prompts: text, token ids (a list of ints, a 1-d tensor / array) or a list of those; a 2-d tensor /
    array is one prompt a row."""
    if isinstance(prompts, str):
        return [prompts]
    if _is_array(prompts):
        return [prompts] if len(prompts.shape) <= 1 else list(prompts)
    if not isinstance(prompts, (list, tuple)):
        raise InputError(f"prompts are {type(prompts).__name__}: give text, token ids (a list of ints or a tensor), or a "
                         "list of those")
    return [prompts] if prompts and isinstance(prompts[0], numbers.Integral) else list(prompts)


def _token_ids(p, what: str) -> list[int]:
    """``what``'s token ids (a prompt, a calibration item) as ints: a sequence of integers, or an integer tensor / array
    (flattened); a float / bool id is refused (int() would truncate 1.5 to 1 without a word)."""
    if _is_array(p):
        if isinstance(p, torch.Tensor):
            integer = not (p.dtype.is_floating_point or p.dtype.is_complex or p.dtype == torch.bool)
        else:
            integer = p.dtype.kind in "iu"
        if not integer:
            kind = str(p.dtype).removeprefix("torch.")
            raise InputError(f"{what} is a {kind} tensor; token ids are integers",
                             hint="pass an integer tensor (torch.long) or a list of ints")
        return [int(t) for t in p.reshape(-1).tolist()]
    ids = list(p)
    bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)), None)
    if bad is not None:
        raise InputError(f"{what} has token id {bad!r} ({type(bad).__name__}); token ids are integers",
                         hint="pass a list of ints, an integer tensor, or text with a tokenizer")
    return [int(t) for t in ids]


def _prefill_bucket(n: int, max_seq: int) -> int:
    """The prefill length of a longest prompt of n tokens: a power of two >= 16, at most max_seq."""
    b = MIN_PREFILL_BUCKET
    while b < n:
        b *= 2
    return min(b, max_seq)


class Generator:
    """Generates from a compiled Llama-family step graph (:class:`~kiln.models.llama.LlamaStep`).

    Build one with :func:`kiln.from_hf` (an in-memory transformers model), :meth:`from_pretrained` (a checkpoint
    directory), :meth:`compile` (kiln's own LlamaForCausalLM) or :meth:`load` (a saved ``.kiln`` artifact, no
    model source or checkpoint needed). ``spec``: vocab_size, num_layers, kv_heads, head_dim, sliding_window, layer_window
    (Gemma 2 / 3's sliding layers' window: their mask is the step's ``window_mask``),
    max_seq (cache length: prompt + new tokens), batch_buckets (request batch sizes compiled for; a request is
    padded up to the next one), eos (token ids), longrope_original (a LongRoPE model's original length: a batch is
    prefilled again where a row grows past it, ``_restarts``; None otherwise). ``tokenizer``: a transformers tokenizer (text in and out,
    stop strings); without one, prompts are token ids. A generator serves one request at a time (the KV
    cache of a batch bucket is shared by its requests): finish or drop one stream before starting the next.
    ``kv_cache_dtype`` (``spec["kv_cache_dtype"]``): None (the cache holds the activations' dtype), "int8" or "fp8"
    (quantized codes + float32 scales, ``ir/kv_quant.py``); a saved generator keeps it."""

    def __init__(self, compiled, spec: dict, tokenizer=None):
        self.compiled = compiled
        self.spec = dict(spec)
        self.max_seq = int(spec["max_seq"])
        self.batch_buckets = tuple(spec["batch_buckets"])
        self.vocab_size = int(spec["vocab_size"])
        self.window, self.layer_window = spec.get("sliding_window"), spec.get("layer_window")
        self.longrope = spec.get("longrope_original")  # (LongRoPE's original length: ``_restarts``)
        self.kv_cache_dtype = spec.get("kv_cache_dtype")
        self.names = cache_names(spec["num_layers"], self.kv_cache_dtype)
        self.device = compiled.device
        self.dtype = _DTYPES[spec["dtype"]]
        self.tokenizer = tokenizer
        self.eos = set(spec.get("eos") or [])
        self.tp = tuple(spec.get("tp") or (0, 1))  # (rank, world)
        self.compile_s = 0.0
        self._caches: dict[int, dict[str, torch.Tensor]] = {}
        self._busy = False

    @classmethod
    def compile(cls, model, *, max_seq: int = 1024, batch_buckets=DEFAULT_BATCH_BUCKETS, device=None, dtype=None,
                tokenizer=None, eos_token_id: int | list[int] | None = None, config: CompileConfig | None = None,
                quantize: str | None = None, calibration=None, kv_cache_dtype: str | None = None,
                tp: int | None = None, prequantized: dict | None = None) -> "Generator":
        """Compile kiln's LlamaForCausalLM ``model`` into a generator (see the class docstring). ``quantize``: a
        weight-only mode (``CompileConfig.quantize``; overrides ``config``'s); ``calibration``: text (with the
        tokenizer) or token ids, one item or a list of them, run as prefill steps (``calibration_steps``) for
        GPTQ and for each quantized GEMM's measured error. ``kv_cache_dtype``: None, "int8" or "fp8"
        (``CompileConfig.kv_cache_dtype``; overrides ``config``'s). ``tp``: tensor parallel over that many ranks
        (``CompileConfig.tp``; overrides ``config``'s): the generator is this process's rank of them (see
        :func:`tensor_parallel_sampling`). ``prequantized``: {parameter name: QuantWeight} of weights a checkpoint
        holds already quantized (:meth:`from_pretrained` on a GPTQ directory), packed as given. The step is captured
        with two layers and made as deep as the model in the IR (``llm/step_capture.py``; the report's notes say so)."""
        cfg = model.config
        if max_seq < 2:
            raise KilnError(f"max_seq must be at least 2, got {max_seq}")
        buckets = tuple(sorted({int(b) for b in batch_buckets}))
        if not buckets or buckets[0] < 1:
            raise KilnError(f"batch_buckets must be positive sizes, got {batch_buckets}")
        param = next(model.parameters())
        device = torch.device(device) if device is not None else param.device
        dtype = dtype or param.dtype
        model = model.to(device, dtype).eval()
        eos = eos_token_id if eos_token_id is not None else getattr(tokenizer, "eos_token_id", None)
        spec = dict(vocab_size=cfg.vocab_size, num_layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads,
                    head_dim=cfg.head_dim, sliding_window=cfg.sliding_window, layer_window=cfg.layer_window,
                    max_seq=int(max_seq), batch_buckets=list(buckets),
                    dtype=str(dtype).removeprefix("torch."), eos=sorted({eos} if isinstance(eos, int) else set(eos or [])),
                    longrope_original=longrope_original(cfg))
        overrides = {k: v for k, v in (("quantize", quantize), ("kv_cache_dtype", kv_cache_dtype), ("tp", tp)) if v is not None}
        config = dataclasses.replace(config or CompileConfig(), **overrides)  # (validates them)
        if config.tp > 1 and calibration is not None:
            raise KilnError("calibration with tp > 1 is not supported yet", hint="quantize without calibration (w8a16, w4a16), or tp=1")
        if config.tp > 1 and prequantized is not None:
            raise KilnError("a GPTQ / AWQ checkpoint's codes with tp > 1 are not supported yet: the shards would be quantized again",
                            hint="tp=1, or quantize the float checkpoint (quantize='w4a16') with tp")
        spec["kv_cache_dtype"] = kv = config.kv_cache_dtype
        if config.device is None:
            config.device = str(device)
        # the example: batch 2 (1 if that is all), 2 tokens; its caches are the example's own
        b0 = min(2, buckets[-1])
        names = cache_names(cfg.num_hidden_layers, kv)
        caches = new_caches(spec, b0, dtype, device)
        example = step_inputs(torch.zeros(b0, 2, dtype=torch.long, device=device), torch.zeros(b0, dtype=torch.long), 0, caches,
                              int(max_seq), cfg.sliding_window, cfg.layer_window)
        dims = step_dims(names, buckets[-1], int(max_seq), cfg.layer_window is not None)
        t0 = time.perf_counter()
        steps = None if calibration is None else calibration_steps(calibration, tokenizer, spec, dtype, device)
        pre = None if prequantized is None else [(model.get_parameter(n), qw) for n, qw in prequantized.items()]
        report = Report()
        src = capture_step(model, kv, example, dims, report)
        compiled = build(src, config, report, (), example, calibration=steps, prequantized=pre)
        compiled.report().notes.append(kv_cache_note(spec, dtype))
        compiled.source_watch = SourceWatch(model)  # (a function's closure is not watched: the model is)
        _shard_spec(spec, compiled)
        g = cls(compiled, spec, tokenizer)
        g.compile_s = time.perf_counter() - t0
        return g

    @classmethod
    def from_pretrained(cls, path, *, dtype=torch.bfloat16, **kw) -> "Generator":
        """A checkpoint directory (config.json + safetensors); its tokenizer when the directory has one. A GPTQ
        or AWQ checkpoint (``quantization_config.quant_method`` "gptq" / "awq") compiles with its own codes (``models/gptq.py``):
        the quantize mode, group and symmetry come from it; asking for another mode is an error."""
        gptq = gptq_config(path)
        if gptq is None:
            model = load_llama(path, dtype=dtype)
        else:
            model, kw["prequantized"], _ = load_gptq_llama(path, dtype=dtype)
            kw["config"] = _checkpoint_config(kw.get("config"), kw.pop("quantize", None), gptq, path)
        tok = kw.pop("tokenizer", None)
        if tok is None:
            tok = _load_tokenizer(path)
        return cls.compile(model, tokenizer=tok, **kw)

    # -- artifacts --------------------------------------------------------------------------------------
    def save(self, path, overwrite: bool = False) -> str:
        """A ``.kiln`` artifact of the step graph, the generation settings and the tokenizer's files (data)."""
        files = {}
        if self.tokenizer is not None:
            import tempfile
            from pathlib import Path

            with tempfile.TemporaryDirectory() as d:
                self.tokenizer.save_pretrained(d)
                for f in sorted(Path(d).iterdir()):
                    if f.is_file() and f.suffix in (".json", ".txt", ".model"):
                        files["tokenizer/" + f.name] = f.read_bytes()
        if self.spec.get("tp"):  # a tensor-parallel rank writes its own shard: gen.kiln -> gen.rank0-of-2.kiln
            path = shard_path(path, *self.spec["tp"])
        return self.compiled.save(path, overwrite, extra={"generator": self.spec}, files=files)

    @classmethod
    def load(cls, path, device=None, backend=None) -> "Generator":
        """A generator saved with :meth:`save` (with its tokenizer when it was saved with one). In a process group of
        several ranks, ``gen.kiln`` means this rank's shard ``gen.rank{R}-of-{N}.kiln`` when no ``gen.kiln`` exists."""
        m = kiln_load(_rank_file(path), device=device, backend=backend)
        spec = m.manifest.get("generator")
        if not isinstance(spec, dict):
            raise ArtifactError(f"{path}: check 'generator' failed: the artifact is a plain model, not a generator",
                                hint="run it with `kiln run`, or save one with Generator.save / `kiln compile --generate`")
        tok_files = {k.removeprefix("tokenizer/"): v for k, v in m.files.items() if k.startswith("tokenizer/")}
        tokenizer = _tokenizer_from_files(tok_files) if tok_files else None
        return cls(m, spec, tokenizer)

    # -- inputs -----------------------------------------------------------------------------------------
    def caches(self, batch: int) -> dict[str, torch.Tensor]:
        """The KV cache of a batch bucket (allocated on first use, then reused)."""
        if batch not in self._caches:
            self._caches[batch] = new_caches(self.spec, batch, self.dtype, self.device)
        return self._caches[batch]

    def _inputs(self, ids: torch.Tensor, pad: torch.Tensor, slot0: int, caches: dict) -> dict:
        return step_inputs(ids, pad, slot0, caches, self.max_seq, self.window, self.layer_window)

    def _encode(self, prompts) -> list[list[int]]:
        out = []
        for i, p in enumerate(_prompt_list(prompts)):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise InputError(f"prompt {i} is text, but this generator has no tokenizer", hint="pass token ids")
                p = self.tokenizer.encode(p)
            p = _token_ids(p, f"prompt {i}")
            if not p:
                raise InputError(f"prompt {i} is empty", hint="give at least one token")
            bad = [t for t in p if not 0 <= t < self.vocab_size]
            if bad:
                raise InputError(f"prompt {i} has token id {bad[0]} outside the vocabulary [0, {self.vocab_size})")
            out.append(p)
        if not out:
            raise InputError("no prompts given")
        return out

    def _bucket(self, batch: int) -> int:
        for b in self.batch_buckets:
            if b >= batch:
                return b
        raise InputError(f"{batch} prompts in one request; this generator was built for at most {self.batch_buckets[-1]}",
                         hint="split the request or build the generator with larger batch_buckets")

    def _prefill_len(self, n: int) -> int:
        """The prefill bucket of a longest prompt of n tokens: a power of two >= 16, at most max_seq."""
        return _prefill_bucket(n, self.max_seq)

    # -- generation -------------------------------------------------------------------------------------
    def stream(self, prompts, max_new_tokens: int = 64, sampling: SamplingParams | None = None,
               stop: list[str] | tuple = (), text: bool = False) -> Iterator[Step]:
        """Generate step by step: yields one :class:`Step` per new token position until every prompt is done
        (an EOS token, a stop string, or ``max_new_tokens``). ``text``: also decode each step's new text."""
        sampling = sampling or SamplingParams()
        ids_list = self._encode(prompts)
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        n = len(ids_list)
        bucket = self._bucket(n)
        longest = max(len(p) for p in ids_list)
        T = self._prefill_len(longest)
        if T + max_new_tokens > self.max_seq:
            which = max(range(n), key=lambda i: len(ids_list[i]))
            if longest >= self.max_seq:
                raise InputError(f"prompt {which} has {longest} tokens; the cache holds {self.max_seq}, and at least one new "
                                 "token needs a slot after the prompt",
                                 hint="shorten the prompt or build the generator with a larger max_seq")
            raise InputError(f"prompt {which} has {len(ids_list[which])} tokens (padded to {T}); with max_new_tokens="
                             f"{max_new_tokens} that needs {T + max_new_tokens} cache slots, the cache holds {self.max_seq}",
                             hint="shorten the prompt, ask for fewer tokens, or build the generator with a larger max_seq")
        if (stop or text) and self.tokenizer is None:
            raise InputError("stop strings and text need a tokenizer", hint="stop on token ids with eos_token_id instead")
        if self._busy:
            raise InputError("this generator is already serving a request (its KV cache is in use)",
                             hint="finish or close the other stream first, or use a second Generator")
        self._busy = True
        try:
            yield from self._stream(ids_list, bucket, T, max_new_tokens, sampling, stop, text)
        finally:
            self._busy = False

    def _prefill(self, rows: list[list[int]], T: int) -> tuple[torch.Tensor, "_Decoder"]:
        """The logits of each row's last token, its rows left-padded to T tokens, and the decoder of the steps after."""
        pad = torch.tensor([T - len(p) for p in rows])
        ids = torch.tensor([[0] * (T - len(p)) + p for p in rows], device=self.device)
        caches = self.caches(len(rows))
        logits = self.compiled.run(list(self._inputs(ids, pad, 0, caches).values()))[0]
        return logits, _Decoder(self, len(rows), pad, caches)

    def _restarts(self, rows: list[list[int]], max_new_tokens: int) -> set[int]:
        """The steps after which the rows are prefilled again, whole: LongRoPE takes its long factors for every position
        of a sequence longer than the original length, so where a row first grows past it (its prompt did not),
        transformers' Phi-3 computes that row's cache again; here every row's (the others' keys stay short, the same
        values to a rounding). A row of L tokens passes it when its token of step ``original - L`` is fed."""
        if self.longrope is None:
            return set()
        return {self.longrope - len(r) for r in rows if 0 <= self.longrope - len(r) < max_new_tokens - 1}

    def _stream(self, ids_list, bucket, T, max_new_tokens, sampling, stop, text) -> Iterator[Step]:
        n = len(ids_list)
        rows = ids_list + [ids_list[-1]] * (bucket - n)  # padding rows repeat the last prompt; dropped
        gen = make_generator(tensor_parallel_sampling(sampling, self.tp[1]), self.device)
        logits, decode = self._prefill(rows, T)
        restarts, seqs = self._restarts(rows, max_new_tokens), [list(r) for r in rows]
        cuda = self.device.type == "cuda"
        if cuda:
            host_tok = torch.empty(bucket, dtype=torch.long, pin_memory=True)
            copied = torch.cuda.Event()
            aside = torch.cuda.Stream(self.device) if COPY_ASIDE else None
        done = [False] * n
        texts = [""] * n
        produced: list[list[int]] = [[] for _ in range(n)]
        greedy = sampling.temperature == 0
        for step in range(max_new_tokens):
            last, restart = step == max_new_tokens - 1, step in restarts
            # greedy, from the second decode step: the token and the next step's inputs in one launch (Decoder.greedy)
            tok = decode.greedy(logits, T + step) if greedy and not (last or restart) else None
            advanced = tok is not None
            if not advanced:
                tok = sample(logits, sampling, gen)  # [bucket]
            if cuda:
                to_host(tok, host_tok, copied, aside)
            if not (last or restart):  # the next step goes to the GPU before this one's tokens are read back
                logits = decode(tok, T + step, advanced)
            if cuda:
                copied.synchronize()
                host = host_tok.tolist()
            else:
                host = tok.tolist()
            if restarts:
                seqs = [q + [t] for q, t in zip(seqs, host)]
            if restart:  # (the next token's slot: T + step + 1 as before, the rows now padded to that length)
                logits, decode = self._prefill(seqs, T + step + 1)
            out, reasons, deltas = [], [], []
            for i in range(n):
                if done[i]:
                    out.append(None)
                    reasons.append(None)
                    deltas.append("")
                    continue
                t = host[i]
                produced[i].append(t)
                out.append(t)
                reason = "eos" if t in self.eos else None
                if stop or text:
                    new_text = self.tokenizer.decode(produced[i], skip_special_tokens=True)
                    deltas.append(new_text[len(texts[i]):])
                    texts[i] = new_text
                    if reason is None and any(s in new_text for s in stop):
                        reason = "stop"
                if reason is None and step == max_new_tokens - 1:
                    reason = "length"
                done[i] = reason is not None
                reasons.append(reason)
            yield Step(out, reasons, deltas if text else None)
            if all(done):
                return

    def generate(self, prompts, max_new_tokens: int = 64, sampling: SamplingParams | None = None,
                 stop: list[str] | tuple = ()) -> Result:
        """Generate for one prompt or a batch (token ids, or text with a tokenizer); see :meth:`stream`."""
        tokens: list[list[int]] = []
        finish: list[str] = []
        t0 = time.perf_counter()
        t_first = None
        steps = 0
        for s in self.stream(prompts, max_new_tokens, sampling, stop):
            if t_first is None:
                t_first = time.perf_counter()
                tokens, finish = [[] for _ in s.tokens], ["length"] * len(s.tokens)
            steps += 1
            for i, (t, r) in enumerate(zip(s.tokens, s.reasons)):
                if t is not None:
                    tokens[i].append(t)
                if r is not None:
                    finish[i] = r
        end = time.perf_counter()
        texts = [self.tokenizer.decode(t, skip_special_tokens=True) for t in tokens] if self.tokenizer is not None else None
        return Result(tokens, texts, finish, prefill_s=(t_first or end) - t0, decode_s=end - (t_first or end),
                      decode_steps=max(steps - 1, 0))


def to_host(tok: torch.Tensor, host: torch.Tensor, done: torch.cuda.Event, side: torch.cuda.Stream | None = None) -> None:
    """``tok``'s values into pinned ``host`` without making the host wait, ``done`` recorded after the copy: on the
    current stream, or on ``side`` once the current stream's queued work is done (what is queued next on the current
    stream then does not wait for the copy; ``tok``'s memory is kept from reuse until the copy has run)."""
    if side is None:
        host.copy_(tok, non_blocking=True)
        done.record()
        return
    side.wait_stream(torch.cuda.current_stream(tok.device))
    with torch.cuda.stream(side):
        host.copy_(tok, non_blocking=True)
        done.record(side)
    tok.record_stream(side)


def leaving(slot: int, window: int | None) -> int | None:
    """The slot that leaves a sliding window of ``window`` keys when the step writes ``slot`` (None: none does)."""
    return slot - window if window is not None and slot >= window else None


class _Decoder:
    """Decode steps of one request: ``decoder(tok [B], slot)`` enqueues the step that writes slot ``slot`` and
    returns its logits. The first step binds the shape bucket's plan; later steps update that plan's input
    buffers in place (tokens, positions + 1, slot + 1, one mask column) and replay it, so a step costs a few
    tiny kernels and one replay (one CUDA graph on the GPU), not a pass through the generic call path."""

    def __init__(self, gen: Generator, bucket: int, pad: torch.Tensor, caches: dict):
        self.gen, self.bucket, self.pad, self.caches = gen, bucket, pad, caches
        graph = gen.compiled.graph
        self.names = [n.attrs["name"] for n in graph.inputs]
        self.logits_index = next(k for k, name in enumerate(graph.output_names) if name not in graph.updates)
        self.plan = None
        self.slot = None
        self.work = None  # greedy's scratch (codegen/kernels/greedy.py) for the bound plan, or False where it does not fit

    def greedy(self, logits: torch.Tensor, slot: int) -> torch.Tensor | None:
        """Each row's greedy token (torch.argmax's), with the inputs of the step writing ``slot`` already advanced to it,
        in one launch (``codegen/kernels/greedy.py``: torch's argmax and the four updates took ~45 us of GPU time a
        step on an H200, bench/NOTES.md, session 18); then call ``self(tok, slot, advanced=True)``. None where the
        kernel does not apply (no plan bound yet, not the next slot, not on a GREEDY_KERNEL_DEVICES device, inputs of
        other dtypes or shapes): sample and call ``self(tok, slot)``."""
        if self.plan is None or slot != self.slot + 1 or logits.device.type not in GREEDY_KERNEL_DEVICES:
            return None
        b = self.buffers
        operands = (logits, b["input_ids"], b["positions"], b["slots"], b["mask"], slot)
        if self.work is None:  # once a bound plan: its buffers are the same every step (None: checked, does not fit)
            fits = gk.check(*operands, window_mask=b.get("window_mask")) is None
            self.work = gk.scratch(*logits.shape, logits.device) if fits else False
        if self.work is False:
            return None
        return gk.greedy(*operands, drop=leaving(slot, self.gen.window), work=self.work, window_mask=b.get("window_mask"),
                         window_drop=leaving(slot, self.gen.layer_window))

    def __call__(self, tok: torch.Tensor, slot: int, advanced: bool = False) -> torch.Tensor:
        g = self.gen
        if advanced:  # (``greedy`` wrote the tokens and advanced the inputs, the sliding layers' mask too)
            self.slot = slot
            return self.plan.replay()[self.logits_index]
        if self.plan is not None and slot == self.slot + 1:
            b = self.buffers
            b["input_ids"].copy_(tok[:, None])
            b["positions"].add_(1)
            b["slots"].add_(1)
            b["mask"].select(3, slot).fill_(True)
            if (old := leaving(slot, g.window)) is not None:
                b["mask"].select(3, old).fill_(False)
            self.advance_window(slot)
        else:
            inputs = list(step_inputs(tok[:, None], self.pad, slot, self.caches, g.max_seq, g.window, g.layer_window).values())
            self.plan = g.compiled.executor.plan_for(inputs)
            self.plan.bind(inputs)
            self.buffers = {name: buf for name, buf in zip(self.names, self.plan.input_buffers) if buf is not None}
            self.work = None  # (greedy checks the new plan's buffers)
        self.slot = slot
        return self.plan.replay()[self.logits_index]

    def advance_window(self, slot: int) -> None:
        """The sliding layers' mask (Gemma 2 / 3's ``window_mask``) advanced to the step writing ``slot``: its column seen,
        the one leaving the window hidden."""
        if self.gen.layer_window is not None:
            self.buffers["window_mask"].select(3, slot).fill_(True)
            if (old := leaving(slot, self.gen.layer_window)) is not None:
                self.buffers["window_mask"].select(3, old).fill_(False)


def from_hf(model, tokenizer=None, **kw) -> Generator:
    """A :class:`Generator` for an in-memory transformers Llama-family causal LM (``models.llama.HF_MODEL_TYPES``; its
    weights are shared, not copied, when device and dtype stay the same)."""
    hf_cfg = model.config.to_dict()
    if hf_cfg.get("model_type") not in HF_MODEL_TYPES:
        raise KilnError(f"kiln.from_hf: model_type {hf_cfg.get('model_type')!r} is not supported",
                        hint=f"supported: {', '.join(HF_MODEL_TYPES)}; kiln.jit / kiln.compile run other models' forward "
                             "(no KV cache)")
    state = model.state_dict()
    try:
        ours = llama_from_tensors(LlamaConfig.from_hf(hf_cfg), state, dict.fromkeys(state, "the transformers model"),
                                  "the transformers model")
    except ValueError as e:
        raise KilnError(f"kiln.from_hf: {e}") from None
    if "eos_token_id" not in kw:
        kw["eos_token_id"] = getattr(getattr(model, "generation_config", None), "eos_token_id", None) or hf_cfg.get("eos_token_id")
    return Generator.compile(ours.eval(), tokenizer=tokenizer, **kw)


def _shard_spec(spec: dict, compiled) -> None:
    """A tensor-parallel rank's generation settings: its KV caches hold its kv heads (the sharded cache inputs say how
    many), and ``tp`` records (rank, world)."""
    config = compiled.config
    if config.tp > 1:
        k0 = next(n for n in compiled.graph.inputs if n.attrs["name"] == "k_cache_0")
        spec.update(kv_heads=int(k0.shape[1]), tp=[config.tp_rank, config.tp])


def tensor_parallel_sampling(sampling: SamplingParams, world: int) -> SamplingParams:
    """How the ranks of a tensor-parallel generator agree on each token: every rank samples the same way from the same
    logits (the LM head's ALL_GATHER hands every rank all of them) with the same seed, so their tokens are equal with
    no collective per token; the alternative, rank 0 sampling and broadcasting, would add a broadcast and a host
    round trip to every decode step. An unseeded request gets one seed drawn on rank 0 and broadcast once (per
    request). Greedy decoding needs no seed."""
    if world == 1 or sampling.seed is not None or sampling.temperature == 0:
        return sampling
    import torch.distributed as dist

    seed = torch.randint(0, 2 ** 62, (1,), dtype=torch.int64, device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.broadcast(seed, src=0)
    return dataclasses.replace(sampling, seed=int(seed))


def _rank_file(path):
    """``path``, or this rank's shard of it when it does not exist and this process is one of several ranks."""
    import os

    rank, world = process_group()
    if world > 1 and not os.path.exists(path) and os.path.exists(shard_path(path, rank, world)):
        return shard_path(path, rank, world)
    return path


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _checkpoint_config(config: CompileConfig | None, quantize: str | None, gptq: GPTQConfig, path) -> CompileConfig:
    """``config`` with the GPTQ / AWQ checkpoint's quantize mode, group and symmetry (other weights stay float)."""
    config = config or CompileConfig()
    for asked in (quantize, config.quantize):
        if asked is not None and asked != gptq.mode:
            raise KilnError(f"{path} is a {gptq.bits}-bit {gptq.method} checkpoint (quantize={gptq.mode!r}); quantize={asked!r} "
                            "would quantize its dequantized weights again", hint=f"leave quantize unset (or {gptq.mode!r})")
    return dataclasses.replace(config, quantize=gptq.mode, quantize_group=None if gptq.group_size == -1 else gptq.group_size,
                               quantize_symmetric=gptq.sym)


def _tokenizer_from_files(files: dict[str, bytes]):
    """A transformers tokenizer from its saved files (JSON / text data: nothing from them is executed)."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        for name, data in files.items():
            if "/" in name or name.startswith("."):
                continue
            (Path(d) / name).write_bytes(data)
        return _load_tokenizer(d)


def _load_tokenizer(path):
    from pathlib import Path

    p = Path(path)
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer.model", "tokenizer_config.json")):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(p), trust_remote_code=False)
