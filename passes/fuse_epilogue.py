"""Epilogue fusion: what a matmul's consumers do to its result is folded into one GEMM op.

    act(x @ w^T + b)                                  ->  GEMM(x, w, b, act)
    act(h[..., :N/2]) * h[..., N/2:],  h = x @ w^T    ->  GEMM(x, w, act, glu)        (silu(gate) * up)
    gate * GEMM(...)                                  ->  GEMM(..., gate)
    residual + GEMM(...)                              ->  GEMM(..., residual)

The GEMM computes ``residual + gate * epi(x @ w^T + b)``, so the rules apply in that order: an
activation onto a bare matmul, a gate onto one without gate or residual, a residual onto one
without. Each rule runs only when the matmul's result has no other reader (else it would be
computed twice) and the extra operand does not widen the result or change its dtype. A gate whose
gated sum feeds a norm stays out (the norm's pointwise kernel takes it: see ``_guard_gate``).
"""
from __future__ import annotations

from ..ir.graph import Graph, Node
from ..ir.ops import fits
from ..ir.ops_fused import gemm_operands
from ..ir.types import dims_equal
from .pattern import O, Rule, V, any_of, rewrite
from .report import PassStats

MATMULS = ("LINEAR", "GEMM")
_ACT_OPS = {"SILU": "silu", "GELU": None}  # GELU's flavour comes from its attribute


def _parts(h: Node) -> dict:
    """The GEMM view of a LINEAR or GEMM node: operands and epilogue attributes."""
    if h.op == "LINEAR":
        return dict(x=h.inputs[0], w=h.inputs[1], bias=h.inputs[2] if len(h.inputs) > 2 else None, gate=None, residual=None,
                    act="none", glu=False)
    x, w, bias, gate, residual = gemm_operands(h.inputs, h.attrs)
    return dict(x=x, w=w, bias=bias, gate=gate, residual=residual, act=h.attrs["act"], glu=h.attrs["glu"])


def _build(graph: Graph, p: dict) -> Node:
    ins = [p["x"], p["w"]] + [p[k] for k in ("bias", "gate", "residual") if p[k] is not None]
    return graph.add("GEMM", ins, bias=p["bias"] is not None, act=p["act"], glu=p["glu"], gate=p["gate"] is not None,
                     residual=p["residual"] is not None)


def _sole_reader(m, h: Node) -> str | None:
    if m.readers(h) != 1:
        return f"the matmul result {h.name} has {m.readers(h)} readers"
    return None


def _act_name(n: Node) -> str | None:
    if n.op == "SILU":
        return "silu"
    if n.op == "GELU":
        return "gelu_tanh" if n.attrs["approximate"] == "tanh" else "gelu"
    return None


H = V("h", where=lambda n: n.op in MATMULS)


# ----------------------------------------------------------------------------- activation


def _guard_act(m) -> str | None:
    h = m["h"]
    p = _parts(h)
    if p["act"] != "none" or p["glu"] or p["gate"] is not None or p["residual"] is not None:
        return f"{h.name} already has an epilogue that must come after the activation"
    return _sole_reader(m, h)


def _build_act(graph, m):
    return _build(graph, {**_parts(m["h"]), "act": _act_name(m.root)})


ACT = Rule("activation", any_of(O.SILU(H), O.GELU(H, approximate="none"), O.GELU(H, approximate="tanh")), _build_act, _guard_act)


# ----------------------------------------------------------------------------- glu: act(first half) * second half


def _half(n: Node, which: int) -> bool:
    """``n`` is SLICE of the last axis taking the first (0) or second (1) half, step 1."""
    if n.op != "SLICE":
        return False
    src = n.inputs[0]
    width = src.shape[-1]
    a = n.attrs
    if a["axis"] != len(src.shape) - 1 or a["step"] != 1 or not isinstance(width, int) or width % 2:
        return False
    return (a["start"], a["end"]) == ((0, width // 2) if which == 0 else (width // 2, width))


GLU_PATTERN = any_of(O.SILU(V("g")), O.GELU(V("g"), approximate="none"), O.GELU(V("g"), approximate="tanh")) * V("u")


def _guard_glu(m) -> str | None:
    g, u = m["g"], m["u"]
    if g.op != "SLICE" or u.op != "SLICE" or g.inputs[0] is not u.inputs[0]:
        return "not two slices of one matmul"
    h = g.inputs[0]
    if h.op not in MATMULS:
        return "the slices are not of a matmul"
    if not (_half(g, 0) and _half(u, 1)):
        return "the activated slice is not the first half and the other the second half of the last dim"
    p = _parts(h)
    if p["act"] != "none" or p["glu"] or p["gate"] is not None or p["residual"] is not None:
        return f"{h.name} already has an epilogue"
    if set(h.users) != {g, u} or m.readers(h) != 2 or m.readers(g) != 1 or m.readers(u) != 1:
        return f"the halves of {h.name} have other readers"
    return None


def _build_glu(graph, m):
    h = m["g"].inputs[0]
    return _build(graph, {**_parts(h), "act": _act_name(m.interior[1]), "glu": True})


GLU = Rule("glu", GLU_PATTERN, _build_glu, _guard_glu, shared_ok=True)  # the halves are checked by the guard


# ----------------------------------------------------------------------------- gate and residual


def _guard_operand(m, slot: str, blocked: tuple) -> str | None:
    h, other = m["h"], m["o"]
    p = _parts(h)
    if any(p[k] is not None for k in blocked):
        return f"{h.name} already has a {' or '.join(k for k in blocked if p[k] is not None)} epilogue"
    if other.dtype != h.dtype or m.root.dtype != h.dtype:
        return f"the {slot} is {other.dtype}, the matmul {h.dtype}"
    if not (fits(other.shape, h.shape) and len(m.root.shape) == len(h.shape)
            and all(dims_equal(a, b) for a, b in zip(m.root.shape, h.shape))):
        return f"the {slot} {other.name} widens the matmul result"
    if other is h:
        return "the matmul result is its own operand"
    return _sole_reader(m, h)


NORMS = ("LAYERNORM", "LAYERNORM_MODULATE", "RMSNORM")


def _guard_gate(m) -> str | None:
    # DiT's gated residual, x + gate * (h @ w^T + b), read by the next norm: left to the norm's kernel, which
    # then reads the matmul's output and x once and normalises the un-rounded sum; folded into the GEMM it
    # costs cuBLAS (the measured faster matmul at these shapes) a separate epilogue pass and one more rounding
    for u in m.root.users:
        if u.op in NORMS or (u.op == "ADD" and any(v.op in NORMS for v in u.users)):
            return "the gated value feeds a norm: it fuses into the norm's kernel"
    return _guard_operand(m, "gate", ("gate", "residual"))


GATE = Rule("gate", H * V("o"), lambda g, m: _build(g, {**_parts(m["h"]), "gate": m["o"]}), _guard_gate)
RESIDUAL = Rule("residual", H + V("o"), lambda g, m: _build(g, {**_parts(m["h"]), "residual": m["o"]}),
                lambda m: _guard_operand(m, "residual", ("residual",)))

RULES = [GLU, ACT, GATE, RESIDUAL]


def fuse_epilogue(graph: Graph) -> PassStats:
    """Fold activations, ``silu(gate) * up``, gates and residual adds into GEMM ops (see the module docstring)."""
    return rewrite(graph, RULES)
