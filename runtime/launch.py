"""The kernel path of the executor: a graph's schedule as a flat launch list over planned buffers.

One :class:`KernelPlan` per concrete shape binding (a *shape bucket*):

1. Layouts. Every value gets a meta tensor (shape and strides): inputs and kernel outputs are
   contiguous, weights keep theirs, a view group (PERMUTE / SLICE / EXPAND / RESHAPE) is evaluated on
   its operand's meta tensor, so the plan knows which views are free (a RESHAPE that torch cannot
   express as a view becomes a copy kernel).
2. Memory. Every kernel output is an interval [group that writes it, last group that reads it or a
   view of it]; graph outputs live to the end; a cuBLAS GLU needs a scratch [M, 2N] for one step. The
   intervals are packed into one arena (``runtime/memory.py``); inputs get their own static buffers.
3. Launches. Each group becomes one closure over fixed tensors: a pointwise group its generated
   Triton kernel; a GEMM the faster of the Triton template and cuBLAS + the epilogue kernel; attention
   the faster of kiln's kernel and SDPA (both measured per shape by ``codegen/tuning.py``); anything
   else its torch reference, copied into the planned buffer.
4. Replay. On CUDA the launch list is warmed up once (Triton compiles, choices are measured) and
   captured into a CUDA graph; a call copies the inputs into the static input buffers, replays the
   graph and returns copies of the outputs. Without CUDA graphs (or on the CPU, with the Triton
   interpreter in tests) the closures run in order.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..codegen.schedule import VIEW_OPS, Group
from ..ir.graph import Graph, Node
from ..ir.ops import OPS, sdpa_mask
from ..ir.ops_fused import gemm_operands
from ..ir.types import eval_attr, eval_dim, has_symbols, torch_dtype
from .executor import _nbytes
from .memory import BufferPlan, Interval, plan_memory


@dataclass
class Launch:
    group: Group
    kind: str  # pointwise | gemm | matmul | attention | update | copy | reference
    run: object  # () -> None
    choice: str = ""


@dataclass
class _Value:
    meta: torch.Tensor  # shape and strides
    root: int | None  # slot of the arena buffer this value is (a view of); None: input / weight / const


def _attrs(n: Node, bindings) -> dict:
    return {k: eval_attr(v, bindings) if has_symbols(v) else v for k, v in n.attrs.items()}


def _config_name(impl: str, config: dict) -> str:
    """A tuning candidate's name: the implementation, then its launch configuration's values."""
    return impl + ":" + ",".join(str(v) for v in config.values())


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


def _stored_order(node: Node):
    """A value read only through one PERMUTE that a RESHAPE then flattens (attention's [B, H, S, D] output
    going back to [B, S, H * D]) is stored in the permuted order, so that both become free views instead
    of a copy: returns the permutation, or None to store it in its own order."""
    if len(node.users) != 1:
        return None
    u = next(iter(node.users))
    if u.op != "PERMUTE" or not u.users or not all(r.op == "RESHAPE" for r in u.users):
        return None
    return tuple(u.attrs["perm"])


def _inverse(perm) -> tuple:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


def _empty(shape, perm, dtype, device) -> torch.Tensor:
    if perm is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.empty([shape[p] for p in perm], dtype=dtype, device=device).permute(_inverse(perm))


@dataclass
class PlanStats:
    launches: dict = field(default_factory=dict)  # kind -> count
    choices: dict = field(default_factory=dict)  # "gemm:cublas" -> count
    build_s: float = 0.0
    cuda_graph: bool = False


class KernelPlan:
    """Launch list + buffer plan (+ CUDA graph) for one binding of the symbols."""

    def __init__(self, graph: Graph, groups: list[Group], bindings: dict[str, int], device: torch.device,
                 static: dict[Node, torch.Tensor], tuner, cuda_graph: bool = True, inputs: list | None = None):
        t0 = time.perf_counter()
        self.bindings = dict(bindings)
        # an input the program updates through one INDEX_COPY (a KV cache) is written in place: the plan adopts
        # the caller's tensor (the executor keys plans by its address) instead of a static copy of it
        self.adopted = adoptable_updates(graph) if inputs is not None else {}
        inplace = {node for _, node in self.adopted.values()}
        self.device = device
        self.tuner = tuner
        slot = {n: k for k, n in enumerate(graph.nodes)}
        self.slot = slot
        shape_of = {n: tuple(eval_dim(d, bindings) for d in n.shape) for n in graph.nodes}
        self.shape_of = shape_of

        # 1. layouts; values that depend on no graph input (ARANGE of a dim, tables of sizes) are computed
        #    now, once per binding, on the device: they are constants of this plan, not launches
        val: dict[Node, _Value] = {}
        kinds: list[str] = []
        order: dict[Node, tuple] = {}  # outputs stored in a permuted dim order (see _stored_order)
        graph_outputs = set(graph.outputs)  # (returned to the caller: kept in their own order)
        # every tensor the launches read lives on the device (a CUDA graph cannot read host memory)
        real: dict[Node, torch.Tensor] = {n: t.to(device) for n, t in static.items()}
        for n, t in real.items():
            val[n] = _Value(torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta"), None)
        for n in graph.inputs:
            val[n] = _Value(torch.empty(shape_of[n], dtype=torch_dtype(n.dtype), device="meta"), None)
        for g in groups:
            kind = g.kind
            if g.nodes[0] in inplace:
                n = g.nodes[0]
                val[n] = val[n.inputs[0]]  # the adopted input itself
                kinds.append("update")
                continue
            if kind in ("view", "reference") and all(i in real for i in g.inputs):
                for n in g.nodes:
                    real[n] = OPS[n.op].ref([real[i] for i in n.inputs], _attrs(n, bindings)).to(device)
                    val[n] = _Value(torch.empty_strided(real[n].shape, real[n].stride(), dtype=real[n].dtype, device="meta"), None)
                kinds.append("constant")
                continue
            if kind == "reference" and g.nodes[0].op in VIEW_OPS:
                kind = "view"  # a RESHAPE the schedule could not prove a view: the layouts decide below
            if kind == "view":
                metas = {}
                for n in g.nodes:
                    src = val[n.inputs[0]] if n.inputs[0] in val else metas[n.inputs[0]]
                    args = [src.meta] + [val[i].meta if i in val else metas[i].meta for i in n.inputs[1:]]
                    r = OPS[n.op].ref(args, _attrs(n, bindings))
                    if not (r._is_view() or r is src.meta):
                        kind = "copy"  # not expressible as a view of its operand: a copy kernel
                        break
                    metas[n] = _Value(r, src.root)
                if kind == "view":
                    val.update(metas)
            if kind not in ("view", "source"):
                for o in g.outputs:
                    perm = _stored_order(o) if kind in ("attention", "pointwise") and o not in graph_outputs else None
                    if perm is not None:
                        order[o] = perm
                    val[o] = _Value(_empty(shape_of[o], perm, torch_dtype(o.dtype), "meta"), slot[o])
            kinds.append(kind)

        # 2. memory: intervals over group steps
        first: dict = {}
        last: dict = {}
        sizes: dict = {}
        scratch: dict[int, tuple] = {}  # group index -> (key, shape) of a cuBLAS GLU's [M, 2N] product
        for k, (g, kind) in enumerate(zip(groups, kinds)):
            if kind in ("view", "source", "constant"):
                continue
            for i in g.inputs if kind != "update" else g.nodes[0].inputs[1:]:
                r = val[i].root if i in val else None
                if r is not None:
                    last[r] = max(last[r], k)
            for o in g.outputs:
                first[slot[o]] = last[slot[o]] = k
                sizes[slot[o]] = _nbytes(shape_of[o], o.dtype)
            n = g.nodes[0]
            if kind == "gemm" and n.op == "GEMM" and n.attrs["glu"]:
                x, w = n.inputs[0], n.inputs[1]
                m = math.prod(shape_of[x][:-1])
                skey = -1 - k
                scratch[k] = (skey, (m, shape_of[w][0]))
                first[skey] = last[skey] = k
                sizes[skey] = _nbytes((m, shape_of[w][0]), n.dtype)
        end = len(groups)
        for o in graph.outputs:
            r = val[o].root
            if r is not None:
                last[r] = end
        self.intervals = [Interval(key, sizes[key], first[key], last[key]) for key in first]
        self.memory: BufferPlan = plan_memory(self.intervals)
        self.arena = torch.zeros(max(self.memory.peak_bytes, 1), dtype=torch.uint8, device=device)

        def buffer(key: int, shape, dtype: torch.dtype, perm=None) -> torch.Tensor:
            off = self.memory.offsets[key]
            raw = self.arena[off: off + sizes[key]].view(dtype)
            if perm is None:
                return raw.view(shape)
            return raw.view([shape[p] for p in perm]).permute(_inverse(perm))

        # real tensors: static, input buffers, arena buffers, views of them
        env: dict[Node, torch.Tensor] = dict(real)
        self.input_buffers = []
        for k, n in enumerate(graph.inputs):
            if k in self.adopted:
                env[n] = inputs[k]
                self.input_buffers.append(None)
                continue
            env[n] = torch.zeros(shape_of[n], dtype=torch_dtype(n.dtype), device=device)
            if inputs is not None:  # the warm-up before capture then computes what this call asks for
                env[n].copy_(inputs[k])
            self.input_buffers.append(env[n])
        self.launches: list[Launch] = []
        for k, (g, kind) in enumerate(zip(groups, kinds)):
            if kind in ("source", "constant"):
                continue
            if kind == "update":
                n = g.nodes[0]
                x, index, src = (env[i] for i in n.inputs)
                axis = n.attrs["axis"]
                env[n] = x
                self.launches.append(Launch(g, "update", lambda x=x, axis=axis, index=index, src=src: x.index_copy_(axis, index, src)))
                continue
            if kind == "view":
                for n in g.nodes:
                    r = OPS[n.op].ref([env[i] for i in n.inputs], _attrs(n, bindings))
                    in_arena = r.untyped_storage().data_ptr() == self.arena.untyped_storage().data_ptr()
                    if r.stride() != val[n].meta.stride() or (val[n].root is not None and not in_arena):
                        raise RuntimeError(f"internal error: view {n!r} did not come out as planned")
                    env[n] = r
                continue
            for o in g.outputs:
                env[o] = buffer(slot[o], shape_of[o], torch_dtype(o.dtype), order.get(o))
            tmp = buffer(scratch[k][0], scratch[k][1], torch_dtype(g.nodes[0].dtype)) if k in scratch else None
            self.launches.append(self._launch(g, kind, env, tmp))
        self.env = env
        self._state_ids = {id(env[graph.inputs[k]]) for k in self.adopted}
        self.output_values = [env[o] for o in graph.outputs]
        self.graph = None
        self.stats = PlanStats(build_s=0.0)
        for launch in self.launches:
            self.stats.launches[launch.kind] = self.stats.launches.get(launch.kind, 0) + 1
            if launch.choice:
                c = f"{launch.kind}:{launch.choice.split(':')[0]}"
                self.stats.choices[c] = self.stats.choices.get(c, 0) + 1
        self.graph_error = None
        if cuda_graph and device.type == "cuda":
            try:
                self._capture()
            except Exception as e:  # an op that syncs or allocates on the host: run the launch list instead
                self.graph = None
                self.graph_error = f"{type(e).__name__}: {e}"
                torch.cuda.synchronize(device)
                import warnings

                warnings.warn(f"kiln: CUDA graph capture failed for {self.bindings} ({self.graph_error.splitlines()[0]}); "
                              "running the launch list without a graph", stacklevel=2)
        self.stats.build_s = time.perf_counter() - t0

    # -- launches -----------------------------------------------------------------------------------------
    def _launch(self, g: Group, kind: str, env, tmp) -> Launch:
        b = self.bindings
        if kind == "pointwise":
            from ..codegen.pointwise import launch

            args = [env.get(i) for i in g.inputs]
            outs = [env[o] for o in g.outputs]
            return Launch(g, "pointwise", lambda: launch(g, args, b, out=outs))
        n = g.nodes[0]
        out = env[n]
        args = [env[i] for i in n.inputs]
        attrs = _attrs(n, b)
        if kind == "gemm":
            if n.op == "MATMUL":
                return Launch(g, "matmul", lambda: torch.matmul(args[0], args[1], out=out))
            if n.op == "LINEAR":
                attrs = dict(bias=len(args) > 2, act="none", glu=False, gate=False, residual=False)
            return self._gemm(g, args, attrs, out, tmp)
        if kind == "attention":
            return self._attention(g, args, attrs, out)
        fn = OPS[n.op].ref
        if kind == "copy":
            return Launch(g, "copy", lambda: out.copy_(fn(args, attrs)))

        def run_reference():
            r = fn(args, attrs)
            if r.shape != out.shape or r.dtype != out.dtype:
                raise RuntimeError(f"internal error: {n!r} produced {r.dtype}{list(r.shape)}, planned {out.dtype}{list(out.shape)}")
            out.copy_(r)
        return Launch(g, "reference", run_reference)

    def _gemm(self, g: Group, args, attrs, out, tmp) -> Launch:
        from ..codegen.kernels import gemm as tg
        from ..codegen.kernels.epilogue import epilogue

        x, w, bias, gate, residual = gemm_operands(args, attrs)
        act, glu = attrs["act"], attrs["glu"]
        m, k = math.prod(x.shape[:-1]), x.shape[-1]
        nout = out.shape[-1]
        out2 = out.view(m, nout)
        wt = w.t()
        plain = act == "none" and not glu and gate is None and residual is None
        h2 = tmp if glu else out2  # the product; the epilogue reads it with the output's leading dims
        h = h2.view(*out.shape[:-1], h2.shape[-1])

        def cublas():
            x2 = x.reshape(m, k)
            if plain:
                if bias is not None:
                    torch.addmm(bias, x2, wt, out=out2)
                else:
                    torch.mm(x2, wt, out=out2)
                return
            if bias is not None:  # cuBLAS adds it in float32 before rounding, as F.linear does
                torch.addmm(bias, x2, wt, out=h2)
            else:
                torch.mm(x2, wt, out=h2)
            epilogue(h, None, gate, residual, act, glu, out=out)

        candidates = {"cublas": cublas}
        # cuBLAS(Lt) computes two epilogues itself: + a full residual (as addmm's C) and bias + tanh-GELU
        only_residual = residual is not None and act == "none" and not glu and gate is None and bias is None
        if only_residual and tuple(residual.shape) == tuple(out.shape):
            res2 = residual.reshape(m, nout)

            def cublas_residual():
                torch.addmm(res2, x.reshape(m, k), wt, out=out2)
            candidates["cublaslt:residual"] = cublas_residual
        # (cuBLASLt's GELU epilogue is the tanh form on CUDA; torch's CPU fallback of the same call uses erf)
        if bias is not None and act == "gelu_tanh" and not glu and gate is None and residual is None and self.device.type == "cuda":
            def cublas_gelu():
                torch._addmm_activation(bias, x.reshape(m, k), wt, use_gelu=True, out=out2)
            candidates["cublaslt:gelu"] = cublas_gelu
        if x.dtype in tg.DTYPES and (self.device.type == "cuda" or tg.INTERPRET):
            cfgs = tg.configs(m, glu) if self.device.type == "cuda" else [tg.INTERPRET_CONFIG]
            for c in cfgs[: TRITON_GEMM_CONFIGS]:
                candidates[_config_name("triton", c)] = (lambda c=c: tg.gemm(x, w, bias, gate, residual, act, glu, out=out, config=c))
        what = {"op": "GEMM", "x": list(x.shape), "x_stride": list(x.stride()), "w": list(w.shape), "dtype": str(x.dtype),
                "act": act, "glu": glu, "bias": bias is not None,
                "gate": None if gate is None else list(gate.shape), "residual": None if residual is None else list(residual.shape)}
        choice = self.tuner.choose("gemm", what, candidates, self.device)
        return Launch(g, "gemm", candidates[choice], choice)

    def _attention(self, g: Group, args, attrs, out) -> Launch:
        from ..codegen.kernels import attention as ta

        q, k, v = args[:3]
        mask = args[3] if len(args) > 3 else None
        causal, scale, gqa = attrs["causal"], attrs["scale"], attrs["gqa"]
        attn_mask, sdpa_causal = sdpa_mask(q, k, mask, causal)  # built once per plan, not per call
        enable_gqa = bool(gqa and q.dim() >= 3 and q.shape[-3] != k.shape[-3])

        def sdpa():
            out.copy_(F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=sdpa_causal, scale=scale,
                                                     enable_gqa=enable_gqa))

        candidates = {"sdpa": sdpa}
        if q.dtype in ta.DTYPES and (self.device.type == "cuda" or ta.INTERPRET):
            cfgs = ta.configs(q.shape[-2]) if self.device.type == "cuda" else [ta.INTERPRET_CONFIG]
            for c in cfgs[: TRITON_ATTENTION_CONFIGS]:
                candidates[_config_name("kiln", c)] = (lambda c=c: ta.attention(q, k, v, mask, causal, scale, gqa, out=out, config=c))
        # few query rows over a long key sequence (LLM decode): the split-KV kernel (one program per kv head and
        # key chunk; every loaded K / V tile serves the whole query group)
        from ..codegen.kernels import decode_attention as td

        if (q.dim() == 4 and k.dim() == 4 and q.dtype in td.DTYPES and not causal and k.shape == v.shape
                and q.shape[0] == k.shape[0] and (mask is None or mask.dtype == torch.bool)
                and (q.shape[1] // max(k.shape[1], 1)) * q.shape[2] <= td.MAX_ROWS and q.shape[-1] <= td.MAX_HEAD_DIM
                and (enable_gqa or q.shape[1] == k.shape[1]) and (self.device.type == "cuda" or td.INTERPRET)):
            cfgs = td.configs() if self.device.type == "cuda" else [td.INTERPRET_CONFIG]
            for c in cfgs[: TRITON_ATTENTION_CONFIGS]:
                candidates[_config_name("kiln-decode", c)] = (
                    lambda c=c: td.decode_attention(q, k, v, mask, scale, enable_gqa, out=out, config=c))
        what = {"op": "ATTENTION", "q": list(q.shape), "k": list(k.shape), "v": list(v.shape), "dtype": str(q.dtype),
                "strides": [list(t.stride()) for t in (q, k, v)], "causal": causal, "scale": scale, "gqa": gqa,
                "mask": None if mask is None else [list(mask.shape), str(mask.dtype)]}
        choice = self.tuner.choose("attention", what, candidates, self.device)
        return Launch(g, "attention", candidates[choice], choice)

    # -- running ------------------------------------------------------------------------------------------
    def _run_launches(self) -> None:
        for launch in self.launches:
            launch.run()

    def _capture(self) -> None:
        s = torch.cuda.Stream(self.device)
        s.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(s):
            self._run_launches()  # compiles every kernel; no first-launch work may happen during capture
        torch.cuda.current_stream(self.device).wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._run_launches()
        self.graph = graph
        self.stats.cuda_graph = True

    def run(self, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        for buf, t in zip(self.input_buffers, inputs):
            if buf is not None:
                buf.copy_(t)
        # an updated input comes back as itself (already written); every other output as a fresh tensor
        return [o if id(o) in self._state_ids else o.clone() for o in self.launch()]

    def launch(self) -> list[torch.Tensor]:
        """Run on what the input buffers hold now (a caller that updates ``input_buffers`` in place, like the
        LLM decode loop); returns the output buffers themselves, valid until the next run."""
        if self.graph is not None:
            self.graph.replay()
        else:
            self._run_launches()
        return self.output_values

    def describe(self) -> dict:
        return {"bindings": self.bindings, "launches": dict(self.stats.launches), "choices": dict(self.stats.choices),
                "cuda_graph": self.stats.cuda_graph, **({"cuda_graph_error": self.graph_error} if self.graph_error else {}),
                "arena_bytes": self.memory.peak_bytes,
                "build_s": round(self.stats.build_s, 3)}


# template configurations measured per shape besides cuBLAS / SDPA. Each is a Triton compile (1-2 s) of a cold
# start; one GEMM configuration (the template lost to cuBLAS at every measured shape) keeps DiT-XL/2's cold
# compile inside its budget
TRITON_GEMM_CONFIGS = 1
TRITON_ATTENTION_CONFIGS = 2

