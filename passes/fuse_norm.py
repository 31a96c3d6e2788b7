"""Norm fusion: normalisations written out op by op become one norm op; DiT's adaLN modulation and a
residual add in front of a norm are folded into it.

    w * cast(x * rsqrt(mean(x ** 2, -1) + eps))                      ->  RMSNORM(x, w, eps)
    x / sqrt(mean(x * x, -1) + eps)                                  ->  RMSNORM(x, eps)
    (x - mean(x, -1)) / sqrt(mean((x - mean(x, -1)) ** 2, -1) + eps) * w + b  ->  LAYERNORM(x, w, b, eps)
    LAYERNORM(x, w, b) * (1 + scale) + shift                         ->  LAYERNORM_MODULATE(x, scale, shift, w, b)
    NORM(a + r, params)                                              ->  NORM(a, params, r, residual=True)

The first is HF Llama / Mistral / Qwen2's RMSNorm (``x`` upcast to float32, normalised, cast back to
the input dtype, times ``w``); the ONNX exports of both norms (Pow / ReduceMean / Add / Sqrt / Div)
import as the same ops. ``rsqrt(s)`` may also read ``1 / sqrt(s)`` or ``reciprocal(sqrt(s))``; the
weight and bias are optional; the mean runs over the trailing ``dims`` axes.

Dtypes: RMSNORM computes a float16 / bfloat16 input in float32 and returns the input's dtype, so an
upcast - normalise - cast back to the same half dtype fuses into RMSNORM of the half value, a float32
or float64 normalisation without a cast back fuses as it is, and a normalisation computed op by op in
half precision (or cast to another dtype) is declined. F.layer_norm, likewise, accumulates half inputs
in float32: a LayerNorm written out in half precision is declined. Each rule also declines when the
fused op would not have exactly the shape and dtype of the value it replaces.

The residual rule leaves the add where a GEMM epilogue will take it (fuse_epilogue folds
``residual + x @ w^T`` and ``residual + gate * (x @ w^T)`` into the GEMM, which is cheaper); when the
sum has other readers (the residual stream), the add stays for them. Rules run consumers first, so
``LAYERNORM(x + pos) * (1 + scale) + shift`` becomes LAYERNORM_MODULATE before the residual rule
could claim its LayerNorm.
"""
from __future__ import annotations

from typing import Callable

from ..ir.graph import Graph, Node, dims_equal_shapes
from ..ir.ops import fits
from ..ir.types import shape_str
from .pattern import A, Match, O, Rule, V, any_of, first_match, maybe_cast, rewrite, type_reason
from .report import PassStats

HALF = ("float16", "bfloat16")
MATMULS = ("LINEAR", "GEMM")
Fused = tuple[str, list[Node], dict] | str  # the fused node (op, inputs, attrs), or the reason to decline


def _rule(name: str, pattern, plan: Callable[[Match], Fused], shared_ok: bool = False) -> Rule:
    """A rule whose guard and builder share ``plan(m)``; the guard also declines when the fused node
    would not have the shape and dtype of the root it replaces."""

    def guard(m) -> str | None:
        p = plan(m)
        if isinstance(p, str):
            return p
        op, ins, attrs = p
        return type_reason(op, [i.type for i in ins], m.root, shape_error_prefix=f"{op} does not accept these operands: ", **attrs)

    def build(graph: Graph, m) -> Node:
        op, ins, attrs = plan(m)
        return graph.add(op, ins, **attrs)

    return Rule(name, pattern, build, guard, shared_ok)


# ----------------------------------------------------------------------------- shared checks


def _eps(m) -> float | str:
    """The captured eps node's value, or the reason it is not a scalar constant."""
    e = m["eps"]
    v = e.attrs.get("value") if e.op == "CONST" else None
    if not isinstance(v, (int, float)) or isinstance(v, bool):
        return f"eps is {e.op} {e.name}, not a constant"
    return float(v)


def _trailing(axes, x: Node) -> int | str:
    """How many trailing dims ``axes`` are, or the reason they are not the trailing ones of ``x``."""
    r = len(x.shape)
    if not axes or tuple(axes) != tuple(range(r - len(axes), r)):
        return f"normalises axes {tuple(axes)} of rank-{r} {x.name}, not the trailing ones"
    return len(axes)


def _params(m, x: Node, k: int, names=("w", "bias")) -> list[Node] | str:
    """The captured weight / bias, or the reason one is not a parameter over the normalised dims."""
    out = []
    for name in names:
        p = m.get(name)
        if p is None:
            break
        if not dims_equal_shapes(p.shape, x.shape[-k:]):
            return f"the {name} {p.name}{shape_str(p.shape)} does not span the normalised dims {shape_str(x.shape[-k:])}"
        out.append(p)
    return out


# ----------------------------------------------------------------------------- patterns


def _inv_sqrt(s):
    return any_of(O.RSQRT(s), O.RECIPROCAL(O.SQRT(s)), O.DIV(1, O.SQRT(s), rounding=None))


def _normalised(v, mean_sq):
    """``v * rsqrt(mean_sq + eps)`` or ``v / sqrt(mean_sq + eps)``."""
    s = mean_sq + V("eps")
    return any_of(v * _inv_sqrt(s), v / O.SQRT(s))


def _mean_square(v):
    return O.MEAN(any_of(v ** 2, v * v), axes=A("axes"), keepdim=True)


x = V("x")
RMS = maybe_cast(_normalised(x, _mean_square(x)), "out")  # maybe_cast: HF's cast back to the input dtype
D = x - O.MEAN(x, axes=A("axes"), keepdim=True)  # x - mean(x); both means reduce the same axes
LN = _normalised(D, _mean_square(D))


# ----------------------------------------------------------------------------- RMSNorm


def _plan_rms(m) -> Fused:
    x, out = m["x"], m["out"]
    centred = first_match(D, x)
    if centred is not None and centred["axes"] == m["axes"]:
        return f"{x.name} is x - mean(x): a LayerNorm, for the layernorm rule"
    eps, k = _eps(m), _trailing(m["axes"], x)
    for r in (eps, k):
        if isinstance(r, str):
            return r
    params = _params(m, x, k, ("w",))
    if isinstance(params, str):
        return params
    src = x.inputs[0] if x.op == "CAST" else None
    if src is not None and src.dtype in HALF and x.dtype == "float32" and out == src.dtype:
        x = src  # upcast, normalise in float32, cast back: what RMSNORM does with a half input
    elif x.dtype in HALF:
        return f"normalises in {x.dtype} op by op; RMSNORM computes {x.dtype} in float32"
    elif out not in (None, x.dtype):
        return f"casts the {x.dtype} result to {out}; RMSNORM returns its input's dtype"
    return "RMSNORM", [x, *params], dict(eps=eps, dims=k)


# ----------------------------------------------------------------------------- LayerNorm


def _plan_ln(m) -> Fused:
    x = m["x"]
    eps, k = _eps(m), _trailing(m["axes"], x)
    for r in (eps, k):
        if isinstance(r, str):
            return r
    if x.dtype in HALF:
        return f"normalises in {x.dtype} op by op; LAYERNORM accumulates {x.dtype} in float32"
    params = _params(m, x, k)
    if isinstance(params, str):
        return params
    for p in params:
        if p.dtype != x.dtype:
            return f"mixed dtypes: {x.name} is {x.dtype}, {p.name} {p.dtype}"
    return "LAYERNORM", [x, *params], dict(eps=eps, dims=k)


# ----------------------------------------------------------------------------- adaLN modulate


def _layernorm(*params):
    return O.LAYERNORM(x, *params, eps=A("eps"), dims=A("dims"), residual=False)


LN_OP = any_of(_layernorm(), _layernorm(V("w")), _layernorm(V("w"), V("bias")))


def _plan_modulate(m) -> Fused:
    x, scale, shift = m["x"], m["scale"], m["shift"]
    for name, v in (("scale", scale), ("shift", shift)):
        if not fits(v.shape, x.shape):
            return f"the {name} {v.name}{shape_str(v.shape)} does not broadcast to {x.name}{shape_str(x.shape)}"
        if v.dtype != x.dtype:
            return f"mixed dtypes: {x.name} is {x.dtype}, the {name} {v.name} {v.dtype}"
    params = [m[k] for k in ("w", "bias") if k in m]
    return "LAYERNORM_MODULATE", [x, scale, shift, *params], dict(eps=m["eps"], dims=m["dims"])


# ----------------------------------------------------------------------------- residual add + norm


def _norm_of(s):
    kw = dict(eps=A("eps"), dims=A("dims"), residual=False)
    return any_of(O.RMSNORM(s, **kw), O.RMSNORM(s, V("w"), **kw), O.LAYERNORM(s, **kw), O.LAYERNORM(s, V("w"), **kw),
                  O.LAYERNORM(s, V("w"), V("bias"), **kw))


def _epilogue_residual(m, v: Node) -> bool:
    """``v`` is a matmul result (or ``gate * matmul``) that only the add reads: fuse_epilogue takes the add."""
    if v.op == "MUL" and m.readers(v) == 1:
        v = next((i for i in v.inputs if i.op in MATMULS), v)
    return v.op in MATMULS and m.readers(v) == 1 and not v.attrs.get("residual")


def _plan_residual(m) -> Fused:
    a, r = m["a"], m["r"]
    if _epilogue_residual(m, a) or _epilogue_residual(m, r):
        return "the residual add is left to the GEMM epilogue"
    s = m.interior[1]  # the ADD
    if not dims_equal_shapes(a.shape, s.shape):
        a, r = r, a
        if not dims_equal_shapes(a.shape, s.shape):
            return f"both operands of {s.name} broadcast"
    params = [m[k] for k in ("w", "bias") if k in m]
    return m.root.op, [a, *params, r], dict(eps=m["eps"], dims=m["dims"], residual=True)


RULES = [
    _rule("modulate", LN_OP * (1 + V("scale")) + V("shift"), _plan_modulate),
    # LayerNorm first: the RMS pattern also matches a LayerNorm's centred x - mean(x) (and declines it)
    _rule("layernorm", any_of(LN * V("w") + V("bias"), LN * V("w"), LN), _plan_ln),
    _rule("rmsnorm", any_of(V("w") * RMS, RMS), _plan_rms),
    _rule("residual", _norm_of(V("a") + V("r")), _plan_residual, shared_ok=True),  # the add stays for its other readers
]


def fuse_norm(graph: Graph) -> PassStats:
    """Decomposed RMSNorm / LayerNorm -> RMSNORM / LAYERNORM; ``LAYERNORM(x) * (1 + scale) + shift`` ->
    LAYERNORM_MODULATE; ``NORM(a + r)`` -> ``NORM(a, r, residual=True)`` (see the module docstring)."""
    return rewrite(graph, RULES)
