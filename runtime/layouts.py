"""How the kernels plan lays values out: permuted where a permute reads them (``stored_order``), GEMM rows padded
(``row_pitch``), and which values it stores channels-last: an NCHW value (its logical shape, as the IR has it) in NHWC
memory, C's stride 1.

cuDNN's fastest convolutions are often channels-last. A convolution between NCHW buffers then pays a copy of x into
NHWC and one of its result back, which at a small decoder's sizes (convolutions of 5-50 us) is a large share; kept
channels-last from one convolution to the next, neither copy is needed. A value ``v`` is stored channels-last when

    eligible(v):  a 4-d float16 / bfloat16 / float32 value that a conv, a group norm or a copy (an upsampling's
                  RESHAPE) writes, not a graph output, whose every reader takes either layout: a conv (as x or
                  residual), a group norm (as x), a pointwise kernel (its loads are strided), or a view or RESHAPE
                  whose own readers all do
    votes(v) > 0: +1 or -1 for the conv writing v and for each conv reading v as x, as that conv alone runs faster
                  channels-last or NCHW at its shape (``prefers``: the tuner's measurement, ``lower.conv_layouts``)

So the group norms and upsamplings between convolutions that run channels-last are channels-last at both ends, and
one between convolutions that disagree converts as it goes (kiln's group norm, the conv epilogue and a copy read one
layout and write the other at no extra cost). Values nothing votes for stay NCHW.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..codegen.schedule import Group
from ..ir.graph import Node
from ..ir.ops import conv_operands

CHANNELS_LAST = (0, 2, 3, 1)  # the dim order an NCHW value is stored in: [N, H, W, C] memory
FLOATS = ("float16", "bfloat16", "float32")


def _is_reshape(n: Node, kind: dict) -> bool:
    """A RESHAPE the schedule could not prove a view: the plan makes it a view or a copy."""
    return kind[n] == "reference" and n.op == "RESHAPE"


def _takes_either(v: Node, kind: dict, outputs: set) -> bool:
    """Every reader of ``v`` (through views) reads it through its strides, and none is a graph output."""
    if v in outputs:
        return False
    for u in v.users:
        k = kind.get(u)
        if k == "conv":
            x, _, _, residual = conv_operands(u.inputs, u.attrs)
            ok = v is x or v is residual
        elif k == "group_norm":
            ok = u.inputs[0] is v and v not in u.inputs[1:]
        elif k == "view" or _is_reshape(u, kind):
            ok = _takes_either(u, kind, outputs)
        else:
            ok = k == "pointwise"
        if not ok:
            return False
    return True


def _eligible(graph, groups: list[Group], shape_of: dict, kind: dict) -> list[Node]:
    outputs = set(graph.outputs)
    values = [o for g in groups if g.kind in ("conv", "group_norm") or (len(g.nodes) == 1 and _is_reshape(g.nodes[0], kind))
              for o in g.outputs]
    return [v for v in values if len(shape_of[v]) == 4 and v.dtype in FLOATS and _takes_either(v, kind, outputs)]


def channels_last_values(graph, groups: list[Group], shape_of: dict, prefers: Callable[[Node], int]) -> set[Node]:
    """The values to store channels-last (see the module docstring). ``shape_of``: node -> its concrete shape;
    ``prefers(conv)``: +1 (channels-last), -1 (NCHW) or 0 (either), asked once per conv next to an eligible value."""
    kind = {n: g.kind for g in groups for n in g.nodes}
    memo: dict[Node, int] = {}

    def vote(conv: Node) -> int:
        if conv not in memo:
            memo[conv] = prefers(conv)
        return memo[conv]

    chosen = set()
    for v in _eligible(graph, groups, shape_of, kind):
        votes = vote(v) if kind[v] == "conv" else 0
        votes += sum(vote(u) for u in v.users if kind.get(u) == "conv" and u.inputs[0] is v)
        if votes > 0:
            chosen.add(v)
    return chosen


def stored_order(node: Node):
    """A value read only through one PERMUTE that a RESHAPE then flattens (attention's [B, H, S, D] output
    going back to [B, S, H * D]) is stored in the permuted order, so that both become free views instead
    of a copy: returns the permutation, or None to store it in its own order."""
    if len(node.users) != 1:
        return None
    u = next(iter(node.users))
    if u.op != "PERMUTE" or not u.users or not all(r.op == "RESHAPE" for r in u.users):
        return None
    return tuple(u.attrs["perm"])


def inverse(perm) -> tuple:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def empty_in_order(shape, perm, dtype, device) -> torch.Tensor:
    if perm is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty([shape[p] for p in perm], dtype=dtype, device=device).permute(inverse(perm))


def row_pitch(shape) -> int | None:
    """The padded row length of a GEMM output whose rows are long and not a multiple of 8 elements (GPT-2's LM head,
    N = 50257): cuBLAS's tensor-core kernels want 16-byte aligned rows; such an output is a view [..., :N] of rows
    padded to a multiple of 64 (torch.compile pads the same way). None: no padding."""
    n = shape[-1] if shape else 0
    return -(-n // 64) * 64 if n >= 256 and n % 8 else None
