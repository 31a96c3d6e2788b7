"""ONE plan protocol: a graph made ready to run at one binding of its symbols (a *shape bucket*).

Every backend's plan (the reference plan below, the kernels plan in ``kernel_plan.py``) is used the same way:

    plan.bind(inputs)      # the plan reads these inputs (copied into its input buffers, or adopted)
    outs = plan.replay()   # run on what the input buffers hold now; the plan's own output tensors
    plan.run(inputs)       # bind + replay, outputs handed out as tensors the caller owns

``input_buffers`` are where the plan reads its inputs: a caller may update them in place between replays
(the LLM decode loop advances tokens and positions that way). After a replay, every input the graph
updates (``Graph.updates``, a KV cache) holds its new value, and that output is the input's tensor itself.

The reference plan runs each op's torch reference and copies the result into its planned buffer, so the
buffer plan itself is exercised on the CPU (two values alive at once never share bytes).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from ..ir.graph import Graph, Node
from ..ir.interpret import eval_node, node_attrs
from ..ir.types import eval_dim, torch_dtype
from .memory import BufferPlan, Interval, Liveness, nbytes


def adoptable_updates(graph: Graph) -> dict[int, tuple[str, Node]]:
    """Input index -> (update output name, INDEX_COPY node) for each input the program writes through one
    INDEX_COPY that is its only reader: those can be written in place in the caller's tensor."""
    index = {n.attrs["name"]: k for k, n in enumerate(graph.inputs)}
    out = {}
    for name, target in graph.updates.items():
        node = graph.outputs[graph.output_names.index(name)]
        k = index[target]
        if node.op == "INDEX_COPY" and node.inputs[0] is graph.inputs[k] and len(graph.inputs[k].users) == 1:
            out[k] = (name, node)
    return out


class Plan(ABC):
    bindings: dict[str, int]
    memory: BufferPlan
    intervals: list[Interval]
    input_buffers: list[torch.Tensor | None]

    @abstractmethod
    def bind(self, inputs: list[torch.Tensor]) -> None:
        """Make the plan read ``inputs`` (which fit its binding)."""

    @abstractmethod
    def replay(self) -> list[torch.Tensor]:
        """Run on the input buffers as they are; returns the plan's output tensors (valid until the next replay)."""

    @abstractmethod
    def describe(self) -> dict:
        """How this bucket runs: its bindings, launches, choices, arena size."""

    def handout(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """``outputs`` of a replay as tensors the caller may keep (default: they already are)."""
        return outputs

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        self.bind(inputs)
        return self.handout(self.replay())


# RESHAPE of a planned (contiguous) buffer is a view of it, not a copy
_ALIAS_OPS = frozenset({"RESHAPE"})


@dataclass
class RefStep:
    node: Node
    args: tuple[int, ...]  # slots read
    attrs: dict  # concrete
    out: int  # slot written
    shape: tuple[int, ...]
    dtype: torch.dtype
    mode: str  # "buffer": into its arena view; "alias": view of args[0]; "output": a fresh tensor
    buffer: torch.Tensor | None = None


class ReferencePlan(Plan):
    """Each op's torch reference, writing into planned buffers of one arena; graph outputs are fresh tensors."""

    def __init__(self, graph: Graph, bindings: dict[str, int], device: torch.device, static: dict[Node, torch.Tensor]):
        self.bindings = dict(bindings)
        slot = {n: k for k, n in enumerate(graph.nodes)}
        self.input_slots = [slot[n] for n in graph.inputs]
        self.output_slots = [slot[n] for n in graph.outputs]
        self.static_values: list = [None] * len(graph.nodes)
        for n, t in static.items():
            self.static_values[slot[n]] = t
        names = {n.attrs["name"]: k for k, n in enumerate(graph.inputs)}
        # output index -> index of the input whose new value it is
        self.updates = {graph.output_names.index(o): names[i] for o, i in graph.updates.items()}
        self.steps = self._steps(graph, slot)
        self.intervals, self.memory = self._liveness().plan()
        self.arena = torch.empty(self.memory.peak_bytes, dtype=torch.uint8, device=device)
        for s in self.steps:
            if s.mode == "buffer":
                off = self.memory.offsets[s.out]
                s.buffer = self.arena[off: off + self.memory.sizes[s.out]].view(s.dtype).view(s.shape)
        self.input_buffers = [None] * len(graph.inputs)

    def _steps(self, graph: Graph, slot: dict) -> list[RefStep]:
        outputs = set(graph.outputs)
        steps = []
        for n in graph.nodes:
            if n.op in ("INPUT", "WEIGHT", "CONST"):
                continue
            if n in outputs:
                mode = "output"
            elif n.op in _ALIAS_OPS and n.inputs[0].op not in ("INPUT", "WEIGHT", "CONST") and n.inputs[0] not in outputs:
                mode = "alias"
            else:
                mode = "buffer"
            shape = tuple(eval_dim(d, self.bindings) for d in n.shape)
            steps.append(RefStep(n, tuple(slot[i] for i in n.inputs), node_attrs(n, self.bindings), slot[n], shape,
                                 torch_dtype(n.dtype), mode))
        return steps

    def _liveness(self) -> Liveness:
        """A view keeps the buffer it views alive until its own last use."""
        lv = Liveness()
        root: dict[int, int] = {}
        for k, s in enumerate(self.steps):
            for a in s.args:
                lv.read(root.get(a), k)
            if s.mode == "alias":
                root[s.out] = root.get(s.args[0], s.args[0])
            elif s.mode == "buffer":
                root[s.out] = s.out
                lv.write(s.out, k, nbytes(s.shape, s.node.dtype))
        return lv

    def bind(self, inputs: list[torch.Tensor]) -> None:
        self.input_buffers = list(inputs)  # read in place: the reference ops never write their inputs

    def replay(self) -> list[torch.Tensor]:
        vals = list(self.static_values)
        for k, t in zip(self.input_slots, self.input_buffers):
            vals[k] = t
        for s in self.steps:
            args = [vals[a] for a in s.args]
            if s.mode == "alias":
                vals[s.out] = args[0].view(s.shape)
                continue
            r = eval_node(s.node, args, self.bindings, s.attrs)
            if tuple(r.shape) != s.shape or r.dtype != s.dtype:
                raise RuntimeError(f"internal error: {s.node!r} produced {r.dtype}{list(r.shape)}, "
                                   f"planned {s.dtype}{list(s.shape)}")
            if s.mode == "buffer":
                vals[s.out] = s.buffer.copy_(r)
            else:
                vals[s.out] = torch.empty(s.shape, dtype=s.dtype, device=self.arena.device).copy_(r)
        outs = [vals[k] for k in self.output_slots]
        for o, i in self.updates.items():  # the updated inputs receive their new values
            outs[o] = self.input_buffers[i].copy_(outs[o])
        return outs

    def describe(self) -> dict:
        return {"bindings": self.bindings, "steps": len(self.steps), "arena_bytes": self.memory.peak_bytes}
