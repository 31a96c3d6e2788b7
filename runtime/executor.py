"""The static-graph executor.

A graph becomes a :class:`Plan` per concrete shape binding (``{"batch": 2, "seq": 77}``): a flat list
of steps, every attribute evaluated to plain ints, and a buffer plan that puts every intermediate
at a fixed offset of one arena. A call binds the symbols from its inputs, picks (or builds) the
plan and runs the steps, each writing into its planned buffer.

CPU path: a step runs the op's reference implementation and its result is copied into the planned
buffer, so the plan itself is exercised (two values alive at once never share bytes). The GPU path
replaces steps by kernels that write into the same buffers directly and replays them as a CUDA graph:
that is ``runtime/launch.py``'s KernelPlan (backend "kernels", the default on CUDA).
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from ..ir.graph import Graph, Node
from ..ir.ops import OPS, const_tensor
from ..ir.types import ITEMSIZE, eval_attr, eval_dim, has_symbols, torch_dtype
from ..ir.bind import bind_inputs
from .memory import BufferPlan, Interval, plan_memory

# RESHAPE of a planned (contiguous) buffer is a view of it, not a copy
_ALIAS_OPS = frozenset({"RESHAPE"})


@dataclass
class Step:
    node: Node
    fn: object  # (list[Tensor], attrs) -> Tensor
    args: tuple[int, ...]  # slots read
    attrs: dict  # concrete
    out: int  # slot written
    shape: tuple[int, ...]
    dtype: torch.dtype
    mode: str  # "buffer": into its arena view; "alias": view of args[0]; "output": a fresh tensor
    buffer: torch.Tensor | None = None


class Plan:
    """Launch list + buffer plan for one binding of the symbols."""

    def __init__(self, graph: Graph, bindings: dict[str, int], device: torch.device, static: dict[Node, torch.Tensor]):
        self.bindings = dict(bindings)
        slot = {n: k for k, n in enumerate(graph.nodes)}
        self.num_slots = len(graph.nodes)
        self.input_slots = [slot[n] for n in graph.inputs]
        self.output_slots = [slot[n] for n in graph.outputs]
        self.static_values: list = [None] * self.num_slots
        for n, t in static.items():
            self.static_values[slot[n]] = t
        outputs = set(graph.outputs)

        self.steps: list[Step] = []
        for n in graph.nodes:
            if n.op in ("INPUT", "WEIGHT", "CONST"):
                continue
            attrs = {k: eval_attr(v, bindings) if has_symbols(v) else v for k, v in n.attrs.items()}
            shape = tuple(eval_dim(d, bindings) for d in n.shape)
            if n in outputs:
                mode = "output"
            elif n.op in _ALIAS_OPS and n.inputs[0].op not in ("INPUT", "WEIGHT", "CONST") and n.inputs[0] not in outputs:
                mode = "alias"
            else:
                mode = "buffer"
            self.steps.append(Step(n, OPS[n.op].ref, tuple(slot[i] for i in n.inputs), attrs, slot[n],
                                   shape, torch_dtype(n.dtype), mode))

        # liveness: a view keeps the buffer it views alive until its own last use
        root: dict[int, int] = {}
        first: dict[int, int] = {}
        last: dict[int, int] = {}
        for k, s in enumerate(self.steps):
            for a in s.args:
                r = root.get(a)
                if r is not None:
                    last[r] = max(last[r], k)
            if s.mode == "alias":
                root[s.out] = root.get(s.args[0], s.args[0])
            elif s.mode == "buffer":
                root[s.out] = s.out
                first[s.out] = last[s.out] = k
        sizes = {s.out: _nbytes(s.shape, s.node.dtype) for s in self.steps if s.mode == "buffer"}
        self.intervals = [Interval(key, sizes[key], first[key], last[key]) for key in first]
        self.memory: BufferPlan = plan_memory(self.intervals)
        self.arena = torch.empty(self.memory.peak_bytes, dtype=torch.uint8, device=device)
        for s in self.steps:
            if s.mode == "buffer":
                off = self.memory.offsets[s.out]
                raw = self.arena[off: off + sizes[s.out]]
                s.buffer = raw.view(s.dtype).view(s.shape)

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        vals = list(self.static_values)
        for k, t in zip(self.input_slots, inputs):
            vals[k] = t
        for s in self.steps:
            args = [vals[a] for a in s.args]
            if s.mode == "alias":
                vals[s.out] = args[0].view(s.shape)
                continue
            r = s.fn(args, s.attrs)
            if tuple(r.shape) != s.shape or r.dtype != s.dtype:
                raise RuntimeError(f"internal error: {s.node!r} produced {r.dtype}{list(r.shape)}, "
                                   f"planned {s.dtype}{list(s.shape)}")
            if s.mode == "buffer":
                s.buffer.copy_(r)
                vals[s.out] = s.buffer
            else:
                vals[s.out] = torch.empty(s.shape, dtype=s.dtype, device=self.arena.device).copy_(r)
        return [vals[k] for k in self.output_slots]


def _nbytes(shape, dtype: str) -> int:
    n = ITEMSIZE[dtype]
    for d in shape:
        n *= d
    return n


class Executor:
    """Runs a graph; keeps at most ``max_plans`` shape bindings planned (least recently used goes)."""

    def __init__(self, graph: Graph, device: str | torch.device | None = None, max_plans: int = 8, *,
                 backend: str = "auto", cuda_graphs: bool = True, tuner=None):
        graph.verify()
        self.graph = graph
        self.device = _canonical_device(torch.device(device) if device is not None else _weights_device(graph))
        self.max_plans = max_plans
        if backend not in ("auto", "kernels", "reference"):
            raise ValueError(f"unknown executor backend {backend!r} (auto, kernels, reference)")
        self.backend = ("kernels" if self.device.type == "cuda" else "reference") if backend == "auto" else backend
        self.cuda_graphs = cuda_graphs
        self._groups = None
        if self.backend == "kernels" and tuner is None:
            from ..codegen.tuning import Tuner

            tuner = Tuner()
        self.tuner = tuner
        self._adoptable: list[int] = []  # inputs a kernels plan writes in place (keyed by address), once per graph
        if self.backend == "kernels" and graph.updates:
            from .launch import adoptable_updates

            self._adoptable = sorted(adoptable_updates(graph))
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()
        self.static: dict[Node, torch.Tensor] = {}
        for n in graph.nodes:
            if n.op == "WEIGHT":
                self.static[n] = graph.weights[n.attrs["name"]].to(self.device)
            elif n.op == "CONST" and not has_symbols(n.attrs["value"]):
                self.static[n] = const_tensor(n.attrs["value"])

    @property
    def groups(self):
        """The kernel schedule (kernels backend), computed once."""
        if self._groups is None:
            from ..codegen.schedule import schedule

            self._groups = schedule(self.graph)
        return self._groups

    def plan(self, bindings: dict[str, int], inputs: list | None = None):
        """The plan for ``bindings`` (built on first use). ``inputs``: the call's tensors; on the kernels backend an
        input the graph updates in place is adopted by the plan, which is then also keyed by its address."""
        key = tuple(sorted(bindings.items()))
        if self._adoptable and inputs is not None:
            key += tuple((k, inputs[k].data_ptr(), tuple(inputs[k].stride())) for k in self._adoptable)
        p = self._plans.get(key)
        if p is None:
            static = dict(self.static)
            for n in self.graph.nodes:  # CONSTs holding a symbolic dim: their value for this binding
                if n.op == "CONST" and n not in static:
                    static[n] = const_tensor(eval_dim(n.attrs["value"], bindings))
            if self.backend == "kernels":
                from .launch import KernelPlan

                p = KernelPlan(self.graph, self.groups, bindings, self.device, static, self.tuner, cuda_graph=self.cuda_graphs,
                               inputs=inputs)
            else:
                p = Plan(self.graph, bindings, self.device, static)
            self._plans[key] = p
            while len(self._plans) > self.max_plans:
                self._plans.popitem(last=False)
        else:
            self._plans.move_to_end(key)
        return p

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        bindings = bind_inputs(self.graph, inputs)
        for i, (node, t) in enumerate(zip(self.graph.inputs, inputs)):
            if t.device != self.device:
                from ..errors import InputError

                raise InputError(f"input {node.attrs['name']!r} is on {t.device}, the compiled model runs on {self.device}",
                                 hint=f"move it with .to({str(self.device)!r})")
        return self.plan(bindings, inputs).run(inputs)

    @property
    def plans(self) -> list:
        return list(self._plans.values())

    def describe(self) -> dict:
        """How the graph runs: backend, the shape buckets planned (launch counts, implementation choices,
        CUDA graph, arena size), the tuner's decisions by source."""
        d = {"backend": self.backend, "device": str(self.device), "max_plans": self.max_plans,
             "plans": [p.describe() if hasattr(p, "describe") else
                       {"bindings": p.bindings, "steps": len(p.steps), "arena_bytes": p.memory.peak_bytes} for p in self.plans]}
        if self.backend == "kernels":
            from ..codegen.schedule import summary

            d["schedule"] = summary(self.groups)["groups"]
            d["tuning"] = self.tuner.summary()
        return d


def _canonical_device(d: torch.device) -> torch.device:
    """``cuda`` -> ``cuda:<current>``, so it compares equal to the device of tensors created on it."""
    if d.type == "cuda" and d.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return d


def _weights_device(graph: Graph) -> torch.device:
    for t in graph.weights.values():
        return t.device
    return torch.device("cpu")
