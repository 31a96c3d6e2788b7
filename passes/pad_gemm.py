"""Pad a wide GEMM's odd output width: its weight gets zero rows up to a multiple of 64, its result becomes a view.

    y = LINEAR(x, W[N, K][, b])            N % 8 != 0, N >= MIN_N
        ->  y = SLICE(LINEAR(x, [W; 0][Np, K][, [b; 0]]), -1, 0, N)        Np = 64 * ceil(N / 64)

The same for ``GEMM`` with a bias and an activation (the padded columns hold act(0), which nobody reads) or a GLU
(each half of its [2N, K] weight and [2N] bias padded to Np rows: [Wg; 0; Wu; 0]).

Why: GPT-2's LM head, ``x[4096, 768] @ W[50257, 768]^T`` (a graph output, 411 MB of logits at bf16). With rows of
an odd element count cuBLAS falls off its tensor-core kernels (16-byte aligned rows): the tuner measured 3.35 ms on
an H200, kiln's Triton template 1.13 ms, and torch.compile, which pads N the same way (inductor's pad_mm), ~0.5 ms.
The padded GEMM writes rows of Np elements; every consumer reads the ``[..., :N]`` SLICE, a free view: a kernel reads
it in place through its strides, and a graph output is handed to the caller as that view, row stride Np, without a
copy (``runtime/kernel_plan.py``). The tuner, the epilogues and the Triton template see an ordinary GEMM of width Np.

Memory: the padded weight *replaces* the original in the graph (and the artifact), so the model holds one copy. A
tied table (GPT-2's ``wte``: the embedding and the LM head read one weight) stays one weight: the EMBEDDING reads the
padded table as it is (its ids index rows below N; an id in [N, Np), invalid for the model, reads a zero row). A
weight that anything else reads is left alone (padding it would keep a second copy). A bias is padded into a new
[Np] vector (small).

Where: last in the pipeline (``pipeline.py`` says why). Declined, with the reason: quantized GEMMs (their Triton
kernels mask the N edge; the packed weight stays as packed), a GEMM with a gate or residual operand (a [.., N]
activation: padding it would copy it every call), computed weights or biases. Below ``MIN_N`` columns the GEMM is
small and the padding (up to 63 rows) a larger share of it: unchanged (``runtime/kernel_plan.py`` still pads such an
output's rows from 256 columns up, without padding the weight).

ONNX export keeps the padded weight and the Slice (standard ops: onnxruntime runs them); ``kiln.jit`` re-folds from
the imported graph, so a changed parameter is padded again.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..ir.graph import Graph, Node
from .quantize_acts import free_name
from .report import PassStats

MIN_N = 1000  # narrowest output padded: the padding (< 64 rows) then adds at most 6.4% to the GEMM
ALIGN = 64  # rows padded to a multiple of 64 elements: 128 bytes at bf16, what inductor's pad_mm pads to
_GEMMS = ("LINEAR", "GEMM", "QGEMM", "AQGEMM")


def pad_gemm(graph: Graph, min_n: int = MIN_N) -> PassStats:
    """GEMM(x, W[N, K], b) with N % 8 != 0 and N >= ``min_n``  ->  SLICE(GEMM(x, [W; 0], [b; 0]), -1, 0, N), the weight
    padded to a multiple of 64 rows at compile time and replacing the original (module docstring)."""
    stats = PassStats()
    by_weight: dict[Node, list[Node]] = {}
    for n in list(graph.nodes):
        if n.op not in _GEMMS or not _odd_wide(n, min_n):
            continue
        why = _why_not(graph, n)
        if why is None:
            by_weight.setdefault(n.inputs[1], []).append(n)
        else:
            stats.decline(why, n, n=n.shape[-1])
    for w, gemms in by_weight.items():
        why = _why_not_weight(w, gemms)
        if why is not None:
            for n in gemms:
                stats.decline(why, n, n=n.shape[-1], weight=w.attrs["name"])
            continue
        padded = _pad(graph, w, gemms)
        stats.rewritten += len(gemms)
        stats.notes.append(f"weight {w.attrs['name']} {list(w.shape)} padded to {padded.attrs['name']} {list(padded.shape)}: "
                           f"{len(gemms)} GEMM(s) of width {gemms[0].shape[-1]} write rows of {padded.shape[0] // _halves(gemms[0])}")
    if stats.rewritten:
        graph.remove_dead()
        graph.toposort()
    return stats


# ----------------------------------------------------------------------------- guards


def _odd_wide(n: Node, min_n: int) -> bool:
    width = n.shape[-1] if n.shape else 0
    return isinstance(width, int) and width % 8 != 0 and width >= min_n


def _halves(n: Node) -> int:
    """Blocks of N rows in the weight: 2 for a GLU ([gate; up]), else 1."""
    return 2 if n.op == "GEMM" and n.attrs["glu"] else 1


def _why_not(graph: Graph, n: Node) -> str | None:
    """The reason GEMM ``n`` of an odd wide output is not padded, or None."""
    if n.op in ("QGEMM", "AQGEMM"):
        return f"quantized ({n.op}): its Triton kernels mask the N edge; the packed weight is not padded"
    if n.op == "GEMM" and (n.attrs["gate"] or n.attrs["residual"]):
        return "its gate / residual operand is an [.., N] activation: padding it would copy it every call"
    w = n.inputs[1]
    if w.op != "WEIGHT" or w.attrs["name"] not in graph.weights:
        return f"weight is computed ({w.op}), not a stored WEIGHT: cannot pad it at compile time"
    bias = _bias(n)
    if bias is not None and (bias.op != "WEIGHT" or bias.attrs["name"] not in graph.weights):
        return f"bias is computed ({bias.op}), not a stored WEIGHT"
    return None


def _why_not_weight(w: Node, gemms: list[Node]) -> str | None:
    """The padded weight replaces ``w`` for every reader, so each must be able to read it: the GEMMs being padded
    (all with one row layout), and EMBEDDINGs of a plain (non-GLU) weight. None when they all can."""
    if len({_halves(g) for g in gemms}) > 1:
        return "read as a GLU weight by one GEMM and as a plain one by another: they need different paddings"
    for u in w.users:
        if u in gemms and u.inputs.count(w) == 1:
            continue
        if u.op == "EMBEDDING" and u.inputs[0] is w and u.inputs.count(w) == 1 and _halves(gemms[0]) == 1:
            continue
        return f"the weight is also read by {u.op} %{u.name}: padding it would keep a second copy"
    return None


def _bias(n: Node) -> Node | None:
    if n.op == "LINEAR":
        return n.inputs[2] if len(n.inputs) > 2 else None
    return n.inputs[2] if n.attrs["bias"] else None


# ----------------------------------------------------------------------------- builder


def _padded(t: torch.Tensor, halves: int, n: int, n_pad: int) -> torch.Tensor:
    """``t`` [halves * n, ...] with each block of n rows followed by n_pad - n zero rows: [halves * n_pad, ...]."""
    blocks = t.reshape(halves, n, -1)  # [halves, n, K] (a bias: K = 1)
    out = F.pad(blocks, (0, 0, 0, n_pad - n))  # [halves, n_pad, K]
    return out.reshape((halves * n_pad,) + tuple(t.shape[1:])).contiguous()


def _pad(graph: Graph, w: Node, gemms: list[Node]) -> Node:
    """Replace weight ``w`` by its padded form for every reader; each GEMM's result becomes the [..., :N] SLICE of
    its padded twin. Returns the padded WEIGHT node."""
    halves, n = _halves(gemms[0]), gemms[0].shape[-1]
    n_pad = -(-n // ALIGN) * ALIGN
    name = w.attrs["name"]
    wp = graph.add_weight(free_name(graph, name, f"pad{n_pad}"), _padded(graph.weights[name], halves, n, n_pad))
    biases: dict[Node, Node] = {}
    for u in list(w.users):
        if u.op == "EMBEDDING":
            graph.replace_all_uses(u, graph.add("EMBEDDING", [wp, u.inputs[1]], name=u.name, loc=u.loc))
            continue
        b = _bias(u)
        if b is not None and b not in biases:
            bname = b.attrs["name"]
            biases[b] = graph.add_weight(free_name(graph, bname, f"pad{n_pad}"), _padded(graph.weights[bname], halves, n, n_pad))
        inputs = [biases.get(i, wp if i is w else i) for i in u.inputs]
        wide = graph.add(u.op, inputs, name=f"{u.name}_pad{n_pad}", loc=u.loc, **u.attrs)
        axis = len(wide.shape) - 1
        graph.replace_all_uses(u, graph.add("SLICE", [wide], name=u.name, loc=u.loc, axis=axis, start=0, end=n))
    return wp
