"""The closed op set of the kiln IR.

Every op has one schema (how many inputs, which attributes with which defaults), one type rule
(shape + dtype of the result from the input types and attributes) and one reference implementation
in plain torch. The reference implementations are the oracle for every pass and kernel: a kernel is
right when it computes what ``OPS[op].ref`` computes.

Conventions
- Attributes are plain hashable values: int, float, str, bool, None, sympy dims, tuples of those.
  Axes are normalised to non-negative ints by the importers.
- Elementwise ops broadcast like torch. A rank-0 operand (``CONST`` included) promotes like a 0-d
  tensor in torch: it does not widen a tensor of its own kind (``bf16 * CONST(0.5)`` stays bf16), but
  it does set the dtype across kinds (``int64 * CONST(0.5)`` is float64, where torch's python ``0.5``
  gives float32): importers cast the tensor operand first.
- Optional inputs are trailing: ``LINEAR(x, w)`` or ``LINEAR(x, w, b)``.
- There are no multi-output ops: a split is one ``SLICE`` per piece.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import sympy
import torch
import torch.nn.functional as F

from .kv_quant import CODE_DTYPES, dequantize_kv
from .types import FLOAT_DTYPES, Dim, TType, dim, dims_equal, dtype_name, numel, shape_str, torch_dtype

REQUIRED = object()


class ShapeError(ValueError):
    """Input types that an op cannot accept."""


class OpDef(NamedTuple):
    name: str
    min_inputs: int
    max_inputs: int | None  # None: variadic
    attrs: dict  # name -> default (REQUIRED when there is none)
    infer: Callable | None  # (list[TType], attrs) -> TType; None for source ops
    ref: Callable | None  # (list[Tensor], attrs) -> Tensor; None for source ops
    kind: str  # source | elementwise | reduction | layout | compute


OPS: dict[str, OpDef] = {}


def define(op_name, inputs, kind, infer, ref, **attrs):
    lo, hi = inputs if isinstance(inputs, tuple) else (inputs, inputs)
    OPS[op_name] = OpDef(op_name, lo, hi, attrs, infer, ref, kind)


# ----------------------------------------------------------------------------- helpers


def _proxy(t: TType) -> torch.Tensor:
    # a one-element stand-in: torch's dtype rules depend on the dtype and on 0-d or not, not on sizes
    # (CPU, not the meta device, whose first use costs a second of imports)
    return torch.ones(() if not t.shape else (1,), dtype=torch_dtype(t.dtype))


_DTYPE_CACHE: dict = {}


def result_dtype(op: str, ins, attrs, fn) -> str:
    """The dtype ``fn`` (the op's reference) gives for inputs of these dtypes, computed once per key."""
    key = (op, tuple((t.dtype, not t.shape) for t in ins), tuple(sorted((k, v) for k, v in attrs.items()
                                                                     if isinstance(v, (str, bool, int, float, type(None))))))
    d = _DTYPE_CACHE.get(key)
    if d is None:
        try:
            d = _DTYPE_CACHE[key] = dtype_name(fn([_proxy(t) for t in ins], attrs).dtype)
        except (RuntimeError, NotImplementedError, TypeError) as e:  # torch rejects these dtypes
            raise ShapeError(f"{op}: inputs of dtype {', '.join(t.dtype for t in ins)}: {e}") from None
    return d


def broadcast_shapes(*shapes) -> tuple:
    rank = max((len(s) for s in shapes), default=0)
    out = []
    for i in range(rank):
        ds = [s[len(s) - rank + i] for s in shapes if len(s) - rank + i >= 0]
        ds = [d for d in ds if not (isinstance(d, int) and d == 1)]
        if not ds:
            out.append(1)
            continue
        d0 = ds[0]
        for d in ds[1:]:
            if not dims_equal(d0, d):
                raise ShapeError(f"cannot broadcast shapes {', '.join(shape_str(s) for s in shapes)} (dim {d0} vs {d})")
        out.append(d0)
    return tuple(out)


def _axis(a: int, rank: int) -> int:
    if not -rank <= a < max(rank, 1):
        raise ShapeError(f"axis {a} out of range for rank {rank}")
    return a % rank if rank else 0


# ----------------------------------------------------------------------------- sources

for _name, _attrs in (("INPUT", {"name": REQUIRED}), ("WEIGHT", {"name": REQUIRED})):
    define(_name, 0, "source", None, None, **_attrs)
# a rank-0 weak scalar; value may be a symbolic dim (evaluated per call)
define("CONST", 0, "source", None, None, value=REQUIRED)


def const_type(value) -> TType:
    if isinstance(value, bool):
        return TType((), "bool")
    if isinstance(value, (int, sympy.Expr)):
        return TType((), "int64")
    if isinstance(value, float):
        return TType((), "float64")
    raise ShapeError(f"CONST value must be a bool, int, float or dim, got {value!r}")


def const_tensor(value) -> torch.Tensor:
    return torch.tensor(value, dtype=torch_dtype(const_type(value).dtype))


# ----------------------------------------------------------------------------- elementwise


def _infer_elementwise(name, ins, attrs, fn):
    shape = broadcast_shapes(*(t.shape for t in ins))
    return TType(shape, result_dtype(name, ins, attrs, fn))


def _elementwise(name, arity, fn, **attrs):
    define(name, arity, "elementwise", lambda ins, a, fn=fn, name=name: _infer_elementwise(name, ins, a, fn), fn, **attrs)


_UNARY = {
    "NEG": torch.neg, "ABS": torch.abs, "EXP": torch.exp, "LOG": torch.log, "SQRT": torch.sqrt,
    "RSQRT": torch.rsqrt, "RECIPROCAL": torch.reciprocal, "SIN": torch.sin, "COS": torch.cos,
    "TANH": torch.tanh, "SIGMOID": torch.sigmoid, "ERF": torch.erf, "RELU": torch.relu,
    "SILU": F.silu, "FLOOR": torch.floor, "CEIL": torch.ceil, "NOT": torch.logical_not,
    "ISNAN": torch.isnan,
}
for _name, _fn in _UNARY.items():
    _elementwise(_name, 1, lambda x, a, fn=_fn: fn(x[0]))

_elementwise("GELU", 1, lambda x, a: F.gelu(x[0], approximate=a["approximate"]), approximate="none")
_elementwise("CAST", 1, lambda x, a: x[0].to(torch_dtype(a["dtype"])), dtype=REQUIRED)
_elementwise("CLAMP", 1, lambda x, a: torch.clamp(x[0], a["min"], a["max"]), min=None, max=None)


def _div(x, a):
    return torch.div(x[0], x[1], rounding_mode=a["rounding"])


_BINARY = {
    "ADD": torch.add, "SUB": torch.sub, "MUL": torch.mul, "POW": torch.pow,
    "MAXIMUM": torch.maximum, "MINIMUM": torch.minimum, "MOD": torch.remainder,
    "EQ": torch.eq, "NE": torch.ne, "LT": torch.lt, "LE": torch.le, "GT": torch.gt, "GE": torch.ge,
    "AND": torch.bitwise_and, "OR": torch.bitwise_or, "XOR": torch.bitwise_xor,
}
for _name, _fn in _BINARY.items():
    _elementwise(_name, 2, lambda x, a, fn=_fn: fn(x[0], x[1]))
_elementwise("DIV", 2, _div, rounding=None)
_elementwise("WHERE", 3, lambda x, a: torch.where(x[0], x[1], x[2]))

COMMUTATIVE = frozenset({"ADD", "MUL", "MAXIMUM", "MINIMUM", "EQ", "NE", "AND", "OR", "XOR"})


# ----------------------------------------------------------------------------- reductions


def _infer_reduce(name, ins, a, fn):
    (t,) = ins
    axes = set(a["axes"])
    if not axes and t.shape:  # torch reads dim=() as "every dim" for sum/mean/amax, as "none" for prod
        raise ShapeError(f"{name}: no reduction axes given for shape {shape_str(t.shape)}")
    for ax in axes:
        if not 0 <= ax < len(t.shape):
            raise ShapeError(f"reduction axis {ax} out of range for shape {shape_str(t.shape)}")
    if name in ("ARGMAX", "ARGMIN"):
        _one_axis(a)
    shape = tuple((1 if a["keepdim"] else None) if i in axes else d for i, d in enumerate(t.shape))
    probe = {"axes": (0,) if t.shape else (), "keepdim": False}
    dtype = result_dtype(name, ins, {}, lambda x, _: fn(x, probe))
    return TType(tuple(d for d in shape if d is not None), dtype)


def _reduction(name, fn):
    define(name, 1, "reduction", lambda ins, a, fn=fn, name=name: _infer_reduce(name, ins, a, fn), fn,
         axes=REQUIRED, keepdim=False)


_reduction("SUM", lambda x, a: torch.sum(x[0], dim=a["axes"], keepdim=a["keepdim"]))
_reduction("MEAN", lambda x, a: torch.mean(x[0], dim=a["axes"], keepdim=a["keepdim"]))
_reduction("MAX", lambda x, a: torch.amax(x[0], dim=a["axes"], keepdim=a["keepdim"]))
_reduction("MIN", lambda x, a: torch.amin(x[0], dim=a["axes"], keepdim=a["keepdim"]))
_reduction("PROD", lambda x, a: _reduce_each(torch.prod, x[0], a))
_reduction("ANY", lambda x, a: _reduce_each(torch.any, x[0], a))
_reduction("ALL", lambda x, a: _reduce_each(torch.all, x[0], a))
_reduction("ARGMAX", lambda x, a: torch.argmax(x[0], dim=_one_axis(a), keepdim=a["keepdim"]))
_reduction("ARGMIN", lambda x, a: torch.argmin(x[0], dim=_one_axis(a), keepdim=a["keepdim"]))


def _one_axis(a):
    if len(a["axes"]) != 1:
        raise ShapeError("ARGMAX/ARGMIN reduce exactly one axis")
    return a["axes"][0]


def _reduce_each(fn, x, a):
    # torch.prod / any / all take one dim at a time
    for ax in sorted(a["axes"], reverse=True):
        x = fn(x, dim=ax, keepdim=a["keepdim"])
    return x


def _along_axis(name, fn):
    # one-axis ops that keep the shape; the dtype is whatever fn gives (cumsum of int32 is int64)
    def infer(ins, a):
        (t,) = ins
        if not 0 <= a["axis"] < max(len(t.shape), 1):
            raise ShapeError(f"{name}: axis {a['axis']} out of range for shape {shape_str(t.shape)}")
        return TType(t.shape, result_dtype(name, ins, {}, lambda x, _: fn(x, {"axis": 0})))
    return infer


for _name, _kind, _fn in (("CUMSUM", "compute", lambda x, a: torch.cumsum(x[0], a["axis"])),
                          ("SOFTMAX", "reduction", lambda x, a: torch.softmax(x[0], a["axis"])),
                          ("LOG_SOFTMAX", "reduction", lambda x, a: torch.log_softmax(x[0], a["axis"]))):
    define(_name, 1, _kind, _along_axis(_name, _fn), _fn, axis=REQUIRED)


# ----------------------------------------------------------------------------- normalisation


def infer_norm(name, ins, a, fn):
    n_params = len(ins) - 1 - int(bool(a.get("residual")))
    if not 0 <= n_params <= (1 if name == "RMSNORM" else 2):
        raise ShapeError(f"{name}: {len(ins)} inputs with residual={bool(a.get('residual'))}")
    if a.get("residual"):  # NORM(x, *params, r) normalises x + r
        x, r = ins[0], ins[-1]
        if not fits(r.shape, x.shape):
            raise ShapeError(f"{name}: residual {shape_str(r.shape)} does not broadcast to the input {shape_str(x.shape)}")
        ins = [TType(x.shape, result_dtype("ADD", [x, r], {}, lambda t, _: t[0] + t[1]))] + list(ins[1:-1])
    x = ins[0]
    k = a["dims"]
    if not 1 <= k <= len(x.shape):
        raise ShapeError(f"{name}: cannot normalise the last {k} dims of {shape_str(x.shape)}")
    for p in ins[1:]:
        if len(p.shape) != k or not all(dims_equal(d, e) for d, e in zip(p.shape, x.shape[-k:])):
            raise ShapeError(f"norm parameter shape {shape_str(p.shape)} does not match the last {k} dims of {shape_str(x.shape)}")
    # RMSNORM's y * w promotes (bf16 x, fp32 w -> fp32, as in HF); F.layer_norm keeps x's dtype
    return TType(x.shape, result_dtype(name, ins, {}, lambda t, _: fn(t, {"eps": 1e-5, "dims": 1})))


def _with_residual(x, a) -> list:
    return [x[0] + x[-1]] + list(x[1:-1]) if a.get("residual") else list(x)


def layernorm_ref(x, a):
    x = _with_residual(x, a)
    k = a["dims"]
    shape = tuple(x[0].shape[-k:])
    w = x[1] if len(x) > 1 else None
    b = x[2] if len(x) > 2 else None
    return F.layer_norm(x[0], shape, w, b, a["eps"])


def rmsnorm_ref(x, a):
    # computed in float32 at least, like HF's RMSNorm; the result has the input's dtype
    x = _with_residual(x, a)
    v = x[0]
    acc = v.float() if v.dtype in (torch.float16, torch.bfloat16) else v
    axes = tuple(range(-a["dims"], 0))
    y = (acc * torch.rsqrt(acc.pow(2).mean(axes, keepdim=True) + a["eps"])).to(v.dtype)
    return y * x[1] if len(x) > 1 else y


# residual=True: the last input is a residual added before normalising, NORM(x + r) (the sum itself stays an ADD)
define("LAYERNORM", (1, 4), "reduction", lambda ins, a: infer_norm("LAYERNORM", ins, a, layernorm_ref), layernorm_ref,
     eps=REQUIRED, dims=1, residual=False)
define("RMSNORM", (1, 3), "reduction", lambda ins, a: infer_norm("RMSNORM", ins, a, rmsnorm_ref), rmsnorm_ref,
     eps=REQUIRED, dims=1, residual=False)


# ----------------------------------------------------------------------------- linear algebra


def _infer_linear(ins, a):
    x, w = ins[0], ins[1]
    if len(w.shape) != 2 or not x.shape or not dims_equal(x.shape[-1], w.shape[1]):
        raise ShapeError(f"LINEAR: input {shape_str(x.shape)} and weight {shape_str(w.shape)} (weight is [out, in])")
    if len(ins) == 3 and (len(ins[2].shape) != 1 or not dims_equal(ins[2].shape[0], w.shape[0])):
        raise ShapeError(f"LINEAR: bias {shape_str(ins[2].shape)} for weight {shape_str(w.shape)}")
    same_dtype("LINEAR", ins)
    return TType(x.shape[:-1] + (w.shape[0],), x.dtype)


def same_dtype(name, ins):
    if len({t.dtype for t in ins}) != 1:
        raise ShapeError(f"{name}: inputs must share one dtype, got {', '.join(t.dtype for t in ins)}")


def _infer_matmul(ins, a):
    x, y = ins
    same_dtype("MATMUL", ins)
    if not x.shape or not y.shape:
        raise ShapeError("MATMUL needs inputs of rank >= 1")
    xs = (1,) + x.shape if len(x.shape) == 1 else x.shape
    ys = y.shape + (1,) if len(y.shape) == 1 else y.shape
    if not dims_equal(xs[-1], ys[-2]):
        raise ShapeError(f"MATMUL: {shape_str(x.shape)} @ {shape_str(y.shape)}: inner dims differ")
    batch = broadcast_shapes(xs[:-2], ys[:-2])
    out = batch + (xs[-2], ys[-1])
    if len(x.shape) == 1:
        out = out[:-2] + out[-1:]
    if len(y.shape) == 1:
        out = out[:-1]
    return TType(out, x.dtype)


define("LINEAR", (2, 3), "compute", _infer_linear, lambda x, a: F.linear(*x))
define("MATMUL", 2, "compute", _infer_matmul, lambda x, a: torch.matmul(x[0], x[1]))


def _conv_out(size, k, s, p, d):
    return dim(sympy.floor((size + 2 * p - d * (k - 1) - 1) / s) + 1) if not isinstance(size, int) \
        else (size + 2 * p - d * (k - 1) - 1) // s + 1


def _infer_conv2d(ins, a):
    x, w = ins[0], ins[1]
    if len(x.shape) != 4 or len(w.shape) != 4:
        raise ShapeError(f"CONV2D: input {shape_str(x.shape)} and weight {shape_str(w.shape)} must be rank 4")
    if not dims_equal(x.shape[1], w.shape[1] * a["groups"]) or (isinstance(w.shape[0], int) and w.shape[0] % a["groups"]):
        raise ShapeError(f"CONV2D: {x.shape[1]} input channels, weight {shape_str(w.shape)}, {a['groups']} groups")
    if len(ins) == 3 and (len(ins[2].shape) != 1 or not dims_equal(ins[2].shape[0], w.shape[0])):
        raise ShapeError(f"CONV2D: bias {shape_str(ins[2].shape)} for weight {shape_str(w.shape)}")
    same_dtype("CONV2D", ins)
    (sh, sw), (ph, pw), (dh, dw) = a["stride"], a["padding"], a["dilation"]
    hw = (_conv_out(x.shape[2], w.shape[2], sh, ph, dh), _conv_out(x.shape[3], w.shape[3], sw, pw, dw))
    if any(isinstance(d, int) and d < 1 for d in hw):
        raise ShapeError(f"CONV2D: kernel {shape_str(w.shape[2:])} does not fit input {shape_str(x.shape)} (output {shape_str(hw)})")
    return TType((x.shape[0], w.shape[0]) + hw, x.dtype)


define("CONV2D", (2, 3), "compute", _infer_conv2d,
     lambda x, a: F.conv2d(x[0], x[1], x[2] if len(x) > 2 else None, a["stride"], a["padding"], a["dilation"], a["groups"]),
     stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1)


def fits(shape, target) -> bool:
    """``shape`` broadcasts to ``target`` without widening it."""
    try:
        b = broadcast_shapes(shape, target)
    except ShapeError:
        return False
    return len(b) == len(target) and all(dims_equal(d, e) for d, e in zip(b, target))


def attention_operands(ins, a) -> tuple:
    """(q, k, v, mask, k_scale, v_scale) from an ATTENTION's inputs; absent ones are None. The scales are present as
    the attributes say; the mask is the one input left over (graphs saved before the scales existed lack the attributes)."""
    k_scaled, v_scaled = bool(a.get("k_scale")), bool(a.get("v_scale"))
    mask = ins[3] if len(ins) - k_scaled - v_scaled == 4 else None
    rest = iter(ins[3 + (mask is not None):])
    k_scale = next(rest) if k_scaled else None
    v_scale = next(rest) if v_scaled else None
    return ins[0], ins[1], ins[2], mask, k_scale, v_scale


def _infer_kv_codes(name: str, t: TType, scale: TType | None, q: TType) -> None:
    """k or v: q's dtype, or (with its scale) quantized codes and a float32 scale per vector (``kv_quant.py``)."""
    if scale is None:
        if t.dtype != q.dtype:
            raise ShapeError(f"ATTENTION: {name} is {t.dtype}, q is {q.dtype} (q, k, v share one dtype unless {name} has a scale)")
        return
    if t.dtype not in CODE_DTYPES:
        raise ShapeError(f"ATTENTION: {name} with a scale must hold codes ({', '.join(sorted(CODE_DTYPES))}), got {t.dtype}")
    if scale.dtype != "float32" or len(scale.shape) != len(t.shape) - 1 or not all(map(dims_equal, scale.shape, t.shape[:-1])):
        raise ShapeError(f"ATTENTION: the {name} scale {scale.dtype}{shape_str(scale.shape)} must be float32 "
                         f"{shape_str(t.shape[:-1])} (one per vector of {name} {shape_str(t.shape)})")


def _infer_attention(ins, a):
    want = 3 + int(bool(a.get("k_scale"))) + int(bool(a.get("v_scale")))
    if len(ins) not in (want, want + 1):
        raise ShapeError(f"ATTENTION: {len(ins)} inputs, the attributes (k_scale={a.get('k_scale')}, v_scale={a.get('v_scale')}) "
                         f"say {want} or {want + 1} (with a mask)")
    q, k, v, m, ks, vs = attention_operands(ins, a)
    cap = a.get("softcap")
    if cap is not None and not (isinstance(cap, (int, float)) and math.isfinite(cap) and cap > 0):
        raise ShapeError(f"ATTENTION: softcap {cap!r} must be a positive number (None: no soft-capping)")
    if len(q.shape) < 2 or len(k.shape) != len(q.shape) or len(v.shape) != len(q.shape):
        raise ShapeError(f"ATTENTION: q {shape_str(q.shape)}, k {shape_str(k.shape)}, v {shape_str(v.shape)} must share a rank >= 2")
    if not dims_equal(q.shape[-1], k.shape[-1]) or not dims_equal(k.shape[-2], v.shape[-2]):
        raise ShapeError(f"ATTENTION: q {shape_str(q.shape)}, k {shape_str(k.shape)}, v {shape_str(v.shape)}")
    _infer_kv_codes("k", k, ks, q)
    _infer_kv_codes("v", v, vs, q)
    k_lead, v_lead = k.shape[:-2], v.shape[:-2]
    if a["gqa"] and len(q.shape) >= 3 and not dims_equal(q.shape[-3], k.shape[-3]):
        hq, hk = q.shape[-3], k.shape[-3]  # [..., H, S, D]: kv heads repeat up to the query heads
        if not (isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0):
            raise ShapeError(f"ATTENTION: {hq} query heads do not group over {hk} kv heads")
        k_lead, v_lead = k_lead[:-1] + (hq,), v_lead[:-1] + (v_lead[-1] * (hq // hk),)
    if not (fits(k_lead, q.shape[:-2]) and fits(v_lead, q.shape[:-2])):
        raise ShapeError(f"ATTENTION: leading dims of k {shape_str(k.shape)} / v {shape_str(v.shape)} do not fit q {shape_str(q.shape)}")
    if m is not None:
        if m.dtype != "bool" and m.dtype != q.dtype:
            raise ShapeError(f"ATTENTION: mask dtype {m.dtype} must be bool or {q.dtype}")
        if not fits(m.shape, q.shape[:-1] + (k.shape[-2],)):
            scores = q.shape[:-1] + (k.shape[-2],)
            raise ShapeError(f"ATTENTION: mask {shape_str(m.shape)} does not broadcast to the scores {shape_str(scores)}")
    return TType(q.shape[:-1] + (v.shape[-1],), q.dtype)


def _attention(x, a):
    q, k, v, mask, ks, vs = attention_operands(x, a)
    if ks is not None:  # the dequantized cache, exactly as the unfused graph computes it
        k = dequantize_kv(k, ks, q.dtype)
    if vs is not None:
        v = dequantize_kv(v, vs, q.dtype)
    if a["gqa"] and q.dim() >= 3 and q.shape[-3] != k.shape[-3]:
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    mask, causal = sdpa_mask(q, k, mask, a["causal"])
    if a.get("softcap"):
        return _softcapped_attention(q, k, v, mask, causal, a["scale"], a["softcap"])
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=a["scale"])


def _softcapped_attention(q, k, v, mask, causal: bool, scale, cap: float):
    """softmax(c * tanh(q k^T * scale / c) + mask) @ v (Gemma 2's attention), in float32 (float64 for float64 operands),
    a row with no key attended 0 (as the kernels give it)."""
    wide = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = (q.to(wide) @ k.to(wide).transpose(-1, -2)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    s = torch.tanh(s / cap) * cap
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.to(wide)
    p = torch.softmax(s, -1)
    return (torch.where(torch.isnan(p), 0.0, p) @ v.to(wide)).to(q.dtype)


def sdpa_mask(q, k, mask, causal: bool):
    """(attn_mask, is_causal) for SDPA: a mask and causality together are combined into the mask, since torch
    versions differ on accepting the pair."""
    if causal and mask is not None:
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        return (mask & keep if mask.dtype == torch.bool else mask.masked_fill(~keep, float("-inf"))), False
    return mask, causal


# scale None: 1/sqrt(head_dim); causal: the upper-left-aligned triangle of torch's SDPA; with a mask
# too, a position is attended where the mask allows it (bool True / float bias) and causality does.
# ATTENTION(q, k, v[, mask][, k_scale][, v_scale]): with k_scale (v_scale), k (v) holds quantized codes [.., S, D] and
# the input a float32 scale per vector [.., S]; the op reads dequantize_kv(codes, scale, q.dtype) (kv_quant.py).
# softcap c (Gemma 2): the scaled scores t soft-capped to c * tanh(t / c) before the mask; None: as they are
define("ATTENTION", (3, 6), "compute", _infer_attention, _attention, causal=False, scale=None, gqa=False,
       k_scale=False, v_scale=False, softcap=None)


# ----------------------------------------------------------------------------- gathers


def _infer_embedding(ins, a):
    table, ids = ins
    if len(table.shape) != 2 or ids.dtype not in ("int64", "int32"):
        raise ShapeError(f"EMBEDDING: table {shape_str(table.shape)} must be 2-d and ids integer (got {ids.dtype})")
    return TType(ids.shape + table.shape[1:], table.dtype)


def _infer_index(ins, a):
    x, idx = ins[0], ins[1:]
    axes = a["axes"]
    if len(axes) != len(idx) or list(axes) != sorted(set(axes)) or (axes and axes[-1] >= len(x.shape)):
        raise ShapeError(f"INDEX: axes {axes} do not fit {len(idx)} index tensors on shape {shape_str(x.shape)}")
    for t in idx:
        if t.dtype not in ("int64", "int32"):
            raise ShapeError(f"INDEX: index tensors must be integer, got {t.dtype}")
    b = broadcast_shapes(*(t.shape for t in idx))
    rest = [d for i, d in enumerate(x.shape) if i not in axes]
    if axes == tuple(range(axes[0], axes[-1] + 1)):  # adjacent: the result goes where the indexed dims were
        shape = x.shape[: axes[0]] + b + x.shape[axes[-1] + 1:]
    else:
        shape = b + tuple(rest)
    return TType(tuple(shape), x.dtype)


def _index(x, a):
    key = [slice(None)] * (a["axes"][-1] + 1)
    for ax, t in zip(a["axes"], x[1:]):
        key[ax] = t
    return x[0][tuple(key)]


def _infer_gather(ins, a):
    x, idx = ins
    if len(x.shape) != len(idx.shape) or not 0 <= a["axis"] < max(len(x.shape), 1) or idx.dtype not in ("int64", "int32"):
        raise ShapeError(f"GATHER: axis {a['axis']}, index {idx.dtype}{shape_str(idx.shape)} on input {shape_str(x.shape)}")
    return TType(idx.shape, x.dtype)


def _infer_index_copy(ins, a):
    x, idx, src = ins
    ax = a["axis"]
    if not 0 <= ax < len(x.shape) or len(idx.shape) != 1 or idx.dtype not in ("int64", "int32"):
        raise ShapeError(f"INDEX_COPY: axis {ax}, index {idx.dtype}{shape_str(idx.shape)} on {shape_str(x.shape)}; "
                         "the index must be a 1-d integer tensor")
    want = x.shape[:ax] + idx.shape + x.shape[ax + 1:]
    if len(src.shape) != len(want) or not all(dims_equal(p, q) for p, q in zip(src.shape, want)) or src.dtype != x.dtype:
        raise ShapeError(f"INDEX_COPY: source {src.dtype}{shape_str(src.shape)} must be {x.dtype}{shape_str(want)}")
    return TType(x.shape, x.dtype)


def index_copy(x: torch.Tensor, axis: int, index: torch.Tensor, src: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """torch's ``index_copy`` (``inplace``: ``index_copy_``); float8 tensors (quantized KV-cache codes) are copied as
    their bytes, since torch's CPU kernel has no float8."""
    if x.dtype == torch.float8_e4m3fn and src.dtype == x.dtype:
        return index_copy(x.view(torch.uint8), axis, index, src.view(torch.uint8), inplace).view(x.dtype)
    return x.index_copy_(axis, index, src) if inplace else x.index_copy(axis, index, src)


define("EMBEDDING", 2, "compute", _infer_embedding, lambda x, a: F.embedding(x[1], x[0]))
# x with the slices at ``index`` along ``axis`` replaced by ``src`` (torch.index_copy): the KV-cache write. A copy
# in the IR's value semantics; the executor writes in place when x is an input the program updates.
define("INDEX_COPY", 3, "compute", _infer_index_copy, lambda x, a: index_copy(x[0], a["axis"], x[1], x[2]), axis=REQUIRED)
define("INDEX", (2, None), "compute", _infer_index, _index, axes=REQUIRED)
define("GATHER", 2, "compute", _infer_gather, lambda x, a: torch.gather(x[0], a["axis"], x[1]), axis=REQUIRED)


# ----------------------------------------------------------------------------- layout


def _no_negative_dims(op, shape):
    if any(isinstance(d, int) and d < 0 for d in shape):  # torch's -1 is resolved by the importers
        raise ShapeError(f"{op}: {shape_str(shape)} has a negative dim")


def _infer_reshape(ins, a):
    (x,) = ins
    shape = a["shape"]
    _no_negative_dims("RESHAPE", shape)
    if not dims_equal(numel(x.shape), numel(shape)):
        raise ShapeError(f"RESHAPE: cannot view {shape_str(x.shape)} as {shape_str(shape)}")
    return TType(tuple(shape), x.dtype)


def _infer_permute(ins, a):
    (x,) = ins
    perm = a["perm"]
    if sorted(perm) != list(range(len(x.shape))):
        raise ShapeError(f"PERMUTE: {perm} is not a permutation of {len(x.shape)} axes")
    return TType(tuple(x.shape[p] for p in perm), x.dtype)


def _infer_expand(ins, a):
    (x,) = ins
    shape = a["shape"]
    _no_negative_dims("EXPAND", shape)
    if len(shape) < len(x.shape):
        raise ShapeError(f"EXPAND: {shape_str(x.shape)} to fewer dims {shape_str(shape)}")
    for d, e in zip(reversed(x.shape), reversed(shape)):
        if not (d == 1 or dims_equal(d, e)):
            raise ShapeError(f"EXPAND: cannot expand {shape_str(x.shape)} to {shape_str(shape)}")
    return TType(tuple(shape), x.dtype)


def slice_len(start, end, step) -> Dim:
    n = end - start
    if step != 1:
        n = sympy.floor((n + step - 1) / step) if not isinstance(n, int) else (n + step - 1) // step
    return dim(n) if not isinstance(n, int) else max(n, 0)


def _infer_slice(ins, a):
    (x,) = ins
    ax = a["axis"]
    if not 0 <= ax < len(x.shape) or a["step"] < 1:
        raise ShapeError(f"SLICE: axis {ax} / step {a['step']} invalid for shape {shape_str(x.shape)}")
    size, start, end = x.shape[ax], a["start"], a["end"]
    # importers normalise bounds (no negatives, end <= size); torch would clamp silently
    if any(isinstance(b, int) and b < 0 for b in (start, end)) or (isinstance(end, int) and isinstance(size, int) and end > size):
        raise ShapeError(f"SLICE: [{start}:{end}] out of range for dim {ax} of {shape_str(x.shape)}")
    shape = list(x.shape)
    shape[ax] = slice_len(a["start"], a["end"], a["step"])
    return TType(tuple(shape), x.dtype)


def _infer_concat(ins, a):
    ax = a["axis"]
    first = ins[0]
    if not 0 <= ax < len(first.shape):
        raise ShapeError(f"CONCAT: axis {ax} out of range for shape {shape_str(first.shape)}")
    total: Dim = 0
    for t in ins:
        if len(t.shape) != len(first.shape) or t.dtype != first.dtype:
            raise ShapeError(f"CONCAT: inputs {', '.join(shape_str(i.shape) + ' ' + i.dtype for i in ins)}")
        for i, (d, e) in enumerate(zip(t.shape, first.shape)):
            if i != ax and not dims_equal(d, e):
                raise ShapeError(f"CONCAT on axis {ax}: shapes {shape_str(t.shape)} and {shape_str(first.shape)}")
        total = total + t.shape[ax]
    shape = list(first.shape)
    shape[ax] = dim(total) if not isinstance(total, int) else total
    return TType(tuple(shape), first.dtype)


def _infer_pad(ins, a):
    (x,) = ins
    pads = a["pads"]  # (before, after) per dim, last dim first, like F.pad
    if len(pads) > len(x.shape) or any(len(p) != 2 for p in pads):
        raise ShapeError(f"PAD: pads {pads} do not fit shape {shape_str(x.shape)}")
    shape = list(x.shape)
    for i, (lo, hi) in enumerate(pads):
        shape[-1 - i] = dim(shape[-1 - i] + lo + hi) if not isinstance(shape[-1 - i], int) else shape[-1 - i] + lo + hi
    return TType(tuple(shape), x.dtype)


def _infer_tri(ins, a):
    if len(ins[0].shape) < 2:
        raise ShapeError("TRIU/TRIL need rank >= 2")
    return ins[0]


define("RESHAPE", 1, "layout", _infer_reshape, lambda x, a: x[0].reshape(a["shape"]), shape=REQUIRED)
define("PERMUTE", 1, "layout", _infer_permute, lambda x, a: x[0].permute(a["perm"]), perm=REQUIRED)
define("EXPAND", 1, "layout", _infer_expand, lambda x, a: x[0].expand(a["shape"]), shape=REQUIRED)
define("SLICE", 1, "layout", _infer_slice,
     lambda x, a: torch.ops.aten.slice.Tensor(x[0], a["axis"], a["start"], a["end"], a["step"]),
     axis=REQUIRED, start=REQUIRED, end=REQUIRED, step=1)
define("CONCAT", (1, None), "layout", _infer_concat, lambda x, a: torch.cat(x, a["axis"]), axis=REQUIRED)
define("PAD", 1, "layout", _infer_pad,
     lambda x, a: F.pad(x[0], [p for pair in a["pads"] for p in pair], value=a["value"]), pads=REQUIRED, value=0.0)
define("TRIU", 1, "elementwise", _infer_tri, lambda x, a: torch.triu(x[0], a["diagonal"]), diagonal=0)
define("TRIL", 1, "elementwise", _infer_tri, lambda x, a: torch.tril(x[0], a["diagonal"]), diagonal=0)


# ----------------------------------------------------------------------------- creation


def _infer_arange(ins, a):
    n = (a["end"] - a["start"]) / a["step"]
    n = sympy.ceiling(n) if isinstance(n, sympy.Expr) else math.ceil(n)
    return TType((dim(n) if not isinstance(n, int) else max(n, 0),), a["dtype"])


def _infer_full(ins, a):
    return TType(tuple(a["shape"]), a["dtype"])


define("ARANGE", 0, "source", _infer_arange,
     lambda x, a: torch.arange(a["start"], a["end"], a["step"], dtype=torch_dtype(a["dtype"])),
     start=0, end=REQUIRED, step=1, dtype="int64")
define("FULL", 0, "source", _infer_full,
     lambda x, a: torch.full(a["shape"], a["value"], dtype=torch_dtype(a["dtype"])),
     shape=REQUIRED, value=REQUIRED, dtype=REQUIRED)

SOURCE_OPS = frozenset({"INPUT", "WEIGHT", "CONST"})
FLOAT = FLOAT_DTYPES


# ----------------------------------------------------------------------------- convolutional decoders (the VAE)

GROUP_NORM_ACTS = {"none": lambda y: y, "silu": F.silu}


def _infer_group_norm(ins, a):
    x, params = ins[0], ins[1:]
    if len(x.shape) < 2 or x.dtype not in FLOAT_DTYPES:
        raise ShapeError(f"GROUP_NORM: input {x.dtype}{shape_str(x.shape)} must be a float tensor [N, C, *]")
    c, g = x.shape[1], a["groups"]
    if not isinstance(g, int) or g < 1 or (isinstance(c, int) and c % g):
        raise ShapeError(f"GROUP_NORM: {c} channels do not split into {g} groups")
    for p in params:
        if len(p.shape) != 1 or not dims_equal(p.shape[0], c):
            raise ShapeError(f"GROUP_NORM: parameter {shape_str(p.shape)} for {c} channels (must be [{c}])")
    if a["act"] not in GROUP_NORM_ACTS:
        raise ShapeError(f"GROUP_NORM: unknown activation {a['act']!r} (one of {', '.join(GROUP_NORM_ACTS)})")
    same_dtype("GROUP_NORM", ins)
    return TType(x.shape, x.dtype)


def _group_norm(x, a):
    w = x[1] if len(x) > 1 else None
    b = x[2] if len(x) > 2 else None
    return GROUP_NORM_ACTS[a["act"]](F.group_norm(x[0], a["groups"], w, b, a["eps"]))


# act(F.group_norm(x, groups, w, b, eps)): x [N, C, *] normalised over each of the ``groups`` channel groups of each
# sample (C/G x prod(*) values, biased variance), then w [C] * . + b [C]; act "silu" is the decoders' norm -> SiLU
define("GROUP_NORM", (1, 3), "reduction", _infer_group_norm, _group_norm, groups=REQUIRED, eps=1e-5, act="none")


def conv_operands(ins, a) -> tuple:
    """(x, w, bias, residual) of a CONV, or of a CONV2D read as a CONV without epilogue; absent ones are None."""
    has_bias = a["bias"] if "bias" in a else len(ins) > 2
    bias = ins[2] if has_bias else None
    residual = ins[-1] if a.get("residual") else None
    return ins[0], ins[1], bias, residual


def _infer_conv(ins, a):
    want = 2 + int(a["bias"]) + int(a["residual"])
    if len(ins) != want:
        raise ShapeError(f"CONV: {len(ins)} inputs, the attributes (bias={a['bias']}, residual={a['residual']}) say {want}")
    x, w, bias, residual = conv_operands(ins, a)
    t = _infer_conv2d([x, w] + ([bias] if bias is not None else []), a)
    if residual is not None and (not fits(residual.shape, t.shape) or residual.dtype != t.dtype):
        raise ShapeError(f"CONV: residual {residual.dtype}{shape_str(residual.shape)} does not fit the output "
                         f"{t.dtype}{shape_str(t.shape)}")
    d = a["divisor"]
    if d is not None and (not isinstance(d, float) or d == 0.0):
        raise ShapeError(f"CONV: divisor {d!r} must be a non-zero float")
    return t


def _conv(ins, a):
    x, w, bias, residual = conv_operands(ins, a)
    h = F.conv2d(x, w, bias, a["stride"], a["padding"], a["dilation"], a["groups"])
    if residual is not None:
        h = residual + h
    return h / a["divisor"] if a["divisor"] is not None else h


# CONV2D with its epilogue, as GEMM is LINEAR with one: (residual + conv2d(x, w, bias)) / divisor, the residual
# block's ending (x + h) / output_scale_factor; which optional inputs are present is said by bias / residual
define("CONV", (2, 4), "compute", _infer_conv, _conv, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
     bias=False, residual=False, divisor=None)
