"""Checkpoints already quantized in the GPTQ layout (AutoGPTQ / GPTQModel / transformers' ``quant_method: "gptq"``), and
in AWQ's GEMM layout (AutoAWQ / transformers' ``quant_method: "awq"``, ``version: "gemm"``).

config.json's ``quantization_config`` (or an older directory's quantize_config.json) holds ``bits`` (kiln reads 4 and
8), ``group_size`` (-1: per output channel), ``desc_act``, ``sym`` and ``checkpoint_format`` ("gptq", the default, or
"gptq_v2"). Each quantized linear ``P`` (in features K, out features N) is stored as

    P.qweight  int32 [K * bits / 32, N]   codes packed along K, 32 / bits per word, little end first:
                                          q(k, n) = (qweight[k // (32 / bits), n] >> (bits * (k % (32 / bits)))) & (2**bits - 1)
    P.qzeros   int32 [G, N * bits / 32]   zero points packed along N the same way (G = K / group_size)
    P.scales   float16 [G, N]
    P.g_idx    int32 [K]                  the group of each input feature
    P.bias     float16 [N] (optional)

    W[n, k] = scales[g_idx[k], n] * (q(k, n) - zero(g_idx[k], n))

where the stored zero is zero - 1 in format "gptq" (v1; a symmetric checkpoint stores 2**(bits-1) - 1) and the zero
itself in "gptq_v2". With g_idx[k] = k // group_size this is exactly kiln's format (``ir/quant.py``) transposed:
codes, scales and zeros carry over bit for bit; a symmetric checkpoint (every zero 2**(bits-1)) drops its zeros.

AWQ (``checkpoint_format`` "awq" here; 4 bits, zero points, no g_idx) packs along N instead, eight codes a word in the
order (0, 2, 4, 6, 1, 3, 5, 7): code n of a word's eight is at bits 4 * AWQ_ORDER.index(n), and the zero is stored as is:

    P.qweight  int32 [K, N / 8]           q(k, n): word qweight[k, n // 8], its code n % 8
    P.qzeros   int32 [G, N / 8]           zero(g, n) likewise
    P.scales   float16 [G, N]             W[n, k] = scales[k // group_size, n] * (q(k, n) - zero(k // group_size, n))

AWQ's other layouts (``version`` "gemv", "gemv_fast", ...) and checkpoints without zero points are refused by name.

Phi-3's merged projections (``qkv_proj``, ``gate_up_proj``) are split by output rows into Llama's parts, codes, scales
and zeros alike (``llama.split_merged``), as its float checkpoints are.

Act-order checkpoints (``desc_act``: GPTQ visited the input features by descending Hessian diagonal and cut the groups
in that order, so g_idx scatters each group over K) are read with the input features reordered: perm = the features
sorted by group (stably), the codes' columns taken in that order, so each group's ``group_size`` features are
consecutive as kiln's kernels read them, and the QuantWeight's ``perm`` says the GEMM reads x[..., perm]
(``quantize_weights`` puts that gather before it). Scales and zeros carry over unchanged; W is the same bit for bit.

Refused with the reason: bits other than 4 / 8, groups kiln's kernels do not take (32 / 64 / 128 or per channel), a
g_idx that does not give every group exactly ``group_size`` features, and a v1 zero point that wrapped around (a stored
zero of -1, AutoGPTQ's packing overflow).

The model is built with the dequantized float weights W (float32, then the model's dtype), so capture and the float
graph work as for any checkpoint; the compile packs the checkpoint's codes (``quantize_weights``' ``prequantized``).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import KilnError
from ..ir.quant import GROUPS, QuantWeight, check_layout, dequantize, pack_int4
from .checkpoint import read_safetensors
from .llama import LlamaConfig, LlamaForCausalLM, llama_from_tensors, split_merged, text_tensors

PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the code of output n % 8 sits at position AWQ_ORDER.index(n % 8) of its word


@dataclass(frozen=True)
class GPTQConfig:
    """A checkpoint's ``quantization_config`` (the fields kiln reads)."""

    bits: int
    group_size: int  # -1: one group per output channel
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"  # "gptq" (v1: stored zero = zero - 1), "gptq_v2" or "awq" (AWQ's GEMM layout)

    @property
    def method(self) -> str:
        """"AWQ" or "GPTQ", as messages name the checkpoint."""
        return "AWQ" if self.checkpoint_format == "awq" else "GPTQ"

    @property
    def mode(self) -> str:
        """The ``CompileConfig.quantize`` mode the checkpoint's weights correspond to."""
        return f"w{self.bits}a16"

    def group_for(self, k: int) -> int:
        return k if self.group_size == -1 else self.group_size


def gptq_config(path: str | Path) -> GPTQConfig | None:
    """The GPTQ settings of checkpoint directory ``path``, None for a float checkpoint; KilnError for other
    quantization methods and for GPTQ settings kiln cannot read."""
    path = Path(path)
    hf = json.loads((path / "config.json").read_text())
    q = hf.get("quantization_config")
    if q is None and (path / "quantize_config.json").is_file():  # AutoGPTQ's own file, before transformers read it
        q = {"quant_method": "gptq", **json.loads((path / "quantize_config.json").read_text())}
    if q is None:
        return None
    method = q.get("quant_method")
    if method == "awq":
        return _awq_config(path, q)
    if method != "gptq":
        raise KilnError(f"{path}: quantization_config.quant_method {method!r} is not read by kiln (it reads 'gptq' and 'awq')",
                        hint="load the float checkpoint and quantize it with CompileConfig(quantize=...)")
    cfg = GPTQConfig(int(q.get("bits", 4)), int(q.get("group_size", 128)), bool(q.get("desc_act", False)),
                     bool(q.get("sym", True)), str(q.get("checkpoint_format", q.get("format", "gptq"))))
    if cfg.bits not in (4, 8):
        raise KilnError(f"{path}: a {cfg.bits}-bit GPTQ checkpoint; kiln's kernels take 4- and 8-bit weights",
                        hint="use a 4- or 8-bit GPTQ checkpoint, or quantize the float checkpoint with kiln")
    if cfg.group_size != -1 and cfg.group_size not in GROUPS:
        raise KilnError(f"{path}: GPTQ group_size {cfg.group_size}; kiln's kernels take {', '.join(map(str, GROUPS))} "
                        "or -1 (per channel)", hint="use such a checkpoint, or quantize the float checkpoint with kiln")
    if cfg.checkpoint_format not in ("gptq", "gptq_v2"):
        raise KilnError(f"{path}: GPTQ checkpoint_format {cfg.checkpoint_format!r}; kiln reads 'gptq' and 'gptq_v2'")
    return cfg


def _awq_config(path: Path, q: dict) -> GPTQConfig:
    """An AWQ ``quantization_config`` -> GPTQConfig(format "awq"); KilnError for what kiln cannot read."""
    version = str(q.get("version", "gemm")).lower()
    bits, group = int(q.get("bits", q.get("w_bit", 4))), int(q.get("group_size", q.get("q_group_size", 128)))
    hint = "use an AWQ checkpoint of version 'gemm' (4 bits, zero points), or quantize the float checkpoint with kiln"
    if version != "gemm":
        raise KilnError(f"{path}: AWQ version {version!r}; kiln reads AWQ's 'gemm' layout", hint=hint)
    if bits != 4 or not q.get("zero_point", True):
        raise KilnError(f"{path}: an AWQ checkpoint of {bits} bits{'' if q.get('zero_point', True) else ' without zero points'}; "
                        "kiln reads 4-bit AWQ with zero points", hint=hint)
    if group not in GROUPS:
        raise KilnError(f"{path}: AWQ group_size {group}; kiln's kernels take {', '.join(map(str, GROUPS))}", hint=hint)
    return GPTQConfig(4, group, False, False, "awq")


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> uint8 codes, 32 / bits codes per word along ``dim`` (0 or 1), code j in bits [j*bits, (j+1)*bits)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)  # [32 / bits]
    words = packed.to(torch.int32)
    if dim == 0:  # [R, C] -> [R, 32/bits, C] -> [R * 32/bits, C]
        codes = (words[:, None, :] >> shifts[None, :, None]) & (2 ** bits - 1)
    else:  # [R, C] -> [R, C, 32/bits] -> [R, C * 32/bits]
        codes = (words[:, :, None] >> shifts[None, None, :]) & (2 ** bits - 1)
    return codes.flatten(dim, dim + 1).to(torch.uint8)


def quant_weight(name: str, parts: dict[str, torch.Tensor], cfg: GPTQConfig) -> QuantWeight:
    """One GPTQ / AWQ linear (``parts``: qweight, qzeros, scales[, g_idx]) -> kiln's QuantWeight, exactly (module docstring)."""
    if cfg.checkpoint_format == "awq":
        return _awq_weight(name, parts, cfg)
    codes = unpack_int32(parts["qweight"], cfg.bits, 0).t()  # [N, K]
    n, k = codes.shape
    group = cfg.group_for(k)
    try:
        check_layout(cfg.bits, group, (n, k))
    except ValueError as e:
        raise KilnError(f"{name}: the GPTQ layout does not fit kiln's format: {e}") from None
    perm = _group_order(name, parts.get("g_idx"), k, group, cfg)
    if perm is not None:
        codes = codes[:, perm]
    zeros = unpack_int32(parts["qzeros"], cfg.bits, 1)[:, :n].t().to(torch.int32)  # [N, G]
    if cfg.checkpoint_format == "gptq":
        zeros = zeros + 1
    if int(zeros.max()) > 2 ** cfg.bits - 1:
        raise KilnError(f"{name}: a v1 GPTQ zero point of {2 ** cfg.bits} (stored -1, the packing overflow of "
                        f"AutoGPTQ's format v1): it cannot be represented in {cfg.bits} bits", hint="use a gptq_v2 checkpoint")
    mid = 2 ** (cfg.bits - 1)
    keep = not (cfg.sym and bool((zeros == mid).all()))
    qweight = pack_int4(codes.contiguous()) if cfg.bits == 4 else codes.contiguous()
    scales = parts["scales"].t().contiguous()  # [N, G]
    if scales.dtype not in (torch.float16, torch.float32):
        scales = scales.float()
    return QuantWeight(qweight, scales, zeros.to(torch.uint8).contiguous() if keep else None, cfg.bits, group, (n, k),
                       perm).check()


def _awq_weight(name: str, parts: dict[str, torch.Tensor], cfg: GPTQConfig) -> QuantWeight:
    def natural(packed):  # int32 [R, N / 8] -> uint8 codes [R, N], output n at column n
        codes = unpack_int32(packed, 4, 1)
        where = torch.tensor([AWQ_ORDER.index(j) for j in range(8)])  # the position of output n % 8 in its word
        return codes.reshape(codes.shape[0], -1, 8)[:, :, where].flatten(1)

    codes, zeros = natural(parts["qweight"]).t(), natural(parts["qzeros"]).t()  # [N, K], [N, G]
    n, k = codes.shape
    try:
        check_layout(4, cfg.group_size, (n, k))
    except ValueError as e:
        raise KilnError(f"{name}: the AWQ layout does not fit kiln's format: {e}") from None
    if tuple(zeros.shape) != (n, k // cfg.group_size) or tuple(parts["scales"].shape) != (k // cfg.group_size, n):
        raise KilnError(f"{name}: qzeros / scales {list(parts['qzeros'].shape)} / {list(parts['scales'].shape)} do not fit "
                        f"qweight {list(parts['qweight'].shape)} at group_size {cfg.group_size}")
    scales = parts["scales"].t().contiguous()
    scales = scales if scales.dtype in (torch.float16, torch.float32) else scales.float()
    return QuantWeight(pack_int4(codes.contiguous()), scales, zeros.contiguous(), 4, cfg.group_size, (n, k)).check()


def _group_order(name: str, g_idx: torch.Tensor | None, k: int, group: int, cfg: GPTQConfig) -> torch.Tensor | None:
    """None where g_idx puts the features in consecutive groups (k // group); else the order of the features that makes
    every group consecutive (int64 [K]: sorted by group, stably). KilnError unless every group has ``group`` features."""
    trivial = torch.arange(k) // group
    if g_idx is None:
        if cfg.desc_act and group != k:
            raise KilnError(f"{name}: an act-order (desc_act) GPTQ checkpoint without {name}.g_idx: the group of each "
                            "input feature is not stored", hint="use a checkpoint that stores g_idx (AutoGPTQ / GPTQModel write it)")
        return None
    g_idx = g_idx.long().cpu().reshape(-1)
    if g_idx.numel() != k:
        raise KilnError(f"{name}: g_idx has {g_idx.numel()} entries for {k} input features")
    if torch.equal(g_idx, trivial):
        return None
    inside = int(g_idx.min()) >= 0 and int(g_idx.max()) < k // group
    if not inside or not bool((torch.bincount(g_idx, minlength=k // group) == group).all()):
        raise KilnError(f"{name}: g_idx does not give each of the {k // group} groups exactly {group} input features "
                        f"(its groups run {int(g_idx.min())}..{int(g_idx.max())})",
                        hint="the checkpoint's g_idx is not GPTQ's; quantize the float checkpoint with kiln instead")
    return torch.sort(g_idx, stable=True).indices


def gptq_tensors(tensors: dict[str, torch.Tensor], cfg: GPTQConfig) -> tuple[dict[str, torch.Tensor], dict[str, QuantWeight]]:
    """A GPTQ / AWQ checkpoint's tensors -> (float tensors by HF name, each quantized ``P.weight`` the dequantized W
    [N, K] float32; the QuantWeight of each ``P.weight``)."""
    prefixes = [name.removesuffix(".qweight") for name in tensors if name.endswith(".qweight")]
    floats = {name: t for name, t in tensors.items() if not name.endswith(tuple(f".{p}" for p in PARTS[:4]))}
    quantized = {}
    for p in prefixes:
        parts = {s: tensors[f"{p}.{s}"] for s in PARTS[:4] if f"{p}.{s}" in tensors}
        absent = [s for s in ("qzeros", "scales") if s not in parts]
        if absent:
            raise KilnError(f"{cfg.method} checkpoint: {p}.qweight has no {', '.join(f'{p}.{s}' for s in absent)}")
        qw = quant_weight(p, parts, cfg)
        quantized[f"{p}.weight"] = qw
        floats[f"{p}.weight"] = dequantize(qw, torch.float32)
    return floats, quantized


def load_gptq_llama(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, dict[str, QuantWeight], GPTQConfig]:
    """A GPTQ / AWQ checkpoint directory -> (the model holding the dequantized weights in ``dtype``, the QuantWeight of each
    quantized parameter by its name, the checkpoint's GPTQConfig). A quantized layer's all-zero bias that the model
    has no parameter for (AutoGPTQ writes one for every layer) is dropped."""
    path = Path(path)
    cfg = gptq_config(path)
    if cfg is None:
        raise KilnError(f"{path} is not a GPTQ / AWQ checkpoint (config.json has no quantization_config)")
    llama_cfg = LlamaConfig.from_hf(json.loads((path / "config.json").read_text()))
    # a multimodal checkpoint's decoder under a text model's names, its vision tower dropped before anything is dequantized
    tensors, source, where = read_safetensors(path, "model")
    tensors, source = text_tensors(tensors, source)
    floats, quantized = gptq_tensors(tensors, cfg)
    with torch.device("meta"):
        expected = set(LlamaForCausalLM(llama_cfg).state_dict())
    for name in [f"{w.removesuffix('.weight')}.bias" for w in quantized]:
        if name in floats and name not in expected and not bool(floats[name].any()):
            del floats[name]
    quantized = split_merged(quantized, {}, llama_cfg)[0]  # (Phi-3's merged projections: their parts' codes, by rows)
    source.update({name: where for name in floats if name not in source})
    try:
        model = llama_from_tensors(llama_cfg, floats, source, where, dtype)
    except ValueError as e:
        raise KilnError(f"{path}: {e}") from None
    return model, quantized, cfg
