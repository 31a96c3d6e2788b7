"""The kernels plan's call list and what it is run as: one :class:`KernelCall` per launch list entry, the collectives'
calls, the output buffer sets a caller may hold (``OutputSet``) and the plan's statistics (``PlanStats``).
``kernel_plan.py`` builds them."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch

from ..codegen.schedule import Group


@dataclass
class KernelCall:
    """One entry of the call list: a group, how it runs, and the implementation chosen for it."""
    group: Group
    kind: str  # pointwise | gemm | matmul | attention | update | rope_kv | copy | collective | reference
    run: object  # () -> None
    choice: str = ""
    takes: KernelCall | None = None  # a call ``run`` makes first (a rope_kv call its decode attention took over)
    options: dict | None = None  # its decision's candidates (name -> run), where refine.py may make it again in the plan
    key: str = ""  # that decision's tuning key


MAX_OUTPUT_SETS = 2  # output buffer sets a caller may hold at once without copies (a loop rebinding `out` needs two)


def use_count(t: torch.Tensor) -> int:
    """References to ``t``'s storage: its tensor, every view of it (a caller's included), and the query's own."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


def collective_call(g: Group, op: str, x: torch.Tensor, attrs: dict, out: torch.Tensor) -> KernelCall:
    """ALL_REDUCE / ALL_GATHER through torch.distributed, straight into the planned buffer ``out``. On NCCL the collective
    is captured in the bucket's CUDA graph and runs at each replay (every rank replays the same graphs in the same
    order: the decode loop runs in lock step). ALL_GATHER gathers into a [world, *x.shape] buffer made with the plan,
    then copies the kept pieces (every ``stride``-th) into ``out`` along ``axis``."""
    import torch.distributed as dist

    world = attrs["world"]
    if world == 1:
        return KernelCall(g, "collective", lambda: out.copy_(x), op.lower())
    if op == "ALL_REDUCE":
        def all_reduce():
            out.copy_(x)
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return KernelCall(g, "collective", all_reduce, "all_reduce")
    ax, stride = attrs["axis"], attrs["stride"]
    flat = torch.empty((world * x.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)  # (gloo's layout)
    kept = flat.view((world,) + tuple(x.shape))[::stride].movedim(0, ax)  # [..., world / stride, n, ...]: the pieces in order along ax
    dst = out.view(kept.shape)

    def all_gather():
        dist.all_gather_into_tensor(flat, x.contiguous())
        dst.copy_(kept)
    return KernelCall(g, "collective", all_gather, "all_gather")


def gather_call(n, args: list, out: torch.Tensor):
    """A gather straight into ``out`` (one ``index_select``, no copy after): EMBEDDING's rows, or INDEX on one axis with
    a 1-d index (an act-order weight's x); None for other nodes or layouts."""
    if not out.is_contiguous():
        return None
    if n.op == "EMBEDDING" and args[0].dim() == 2:
        w, idx, rows = args[0], args[1], out.view(-1, args[0].shape[1])
        return lambda: torch.index_select(w, 0, idx.reshape(-1), out=rows)
    if n.op == "INDEX" and len(n.attrs["axes"]) == 1 and args[1].dim() == 1:
        x, idx, axis = args[0], args[1], n.attrs["axes"][0]
        return lambda: torch.index_select(x, axis, idx, out=out)
    return None


def run_calls(calls: list) -> None:
    for call in calls:
        call.run()


def capture(calls: list, device: torch.device, phase=lambda name: contextlib.nullcontext()):
    """``calls`` as one CUDA graph: run once on a side stream first (Triton compiles, kernel loads: no first-launch work
    may happen during capture), then captured. ``phase(name)``: a context around "warmup" and "capture" (the plan's
    timers). Raises what the capture raises (an op that syncs or allocates on the host)."""
    s = torch.cuda.Stream(device)
    s.wait_stream(torch.cuda.current_stream(device))
    with phase("warmup"), torch.cuda.stream(s):
        run_calls(calls)
        torch.cuda.synchronize(device)
    torch.cuda.current_stream(device).wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with phase("capture"), torch.cuda.graph(graph):
        run_calls(calls)
    return graph


@dataclass
class OutputSet:
    """Buffers for the graph outputs that kernels write (or the values outputs are views of), the calls writing them,
    their CUDA graph. Outputs in these buffers are handed out as aliases of them (the view itself for a view); the set
    is written again only once nothing outside the plan refers to them."""
    buffers: dict  # node (an output, or the value an output views) -> its buffer
    calls: list
    cuda_graph: object
    outputs: list  # the plan's values of every graph output when this set runs
    env: dict = field(default_factory=dict)  # every value as this set's calls read it (views of its buffers kept alive)
    counts: list = field(default_factory=list)  # each buffer's storage use count when nobody else holds it
    direct: frozenset = frozenset()  # indices of the outputs that live in one of ``buffers`` (handed out without a copy)

    def free(self) -> bool:
        return all(use_count(t) == c for t, c in zip(self.buffers.values(), self.counts))

    def run(self) -> None:
        if self.cuda_graph is not None:
            self.cuda_graph.replay()
        else:
            run_calls(self.calls)


@dataclass
class PlanStats:
    launches: dict = field(default_factory=dict)  # kind -> count
    choices: dict = field(default_factory=dict)  # "gemm:cublas" -> count
    build_s: float = 0.0
    cuda_graph: bool = False
    # where the build's time went: layouts (the convs' layout measurements included), memory, buffers, calls (choosing
    # implementations, the tuner's measurements as "tuning"), warmup (the first run: Triton compiles and kernel loads),
    # capture (the CUDA graph)
    phases: dict = field(default_factory=dict)
    refine: dict | None = None  # KILN_REFINE's report where it made decisions again in this plan (refine.refine_set)
    # values stored channels-last, and the layout conversions the convs make per call (``lower.conv_layout_changes``)
    layouts: dict = field(default_factory=dict)
    causal_masks: set = field(default_factory=set)  # ATTENTIONs whose folded mask is the causal triangle: run causal
