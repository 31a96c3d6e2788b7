"""Calibration: the float graph run on example inputs with the reference ops, the inputs of chosen nodes observed.

Shared by the quantization passes (GPTQ's Hessians, SmoothQuant's activation statistics, each quantized GEMM's
measured error). Each sample (a flat list of input tensors, graph order) is evaluated node by node with
``ir/interpret.py``'s ``eval_node``; when a watched node is reached, its callback receives the value of the node's
first input (a GEMM's activations). Streaming: one sample's values at a time, each freed after its last reader.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import KilnError
from ..ir.bind import bind_inputs
from ..ir.graph import Graph, Node
from ..ir.interpret import eval_node


def observe_inputs(graph: Graph, watch: dict[Node, Callable[[torch.Tensor], None]], calibration) -> None:
    """Run ``graph`` on every sample of ``calibration``; ``watch[n](x)`` with x the value of ``n.inputs[0]``."""
    device = graph.weights_device()
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
                if n in watch:
                    watch[n](env[n.inputs[0]])
                for i in n.inputs:
                    if last[i] == k:
                        env.pop(i, None)


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
