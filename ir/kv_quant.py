"""kiln's quantized KV-cache formats: codes plus one float32 scale per (row, kv head, slot), symmetric.

A key (or value) vector x [D] of one row, kv head and cache slot is stored as

    scale = max_d |x_d| / QMAX          codes = round(x / scale)          x ~ codes * scale

- ``"int8"``: codes int8 in [-127, 127] (QMAX = 127), rounded to nearest (ties up: ``floor(y + 1/2)``, as the IR has
  no round op); |x_d - codes_d * scale| <= scale / 2.
- ``"fp8"``: codes ``torch.float8_e4m3fn`` (QMAX = 448, e4m3's largest finite value), rounded by the cast (nearest
  even); a relative error <= 2^-4 for |codes| >= 2^-6 (e4m3's smallest normal), an absolute one <= 2^-10 * scale below.

A zero vector gets scale 0 and codes 0: it dequantizes to exact zeros, never NaN. Caches are ``[B, kv_heads, S, D]``
codes with ``[B, kv_heads, S]`` float32 scales. Both functions are plain torch, so a module calling them
(``models.llama.LlamaStep``) captures into ordinary IR ops: ABS, MAX, DIV, WHERE, FLOOR, CLAMP, CAST, MUL.
"""
from __future__ import annotations

import torch

KV_DTYPES = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
QMAX = {"int8": 127.0, "fp8": 448.0}
CODE_DTYPES = frozenset({"int8", "float8_e4m3fn"})  # the IR dtypes of the codes


def check_kv_dtype(kv_dtype) -> None:
    if kv_dtype is not None and kv_dtype not in KV_DTYPES:
        raise ValueError(f"KV-cache dtype must be None (the activations' dtype) or one of {', '.join(KV_DTYPES)}, got {kv_dtype!r}")


def quantize_kv(x: torch.Tensor, kv_dtype: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] -> (codes [..., D] of ``KV_DTYPES[kv_dtype]``, scale [...] float32), see the module docstring."""
    amax = x.abs().amax(-1, keepdim=True).to(torch.float32)  # [..., 1]
    scale = amax / QMAX[kv_dtype]
    y = x.to(torch.float32) / torch.where(scale > 0, scale, 1.0)  # [..., D] in [-QMAX, QMAX] (up to rounding)
    if kv_dtype == "int8":
        codes = (y + 0.5).floor().clamp(-127.0, 127.0).to(torch.int8)
    else:
        codes = y.clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
    return codes, scale.squeeze(-1)


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """codes [..., D] * scale [...] in the scale's dtype (float32), rounded once to ``dtype``: what ATTENTION reads."""
    return (codes.to(scale.dtype) * scale.unsqueeze(-1)).to(dtype)
