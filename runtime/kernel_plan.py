"""The kernels plan: a graph's schedule as a flat list of kernel calls over planned buffers, replayed as a
CUDA graph. One :class:`KernelPlan` per concrete shape binding (a *shape bucket*); it implements the plan
protocol of ``plan.py``. Built in four named steps:

1. Layouts (:meth:`KernelPlan._layouts`). Every value gets a meta tensor (shape and strides): inputs and
   kernel outputs are contiguous (or stored permuted: attention outputs read back through a permute, and values
   between convolutions channels-last where the convolutions measure faster so, ``layouts.py``), weights keep
   theirs, a view group (PERMUTE / SLICE / EXPAND / RESHAPE) is evaluated on its operand's meta tensor, so the
   plan knows which views are free (a RESHAPE that torch cannot express as a view becomes a copy kernel).
   Values that depend on no input are computed now (shape-dependent ones too: HF's causal mask and RoPE tables
   built from the positions), and an ATTENTION whose mask so computed is the causal triangle runs causal without it.
2. Memory (:meth:`KernelPlan._memory`). Every kernel output is an interval [group that writes it, last group
   that reads it or a view of it]; graph outputs live to the end; a GEMM adding a residual read by nothing after it
   writes over the residual's buffer (``_inplace_residuals``, decided with the layouts); a cuBLAS GLU needs a scratch [M, 2N] for
   one step, an SDPA prefill on a quantized KV cache the cache dequantized, a skinny (decode) GEMM's split-K its
   workspace (the largest its candidates need, planned before the tuner picks one) and its counters (alive over
   the whole plan, so zero from the arena's allocation on: each call leaves them zero), an AQGEMM the codes +
   scales of its x (from the kernel producing x to the last AQGEMM reading them, where that kernel may store them:
   the float x then lives inside that step only). The intervals are packed into one arena (``memory.py``); inputs
   get their own static buffers, and so do graph outputs a kernel writes and the values outputs are views of
   (handed to the caller without a copy: ``kernel_calls.OutputSet``).
3. Calls (:meth:`KernelPlan._calls`). Each group becomes one closure over fixed tensors: a pointwise group
   its generated Triton kernel; a GEMM or attention the fastest of its candidates (``codegen/lower.py``,
   measured per shape by the target's tuner); anything else its torch reference, copied into the buffer.
4. Capture. On CUDA the call list is warmed up once (Triton compiles, choices are measured) and captured
   into a CUDA graph; :meth:`replay` replays it. Without CUDA graphs (or on the CPU, with the Triton
   interpreter in tests) the calls run in order.
"""
from __future__ import annotations

import math
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch

from ..codegen import lower, lower_attention
from ..codegen.pointwise import launch
from ..codegen.schedule import (VIEW_OPS, Group, norm_prologue, rope_kv_core, rope_kv_parts, rope_kv_reader, rope_norm,
                                rope_norm_parts)
from ..codegen.tuning import compile_ahead
from ..ir.graph import Graph, Node
from ..ir.interpret import eval_node, node_attrs
from ..ir.ops import attention_operands, index_copy
from ..ir.ops_collective import COLLECTIVE_OPS
from ..ir.ops_fused import AQ_FORMATS, aqgemm_operands
from ..ir.types import eval_dim, torch_dtype
from .kernel_calls import MAX_OUTPUT_SETS, KernelCall, OutputSet, PlanStats, capture, collective_call, gather_call, use_count
from . import refine, warm_libs
from .layouts import CHANNELS_LAST, channels_last_values, empty_in_order, inverse, row_pitch, stored_order
from .memory import Liveness, nbytes
from .plan import Plan, adoptable_updates


# kinds of call that may launch Triton kernels, run by the survey with the launches recorded (not "update", "copy",
# "reference": their torch ops would write state or read indices that skipped kernels did not compute)
_COMPILED = ("pointwise", "gemm", "attention", "conv", "group_norm", "rope_kv", "quantize")
FOLD_MAX_STATIC = 1 << 16  # elements of a weight / constant a pointwise group folded at plan time may read
FOLD_MAX_BYTES = 1 << 28  # bytes a folded pointwise group's values may take while it is evaluated


@dataclass
class _Value:
    meta: torch.Tensor  # shape and strides
    root: int | None  # slot of the arena buffer this value is (a view of); None: input / weight / const


def _codes_scales_at(shape) -> int:
    """Where the float32 scales of codes [..., K] (one byte each) begin in their buffer: after the codes, 256-aligned."""
    return -(-math.prod(shape) // 256) * 256


def _scales_shape(shape, group: int) -> tuple:
    """The scales of codes [..., K]: [...] (one a row), or [..., K / group]."""
    return tuple(shape[:-1]) + ((shape[-1] // group,) if group else ())


def _reads(g: Group, kind: str) -> list[Node]:
    """The values group ``g`` reads as it runs (an update, the caller's tensor written in place: its index and source)."""
    return g.inputs if kind != "update" else g.nodes[0].inputs[1:]


def _meta(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")


class KernelPlan(Plan):
    """Call list + buffer plan (+ CUDA graph) for one binding of the symbols."""

    def __init__(self, graph: Graph, groups: list[Group], bindings: dict[str, int], target,
                 static: dict[Node, torch.Tensor], inputs: list | None = None):
        t0 = time.perf_counter()
        warm_libs.wait()  # (no other thread's CUDA calls while this plan measures and captures)
        self.stats = PlanStats()
        self.graph, self.groups, self.bindings, self.target = graph, groups, dict(bindings), target
        self.device = target.device
        # an input the program updates through one INDEX_COPY (a KV cache) is written in place: the plan adopts
        # the caller's tensor (the executor keys plans by its address) instead of a static copy of it
        self.adopted = adoptable_updates(graph) if inputs is not None else {}
        # a rope_kv group writes its caches in place: only where both are adopted, else its four parts
        inplace = {node for _, node in self.adopted.values()}
        self.groups = [p for g in groups for p in ([g] if g.kind != "rope_kv" or set(rope_kv_core(g)[2:]) <= inplace else rope_kv_parts(g))]
        self.slot = {n: k for k, n in enumerate(graph.nodes)}
        self.shape_of = {n: tuple(eval_dim(d, bindings) for d in n.shape) for n in graph.nodes}
        with self._phase("layouts"):
            self._layouts(static)
        self.takeover = self._rope_takeovers()
        with self._phase("memory"):
            self._memory()
        with self._phase("buffers"):
            self._buffers(inputs)
        self.cuda_graph_error = None
        self.compiled_ahead: dict | None = None  # the survey's compile statistics (compile_pool.CompilePool.compile)
        self.sets: list[OutputSet] = []  # the output buffers the caller may hold, with the calls writing them
        self._private: OutputSet | None = None  # written when the caller holds every set's outputs: copies go out
        tuned = target.tuner.seconds
        self.sets.append(self._new_set())
        refine.refine_set(self, self.sets[0])  # (KILN_REFINE: its decode GEMMs' decisions made again in the step)
        self.stats.phases["tuning"] = round(target.tuner.seconds - tuned, 4)
        self.stats.phases["calls"] = round(self.stats.phases["calls"] - self.stats.phases["tuning"], 4)
        self.calls = self.sets[0].calls
        self._current = self.sets[0]
        self.output_values = self._current.outputs
        self._state_ids = {id(self.env[graph.inputs[k]]) for k in self.adopted}
        for call in (t for c in self.calls for t in (c.takes, c) if t is not None):
            self.stats.launches[call.kind] = self.stats.launches.get(call.kind, 0) + 1
            if call.choice:
                c = f"{call.kind}:{call.choice.split(':')[0]}"
                self.stats.choices[c] = self.stats.choices.get(c, 0) + 1
        self.stats.layouts = self._layout_stats()
        self.stats.build_s = time.perf_counter() - t0

    def _layout_stats(self) -> dict:
        """How many values are stored channels-last; how many layout conversions (x into the layout a conv computes in,
        its result into its buffer's) the chosen convs make per call."""
        changes = 0
        for call in self.calls:
            if call.kind == "conv":
                n = call.group.nodes[-1]
                changes += lower.conv_layout_changes(call.choice, self.env[n.inputs[0]], self.env[n])
        stored = sum(o in self.channels_last for o in self.order)  # (a RESHAPE that came out a view has no order)
        return {"channels_last": stored, "conv_layout_changes": changes}

    @contextmanager
    def _phase(self, name: str):
        t0 = time.perf_counter()
        yield
        self.stats.phases[name] = round(self.stats.phases.get(name, 0.0) + time.perf_counter() - t0, 4)

    # -- 1. layouts -----------------------------------------------------------------------------------------
    def _layouts(self, static: dict) -> None:
        """``self.val``: node -> _Value; ``self.kinds``: the kind of each group as it runs; ``self.real``: tensors
        known now (weights, constants, values that depend on no input), on the device (a CUDA graph cannot read
        host memory); ``self.order``: outputs stored in a permuted dim order (see layouts.stored_order), among them the
        ``self.channels_last`` values (``layouts.py``)."""
        inplace = {node for _, node in self.adopted.values()}
        folded: set[Node] = set()  # values computed now from others known now (not the static weights / constants)
        self._causal_masks: dict[tuple, bool] = {}  # (folded mask, queries, keys) -> is it the causal triangle
        self.real = {n: t.to(self.device) for n, t in static.items()}
        self.val = {n: _Value(_meta(t), None) for n, t in self.real.items()}
        for n in self.graph.inputs:
            self.val[n] = _Value(torch.empty(self.shape_of[n], dtype=torch_dtype(n.dtype), device="meta"), None)
        self.order: dict[Node, tuple] = {}
        self.pitch: dict[Node, int] = {}  # GEMM outputs whose rows are padded (see _pitch)
        self.channels_last = channels_last_values(self.graph, self.groups, self.shape_of, self._conv_layout)
        self.kinds: list[str] = []
        for g in self.groups:
            if g.nodes[0] in inplace:
                self.val[g.nodes[0]] = self.val[g.nodes[0].inputs[0]]  # the adopted input itself
                self.kinds.append("update")
            elif g.kind == "rope_kv":  # (its caches adopted: see __init__) roped q in a buffer, the caches in place
                q, _, kc, vc = rope_kv_core(g)
                self.val.update({n: self.val[n.inputs[0]] for n in (kc, vc)})
                self.val[q] = _Value(self._empty(q, "meta"), self.slot[q])
                self.kinds.append("rope_kv")
            elif g.kind in ("view", "reference") and all(i in self.real for i in g.inputs) or self._foldable(g, folded):
                self._constant(g)
                folded.update(g.nodes)
                self.kinds.append("constant")
            else:
                self.kinds.append(self._layout(g))
        # folded values only other folded values read are dropped (a mask's comparisons: a [seq, seq] tensor each)
        read = {i for g, kind in zip(self.groups, self.kinds) if kind != "constant" for i in g.inputs} | set(self.graph.outputs)
        for n in folded - read:
            del self.real[n]
        self.inplace = self._inplace_residuals()

    def _inplace_residuals(self) -> dict[Node, Node]:
        """GEMM output -> the residual it is written over: where a GEMM / QGEMM / AQGEMM group adds a residual whose
        buffer nothing reads after it (no later group, no graph output) and which has the output's shape, strides and
        dtype, its output takes the residual's buffer (``val`` roots remapped) instead of one of its own: cuBLAS's
        beta-add then needs no copy of the residual into the output first (a Llama-3.2-1B prefill of 2048 tokens: 32
        device copies, 0.18 ms, H200), and every other candidate reads each residual element before writing that
        element (``lower``: ``_cublas`` puts its product elsewhere then). Not where the group reads the residual's
        buffer as anything else (a norm prologue's x: its fused candidates read x whole while other programs write)."""
        last: dict[int, int] = {}
        for k, (g, kind) in enumerate(zip(self.groups, self.kinds)):
            if kind in ("view", "source", "constant"):
                continue
            for i in _reads(g, kind):
                if i in self.val and self.val[i].root is not None:
                    last[self.val[i].root] = k
        for o in self.graph.outputs:
            if o in self.val and self.val[o].root is not None:
                last[self.val[o].root] = len(self.groups)
        alias = {}
        for k, (g, kind) in enumerate(zip(self.groups, self.kinds)):
            n = g.nodes[-1]
            if kind != "gemm" or n.op not in ("GEMM", "QGEMM", "AQGEMM") or not n.attrs["residual"] or n not in g.outputs:
                continue
            r = n.inputs[-1]  # (the residual is a fused GEMM's last operand: ir/ops_fused.py)
            rv, ov = self.val.get(r), self.val[n]
            if rv is None or rv.root != self.slot[r] or last.get(rv.root) != k or r in alias.values():
                continue
            if last.get(self.slot[n]) == len(self.groups):  # (a graph output, or a view of one: its buffer is its own)
                continue
            if any(x in self.order or x in self.pitch for x in (r, n)) or rv.meta.dtype != ov.meta.dtype:
                continue
            if rv.meta.shape != ov.meta.shape or rv.meta.stride() != ov.meta.stride():
                continue
            operands = [i for node in g.nodes for i in node.inputs]
            operands.remove(r)  # (one residual operand; x may be r too: then it is read across K while others write)
            if any(i in self.val and self.val[i].root == rv.root for i in operands):
                continue
            alias[n] = r
        for n, r in alias.items():  # n's buffer (and every view of it) is r's
            old, new = self.slot[n], self.val[r].root
            for v in self.val.values():
                if v.root == old:
                    v.root = new
        return alias

    def _foldable(self, g: Group, folded: set) -> bool:
        """A pointwise group computed once now instead of at every call: every input is known now (a weight or constant
        of at most FOLD_MAX_STATIC elements, or a value folded before: what depends on shape symbols alone, which the
        compile-time folding could not evaluate: HF's causal mask from the positions, RoPE's tables), no output is a
        graph output, and its values stay under FOLD_MAX_BYTES. Large weights are left to the kernels: a folded copy of
        one would be kept per plan."""
        if g.kind != "pointwise" or any(o in self.graph.outputs for o in g.outputs):
            return False
        if not all(i in folded or (i in self.real and self.real[i].numel() <= FOLD_MAX_STATIC) for i in g.inputs):
            return False
        return sum(nbytes(self.shape_of[n], n.dtype) for n in g.nodes) <= FOLD_MAX_BYTES

    def _conv_layout(self, n: Node) -> int:
        """+1 / -1: conv ``n`` alone runs faster with x and its result channels-last / NCHW at this shape, as the tuner
        measures it (``lower.conv_layouts``); 0: no such choice (its weight is not static, or it runs the reference)."""
        w = n.inputs[1]
        choice = None
        if w in self.real:
            choice = lower.conv_layouts(self.shape_of[n.inputs[0]], self.real[w], node_attrs(n, self.bindings), self.device)
        if choice is None:
            return 0
        return 1 if self.target.tuner.choose("conv_layout", *choice, self.device) == "nhwc" else -1

    def _constant(self, g: Group) -> None:
        for n in g.nodes:
            self.real[n] = eval_node(n, [self.real[i] for i in n.inputs], self.bindings).to(self.device)
            self.val[n] = _Value(_meta(self.real[n]), None)

    def _layout(self, g: Group) -> str:
        """The group's kind as it runs ("view" -> "copy" when a view is not expressible) and its outputs' layouts."""
        kind = g.kind
        if kind == "reference" and g.nodes[0].op in VIEW_OPS:
            kind = "view"  # a RESHAPE the schedule could not prove a view: the layouts decide
        if kind == "view":
            metas = {}
            for n in g.nodes:
                src = self.val[n.inputs[0]] if n.inputs[0] in self.val else metas[n.inputs[0]]
                args = [src.meta] + [self.val[i].meta if i in self.val else metas[i].meta for i in n.inputs[1:]]
                r = eval_node(n, args, self.bindings)
                if not (r._is_view() or r is src.meta):
                    kind = "copy"  # not expressible as a view of its operand: a copy kernel
                    break
                metas[n] = _Value(r, src.root)
            if kind == "view":
                self.val.update(metas)
                return kind
        if kind != "source":
            outputs = set(self.graph.outputs)  # (returned to the caller: kept in their own order)
            for o in g.outputs:
                perm = stored_order(o) if kind in ("attention", "pointwise") and o not in outputs else None
                if o in self.channels_last:
                    perm = CHANNELS_LAST
                if perm is not None:
                    self.order[o] = perm
                if kind == "gemm" and row_pitch(self.shape_of[o]) is not None:
                    self.pitch[o] = row_pitch(self.shape_of[o])
                self.val[o] = _Value(self._empty(o, "meta"), self.slot[o])
        return kind

    def _empty(self, o: Node, device) -> torch.Tensor:
        """A new tensor for value ``o``: in its stored dim order, rows padded to its pitch (a view of them)."""
        shape, dtype = self.shape_of[o], torch_dtype(o.dtype)
        if o in self.pitch:
            return torch.empty(shape[:-1] + (self.pitch[o],), dtype=dtype, device=device)[..., :shape[-1]]
        return empty_in_order(shape, self.order.get(o), dtype, device)

    def _nbytes(self, o: Node) -> int:
        shape = self.shape_of[o]
        return nbytes(shape[:-1] + (self.pitch[o],) if o in self.pitch else shape, o.dtype)

    # -- 2. memory ------------------------------------------------------------------------------------------
    def _memory(self) -> None:
        """Intervals over group steps, packed into one arena; ``self.scratch``: group index -> (key, shape, dtype) of a
        cuBLAS GLU's [M, 2N] product, of a group norm's float32 partial statistics, or of the dequantized KV cache an
        ATTENTION's SDPA candidate reads (prefill on a quantized cache)."""
        lv = Liveness()
        self.scratch: dict[int, tuple] = {}
        self.workspace: dict[int, tuple] = {}
        self.counters: dict[int, tuple] = {}
        self.prologue: dict[int, int] = {}  # gemm group index -> key of its norm prologue's output
        self.codes: dict[Node, int] = {}  # output x its kernel may store as AQGEMM codes -> key of codes + scales
        self.quantizing: dict[int, int] = {}  # AQGEMM group index -> key of the codes + scales it quantizes its x into
        for k, (g, kind) in enumerate(zip(self.groups, self.kinds)):
            if kind in ("view", "source", "constant"):
                continue
            rope = self.groups[self.takeover[k]].inputs if k in self.takeover else []  # (its rope_kv's reads: run here)
            for i in [*_reads(g, kind), *rope]:
                if not (kind == "gemm" and i in self.codes):  # (an AQGEMM reads x's codes instead: _act_codes)
                    lv.read(self.val[i].root if i in self.val else None, k)
            if k in self.takeover:  # (and its roped-k scratch)
                lv.read(-1 - self.takeover[k], k)
            self._act_codes(lv, k, g, kind)
            for o in g.outputs if kind != "rope_kv" else rope_kv_core(g)[:1]:
                if o not in self.inplace:  # (written over its residual: that buffer's interval, read on)
                    lv.write(self.slot[o], k, self._nbytes(o))
            n = g.nodes[-1]  # (a gemm group's GEMM comes after its norm prologue)
            if kind == "gemm" and len(g.nodes) > 1:  # the normalised x, written and read inside this step
                self.prologue[k] = -1 - 2 * len(self.groups) - k
                lv.write(self.prologue[k], k, self._nbytes(g.nodes[0]))
            if kind == "gemm" and n.op in ("GEMM", "QGEMM") and n.attrs["glu"]:
                shape = (math.prod(self.shape_of[n.inputs[0]][:-1]), self.shape_of[n.inputs[1]][0])
                self.scratch[k] = (-1 - k, shape, n.dtype)
            if kind == "group_norm":
                self.scratch[k] = (-1 - k, lower.group_norm_scratch(self.shape_of[n.inputs[0]], n.attrs["groups"]), "float32")
            if kind == "attention" and (shape := self._attention_scratch(n)):
                self.scratch[k] = (-1 - k, shape, n.dtype)
            if kind == "rope_kv":  # roped k, where the separate kernels put it before the cache write
                self.scratch[k] = (-1 - k, self.shape_of[rope_kv_core(g)[1]], rope_kv_core(g)[1].dtype)
            if k in self.scratch:
                lv.write(-1 - k, k, nbytes(self.scratch[k][1], self.scratch[k][2]))
            if kind == "gemm":
                self._workspace(lv, k, n)
            if kind == "attention":
                self._counters(lv, k, lower_attention.attention_counter_bytes(
                    self.shape_of[n.inputs[0]], self.shape_of[n.inputs[1]], n.attrs, torch_dtype(n.dtype), self.device))
        for o in self.graph.outputs:
            lv.read(self.val[o].root, len(self.groups))
        # a graph output a kernel writes, or the value an output is a view of, gets buffers of its own, outside the
        # arena, which are handed to the caller without a copy (see OutputSet and _own_values)
        self.own = self._own_values()
        self._own_slots = {self.slot[o]: o for o in self.own}
        for o in self.own:
            del lv.first[self.slot[o]], lv.last[self.slot[o]], lv.sizes[self.slot[o]]
        self.intervals, self.memory = lv.plan()
        self.arena = torch.zeros(max(self.memory.peak_bytes, 1), dtype=torch.uint8, device=self.device)

    def _own_values(self) -> list[Node]:
        """The values with buffers of their own: each graph output a kernel writes, and each kernel-written value a
        graph output is a view of, when the view holds at least half of it and no more (a padded GEMM's [..., :N],
        ``passes/pad_gemm.py``: handed out as that view, row stride and all; a smaller view, say the last position's
        logits, is copied out instead, so that each output set does not keep a whole root). A rope_kv group's q is
        written into the arena by its call (``_rope_kv``): an output of it is copied out."""
        roped = {rope_kv_core(g)[0] for g, kind in zip(self.groups, self.kinds) if kind == "rope_kv"}
        own = {}
        for o in self.graph.outputs:
            root = self.val[o].root
            if root is None or self.graph.nodes[root] in roped:
                continue
            r = self.graph.nodes[root]
            view, whole = math.prod(self.shape_of[o]), math.prod(self.shape_of[r])
            if r is o or whole <= 2 * view <= 2 * whole:
                own[r] = None
        return list(own)

    def _attention_scratch(self, n: Node) -> tuple | None:
        """The scratch an ATTENTION on a quantized KV cache needs for its SDPA candidate (``lower_attention.attention_scratch``)."""
        q, k, v = (self.shape_of[i] for i in n.inputs[:3])
        return lower_attention.attention_scratch(q, k, v, n.attrs, torch_dtype(n.dtype), self.device)

    def _workspace(self, lv: Liveness, k: int, n: Node) -> None:
        """``self.workspace[k]``: (key, bytes) of the split-K workspace of gemm group k's skinny candidates, if any, and
        ``self.counters[k]`` of their split-K counters. The counters are state, not scratch: they must be zero when a
        call starts and each call leaves them zero, so they live from the first step past the last (no other buffer
        ever shares their bytes) in the arena, which is zeroed when allocated: no memset per call or replay."""
        x, w = n.inputs[0], n.inputs[1]
        shapes = (n.op, n.attrs, self.shape_of[x], self.shape_of[w], torch_dtype(x.dtype), self.device)
        size = lower.workspace_bytes(*shapes)
        if size:
            self.workspace[k] = (-1 - len(self.groups) - k, size)  # (keys apart from the scratch's)
            lv.write(self.workspace[k][0], k, size)
        self._counters(lv, k, lower.counter_bytes(*shapes))

    def _counters(self, lv: Liveness, k: int, count: int) -> None:
        """``self.counters[k]``: (key, bytes) of group k's counters (split-K GEMMs, one-launch split-KV attention), alive
        over the whole plan (see ``_workspace``)."""
        if count:
            self.counters[k] = (-1 - 3 * len(self.groups) - k, count)  # (apart from the prologue's too)
            lv.write(self.counters[k][0], 0, count)
            lv.read(self.counters[k][0], len(self.groups))

    def _act_codes(self, lv: Liveness, k: int, g: Group, kind: str) -> None:
        """The codes + scales of AQGEMM inputs: written by group k (pointwise, or an AQGEMM's) for each output in
        ``g.codes`` (read by the AQGEMMs instead of x), or by AQGEMM group k's own quantizer call when its x has none."""
        # keys apart from the counters' and from each other: x's codes, and an AQGEMM node's own quantizer's codes
        key = lambda n, own=False: -1 - 4 * len(self.groups) - (len(self.graph.nodes) if own else 0) - self.slot[n]  # noqa: E731
        def size(x, group):
            return _codes_scales_at(self.shape_of[x]) + 4 * math.prod(_scales_shape(self.shape_of[x], group))
        n = g.nodes[-1]
        if kind == "gemm" and n.op == "AQGEMM":
            x = n.inputs[0]
            if x in self.codes:
                lv.read(self.codes[x], k)
            elif lower.quantizes(torch_dtype(x.dtype), self.device):
                self.quantizing[k] = key(n, own=True)
                lv.write(key(n, own=True), k, size(x, n.attrs.get("act_group", 0)))
        if kind in ("pointwise", "gemm"):  # (a gemm group's: its AQGEMM's output, ``lower.coded_aqgemm``)
            for x, c in g.codes.items():
                if lower.quantizes(torch_dtype(x.dtype), self.device):
                    self.codes[x] = key(x)
                    lv.write(key(x), k, size(x, c.group))

    def _codes_buffers(self, key: int, x: Node, fmt: str, group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes [..., K], scales [...] or [..., K / group]) of x in the arena at ``key``: the codes (one byte each),
        then the float32 scales (``_codes_scales_at``)."""
        shape, off = self.shape_of[x], self.memory.offsets[key]
        at, scales = off + _codes_scales_at(shape), _scales_shape(shape, group)
        q = self.arena[off: off + math.prod(shape)].view(torch_dtype(AQ_FORMATS[fmt])).view(shape)
        return q, self.arena[at: at + 4 * math.prod(scales)].view(torch.float32).view(scales)

    def _buffer(self, key: int, shape, dtype: torch.dtype, perm=None, pitch=None) -> torch.Tensor:
        off = self.memory.offsets[key]
        raw = self.arena[off: off + self.memory.sizes[key]].view(dtype)
        if pitch is not None:
            return raw.view(tuple(shape[:-1]) + (pitch,))[..., :shape[-1]]
        if perm is None:
            return raw.view(shape)
        return raw.view([shape[p] for p in perm]).permute(inverse(perm))

    def _buffers(self, inputs: list | None) -> None:
        """``self.env``: node -> its real tensor (static, input buffer, arena buffer, or a view of one)."""
        self.env: dict[Node, torch.Tensor] = dict(self.real)
        self.input_buffers = []
        for k, n in enumerate(self.graph.inputs):
            if k in self.adopted:
                self.env[n] = inputs[k]
                self.input_buffers.append(None)
                continue
            self.env[n] = torch.zeros(self.shape_of[n], dtype=torch_dtype(n.dtype), device=self.device)
            if inputs is not None:  # the warm-up before capture then computes what this call asks for
                self.env[n].copy_(inputs[k])
            self.input_buffers.append(self.env[n])

    # -- 3. calls -------------------------------------------------------------------------------------------
    def _calls(self) -> list[KernelCall]:
        calls, self._ropes, self._taken = [], {}, set()  # (attention -> (RopeStep, rope_kv call), calls taken: ``_rope_kv``)
        # what a GEMM's / an attention's output check leaves as it is (lower.output_check): stored tensors, the caller's inputs
        self._kept = {id(t) for t in (*self.real.values(), *(self.env[i] for k, i in enumerate(self.graph.inputs) if k in self.adopted))}
        for k, (g, kind) in enumerate(zip(self.groups, self.kinds)):
            if kind in ("source", "constant"):
                continue
            if kind == "update":
                n = g.nodes[0]
                x, index, src = (self.env[i] for i in n.inputs)
                self.env[n] = x
                calls.append(KernelCall(g, "update", lambda x=x, a=n.attrs["axis"], i=index, s=src: index_copy(x, a, i, s, inplace=True)))
                continue
            if kind == "rope_kv":
                calls.append(self._rope_kv(k, g))
                continue
            if kind == "view":
                self._views(g)
                continue
            for o in g.outputs:
                if o in self.inplace:
                    self.env[o] = self.env[self.inplace[o]]
                elif o not in self._own_buffers:
                    self.env[o] = self._buffer(self.slot[o], self.shape_of[o], torch_dtype(o.dtype), self.order.get(o), self.pitch.get(o))
            tmp = self._buffer(self.scratch[k][0], self.scratch[k][1], torch_dtype(self.scratch[k][2])) if k in self.scratch else None
            ws = self._buffer(self.workspace[k][0], (self.workspace[k][1],), torch.uint8) if k in self.workspace else None
            if k in self.counters:  # (partials, counters) of a skinny GEMM, (None, counters) of a decode attention
                ws = (ws, self._buffer(self.counters[k][0], (self.counters[k][1],), torch.uint8))
            if k in self.prologue:
                norm = g.nodes[0]
                self.env[norm] = self._buffer(self.prologue[k], self.shape_of[norm], torch_dtype(norm.dtype))
            if kind == "pointwise" and any(x in self.codes for x in g.codes):
                calls += self._coded_calls(g)
                continue
            codes = self._aqgemm_codes(k, g) if kind == "gemm" and g.nodes[-1].op == "AQGEMM" else None
            if k in self.quantizing:
                calls.append(self._quantizer_call(g, codes))
            if kind == "gemm" and any(x in self.codes for x in g.codes):
                calls += self._coded_gemm_calls(g, codes)
                continue
            calls.append(self._call(g, kind, tmp, ws, codes))
        return [c for c in calls if id(c) not in self._taken] + self._state_copies()

    def _views(self, g: Group) -> None:
        for n in g.nodes:
            r = eval_node(n, [self.env[i] for i in n.inputs], self.bindings)
            root = self.val[n].root
            home = self.arena if root not in self._own_slots else self._own_buffers[self._own_slots[root]]
            inside = r.untyped_storage().data_ptr() == home.untyped_storage().data_ptr()
            if r.stride() != self.val[n].meta.stride() or (root is not None and not inside):
                raise RuntimeError(f"internal error: view {n!r} did not come out as planned")
            self.env[n] = r

    def _state_copies(self) -> list[KernelCall]:
        """An input the graph updates but the plan could not adopt receives its new value in its input buffer
        (the plan protocol: after a replay, an updated input holds its new value)."""
        index = {n.attrs["name"]: k for k, n in enumerate(self.graph.inputs)}
        calls = []
        for name, target in self.graph.updates.items():
            k = index[target]
            if k in self.adopted:
                continue
            node, buf = self.graph.outputs[self.graph.output_names.index(name)], self.input_buffers[k]
            value = self.env[node]
            calls.append(KernelCall(Group("reference", [node]), "copy", lambda b=buf, v=value: b.copy_(v)))
            self.env[node] = buf
        return calls

    def _call(self, g: Group, kind: str, tmp, workspace=None, codes: tuple | None = None) -> KernelCall:
        b, device = self.bindings, self.device
        if kind == "pointwise":
            args, outs, cache = [self.env.get(i) for i in g.inputs], [self.env[o] for o in g.outputs], self.target.cache
            return KernelCall(g, "pointwise", lambda: launch(g, args, b, out=outs, cache=cache))
        n = g.nodes[-1]
        out, args, attrs, check = self.env[n], [self.env[i] for i in n.inputs], node_attrs(n, b), None
        if kind == "gemm" and n.op == "MATMUL":
            return KernelCall(g, "matmul", lambda: torch.matmul(args[0], args[1], out=out))
        if kind == "gemm":
            if n.op == "LINEAR":
                attrs = dict(bias=len(args) > 2, act="none", glu=False, gate=False, residual=False)
            attrs = dict(attrs, static_w=n.inputs[1] in self.real)  # (a stored weight: read before a PDL wait)
            norm = None if n.op == "AQGEMM" else self._norm(g)
            if n.op == "AQGEMM":
                what, candidates = lower.aqgemm(args, attrs, out, tmp, device, workspace, codes=codes)
            else:
                what, candidates = {"QGEMM": lower.qgemm}.get(n.op, lower.gemm)(args, attrs, out, tmp, device, workspace, norm)
            check = lower.output_check(n.op, args, attrs, out, norm, workspace, self._kept, codes)
        elif kind == "attention":  # (workspace: (None, counters) where the plan has counters for it)
            args, attrs = self._causal(n, args, attrs)
            rope, before = self._ropes.pop(n, (None, None))
            self._taken.add(id(before))  # (id(None) is no call's)
            counters = workspace[1] if isinstance(workspace, tuple) else None
            what, candidates = lower_attention.attention(args, attrs, out, tmp, device, counters, rope)
            check = lower_attention.output_check(args, attrs, out, what, self._kept, counters)
            choice = self.target.tuner.choose(kind, what, candidates, device, check)  # (it runs ``before`` first, or its work)
            return KernelCall(g, kind, candidates[choice], choice, before if lower_attention.runs_first(candidates[choice]) else None)
        elif kind == "conv":
            what, candidates = lower.conv(args, attrs, out, device)
        elif kind == "group_norm":
            what, candidates = lower.group_norm(args, attrs, out, tmp, device)
        elif n.op in COLLECTIVE_OPS:
            return collective_call(g, n.op, args[0], attrs, out)
        else:
            return self._reference(g, kind, n, args, attrs, out)
        choice = self.target.tuner.choose(kind, what, candidates, device, check)  # (check: a GEMM's outputs compared)
        choice, refinable = refine.choice(self.target.tuner, kind, what, candidates, device, choice)  # (KILN_REFINE)
        return KernelCall(g, kind, candidates[choice], choice, **refinable)

    def _causal(self, n: Node, args: list, attrs: dict) -> tuple[list, dict]:
        """An ATTENTION whose mask was folded (it depends on no input) and is the causal triangle (``causal_mask``: what HF
        builds from the positions) runs causal: its kernels skip the blocks above the diagonal, SDPA may run cuDNN's."""
        mask = attention_operands(n.inputs, attrs)[3]
        if mask is None or attrs["causal"] or mask not in self.real:
            return args, attrs
        q, k = (self.shape_of[i] for i in n.inputs[:2])
        key = (mask, q[-2], k[-2])  # (every layer reads one mask; every output set builds its calls again)
        if key not in self._causal_masks:
            self._causal_masks[key] = lower_attention.causal_mask(self.real[mask], q[-2], k[-2])
        if not self._causal_masks[key]:
            return args, attrs
        self.stats.causal_masks.add(n)
        return args[:3] + args[4:], dict(attrs, causal=True)

    def _rope_kv(self, k: int, g: Group) -> KernelCall:
        """A rope_kv group's call: the fused kernel or the separate one (two RoPE kernels and two cache writes, roped k
        through the planned scratch), as the tuner picks (``lower_attention.rope_kv``). The attention after it takes the
        call over (``lower_attention.RopeStep``) where nothing else reads the caches it writes."""
        q_rope, k_rope, kc, vc = rope_kv_core(g)
        self.env[q_rope] = self._buffer(self.slot[q_rope], self.shape_of[q_rope], torch_dtype(q_rope.dtype), self.order.get(q_rope))
        self.env[kc], self.env[vc] = self.env[kc.inputs[0]], self.env[vc.inputs[0]]
        self.env[k_rope] = self._buffer(*self.scratch[k][:2], torch_dtype(k_rope.dtype))
        normed = [rope_norm_parts(c) if (c := rope_norm(r)) and c[0] in g.nodes else None for r in (q_rope, k_rope)]
        norms = [None if n is None else (self.env[n[1].inputs[1]] if len(n[1].inputs) > 1 else None, n[1].attrs["eps"])
                 for n in normed]
        parts = [Group("pointwise", [n], list(dict.fromkeys(n.inputs)), [n]) for n in (q_rope, k_rope)]
        ropes = None if any(normed) else [partial(launch, p, [self.env[i] for i in p.inputs], self.bindings,
                                                  out=[self.env[p.nodes[0]]], cache=self.target.cache) for p in parts]
        x = [r.inputs[0] if n is None else n[0] for r, n in zip((q_rope, k_rope), normed)]
        args = [self.env[x[0]], self.env[x[1]], self.env[vc.inputs[2]], *(self.env[i] for i in q_rope.inputs[1:]), self.env[kc.inputs[1]]]
        what, candidates = lower_attention.rope_kv(args, self.env[q_rope], self.env[kc], self.env[vc], self.env[k_rope], ropes,
                                                   self.device, norms if any(normed) else None)
        choice = self.target.tuner.choose("rope_kv", what, candidates, self.device)
        call = KernelCall(g, "rope_kv", candidates[choice], choice)
        if k in self.takeover.values():
            att = rope_kv_reader(g)
            mask = attention_operands(att.inputs, att.attrs)[3]
            rope = lower_attention.RopeStep(tuple(args), call.run, set(q_rope.users) == {att}, mask is None or mask.op == "INPUT",
                                            norms if any(normed) else None)
            self._ropes[att] = (rope, call)
        return call

    def _rope_takeovers(self) -> dict[int, int]:
        """Attention group index -> the rope_kv group's before it whose call it takes over (``_rope_kv``): its ATTENTION
        reads the group's roped q and caches, and nothing else reads those caches (which it then writes later)."""
        index = {g.nodes[-1]: k for k, g in enumerate(self.groups)}
        out = {}
        for k, (g, kind) in enumerate(zip(self.groups, self.kinds)):
            if kind == "rope_kv":
                att, (_, _, kc, vc) = rope_kv_reader(g), rope_kv_core(g)
                if set(kc.users) | set(vc.users) == {att} and self.kinds[index[att]] == "attention":
                    out[index[att]] = k
        return out

    def _aqgemm_codes(self, k: int, g: Group) -> tuple | None:
        """(codes, scales) of AQGEMM group k's x, as its producer or its own quantizer call writes them (None: neither,
        the AQGEMM quantizes x itself)."""
        n = g.nodes[-1]
        x = n.inputs[0]
        key = self.codes.get(x, self.quantizing.get(k))
        return None if key is None else self._codes_buffers(key, x, n.attrs["format"], n.attrs.get("act_group", 0))

    def _quantizer_call(self, g: Group, codes: tuple) -> KernelCall:
        """AQGEMM group g's quantizer, a launch of its own: x -> ``codes`` (codes, scales) by kiln's row kernel."""
        n = g.nodes[-1]
        smooth = aqgemm_operands([self.env[i] for i in n.inputs], n.attrs)[3]
        return KernelCall(g, "quantize", lower.quantizer(self.env[n.inputs[0]], n.attrs["format"], *codes, smooth,
                                                         n.attrs.get("act_group", 0)))

    def _coded_calls(self, g: Group) -> list[KernelCall]:
        """A pointwise group some of whose outputs feed AQGEMMs as codes: its kernel storing them itself ("fused") or
        its kernel and then a quantizer call per such output ("separate"), as the tuner picks (``lower.act_codes``)."""
        codes = {}
        for x, c in g.codes.items():
            if x in self.codes:
                smooth = self.env[c.smooth].contiguous() if c.smooth is not None else None
                codes[x] = (c.fmt, *self._codes_buffers(self.codes[x], x, c.fmt), smooth)
        args, outs = [self.env.get(i) for i in g.inputs], [self.env[o] for o in g.outputs]
        what, candidates, steps = lower.act_codes(g, args, outs, codes, self.bindings, self.target.cache)
        choice = self.target.tuner.choose("quantize", what, candidates, self.device)
        return [KernelCall(g, kind, run, choice if kind == "pointwise" else "") for kind, run in steps[choice]]

    def _coded_gemm_calls(self, g: Group, codes: tuple | None) -> list[KernelCall]:
        """An AQGEMM group whose output feeds AQGEMMs as codes (``Group.codes``): a library GEMM with the epilogue storing
        the codes itself, or a GEMM storing its output and then the row quantizer, as the tuner picks
        (``lower.coded_aqgemm``). ``codes``: its own x's, as for ``_call``."""
        n = g.nodes[-1]
        c = g.codes[n]
        smooth = self.env[c.smooth].contiguous() if c.smooth is not None else None
        out_codes = (c.fmt, *self._codes_buffers(self.codes[n], n, c.fmt, c.group), smooth)
        args, attrs = [self.env[i] for i in n.inputs], node_attrs(n, self.bindings)
        what, candidates, steps = lower.coded_aqgemm(args, attrs, self.env[n], self.device, codes, out_codes)
        check = lower.output_check("AQGEMM", args, attrs, self.env[n], None, None, self._kept, codes, out_codes)
        choice = self.target.tuner.choose("gemm", what, candidates, self.device, check)
        return [KernelCall(g, kind, run, choice if kind == "gemm" else "") for kind, run in steps[choice]]

    def _norm(self, g: Group) -> dict | None:
        """A gemm group's norm prologue as ``lower.gemm`` takes it (None without one): its input, weight and eps, and
        its own kernel writing the normalised x (the GEMM's planned operand). A weightless norm (its weight folded into
        the GEMM's: ``passes/fold_norm_weight.py``) gives a weight of ones and ``unit``: the GEMM may then scale its
        rows by 1 / rms itself."""
        p = norm_prologue(g)
        if p is None:
            return None
        norm, b, cache = p.nodes[0], self.bindings, self.target.cache
        args, out = [self.env[i] for i in p.inputs], [self.env[norm]]
        x = self.env[norm.inputs[0]]
        unit = len(norm.inputs) == 1
        w = x.new_ones(x.shape[-1]) if unit else self.env[norm.inputs[1]].contiguous()
        return dict(x=x, w=w, eps=norm.attrs["eps"], unit=unit, run=lambda: launch(p, args, b, out=out, cache=cache))

    def _reference(self, g: Group, kind: str, n: Node, args, attrs, out) -> KernelCall:
        b = self.bindings
        if kind == "copy" and n.op == "RESHAPE":  # out seen in x's shape: one strided pass, no temporary (an upsampling)
            try:
                dst = out.view(args[0].shape)  # (out contiguous, or channels-last and the reshape splits H and W)
                return KernelCall(g, "copy", lambda: dst.copy_(args[0]))
            except RuntimeError:
                pass
        if kind == "copy":
            return KernelCall(g, "copy", lambda: out.copy_(eval_node(n, args, b, attrs)))
        gather = gather_call(n, args, out)  # (EMBEDDING, one-axis INDEX: gathered into out, no copy after)
        if gather is not None:
            return KernelCall(g, "reference", gather)

        def run_reference():
            r = eval_node(n, args, b, attrs)
            if r.shape != out.shape or r.dtype != out.dtype:
                raise RuntimeError(f"internal error: {n!r} produced {r.dtype}{list(r.shape)}, planned {out.dtype}{list(out.shape)}")
            out.copy_(r)
        return KernelCall(g, "reference", run_reference)

    # -- 4. running -----------------------------------------------------------------------------------------
    def _new_set(self) -> "OutputSet":
        """Fresh buffers for the outputs in ``self.own``, the calls writing them, and (on CUDA) their CUDA graph."""
        self._own_buffers = {o: self._empty(o, self.device) for o in self.own}
        self.env.update(self._own_buffers)
        if not self.sets and self.target.tuner.surveys(self.device):
            with self._phase("compile"):
                self._survey()
        with self._phase("calls"):
            calls = self._calls()
        outputs = [self.env[o] for o in self.graph.outputs]
        homes = {t.untyped_storage().data_ptr() for t in self._own_buffers.values() if t.numel()}
        direct = frozenset(k for k, t in enumerate(outputs) if t.numel() and t.untyped_storage().data_ptr() in homes)
        out = OutputSet(dict(self._own_buffers), calls, None, outputs, dict(self.env), direct=direct)
        if self.target.cuda_graphs and self.device.type == "cuda" and self.cuda_graph_error is None:
            out.cuda_graph = self._capture(calls)
        out.counts = [use_count(t) for t in out.buffers.values()]  # now: the plan's own references
        return out

    def _survey(self) -> None:
        """Start-up: the calls built once with the tuner surveying, then every kernel that they and the surveyed
        decisions' candidates launch compiled at once (``tuning.compile_ahead``). The arena is zeroed after, as it was
        before (its split-K counters must be zero), so the calls built next are those a plan without the survey builds."""
        with self.target.tuner.surveying() as survey:
            calls = self._calls()
        self.compiled_ahead = compile_ahead(survey, [c.run for c in calls if c.kind in _COMPILED], self.device)
        self.arena.zero_()

    def _capture(self, calls: list[KernelCall]):
        """The calls as one CUDA graph (None, with a warning, when they cannot be captured)."""
        try:
            cuda_graph = capture(calls, self.device, self._phase)
            self.stats.cuda_graph = True
            return cuda_graph
        except Exception as e:  # an op that syncs or allocates on the host: run the call list instead
            self.cuda_graph_error = f"{type(e).__name__}: {e}"
            torch.cuda.synchronize(self.device)
            warnings.warn(f"kiln: CUDA graph capture failed for {self.bindings} ({self.cuda_graph_error.splitlines()[0]}); "
                          "running the call list without a graph", stacklevel=3)
            return None

    @property
    def cuda_graph(self):
        return self._current.cuda_graph

    def bind(self, inputs: list[torch.Tensor]) -> None:
        for buf, t in zip(self.input_buffers, inputs):
            if buf is not None:
                buf.copy_(t)

    def replay(self) -> list[torch.Tensor]:
        """Run into the first output set nobody outside the plan holds; when the caller holds every one (at most
        ``MAX_OUTPUT_SETS``), into a private set, whose outputs ``handout`` copies."""
        free = next((s for s in self.sets if s.free()), None)
        if free is None and len(self.sets) < MAX_OUTPUT_SETS:
            free = self._new_set()
            self.sets.append(free)
        if free is None:
            self._private = self._private or self._new_set()
            free = self._private
        self._current = free
        free.run()
        self.output_values = free.outputs
        return free.outputs

    def handout(self, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """An adopted input comes back as itself (already written); an output in a buffer of its own (or a view of
        one: a padded GEMM's [..., :N], row stride Np) as an alias of it, strides kept (the set is not written again
        while the caller holds it); anything else as a copy."""
        return [o if how == "input" else o.view(o.shape) if how in ("buffer", "view") else o.clone()
                for o, how in zip(outputs, self._handed(self._current))]

    def _handed(self, s: OutputSet) -> list[str]:
        """How each output of set ``s`` goes to the caller: "input" (an adopted input, itself), "buffer" (an alias of
        its own buffer), "view" (an alias of a view of one, strides kept), "copy" (the private set's, and the rest)."""
        own = {id(t) for t in s.buffers.values()}
        direct = s.direct if s is not self._private else frozenset()
        return ["input" if id(o) in self._state_ids else ("buffer" if id(o) in own else "view") if k in direct else "copy"
                for k, o in enumerate(s.outputs)]

    def describe(self) -> dict:
        handed = self._handed(self.sets[0])  # how a call's outputs go out, while the caller holds no earlier ones
        return {"bindings": self.bindings, "launches": dict(self.stats.launches), "choices": dict(self.stats.choices),
                "cuda_graph": self.stats.cuda_graph, "output_sets": len(self.sets) + (self._private is not None),
                "outputs": {k: handed.count(k) for k in ("input", "buffer", "view", "copy")},
                **({"cuda_graph_error": self.cuda_graph_error} if self.cuda_graph_error else {}),
                **({"compiled_ahead": self.compiled_ahead} if self.compiled_ahead else {}),
                "arena_bytes": self.memory.peak_bytes, "build_s": round(self.stats.build_s, 3), "phases": dict(self.stats.phases),
                "layouts": dict(self.stats.layouts), "causal_masks": len(self.stats.causal_masks),
                "inplace_residuals": len(self.inplace)}
