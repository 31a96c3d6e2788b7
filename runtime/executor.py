"""The static-graph executor: a graph becomes one plan per concrete shape binding (``{"batch": 2, "seq": 77}``),
every plan implementing the one protocol of ``plan.py``. A call binds the symbols from its inputs, picks (or
builds) the plan of that shape bucket and runs it.

The target's backend decides the plan: "reference" (each op's torch reference over planned buffers: the CPU
path) or "kernels" (``kernel_plan.py``: the schedule as Triton / cuBLAS / SDPA calls over one arena, replayed
as a CUDA graph; the default on CUDA).
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from ..codegen.schedule import schedule, summary
from ..errors import InputError
from ..ir.bind import bind_inputs
from ..ir.graph import Graph, Node
from ..ir.ops import const_tensor
from ..ir.types import eval_dim, has_symbols
from .kernel_plan import KernelPlan
from .plan import Plan, ReferencePlan, adoptable_updates
from .target import Target


class Executor:
    """Runs a graph on a :class:`Target`; keeps at most ``target.max_plans`` shape buckets planned (least
    recently used goes). Without a target: the default config's, on the device of the graph's weights."""

    def __init__(self, graph: Graph, target: Target | None = None):
        graph.verify()
        self.graph = graph
        self.target = target or Target.from_config(default_device=_weights_device(graph))
        self.device = self.target.device
        self._groups = None
        # inputs a kernels plan writes in place (plans are then keyed by their address), once per graph
        self._adoptable = sorted(adoptable_updates(graph)) if self.backend == "kernels" and graph.updates else []
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()
        self.static: dict[Node, torch.Tensor] = {}
        for n in graph.nodes:
            if n.op == "WEIGHT":
                self.static[n] = graph.weights[n.attrs["name"]].to(self.device)
            elif n.op == "CONST" and not has_symbols(n.attrs["value"]):
                self.static[n] = const_tensor(n.attrs["value"])

    @property
    def backend(self) -> str:
        return self.target.backend

    @property
    def tuner(self):
        return self.target.tuner

    @property
    def groups(self):
        """The kernel schedule (kernels backend), computed once."""
        if self._groups is None:
            self._groups = schedule(self.graph)
        return self._groups

    def plan(self, bindings: dict[str, int], inputs: list | None = None) -> Plan:
        """The plan for ``bindings`` (built on first use). ``inputs``: the call's tensors; on the kernels backend an
        input the graph updates in place is adopted by the plan, which is then also keyed by its address."""
        key = tuple(sorted(bindings.items()))
        if self._adoptable and inputs is not None:
            key += tuple((k, inputs[k].data_ptr(), tuple(inputs[k].stride())) for k in self._adoptable)
        p = self._plans.get(key)
        if p is not None:
            self._plans.move_to_end(key)
            return p
        static = dict(self.static)
        for n in self.graph.nodes:  # CONSTs holding a symbolic dim: their value for this binding
            if n.op == "CONST" and n not in static:
                static[n] = const_tensor(eval_dim(n.attrs["value"], bindings))
        if self.backend == "kernels":
            p = KernelPlan(self.graph, self.groups, bindings, self.target, static, inputs=inputs)
        else:
            p = ReferencePlan(self.graph, bindings, self.device, static)
        self._plans[key] = p
        while len(self._plans) > self.target.max_plans:
            self._plans.popitem(last=False)
        return p

    def plan_for(self, inputs: list[torch.Tensor]) -> Plan:
        """The plan of the shape bucket these inputs fall in; raises :class:`InputError` when they do not fit."""
        bindings = bind_inputs(self.graph, inputs)
        for node, t in zip(self.graph.inputs, inputs):
            if t.device != self.device:
                raise InputError(f"input {node.attrs['name']!r} is on {t.device}, the compiled model runs on {self.device}",
                                 hint=f"move it with .to({str(self.device)!r})")
        return self.plan(bindings, inputs)

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        return self.plan_for(inputs).run(inputs)

    @property
    def plans(self) -> list[Plan]:
        return list(self._plans.values())

    def describe(self) -> dict:
        """How the graph runs: backend, the shape buckets planned (launch counts, implementation choices,
        CUDA graph, arena size), the tuner's decisions by source."""
        d = {"backend": self.backend, "device": str(self.device), "max_plans": self.target.max_plans,
             "plans": [p.describe() for p in self.plans]}
        if self.backend == "kernels":
            d["schedule"] = summary(self.groups)["groups"]
            d["tuning"] = self.tuner.summary()
        return d


def _weights_device(graph: Graph) -> torch.device:
    for t in graph.weights.values():
        return t.device
    return torch.device("cpu")
