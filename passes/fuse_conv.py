"""Convolutional fusion: what a VAE decoder does around its convolutions and group norms, folded into them.

    silu(GROUP_NORM(x, w, b))        ->  GROUP_NORM(x, w, b, act=silu)
    r + conv2d(x, w, b)              ->  CONV(x, w, b, r)
    CONV(x, w, b[, r]) / d           ->  CONV(x, w, b[, r], divisor=d)        (d a constant)

The decoder's resnet block is ``norm1 -> silu -> conv1 -> norm2 -> silu -> conv2`` ending in
``(x + h) / output_scale_factor``: after this pass it is two GROUP_NORM(act=silu) and two CONV, the second
carrying the residual and the division (one pass after cuDNN instead of an add, a division and cuDNN's own
bias pass). CONV computes ``(r + conv2d(x, w, b)) / d`` exactly as written, so the reference path changes no
number. A conv or norm result that something else reads is left alone (it would be computed twice), and so is
an operand that would widen the result or change its dtype.

Not fused: a group norm of a residual sum. The decoder's sums (the resnet's and the attention block's) are
also read as the next block's residual, so the sum must be stored anyway; the resnet's becomes CONV's epilogue.
"""
from __future__ import annotations

from ..ir.graph import Graph, Node
from ..ir.ops import conv_operands, fits
from ..ir.types import dims_equal
from .pattern import C, O, Rule, V, rewrite
from .report import PassStats

CONVS = ("CONV2D", "CONV")


def _sole_reader(m, n: Node) -> str | None:
    return f"{n.name} ({n.op}) has {m.readers(n)} readers" if m.readers(n) != 1 else None


# ----------------------------------------------------------------------------- group norm -> SiLU


def _guard_silu(m) -> str | None:
    gn = m["gn"]
    if gn.attrs["act"] != "none":
        return f"{gn.name} already has the activation {gn.attrs['act']}"
    return _sole_reader(m, gn)


def _build_silu(graph: Graph, m) -> Node:
    gn = m["gn"]
    return graph.add("GROUP_NORM", list(gn.inputs), **{**gn.attrs, "act": "silu"})


GN = V("gn", where=lambda n: n.op == "GROUP_NORM")
SILU = Rule("group_norm_silu", O.SILU(GN), _build_silu, _guard_silu)


# ----------------------------------------------------------------------------- conv epilogue


def _parts(h: Node) -> dict:
    """The CONV view of a CONV2D or CONV node: operands and attributes."""
    x, w, bias, residual = conv_operands(h.inputs, h.attrs)
    conv = {k: h.attrs[k] for k in ("stride", "padding", "dilation", "groups")}
    return dict(conv, x=x, w=w, bias=bias, residual=residual, divisor=h.attrs.get("divisor"))


def _build(graph: Graph, p: dict) -> Node:
    ins = [p["x"], p["w"]] + [p[k] for k in ("bias", "residual") if p[k] is not None]
    attrs = {k: p[k] for k in ("stride", "padding", "dilation", "groups", "divisor")}
    return graph.add("CONV", ins, bias=p["bias"] is not None, residual=p["residual"] is not None, **attrs)


def _guard_residual(m) -> str | None:
    h, r = m["h"], m["r"]
    p = _parts(h)
    if p["residual"] is not None or p["divisor"] is not None:
        return f"{h.name} already has a {'residual' if p['residual'] is not None else 'divisor'}: the add would come after it"
    if r is h:
        return "the conv result is its own residual"
    if r.dtype != h.dtype or m.root.dtype != h.dtype:
        return f"the residual {r.name} is {r.dtype}, the conv {h.dtype}"
    if not (fits(r.shape, h.shape) and all(dims_equal(a, b) for a, b in zip(m.root.shape, h.shape))
            and len(m.root.shape) == len(h.shape)):
        return f"the residual {r.name} widens the conv result"
    return _sole_reader(m, h)


def _guard_divisor(m) -> str | None:
    h, d = m["h"], m["d"]
    if _parts(h)["divisor"] is not None:
        return f"{h.name} is divided already"
    if isinstance(d, bool) or not isinstance(d, (int, float)) or d == 0 or m.root.dtype != h.dtype:
        return f"the divisor {d!r} is not a non-zero number that keeps the conv's dtype"
    return _sole_reader(m, h)


H = V("h", where=lambda n: n.op in CONVS)
RESIDUAL = Rule("residual", H + V("r"), lambda g, m: _build(g, {**_parts(m["h"]), "residual": m["r"]}), _guard_residual)
DIVISOR = Rule("divisor", O.DIV(H, C("d"), rounding=None), lambda g, m: _build(g, {**_parts(m["h"]), "divisor": float(m["d"])}),
               _guard_divisor)

RULES = [SILU, RESIDUAL, DIVISOR]


def fuse_conv(graph: Graph) -> PassStats:
    """Fold SiLU into the group norm before it and residual adds / constant divisions into the conv before them
    (see the module docstring)."""
    return rewrite(graph, RULES)
