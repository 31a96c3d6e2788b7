"""Checkpoints already quantized in the GPTQ layout (AutoGPTQ / GPTQModel / transformers' ``quant_method: "gptq"``).

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

Phi-3's merged projections (``qkv_proj``, ``gate_up_proj``) are split by output rows into Llama's parts, codes, scales
and zeros alike (``llama.split_merged``), as its float checkpoints are.

Refused with the reason: bits other than 4 / 8, groups kiln's kernels do not take (32 / 64 / 128 or per channel),
act-order checkpoints whose g_idx is a permutation (kiln's own GPTQ with act order quantizes the float checkpoint
instead), and a v1 zero point that wrapped around (a stored zero of -1, AutoGPTQ's packing overflow).

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
from .llama import LlamaConfig, LlamaForCausalLM, llama_from_tensors, read_safetensors, split_merged

PARTS = ("qweight", "qzeros", "scales", "g_idx", "bias")
ACT_ORDER_HINT = ("load the float (unquantized) checkpoint and quantize it with kiln's own GPTQ in act order: "
                  "CompileConfig(quantize='w4a16-gptq', quantize_act_order=True) with calibration data")


@dataclass(frozen=True)
class GPTQConfig:
    """A checkpoint's ``quantization_config`` (the fields kiln reads)."""

    bits: int
    group_size: int  # -1: one group per output channel
    desc_act: bool = False
    sym: bool = True
    checkpoint_format: str = "gptq"  # "gptq" (v1: stored zero = zero - 1) or "gptq_v2"

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
    if method != "gptq":
        raise KilnError(f"{path}: quantization_config.quant_method {method!r} is not read by kiln (it reads 'gptq')",
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
    """One GPTQ linear (``parts``: qweight, qzeros, scales[, g_idx]) -> kiln's QuantWeight, exactly (module docstring)."""
    codes = unpack_int32(parts["qweight"], cfg.bits, 0).t()  # [N, K]
    n, k = codes.shape
    group = cfg.group_for(k)
    try:
        check_layout(cfg.bits, group, (n, k))
    except ValueError as e:
        raise KilnError(f"{name}: the GPTQ layout does not fit kiln's format: {e}") from None
    g_idx = parts.get("g_idx")
    trivial = torch.arange(k) // group
    if (g_idx is None and cfg.desc_act) or (g_idx is not None and not torch.equal(g_idx.long().cpu(), trivial)):
        raise KilnError(f"{name}: an act-order (desc_act) GPTQ checkpoint: its g_idx reorders the input features' groups, "
                        "which kiln's kernels (consecutive groups) cannot read", hint=ACT_ORDER_HINT)
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
    return QuantWeight(qweight, scales, zeros.to(torch.uint8).contiguous() if keep else None, cfg.bits, group, (n, k)).check()


def gptq_tensors(tensors: dict[str, torch.Tensor], cfg: GPTQConfig) -> tuple[dict[str, torch.Tensor], dict[str, QuantWeight]]:
    """A GPTQ checkpoint's tensors -> (float tensors by HF name, each quantized ``P.weight`` the dequantized W
    [N, K] float32; the QuantWeight of each ``P.weight``)."""
    prefixes = [name.removesuffix(".qweight") for name in tensors if name.endswith(".qweight")]
    floats = {name: t for name, t in tensors.items() if not name.endswith(tuple(f".{p}" for p in PARTS[:4]))}
    quantized = {}
    for p in prefixes:
        parts = {s: tensors[f"{p}.{s}"] for s in PARTS[:4] if f"{p}.{s}" in tensors}
        absent = [s for s in ("qzeros", "scales") if s not in parts]
        if absent:
            raise KilnError(f"GPTQ checkpoint: {p}.qweight has no {', '.join(f'{p}.{s}' for s in absent)}")
        qw = quant_weight(p, parts, cfg)
        quantized[f"{p}.weight"] = qw
        floats[f"{p}.weight"] = dequantize(qw, torch.float32)
    return floats, quantized


def load_gptq_llama(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[LlamaForCausalLM, dict[str, QuantWeight], GPTQConfig]:
    """A GPTQ checkpoint directory -> (the model holding the dequantized weights in ``dtype``, the QuantWeight of each
    quantized parameter by its name, the checkpoint's GPTQConfig). A quantized layer's all-zero bias that the model
    has no parameter for (AutoGPTQ writes one for every layer) is dropped."""
    path = Path(path)
    cfg = gptq_config(path)
    if cfg is None:
        raise KilnError(f"{path} is not a GPTQ checkpoint (config.json has no quantization_config)")
    llama_cfg = LlamaConfig.from_hf(json.loads((path / "config.json").read_text()))
    tensors, source, where = read_safetensors(path, "model")
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
