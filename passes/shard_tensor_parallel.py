"""Tensor parallelism, Megatron-style: rank r's shard of a graph, after fusion (so each rank still gets merged, fused GEMMs).

    LINEAR(x, [W_1; ..; W_n])             x replicated   ->  LINEAR(x, [W_1[r]; ..; W_n[r]])                   column-parallel
    GEMM(x, W, b, residual)               x split on K   ->  ALL_REDUCE(GEMM(x[r], W[:, r], b, residual on rank 0))   row-parallel
    h = LINEAR(x, W_vocab) (an output)                   ->  ALL_GATHER(LINEAR(x, W_vocab[r]), axis=-1)       vocab-parallel head

``W_i[r]``: block r of part i's rows. The parts of a merged weight are its SLICE consumers (Q / K / V of a horizontal
GEMM) or its GLU halves (gate / up), each split on its own, so merged weights split by their parts. A part read as
heads (a RESHAPE to [.., H, head_dim]) splits by whole heads; with fewer heads than ranks (kv heads) neighbouring
ranks hold copies of one head (block ``r * H // world`` of H). The split then flows through the ops between the two
GEMMs: SLICE, RESHAPE and PERMUTE move it to another axis (RESHAPE's target shape shrinks), elementwise ops and ROPE
keep it (their other operands broadcast along it), INDEX_COPY writes a KV cache whose graph input shrinks to this
rank's heads, ATTENTION pairs each rank's query heads with its kv heads. Embeddings stay replicated: a lookup reads
B * T rows, and a vocab-parallel table would cost an ALL_REDUCE of [B, T, D] per step for memory alone.

A column-parallel GEMM whose split reaches an op that cannot keep it (a norm, an epilogue with a replicated gate) is
declined with that reason and stays replicated: the walk starts again without it, so the result never gathers
mid-graph. Graph outputs are gathered (the logits: every rank gets all of them); an output that is a sharded input's
new value (a KV cache) stays this rank's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..ir.graph import Graph, Node
from ..ir.ops import OPS
from ..ir.types import ITEMSIZE, dims_equal, eval_dim, numel
from .report import PassStats

GEMM_OPS = ("LINEAR", "GEMM")


@dataclass(frozen=True)
class Shard:
    """This rank holds block ``index`` of ``blocks`` equal blocks of the value along ``axis`` (blocks < world: ranks
    ``r`` with one ``r * blocks // world`` hold copies of one block)."""
    axis: int
    blocks: int
    index: int


@dataclass(frozen=True)
class Parts:
    """A column-parallel GEMM's output: along ``axis``, parts of full widths ``sizes``, each held as its Shard."""
    axis: int
    sizes: tuple
    shards: tuple


class _Retry(Exception):
    """The split of column GEMM ``gemm`` reaches an op that cannot keep it: walk again with ``gemm`` replicated."""

    def __init__(self, gemm: Node, reason: str):
        super().__init__(reason)
        self.gemm, self.reason = gemm, reason


def shard_tensor_parallel(graph: Graph, rank: int = 0, world: int = 1) -> PassStats:
    """Rewrite ``graph`` in place into rank ``rank`` of ``world``'s shard (see the module docstring); world 1: no change.

    The statistics: ``rules`` counts column / row / vocab-parallel GEMMs and collectives; ``notes`` give this rank's
    summary and the bytes each collective moves per token (batch 1, one position: its tensor at every symbol = 1)."""
    stats = PassStats()
    if world == 1:
        return stats
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not one of the {world} ranks")
    replicated: dict[Node, str] = {}
    while True:
        walk = _Walk(graph, rank, world, replicated)
        try:
            new = walk.run()
            break
        except _Retry as e:
            replicated[e.gemm] = e.reason
    for gemm, reason in replicated.items():
        stats.decline(f"kept replicated: {reason}", gemm)
    _adopt(graph, new)
    stats.rules = dict(walk.counts)
    stats.rewritten = walk.counts.get("column", 0) + walk.counts.get("row", 0)
    stats.notes = [f"rank {rank} of {world}: " + ", ".join(f"{v} {k}" for k, v in walk.counts.items()),
                   f"collectives move {comm_bytes_per_token(graph)} bytes per token (payload per rank)"]
    return stats


def comm_bytes_per_token(graph: Graph) -> int:
    """Bytes the collectives of ``graph`` send per token and rank: each one's input at batch 1, one position."""
    ones = dict.fromkeys(graph.symbols, 1)
    total = 0
    for n in graph.nodes:
        if n.op in ("ALL_REDUCE", "ALL_GATHER"):
            x = n.inputs[0]
            total += eval_dim(numel(x.shape), ones) * ITEMSIZE[x.dtype]
    return total


def _adopt(graph: Graph, new: Graph) -> None:
    """``graph`` becomes ``new`` (a pass rewrites the graph it is given)."""
    for k in ("nodes", "inputs", "outputs", "output_names", "weights", "_names", "_weight_nodes"):
        setattr(graph, k, getattr(new, k))


def _local_shape(shape: tuple, state) -> tuple:
    out = list(shape)
    if isinstance(state, Shard):
        out[state.axis] = shape[state.axis] // state.blocks
    elif isinstance(state, Parts):
        out[state.axis] = sum(size // s.blocks for size, s in zip(state.sizes, state.shards))
    return tuple(out)


def _block(t: torch.Tensor, dim: int, start: int, size: int, s: Shard) -> torch.Tensor:
    """Block ``s.index`` of ``s.blocks`` of ``t[start:start + size]`` along ``dim``."""
    step = size // s.blocks
    return t.narrow(dim, start + s.index * step, step)


class _Walk:
    """One walk over the graph in order, building the rank's graph ``new``; ``state``: old node -> None (replicated) |
    Shard | Parts; ``origin``: old node -> the column GEMM its split comes from."""

    def __init__(self, graph: Graph, rank: int, world: int, replicated: dict):
        self.g, self.rank, self.world, self.replicated = graph, rank, world, replicated
        self.new = Graph()
        self.new.symbols, self.new.updates = dict(graph.symbols), dict(graph.updates)
        self.map: dict[Node, Node] = {}
        self.state: dict[Node, object] = {}
        self.origin: dict[Node, Node] = {}
        self.counts: dict[str, int] = {}

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def run(self) -> Graph:
        for n in self.g.nodes:
            if n.op not in ("INPUT", "WEIGHT", "CONST"):
                self.visit(n)
        outs = [self.output(o, name) for o, name in zip(self.g.outputs, self.g.output_names)]
        for i in self.g.inputs:
            self.value(i)  # (an input nothing reads)
        self.new.inputs = [self.map[i] for i in self.g.inputs]
        self.new.set_outputs(outs, list(self.g.output_names))
        self.new.remove_dead()
        for k, t in self.new.weights.items():
            self.new.weights[k] = t.contiguous()
        return self.new

    # -- values ---------------------------------------------------------------------------------------------------
    def value(self, n: Node, state=None) -> Node:
        """The rank's node for ``n``; a source is made on first use (an input with the split ``state`` asks for)."""
        if n not in self.map:
            if n.op == "INPUT":
                self.map[n] = self.new.add_input(n.attrs["name"], _local_shape(n.shape, state), n.dtype)
                self.state[n] = state
            elif n.op == "WEIGHT":
                self.map[n] = self.new.add_weight(n.attrs["name"], self.g.weights[n.attrs["name"]])
            else:
                self.map[n] = self.new.const(n.attrs["value"], name=n.name)
        return self.map[n]

    def weight(self, old: Node, tensor: torch.Tensor) -> Node:
        """This rank's block of WEIGHT ``old``: under its name, or ``name.tpR`` when other nodes read ``old`` too (a tied
        embedding keeps the whole table under the name)."""
        base = name = old.attrs["name"] + (f".tp{self.rank}" if len(old.users) > 1 else "")
        k = 2
        while name in self.new.weights:
            name, k = f"{base}_{k}", k + 1
        return self.new.add_weight(name, tensor)

    def add(self, n: Node, inputs: list, state=None, origin: Node | None = None, **attrs) -> Node:
        m = self.new.add(n.op, inputs, name=n.name, loc=n.loc, **{**n.attrs, **attrs})
        self.map[n], self.state[n] = m, state
        if origin is not None:
            self.origin[n] = origin
        return m

    def retry(self, n: Node, reason: str):
        src = next(self.origin[i] for i in n.inputs if self.state.get(i) is not None)
        raise _Retry(src, f"its split reaches {n.op} %{n.name}, which {reason}")

    # -- nodes ----------------------------------------------------------------------------------------------------
    def visit(self, n: Node) -> None:
        states = [self.state.get(i) for i in n.inputs]
        if n.op in GEMM_OPS and n.inputs[1].op == "WEIGHT" and len(n.inputs[1].shape) == 2:
            if states[0] is None and n not in self.replicated and self.column(n):
                return
            if states[0] is not None:
                return self.row(n, states[0])
        if all(s is None for s in states):
            self.add(n, [self.value(i) for i in n.inputs])
            return
        rule = _RULES.get(n.op) or (_elementwise if OPS[n.op].kind == "elementwise" and n.op not in ("TRIU", "TRIL") else None)
        if rule is None:
            self.retry(n, "keeps no split")
        rule(self, n, states)

    def output(self, o: Node, name: str) -> Node:
        s = self.state.get(o)
        if s is None or name in self.g.updates:  # a sharded input's new value stays this rank's
            return self.map[o] if o in self.map else self.value(o)
        if isinstance(s, Parts):
            raise _Retry(self.origin[o], f"graph output {name!r} holds its merged parts")
        self.count("all_gather")
        return self.new.add("ALL_GATHER", [self.map[o]], name=f"{o.name}_gather", axis=s.axis, world=self.world,
                            stride=self.world // s.blocks)

    # -- column / row parallel GEMMs ------------------------------------------------------------------------------
    def column(self, n: Node) -> bool:
        """Split the output features of ``n`` by its parts; False (declined, recorded) when they do not divide."""
        a = n.attrs
        if n.op == "GEMM" and (a["gate"] or a["residual"]):
            self.replicated[n] = "a column-parallel epilogue would need its gate / residual split"
            return False
        sizes, heads = _parts(n)
        shards = []
        for size, units in zip(sizes, heads):
            if units % self.world == 0:
                shards.append(Shard(len(n.shape) - 1, self.world, self.rank))
            elif self.world % units == 0 and not (n.op == "GEMM" and a["glu"]):
                shards.append(Shard(len(n.shape) - 1, units, self.rank * units // self.world))
            else:
                self.replicated[n] = f"a part of {units} heads / features does not split over {self.world} ranks"
                return False
        w, b = (self.g.weights[i.attrs["name"]] if i is not None else None for i in (n.inputs[1], _bias(n)))
        starts = [sum(sizes[:k]) for k in range(len(sizes))]
        inputs = [self.value(n.inputs[0]),
                  self.weight(n.inputs[1], torch.cat([_block(w, 0, o, z, s) for o, z, s in zip(starts, sizes, shards)]))]
        if b is not None:
            inputs.append(self.weight(_bias(n), torch.cat([_block(b, 0, o, z, s) for o, z, s in zip(starts, sizes, shards)])))
        inputs += [self.value(i) for i in n.inputs[2 + (b is not None):]]
        state = shards[0] if len(shards) == 1 or (n.op == "GEMM" and a["glu"]) else Parts(len(n.shape) - 1, tuple(sizes), tuple(shards))
        self.add(n, inputs, state, origin=n)
        self.count("column")
        return True

    def row(self, n: Node, s) -> None:
        """``n`` reads a split of its input features: each rank multiplies its block, ALL_REDUCE sums the blocks; the
        bias and residual join on rank 0 only (the sum adds them once), a gate multiplies every rank's block."""
        x = n.inputs[0]
        a = n.attrs
        if not isinstance(s, Shard) or s.axis != len(x.shape) - 1 or s.blocks != self.world:
            self.retry(n, "reads a split that is not a block per rank of its input features")
        if n.op == "GEMM" and (a["act"] != "none" or a["glu"]):
            self.retry(n, f"applies {a['act']}{' GLU' if a['glu'] else ''} after the sum of the ranks' blocks")
        rest = [i for i in n.inputs[2:]]
        if any(self.state.get(i) is not None for i in rest):
            self.retry(n, "has a split epilogue operand")
        keep = {"bias": _bias(n), "residual": n.inputs[-1] if n.op == "GEMM" and a["residual"] else None}
        drop = {v for v in keep.values() if v is not None} if self.rank else set()
        w = self.g.weights[n.inputs[1].attrs["name"]]
        inputs = [self.value(x), self.weight(n.inputs[1], _block(w, 1, 0, w.shape[1], s))]
        inputs += [self.value(i) for i in rest if i not in drop]
        attrs = {k: a[k] and v not in drop for k, v in keep.items()} if n.op == "GEMM" else {}
        part = self.new.add(n.op, inputs, name=f"{n.name}_part", loc=n.loc, **{**a, **attrs})
        self.map[n] = self.new.add("ALL_REDUCE", [part], name=n.name, loc=n.loc, world=self.world)
        self.state[n] = None
        self.count("row")
        self.count("all_reduce")


def _bias(n: Node) -> Node | None:
    if n.op == "LINEAR":
        return n.inputs[2] if len(n.inputs) == 3 else None
    return n.inputs[2] if n.attrs["bias"] else None


def _parts(n: Node) -> tuple[list[int], list[int]]:
    """The widths of the parts of GEMM ``n``'s output features, and each part's units (heads, else features): its
    GLU halves, the SLICEs that tile its output, or one part."""
    width = n.shape[-1] * (2 if n.op == "GEMM" and n.attrs["glu"] else 1)
    if n.op == "GEMM" and n.attrs["glu"]:
        return [width // 2] * 2, [width // 2] * 2
    axis = len(n.shape) - 1
    cuts = sorted((u.attrs["start"], u.attrs["end"], u) for u in n.users
                  if u.op == "SLICE" and u.attrs["axis"] == axis and u.attrs["step"] == 1)
    if len(cuts) == len(n.users) and [c[0] for c in cuts] == [0] + [c[1] for c in cuts[:-1]] and cuts[-1][1] == width:
        return [e - s for s, e, _ in cuts], [_heads(u, e - s) for s, e, u in cuts]
    return [width], [_heads(n, width)]


def _heads(n: Node, width: int) -> int:
    """How many heads ``n`` holds along its last axis: the head count every RESHAPE reading it splits it into
    (``[.., width] -> [.., H, width / H]``), else ``width`` (features)."""
    counts = set()
    for u in n.users:
        if u.op != "RESHAPE" or len(u.shape) != len(n.shape) + 1 or not isinstance(u.shape[-2], int):
            return width
        counts.add(u.shape[-2])
    return counts.pop() if len(counts) == 1 else width


# ----------------------------------------------------------------------------- ops between the GEMMs


def _slice(w: _Walk, n: Node, states) -> None:
    s, a = states[0], n.attrs
    if isinstance(s, Shard) and a["axis"] != s.axis:
        w.add(n, [w.value(n.inputs[0])], s, w.origin[n.inputs[0]])
        return
    if not isinstance(s, Parts) or a["axis"] != s.axis or a["step"] != 1:
        w.retry(n, "slices along the split")
    starts = [sum(s.sizes[:k]) for k in range(len(s.sizes))]
    local = [size // sh.blocks for size, sh in zip(s.sizes, s.shards)]
    for k, (o, size) in enumerate(zip(starts, s.sizes)):
        if (a["start"], a["end"]) == (o, o + size):
            lo = sum(local[:k])
            w.add(n, [w.value(n.inputs[0])], s.shards[k], w.origin[n.inputs[0]], start=lo, end=lo + local[k])
            return
    w.retry(n, "slices across the merged parts")


def _reshape(w: _Walk, n: Node, states) -> None:
    """A block of src's axis a is a block of dst's axis b when the dims before them hold as many elements (the flat
    offsets of block k are [p * R + k * R / B, ..) on both sides) and dst[b] divides into the blocks."""
    s, src, dst = states[0], n.inputs[0].shape, n.shape
    if isinstance(s, Shard):
        before = numel(src[:s.axis])
        for b in range(len(dst)):
            if dims_equal(numel(dst[:b]), before) and isinstance(dst[b], int) and dst[b] % s.blocks == 0:
                state = Shard(b, s.blocks, s.index)
                w.add(n, [w.value(n.inputs[0])], state, w.origin[n.inputs[0]], shape=_local_shape(dst, state))
                return
    w.retry(n, "reshapes the split across its blocks")


def _permute(w: _Walk, n: Node, states) -> None:
    s = states[0]
    if not isinstance(s, Shard):
        w.retry(n, "permutes merged parts")
    w.add(n, [w.value(n.inputs[0])], Shard(n.attrs["perm"].index(s.axis), s.blocks, s.index), w.origin[n.inputs[0]])


def _elementwise(w: _Walk, n: Node, states) -> None:
    """Every split operand split alike (axes counted from the right, as broadcasting aligns them); every other operand
    broadcasts along that axis."""
    rank = len(n.shape)
    if any(isinstance(s, Parts) for s in states):
        w.retry(n, "combines merged parts")
    split = {Shard(s.axis + rank - len(i.shape), s.blocks, s.index) for i, s in zip(n.inputs, states) if s is not None}
    if len(split) != 1:
        w.retry(n, "combines differently split operands")
    (out,) = split
    for i, s in zip(n.inputs, states):
        if s is None and not _broadcasts(i, out.axis - rank):
            w.retry(n, f"reads %{i.name} whole along the split axis")
    origin = next(w.origin[i] for i, s in zip(n.inputs, states) if s is not None)
    w.add(n, [w.value(i) for i in n.inputs], out, origin)


def _broadcasts(n: Node, axis_from_right: int) -> bool:
    """``n`` broadcasts along the axis ``axis_from_right`` (negative) of a larger value: size 1 there, or no such axis."""
    return -axis_from_right > len(n.shape) or n.shape[axis_from_right] == 1


def _index_copy(w: _Walk, n: Node, states) -> None:
    """A KV-cache write: the cache (a graph input read only here) becomes this rank's heads of it."""
    x, idx, src = n.inputs
    s = states[2]
    if not isinstance(s, Shard) or s.axis == n.attrs["axis"] or states[1] is not None:
        w.retry(n, "writes along the split")
    if x.op == "INPUT" and x not in w.map and set(x.users) == {n}:
        w.value(x, s)
        w.origin[x] = w.origin[src]
    if w.state.get(x) != s:
        w.retry(n, f"writes into %{x.name}, which is not split like the source")
    w.add(n, [w.value(i) for i in n.inputs], s, w.origin[src])


def _attention(w: _Walk, n: Node, states) -> None:
    """Each rank's query heads attend with its kv heads: the same heads, or with GQA the kv heads of their groups."""
    q, k = n.inputs[0], n.inputs[1]
    sq, sk, sv = states[:3]
    ax = len(q.shape) - 3
    if not all(isinstance(s, Shard) and s.axis == ax for s in (sq, sk, sv)) or sk != sv:
        w.retry(n, "needs query and kv heads split")
    if len(states) == 4 and (states[3] is not None or not _broadcasts(n.inputs[3], ax - len(q.shape))):
        w.retry(n, "has a mask per head")
    hq, hk = q.shape[ax], k.shape[ax]
    qn, kn = hq // sq.blocks, hk // sk.blocks
    qlo, klo = sq.index * qn, sk.index * kn
    g = hq // hk if n.attrs["gqa"] else 1
    aligned = (qlo == klo * g and qn == kn * g) or (kn == 1 and qlo // g == klo and (qlo + qn - 1) // g == klo)
    if not aligned:
        w.retry(n, f"pairs query heads [{qlo}, {qlo + qn}) with kv heads [{klo}, {klo + kn}) of groups of {g}")
    w.add(n, [w.value(i) for i in n.inputs], sq, w.origin[q], gqa=n.attrs["gqa"] or qn != kn)


_RULES = {"SLICE": _slice, "RESHAPE": _reshape, "PERMUTE": _permute, "INDEX_COPY": _index_copy, "ATTENTION": _attention}
