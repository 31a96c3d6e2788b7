"""Calibration: the float graph run on example inputs with the reference ops, the inputs of chosen nodes observed.

Shared by the quantization passes (GPTQ's Hessians, SmoothQuant's activation statistics, each quantized GEMM's
measured error). Each sample (a flat list of input tensors, graph order) is evaluated node by node with
``ir/interpret.py``'s ``eval_node``; when a watched node is reached, its callback receives the value of the node's
first input (a GEMM's activations). Streaming: one sample's values at a time, each freed after its last reader.

Every token's row, where the graph computes one. A generator's step graph (and any graph of an HF model asked for the
last position's logits) selects each sequence's last token before its final norm and LM head: x[:, -1] -> RMSNORM ->
head. Observed as it runs, the head sees one row a calibration sample (too few for GPTQ's Hessian, which needs K), though
every position's hidden state is the head's input at some decode step. So where a watched node's input is such a SLICE
of the last row of a token axis of a tensor t (not a first row: a CLS token's), followed only by views and row-wise ops
(RMSNORM / LAYERNORM over the last dim, with stored weights; CAST), the callback receives those ops applied to every
row of t instead (``_row_source``).
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import KilnError
from ..ir.bind import bind_inputs
from ..ir.graph import Graph, Node
from ..ir.interpret import eval_node
from ..ir.types import dims_equal


def observe_inputs(graph: Graph, watch: dict[Node, Callable[[torch.Tensor], None]], calibration) -> None:
    """Run ``graph`` on every sample of ``calibration``; ``watch[n](x)`` with x the value of ``n.inputs[0]`` (of every
    token's row where n reads one selected row: module docstring)."""
    device = graph.weights_device()
    taps: dict[Node, list[Callable[[torch.Tensor], None]]] = {}
    for n, fn in watch.items():
        source = _row_source(n)
        if source is None:
            taps.setdefault(n, []).append(fn)
        else:
            taps.setdefault(source[0], []).append(lambda t, chain=source[1], fn=fn: fn(_rows(graph, chain, t)))
    last = {}
    for k, n in enumerate(graph.nodes):
        for i in n.inputs:
            last[i] = k
    for s, sample in enumerate(calibration):
        sample = _sample(graph, sample, s, device)
        bindings = bind_inputs(graph, sample)
        env: dict = dict(zip(graph.inputs, sample))
        with torch.no_grad():
            for k, n in enumerate(graph.nodes):
                if n.op == "WEIGHT":
                    env[n] = graph.weights[n.attrs["name"]]
                elif n.op != "INPUT" and n in last:  # (a value nothing reads is not computed)
                    env[n] = eval_node(n, [env[i] for i in n.inputs], bindings, device=device)
                for fn in taps.get(n, ()):
                    fn(env[n.inputs[0]])
                for i in n.inputs:
                    if last[i] == k:
                        env.pop(i, None)


_ROW_OPS = ("RMSNORM", "LAYERNORM", "CAST")
_ROW_VIEWS = ("RESHAPE",)


def _row_source(n: Node) -> tuple[Node, list[Node]] | None:
    """(the SLICE of one row of a token axis, the row-wise ops after it in order) where ``n``'s input is that row
    through views and row-wise ops only (module docstring); None otherwise."""
    x, chain = n.inputs[0], []
    while True:
        if x.op in _ROW_OPS and not x.attrs.get("residual") and x.attrs.get("dims", 1) == 1 and \
                all(i.op == "WEIGHT" for i in x.inputs[1:]):
            chain.append(x)
        elif x.op == "SLICE":
            return (x, chain[::-1]) if _last_row(x) and x.inputs[0].shape[-1] == n.inputs[0].shape[-1] else None
        elif x.op not in _ROW_VIEWS:
            return None
        x = x.inputs[0]


def _last_row(x: Node) -> bool:
    """SLICE ``x`` keeps the last row of a middle (token) axis of its input: a causal model's last position, which
    every position is at its own step. Not a first row (BERT's pooler and ViT's classifier read the CLS token, whose
    rows differ from the others')."""
    t, a = x.inputs[0], x.attrs
    rank = len(t.shape)
    axis = a["axis"] % rank if rank else 0
    if rank < 3 or not 0 < axis < rank - 1 or a.get("step", 1) != 1 or x.shape[axis] != 1:
        return False
    size, start, end = t.shape[axis], a["start"], a["end"]
    return (isinstance(end, int) and end >= 2 ** 31) or dims_equal(end, size) or start == -1 or dims_equal(start, size - 1)


def _rows(graph: Graph, chain: list[Node], t: torch.Tensor) -> torch.Tensor:
    """The row-wise ops ``chain`` applied to every row of ``t`` (their stored weights read from ``graph``)."""
    for c in chain:
        t = eval_node(c, [t] + [graph.weights[i.attrs["name"]] for i in c.inputs[1:]], {})
    return t


def _sample(graph: Graph, sample, index: int, device) -> list[torch.Tensor]:
    if not isinstance(sample, (list, tuple)) or len(sample) != len(graph.inputs) or \
            not all(isinstance(t, torch.Tensor) for t in sample):
        raise KilnError(f"calibration sample {index}: expected a list of {len(graph.inputs)} tensors "
                        f"({', '.join(i.attrs['name'] for i in graph.inputs)}), got {type(sample).__name__}")
    return [t.to(device) for t in sample]


class RowSample:
    """What calibration saw at one GEMM input: the per-channel max |x_j| over every row, and up to ``per_call`` rows of
    each call (evenly strided; float32) for measuring errors on."""

    def __init__(self, per_call: int):
        self.per_call = max(1, per_call)
        self.amax: torch.Tensor | None = None  # [K]
        self.parts: list[torch.Tensor] = []

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()  # [rows, K]
        a = x.abs().amax(0)
        self.amax = a if self.amax is None else torch.maximum(self.amax, a)
        self.parts.append(x[::max(1, -(-x.shape[0] // self.per_call))].clone())

    @property
    def rows(self) -> torch.Tensor:
        """The kept rows [R, K]."""
        return torch.cat(self.parts)
