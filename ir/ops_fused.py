"""Fused ops: what the pass pipeline rewrites the model into. Ordinary ops of the one op set (same
schema / type rule / reference implementation as ``ops.py``); the reference computes exactly the
unfused formula, in the same order, so a fusion changes no number on the reference path.

- ``GEMM(x, w[, bias][, gate][, residual])``: ``residual + gate * epi(x @ w^T + bias)`` where
  ``epi`` is the activation, or with ``glu`` ``act(h[..., :N/2]) * h[..., N/2:]`` (``silu(gate) * up``
  on a merged gate/up weight). Which optional inputs are present is said by the boolean attributes.
- ``LAYERNORM_MODULATE(x, scale, shift[, w, b])``: DiT's adaLN ``layer_norm(x) * (1 + scale) + shift``.
- ``ROPE(x, cos, sin)``: rotary embedding in the rotate-half form ``x * cos + rotate_half(x) * sin``.
- ``QGEMM(x, qweight, scales[, zeros][, bias][, gate][, residual])``: GEMM on a weight-only quantized weight
  in kiln's packed format (``ir/quant.py``): ``W = (q - zero) * scale`` dequantized in float32, rounded to
  x's dtype, then exactly GEMM's formula. Attributes: GEMM's, plus ``bits`` (4 / 8), ``group`` and ``zeros``.
- ``AQGEMM(x, wq, ws[, smooth][, bias][, gate][, residual][, cos, sin])``: GEMM with activations quantized too (W8A8
  int8, FP8 e4m3): see its section below.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .ops import REQUIRED, ShapeError, define, fits, infer_norm, layernorm_ref, same_dtype
from .quant import QuantWeight, check_layout, codes_of, dequantize_rows, quantize_rows
from .types import TType, dims_equal, shape_str

ACTIVATIONS = {
    "none": lambda h: h,
    "silu": F.silu,
    "gelu": lambda h: F.gelu(h),
    "gelu_tanh": lambda h: F.gelu(h, approximate="tanh"),
}


def gemm_operands(ins, a) -> tuple:
    """(x, w, bias, gate, residual) from a GEMM's inputs; absent ones are None."""
    it = iter(ins[2:])
    bias = next(it) if a["bias"] else None
    gate = next(it) if a["gate"] else None
    residual = next(it) if a["residual"] else None
    return ins[0], ins[1], bias, gate, residual


def _gemm_arity(a) -> int:
    return 2 + int(a["bias"]) + int(a["gate"]) + int(a["residual"])


def _infer_gemm(ins, a):
    if len(ins) != _gemm_arity(a):
        raise ShapeError(f"GEMM: {len(ins)} inputs, the attributes (bias={a['bias']}, gate={a['gate']}, "
                         f"residual={a['residual']}) say {_gemm_arity(a)}")
    x, w, bias, gate, residual = gemm_operands(ins, a)
    if len(w.shape) != 2 or not x.shape or not dims_equal(x.shape[-1], w.shape[1]):
        raise ShapeError(f"GEMM: input {shape_str(x.shape)} and weight {shape_str(w.shape)} (weight is [out, in])")
    same_dtype("GEMM", ins)
    return _epilogue_type("GEMM", x, w.shape, bias, gate, residual, a)


def _epilogue_type(op: str, x: TType, w_shape: tuple, bias, gate, residual, a) -> TType:
    """The output type of ``residual + gate * epi(x @ W^T + bias)`` for a weight W of shape ``w_shape`` [N, K]."""
    if a["act"] not in ACTIVATIONS:
        raise ShapeError(f"{op}: unknown activation {a['act']!r} (one of {', '.join(ACTIVATIONS)})")
    if bias is not None and (len(bias.shape) != 1 or not dims_equal(bias.shape[0], w_shape[0])):
        raise ShapeError(f"{op}: bias {shape_str(bias.shape)} for weight {shape_str(w_shape)}")
    n = w_shape[0]
    if a["glu"]:
        if not isinstance(n, int) or n % 2:
            raise ShapeError(f"{op}: glu needs an even output width, weight is {shape_str(w_shape)}")
        n //= 2
    out = x.shape[:-1] + (n,)
    for name, t in (("gate", gate), ("residual", residual)):
        if t is not None and not fits(t.shape, out):
            raise ShapeError(f"{op}: {name} {shape_str(t.shape)} does not broadcast to the output {shape_str(out)}")
    return TType(out, x.dtype)


def _gemm(ins, a):
    x, w, bias, gate, residual = gemm_operands(ins, a)
    return apply_epilogue(F.linear(x, w, bias), gate, residual, a)


def apply_epilogue(h, gate, residual, a):
    """``residual + gate * epi(h)``: GEMM's epilogue after the matmul and its bias (``a``: act, glu)."""
    act = ACTIVATIONS[a["act"]]
    if a["glu"]:
        g, u = h.chunk(2, dim=-1)
        h = act(g) * u
    else:
        h = act(h)
    if gate is not None:
        h = gate * h
    if residual is not None:
        h = h + residual
    return h


define("GEMM", (2, 5), "compute", _infer_gemm, _gemm, bias=False, act="none", glu=False, gate=False, residual=False)


def _infer_modulate(ins, a):
    x, scale, shift = ins[:3]
    t = infer_norm("LAYERNORM_MODULATE", [x] + list(ins[3:]), a, layernorm_ref)
    for name, p in (("scale", scale), ("shift", shift)):
        if not fits(p.shape, x.shape):
            raise ShapeError(f"LAYERNORM_MODULATE: {name} {shape_str(p.shape)} does not broadcast to {shape_str(x.shape)}")
    same_dtype("LAYERNORM_MODULATE", ins)
    return t


def _modulate(ins, a):
    x, scale, shift = ins[:3]
    return layernorm_ref([x] + list(ins[3:]), a) * (1 + scale) + shift


define("LAYERNORM_MODULATE", (3, 5), "reduction", _infer_modulate, _modulate, eps=REQUIRED, dims=1)


def _infer_rope(ins, a):
    x, cos, sin = ins
    if not x.shape or not isinstance(x.shape[-1], int) or x.shape[-1] % 2:
        raise ShapeError(f"ROPE: the last dim of {shape_str(x.shape)} must be even")
    for name, t in (("cos", cos), ("sin", sin)):
        if not fits(t.shape, x.shape):
            raise ShapeError(f"ROPE: {name} {shape_str(t.shape)} does not broadcast to {shape_str(x.shape)}")
    same_dtype("ROPE", ins)
    return TType(x.shape, x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


define("ROPE", 3, "elementwise", _infer_rope, lambda ins, a: ins[0] * ins[1] + rotate_half(ins[0]) * ins[2])


def rope_columns_ref(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, dim: int, end: int) -> torch.Tensor:
    """h [..., N] with its columns [0, end) rotated as ROPE rotates each head of ``dim`` of them (cos / sin broadcasting
    to [..., dim]), in h's dtype: ROPE's reference on the heads a merged QKV GEMM's output holds (AQGEMM's rope)."""
    heads = h[..., :end].unflatten(-1, (end // dim, dim))  # [..., heads, dim]
    c, s = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return torch.cat(((heads * c + rotate_half(heads) * s).flatten(-2), h[..., end:]), dim=-1)



# ----------------------------------------------------------------------------- QGEMM: GEMM on a quantized weight

SCALE_DTYPES = ("float16", "float32")


def qgemm_operands(ins, a) -> tuple:
    """(x, qweight, scales, zeros, bias, gate, residual) from a QGEMM's inputs; absent ones are None."""
    it = iter(ins[3:])
    zeros = next(it) if a["zeros"] else None
    bias = next(it) if a["bias"] else None
    gate = next(it) if a["gate"] else None
    residual = next(it) if a["residual"] else None
    return ins[0], ins[1], ins[2], zeros, bias, gate, residual


def _infer_qgemm(ins, a):
    arity = 3 + int(a["zeros"]) + _gemm_arity(a) - 2
    if len(ins) != arity:
        raise ShapeError(f"QGEMM: {len(ins)} inputs, the attributes (zeros={a['zeros']}, bias={a['bias']}, gate={a['gate']}, "
                         f"residual={a['residual']}) say {arity}")
    x, q, scales, zeros, bias, gate, residual = qgemm_operands(ins, a)
    bits, group = a["bits"], a["group"]
    if not x.shape or not isinstance(x.shape[-1], int) or len(q.shape) != 2 or not isinstance(q.shape[0], int):
        raise ShapeError(f"QGEMM: input {shape_str(x.shape)} and qweight {shape_str(q.shape)} (qweight is [N, K * bits / 8])")
    n, k = q.shape[0], x.shape[-1]
    try:
        check_layout(bits, group, (n, k))
    except ValueError as e:
        raise ShapeError(f"QGEMM: {e}") from None
    if q.dtype != "uint8" or tuple(q.shape) != (n, k * bits // 8):
        raise ShapeError(f"QGEMM: qweight is {q.dtype}{shape_str(q.shape)}, input K = {k} at {bits} bits needs uint8[{n}, {k * bits // 8}]")
    for name, t, dtypes in (("scales", scales, SCALE_DTYPES), ("zeros", zeros, ("uint8",))):
        if t is not None and (t.dtype not in dtypes or tuple(t.shape) != (n, k // group)):
            raise ShapeError(f"QGEMM: {name} is {t.dtype}{shape_str(t.shape)}, expected {' or '.join(dtypes)}[{n}, {k // group}]")
    same_dtype("QGEMM", [x] + [t for t in (bias, gate, residual) if t is not None])
    return _epilogue_type("QGEMM", x, (n, k), bias, gate, residual, a)


def _qgemm(ins, a):
    # ir/quant.dequantize's formula, without its checks of the values (what the quantizer guarantees, a reference
    # need not sync the device for): float32, or float64 for float64 x (the interpreter's float64 mode)
    x, q, scales, zeros, bias, gate, residual = qgemm_operands(ins, a)
    qw = QuantWeight(q, scales, zeros, a["bits"], a["group"], (q.shape[0], x.shape[-1]))
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    w = (codes_of(qw).to(acc) - qw.zero_point().to(acc).repeat_interleave(qw.group, 1)) * scales.to(acc).repeat_interleave(qw.group, 1)
    rest = [t for t in (bias, gate, residual) if t is not None]
    return _gemm([x, w.to(x.dtype)] + rest, a)


define("QGEMM", (3, 7), "compute", _infer_qgemm, _qgemm, bits=REQUIRED, group=REQUIRED, zeros=False, bias=False, act="none",
       glu=False, gate=False, residual=False)



# ----------------------------------------------------------------------------- AQGEMM: activations quantized too
#
# AQGEMM(x, wq, ws[, smooth][, bias][, gate][, residual][, cos, sin]; format, smooth, bias, act, glu, gate, residual,
#        act_group, rope_dim, rope_end):
#
#     qx, sx = quantize_rows(x * smooth, format)             per token, at run time (ir/quant.py)
#     h = (qx @ wq^T) * sx[:, None] * ws[None, :] + bias      float32 (integer / fp8 products, scaled once)
#     out = residual + gate * epi(h)                          GEMM's epilogue, in float32, rounded once to x's dtype
#     out[..., :rope_end] = ROPE per head of rope_dim         rope_dim > 0: cos / sin [.., S, rope_dim] (no glu, gate
#                                                             or residual); the reference rotates the rounded out in
#                                                             its dtype, as ROPE would (passes/fuse_rope_epilogue.py)
#
# act_group = G > 0: x's codes carry a scale per token and G columns (quantize_rows(.., group=G), sx [..., K / G]),
# h = sum over the groups of (qx_g @ wq_g^T) * sx_g * ws: where x is another GEMM's output, that GEMM's epilogue can
# store its codes (each group's scale is its own tile's), where one scale a token needs the whole row first.
#
# wq: int8 (format "int8") or float8_e4m3fn ("fp8") codes [N, K], per output channel; ws float32 [N]; smooth float32
# [K] (SmoothQuant's 1 / s where no norm weight can absorb it: the quantizing kernel reads x anyway).
# A sibling of QGEMM, not a QGEMM variant: QGEMM computes on x as it is (the weight is dequantized to x's dtype),
# AQGEMM quantizes x, so the matmul runs on int8 / fp8 tensor cores; the weight formats (unsigned grouped codes with
# zero points vs signed per-channel codes) and attributes share nothing beyond the epilogue.

AQ_FORMATS = {"int8": "int8", "fp8": "float8_e4m3fn"}  # format -> the codes' IR dtype


def aqgemm_operands(ins, a) -> tuple:
    """(x, wq, ws, smooth, bias, gate, residual) from an AQGEMM's inputs; absent ones are None."""
    it = iter(ins[3:])
    smooth = next(it) if a["smooth"] else None
    bias = next(it) if a["bias"] else None
    gate = next(it) if a["gate"] else None
    residual = next(it) if a["residual"] else None
    return ins[0], ins[1], ins[2], smooth, bias, gate, residual


def aqgemm_rope(ins, a) -> tuple | None:
    """(cos, sin, rope_dim, rope_end) of an AQGEMM that rotates its output's first columns (its last two inputs), else
    None."""
    d = a.get("rope_dim", 0)  # (graphs saved before rope_dim have none)
    return (ins[-2], ins[-1], d, a["rope_end"]) if d else None


def _infer_aqgemm(ins, a):
    rope = a.get("rope_dim", 0)
    arity = 3 + int(a["smooth"]) + _gemm_arity(a) - 2 + (2 if rope else 0)
    if len(ins) != arity:
        raise ShapeError(f"AQGEMM: {len(ins)} inputs, the attributes (smooth={a['smooth']}, bias={a['bias']}, gate={a['gate']}, "
                         f"residual={a['residual']}, rope_dim={rope}) say {arity}")
    if a["format"] not in AQ_FORMATS:
        raise ShapeError(f"AQGEMM: unknown format {a['format']!r} (one of {', '.join(AQ_FORMATS)})")
    x, wq, ws, smooth, bias, gate, residual = aqgemm_operands(ins, a)
    if not x.shape or not isinstance(x.shape[-1], int) or len(wq.shape) != 2 or not dims_equal(wq.shape[1], x.shape[-1]):
        raise ShapeError(f"AQGEMM: input {shape_str(x.shape)} and weight codes {shape_str(wq.shape)} (codes are [N, K])")
    if x.dtype not in ("float16", "bfloat16", "float32", "float64"):
        raise ShapeError(f"AQGEMM: input dtype {x.dtype} is not a float")
    if wq.dtype != AQ_FORMATS[a["format"]]:
        raise ShapeError(f"AQGEMM: {a['format']} weight codes must be {AQ_FORMATS[a['format']]}, got {wq.dtype}")
    n, k = wq.shape
    g = a.get("act_group", 0)  # (graphs saved before act_group have none)
    if not isinstance(g, int) or isinstance(g, bool) or g < 0 or (g and (not isinstance(k, int) or k % g)):
        raise ShapeError(f"AQGEMM: act_group {g!r} must be 0 (a scale per token) or divide the {k} input features")
    for name, t, size in (("ws", ws, n), ("smooth", smooth, k)):
        if t is not None and (t.dtype not in ("float32", "float64") or len(t.shape) != 1 or not dims_equal(t.shape[0], size)):
            raise ShapeError(f"AQGEMM: {name} is {t.dtype}{shape_str(t.shape)}, expected float32[{size}]")
    same_dtype("AQGEMM", [x] + [t for t in (bias, gate, residual) if t is not None])
    out = _epilogue_type("AQGEMM", x, (n, k), bias, gate, residual, a)
    if rope:
        _check_rope(ins[-2:], a, out)
    return out


def _check_rope(tables, a, out: TType) -> None:
    d, end = a["rope_dim"], a.get("rope_end", 0)
    if not isinstance(d, int) or d < 2 or d % 2 or not isinstance(end, int) or end <= 0 or end % d \
            or not isinstance(out.shape[-1], int) or end > out.shape[-1]:
        raise ShapeError(f"AQGEMM: rope_dim {d!r} / rope_end {end!r} must be an even head dim and a multiple of it within "
                         f"the {out.shape[-1]} output columns")
    if a["glu"] or a["gate"] or a["residual"]:
        raise ShapeError("AQGEMM: rope takes no glu, gate or residual")
    for name, t in zip(("cos", "sin"), tables):
        if not fits(t.shape, out.shape[:-1] + (d,)):
            raise ShapeError(f"AQGEMM: rope's {name} {shape_str(t.shape)} does not broadcast to {shape_str(out.shape[:-1] + (d,))}")
    same_dtype("AQGEMM", [out, *tables])


def _aqgemm(ins, a):
    x, wq, ws, smooth, bias, gate, residual = aqgemm_operands(ins, a)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xs = x.to(acc) * smooth.to(acc) if smooth is not None else x
    if a.get("act_group", 0):  # sx [..., K / G]
        qx, sx = quantize_rows(xs, a["format"], group=a.get("act_group"))
        h = (dequantize_rows(qx, sx, acc) @ wq.to(acc).T) * ws.to(acc)
    else:
        qx, sx = quantize_rows(xs, a["format"])  # [..., K], [...]
        h = (qx.to(acc) @ wq.to(acc).T) * sx.to(acc)[..., None] * ws.to(acc)
    if bias is not None:
        h = h + bias.to(acc)
    up = [t.to(acc) if t is not None else None for t in (gate, residual)]
    out = apply_epilogue(h, *up, a).to(x.dtype)
    rope = aqgemm_rope(ins, a)
    return out if rope is None else rope_columns_ref(out, *rope)


define("AQGEMM", (3, 9), "compute", _infer_aqgemm, _aqgemm, format=REQUIRED, smooth=False, bias=False, act="none", glu=False,
       gate=False, residual=False, act_group=0, rope_dim=0, rope_end=0)

FUSED_OPS = ("GEMM", "LAYERNORM_MODULATE", "ROPE", "QGEMM", "AQGEMM")
