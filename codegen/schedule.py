"""Partition an optimized graph into kernel groups.

    gemm       GEMM / LINEAR / MATMUL / QGEMM / AQGEMM, one node (its epilogue is part of the op), or that node after
               the RMSNORM that only it reads: the norm prologue (see ``norm_prologue``)
    attention  ATTENTION, one node
    conv       CONV2D / CONV, one node (CONV's epilogue is part of the op)
    group_norm GROUP_NORM, one node (its SiLU is part of the op): a group is C/G x H x W values, more than a pointwise
               row holds, so it has a kernel of its own
    pointwise  a chain of elementwise ops and last-axis row reductions over one domain (the shape of the
               group's outputs), rendered by ``codegen/pointwise.py`` into one Triton kernel
    rope_kv    ROPE(q), ROPE(k) and the two INDEX_COPYs that write k and v into an ATTENTION's KV caches (decode's
               small work between the QKV GEMM and attention), see ``rope_kv_nodes``: one kernel when the plan
               writes the caches in place, else the four groups it merged (``rope_kv_parts``)
    view       PERMUTE / SLICE / EXPAND, and RESHAPE of a contiguous value: no data moves. A pointwise
               group reading a view reads it in place through its strides (the view is folded into the load)
    source     INPUT / WEIGHT / CONST: bound by the executor
    reference  everything else: the op's torch reference (the correct fallback)

Fusion is greedy in topological order: a fusible node joins the pointwise group of one of its operands when
(1) its shape is the group's domain, or it widens the domain and every member of another shape is used
only inside the group; (2) a row reduction has the domain's shape; (3) ROPE's ``x`` comes from outside the
group (its partner lane is a second load); (4) no operand from another group depends on this group
(no cycle between groups). A member read outside the group, or a graph output, is a group output.

Norm prologues. An RMSNORM in a pointwise group of its own whose one reader is a GEMM / LINEAR / QGEMM's x (Llama's
input and post-attention norms before the QKV and gate/up projections, the final norm before the LM head) joins
that GEMM's group: ``lower.py`` then offers the norm folded into the skinny template's loads (one launch, at most
16 rows: decode) beside the norm's own kernel followed by the GEMM (every row count: prefill).

Activation codes. An AQGEMM quantizes its x per row (codes + one scale a row) before its GEMM. Where x is an output
of a pointwise group that can hold its rows whole (x has the domain's shape, rows of at most ``MAX_ROW``) and every
reader of x is an AQGEMM reading it as x, with one format and one smooth vector (a merged QKV is one reader), the
group records it in ``Group.codes`` (see ``act_codes``): ``lower.py`` then offers the group's kernel storing x as those
codes and scales itself (the quantizer in its epilogue, x not stored) beside the kernel storing x followed by the
row quantizer; the AQGEMMs read the codes either way. An AQGEMM's output x read so (an LLM's gate/up feeding the down
projection, a DiT's first MLP GEMM the second) is recorded in its gemm group's ``codes`` too: its library candidates'
epilogue then stores the codes (``kernels/epilogue_codes.py``), any row length, and its others store x for the row
quantizer.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..ir.bind import bind_inputs
from ..ir.graph import Graph, Node
from ..ir.interpret import data_device, eval_nodes
from ..ir.ops import SOURCE_OPS, fits
from ..ir.ops_fused import aqgemm_operands
from ..ir.types import dims_equal, is_static
from .pointwise import MAX_ROW, ROW_OPS, expr_key, fusible, launch

GEMM_OPS = frozenset({"GEMM", "LINEAR", "MATMUL", "QGEMM", "AQGEMM"})
PROLOGUE_GEMMS = frozenset({"GEMM", "LINEAR", "QGEMM"})  # the ops of the weight-streaming template (a norm prologue)
CONV_OPS = frozenset({"CONV2D", "CONV"})
VIEW_OPS = frozenset({"PERMUTE", "SLICE", "EXPAND", "RESHAPE"})
CODE_DTYPES = ("float16", "bfloat16", "float32")  # what the row quantizer reads (``kernels/quantize_rows.py``)


@dataclass(frozen=True)
class Codes:
    """How the AQGEMMs reading a value quantize it: ``fmt`` ("int8" / "fp8") codes of value * ``smooth`` (a stored [K]
    vector, or None), one float32 scale per row, or per row and ``group`` columns (the readers' act_group)."""
    fmt: str
    smooth: Node | None
    group: int = 0


@dataclass(eq=False)
class Group:
    kind: str  # gemm | attention | conv | group_norm | rope_kv | pointwise | view | source | reference
    nodes: list[Node]
    inputs: list[Node] = field(default_factory=list)  # values read from other groups, first-use order
    outputs: list[Node] = field(default_factory=list)  # members read by other groups or graph outputs
    codes: dict = field(default_factory=dict)  # pointwise, AQGEMM: output -> Codes, where it may be stored as those (``act_codes``)

    @property
    def domain(self) -> tuple:
        """A pointwise group's iteration shape: every member joins with it or widens it, so the last one's."""
        return self.nodes[-1].shape

    def __repr__(self) -> str:
        return f"{self.kind}[{', '.join(f'%{n.name}:{n.op}' for n in self.nodes)}]"


def _same(a, b) -> bool:
    return len(a) == len(b) and all(dims_equal(x, y) for x, y in zip(a, b))


def _row_fits(node) -> bool:
    n = node.shape[-1] if node.shape else 1
    return not is_static(n) or n <= MAX_ROW


def _kind(node: Node, group_of: dict) -> str:
    if node.op in SOURCE_OPS:
        return "source"
    if node.op in GEMM_OPS:
        return "gemm"
    if node.op == "ATTENTION":
        return "attention"
    if node.op in CONV_OPS:
        return "conv"
    if node.op == "GROUP_NORM":
        return "group_norm"
    if node.op in VIEW_OPS:
        src = node.inputs[0]
        # RESHAPE is a view only of a value we know is contiguous: a kernel's output or such a reshape
        if node.op != "RESHAPE" or src.op not in VIEW_OPS or (src.op == "RESHAPE" and group_of[src].kind == "view"):
            return "view"
        return "reference"
    if fusible(node) and (expr_key(node) not in ROW_OPS or _row_fits(node)):
        return "pointwise"
    return "reference"


class _Scheduler:
    def __init__(self, graph: Graph):
        self.graph = graph
        self.group_of: dict[Node, Group] = {}
        self.outputs = set(graph.outputs)

    def deps(self, g: Group) -> set:
        return {self.group_of[i] for n in g.nodes for i in n.inputs if self.group_of[i] is not g}

    def reaches(self, start: Group, target: Group) -> bool:
        """``target`` is ``start`` or one of its transitive producer groups."""
        seen, stack = set(), [start]
        while stack:
            g = stack.pop()
            if g is target:
                return True
            if g not in seen:
                seen.add(g)
                stack.extend(self.deps(g))
        return False

    def can_join(self, n: Node, g: Group) -> bool:
        members = set(g.nodes)
        if not _same(n.shape, g.domain):
            if not fits(g.domain, n.shape):
                return False  # n narrower than the group, or incomparable
            for m in g.nodes:  # widening: members of another shape must stay internal
                if not _same(m.shape, n.shape) and (m in self.outputs or any(u not in members and u is not n for u in m.users)):
                    return False
        if any(expr_key(m) in ROW_OPS and not dims_equal(m.shape[-1], n.shape[-1]) for m in g.nodes):
            return False
        if n.op == "ROPE" and n.inputs[0] in members:
            return False
        for i in n.inputs:
            h = self.group_of[i]
            if h is not g and h.kind != "source" and self.reaches(h, g):
                return False  # g -> ... -> h -> n: fusing n into g would make a cycle
        return True

    def can_merge(self, h: Group, g: Group) -> bool:
        """Pointwise group ``h`` (another producer of g's newest node) can be folded into ``g``."""
        members, dom = set(g.nodes) | set(h.nodes), g.domain
        for m in h.nodes + g.nodes:
            if m.op == "ROPE" and m.inputs[0] in members:
                return False
        for m in h.nodes:
            if not fits(m.shape, dom) or (expr_key(m) in ROW_OPS and not dims_equal(m.shape[-1], dom[-1])):
                return False
            if not _same(m.shape, dom) and (m in self.outputs or any(u not in members for u in m.users)):
                return False
        # a path between the two through a third group would become a cycle
        return not any(d is not g and self.reaches(d, g) for d in self.deps(h)) and \
            not any(d is not h and self.reaches(d, h) for d in self.deps(g))

    def run(self) -> list[Group]:
        groups: list[Group] = []
        index = {n: k for k, n in enumerate(self.graph.nodes)}
        for n in self.graph.nodes:
            kind = _kind(n, self.group_of)
            target = None
            if kind == "gemm" and self.foldable_norm(n):
                target = self.fold_norm(n)
            elif kind == "pointwise":
                for i in n.inputs:
                    g = self.group_of[i]
                    if g.kind == "pointwise" and self.can_join(n, g):
                        target = g
                        break
            if target is None:
                target = Group(kind, [])
                groups.append(target)
            target.nodes.append(n)
            self.group_of[n] = target
            for h in dict.fromkeys(self.group_of[i] for i in n.inputs):  # n joins two chains: one kernel
                if kind == "pointwise" and h.kind == "pointwise" and h is not target and self.can_merge(h, target):
                    target.nodes = sorted(target.nodes + h.nodes, key=index.get)
                    self.group_of.update(dict.fromkeys(h.nodes, target))
                    groups.remove(h)
        groups = self.fuse_rope_kv(groups)
        for g in groups:
            members = set(g.nodes)
            g.inputs = list(dict.fromkeys(i for n in g.nodes for i in n.inputs if i not in members))
            g.outputs = [n for n in g.nodes if n in self.outputs or any(u not in members for u in n.users)]
            if g.kind == "pointwise":
                g.codes = {x: c for x in g.outputs if (c := act_codes(x, g.domain, self.outputs)) is not None}
            elif g.kind == "gemm" and g.nodes[-1].op == "AQGEMM":
                x = g.nodes[-1]
                g.codes = {x: c} if (c := act_codes(x, x.shape, self.outputs, whole=False)) is not None else {}
        return self.order(groups)

    def foldable_norm(self, n: Node) -> bool:
        """``n``'s x is an RMSNORM (one stored weight or none: ``passes/fold_norm_weight.py``; last axis, no residual, one
        dtype throughout) that only ``n`` reads, alone in its pointwise group: a norm prologue."""
        norm = n.inputs[0]
        if n.op not in PROLOGUE_GEMMS or norm.op != "RMSNORM" or norm in self.outputs or len(norm.inputs) not in (1, 2):
            return False
        if norm.attrs["residual"] or norm.attrs["dims"] != 1 or any(p.op not in SOURCE_OPS for p in norm.inputs[1:]):
            return False
        if {i.dtype for i in norm.inputs} != {norm.dtype} or n.dtype != norm.dtype:
            return False
        if set(norm.users) != {n} or sum(i is norm for i in n.inputs) != 1:
            return False
        return self.group_of[norm].nodes == [norm]

    def fold_norm(self, n: Node) -> Group:
        """The gemm group of ``n`` that takes over the norm's group (the norm's inputs come before it)."""
        h = self.group_of[n.inputs[0]]
        h.kind = "gemm"
        return h

    def fuse_rope_kv(self, groups: list[Group]) -> list[Group]:
        """Each ATTENTION's ROPE(q), ROPE(k) and the two INDEX_COPYs writing k and v into the caches (``rope_kv_nodes``),
        four groups of their own (and the per-head RMSNORMs q and k take before RoPE: ``rope_norm``), merged into one
        rope_kv group when no other group lies on a path between them. Its nodes: the norms, then ``rope_kv_core``."""
        for n in self.graph.nodes:
            nodes = rope_kv_nodes(n) if n.op == "ATTENTION" else None
            if nodes is None or nodes[1] in self.outputs:
                continue  # (roped k has no buffer of its own in the fused kernel)
            if not self.whole(nodes):
                continue
            # (a norm chain may be one group already; one that shares its group with other nodes stays apart)
            chains = [c for c in map(rope_norm, nodes[:2]) if not any(m in self.outputs for m in c) and self.whole(c)]
            nodes = (*(m for c in chains for m in c), *nodes)
            parts = list(dict.fromkeys(self.group_of[m] for m in nodes))
            outside = {d for p in parts for d in self.deps(p)} - set(parts)
            if any(self.reaches(d, p) for d in outside for p in parts):
                continue  # rope -> X -> copy: merging would make a cycle
            g = Group("rope_kv", list(nodes))
            groups[min(groups.index(p) for p in parts)] = g
            groups = [h for h in groups if h not in parts]
            self.group_of.update(dict.fromkeys(nodes, g))
        return groups

    def whole(self, nodes) -> bool:
        """The groups of ``nodes`` hold these nodes and no others."""
        parts = {id(self.group_of[m]): self.group_of[m] for m in nodes}.values()
        return all(set(p.nodes) <= set(nodes) for p in parts) and sum(len(p.nodes) for p in parts) == len(set(nodes))

    def order(self, groups: list[Group]) -> list[Group]:
        """Topological order of the groups, stable in the order of their first nodes."""
        pos = {g: k for k, g in enumerate(groups)}
        deps = {g: self.deps(g) for g in groups}
        done: set = set()
        out: list[Group] = []
        for root in groups:
            stack = [root]
            while stack:
                g = stack[-1]
                if g in done:
                    stack.pop()
                    continue
                todo = sorted((d for d in deps[g] if d not in done), key=pos.get)
                if todo:
                    stack.append(todo[0])
                    continue
                done.add(g)
                out.append(stack.pop())
        return out


def act_codes(x: Node, domain: tuple, outputs: set, whole: bool = True) -> Codes | None:
    """How the readers of ``x``, an output of a pointwise group over ``domain`` (or of an AQGEMM: its own shape), quantize
    it, where that group can store it so (module docstring): every reader an AQGEMM reading x as its x only, one format
    and one stored smooth vector (or none) among them, x no graph output, of the domain's shape with static rows (of at
    most ``MAX_ROW`` where the kernel holds them ``whole``), in a dtype the quantizer reads; a scale per row and
    act_group columns only from an AQGEMM (``whole`` False: its epilogue stores them). None otherwise."""
    readers = list(x.users)
    if not readers or any(u.op != "AQGEMM" or u.inputs[0] is not x or any(i is x for i in u.inputs[1:]) for u in readers):
        return None
    if x in outputs or x.dtype not in CODE_DTYPES or not _same(x.shape, domain):
        return None
    if not isinstance(x.shape[-1], int) or (whole and x.shape[-1] > MAX_ROW):
        return None
    kinds = {Codes(u.attrs["format"], aqgemm_operands(u.inputs, u.attrs)[3], u.attrs.get("act_group", 0)) for u in readers}
    if len(kinds) != 1:
        return None
    c = kinds.pop()
    if c.group and whole:  # (a pointwise kernel stores codes a scale a row; the AQGEMM then quantizes x by groups itself)
        return None
    return c if c.smooth is None or (c.smooth.op in SOURCE_OPS and c.smooth.dtype == "float32") else None


def norm_prologue(g: Group) -> Group | None:
    """The RMSNORM a gemm group begins with, as the pointwise group it is on its own (None when there is none)."""
    if g.kind != "gemm" or len(g.nodes) == 1:
        return None
    norm = g.nodes[0]
    return Group("pointwise", [norm], list(dict.fromkeys(norm.inputs)), [norm])


def rope_kv_nodes(attention: Node) -> tuple | None:
    """(ROPE q, ROPE k, INDEX_COPY k, INDEX_COPY v) when ``attention`` reads ROPE(q, cos, sin) as q and, as K and V, two
    caches (graph inputs) written along the slot axis at the same slots with ROPE(k, cos, sin) (read by nothing else)
    and v: one dtype throughout, 4-d, no quantized cache (its INDEX_COPYs write codes, so this never matches).
    None otherwise: the rope_kv group's pattern (``codegen/kernels/rope_kv.py``)."""
    q_rope, kc, vc = attention.inputs[:3]
    if q_rope.op != "ROPE" or kc.op != "INDEX_COPY" or vc.op != "INDEX_COPY" or attention.attrs.get("k_scale"):
        return None
    k_rope = kc.inputs[2]
    if k_rope.op != "ROPE" or q_rope.inputs[1:] != k_rope.inputs[1:] or set(k_rope.users) != {kc}:
        return None
    if kc.attrs["axis"] != 2 or vc.attrs["axis"] != 2 or kc.inputs[1] is not vc.inputs[1]:
        return None
    if kc.inputs[0].op != "INPUT" or vc.inputs[0].op != "INPUT" or kc.inputs[0] is vc.inputs[0]:
        return None
    values = (q_rope, k_rope, vc.inputs[2], kc, vc, *q_rope.inputs)
    if len({m.dtype for m in values}) != 1 or any(len(m.shape) != 4 for m in values):
        return None
    return q_rope, k_rope, kc, vc


def rope_norm(rope: Node) -> tuple[Node, ...]:
    """The RMSNORM over each head's dims that ROPE ``rope`` rotates the output of, read by nothing else, which the rope_kv
    group applies itself: (the RMSNORM,) in Qwen3's form (q_norm / k_norm: a weight of q's dtype, or none), or (CAST,
    RMSNORM, CAST) in Gemma 3's (q cast to float32, normalised with a float32 weight, cast back: ``rope_norm_parts``);
    () when there is none."""
    x = rope.inputs[0]
    if x.op == "CAST" and set(x.users) == {rope} and x.dtype == rope.dtype and x.inputs[0].op == "RMSNORM":
        norm = x.inputs[0]
        cast = norm.inputs[0]
        weight = norm.inputs[1:]
        if norm.dtype == "float32" and set(norm.users) == {x} and cast.op == "CAST" and set(cast.users) == {norm} and \
                cast.inputs[0].dtype == rope.dtype and _head_norm(norm) and \
                all(len(w.shape) == 1 and w.dtype == "float32" for w in weight):
            return cast, norm, x
        return ()
    if x.op != "RMSNORM" or not _head_norm(x) or set(x.users) != {rope} or x.dtype != rope.dtype:
        return ()
    return (x,) if len(x.inputs) == 1 or (len(x.inputs[1].shape) == 1 and x.inputs[1].dtype == x.dtype) else ()


def _head_norm(norm: Node) -> bool:
    return norm.attrs["dims"] == 1 and not norm.attrs.get("residual")


def rope_norm_parts(chain: tuple[Node, ...]) -> tuple[Node, Node]:
    """(the normalised tensor, the RMSNORM) of a ``rope_norm`` chain."""
    norm = next(m for m in chain if m.op == "RMSNORM")
    return chain[0].inputs[0], norm


def rope_kv_core(g: Group) -> tuple:
    """(ROPE q, ROPE k, INDEX_COPY k, INDEX_COPY v) of a rope_kv group: its last four nodes (``rope_norm``s first)."""
    return tuple(g.nodes[-4:])


def rope_kv_reader(g: Group) -> Node:
    """The ATTENTION a rope_kv group's roped q and k cache feed (``rope_kv_nodes``)."""
    q_rope, _, kc, _ = rope_kv_core(g)
    return next(u for u in q_rope.users if u.op == "ATTENTION" and u.inputs[1] is kc)


def rope_kv_parts(g: Group) -> list[Group]:
    """A rope_kv group as the groups it merged (what runs when the plan cannot write the caches in place)."""
    core = rope_kv_core(g)
    chains = [c for c in map(rope_norm, core[:2]) if c and c[0] in g.nodes]
    parts = [Group("pointwise", list(c)) for c in chains] + [Group("pointwise", [n]) for n in core[:2]] + \
        [Group("reference", [n]) for n in core[2:]]
    for p in parts:
        members = set(p.nodes)
        p.inputs = list(dict.fromkeys(i for n in p.nodes for i in n.inputs if i not in members))
        p.outputs = p.nodes[-1:]
    return parts[:-4] + [parts[-3], parts[-2], parts[-1], parts[-4]]  # (the norms,) k's rope before its copy, q's rope


def schedule(graph: Graph) -> list[Group]:
    """The graph's nodes partitioned into kernel groups, in an order that runs every group after the
    groups it reads (see the module docstring for the rules)."""
    return _Scheduler(graph).run()


def execute(graph: Graph, groups: list[Group], inputs: list, bindings: dict | None = None) -> list:
    """Run ``groups`` in order: pointwise groups as their generated Triton kernel, every other group by its
    ops' torch references. The simplest executor of a schedule; what tests compare to ``ir.interpret``."""
    bindings = bind_inputs(graph, inputs) if bindings is None else bindings
    env: dict = dict(zip(graph.inputs, inputs))
    device = data_device(inputs, graph.weights)
    for g in groups:
        if g.kind == "pointwise":
            env.update(zip(g.outputs, launch(g, [env.get(i) for i in g.inputs], bindings)))
        else:
            eval_nodes(g.nodes, env, bindings, graph.weights, device=device)
    return [env[o] for o in graph.outputs]


def summary(groups: list[Group]) -> dict:
    """Group counts by kind and the op chains of the pointwise groups (for the compile report)."""
    counts: dict = {}
    for g in groups:
        counts[g.kind] = counts.get(g.kind, 0) + 1
    return {"groups": counts, "pointwise": [" -> ".join(n.op for n in g.nodes) for g in groups if g.kind == "pointwise"]}
