"""Fold the RoPE of q and k into the merged QKV AQGEMM that produces them: the GEMM stores them rotated.

    h = AQGEMM(x, ..)                           [B, S, N]        h = AQGEMM(x, .., cos', sin'; rope_dim=D, rope_end=E)
    q = ROPE(view(h[..., 0:Q]), cos, sin)                   =>  q = view(h[..., 0:Q])
    k = ROPE(view(h[..., Q:E]), cos, sin)                        k = view(h[..., Q:E])
    v = view(h[..., E:N])                                        v = view(h[..., E:N])

where view is RESHAPE [B, S, heads, D] (then PERMUTE to [B, heads, S, D]) and cos' / sin' are cos / sin as
[B or 1, S, D] (a RESHAPE dropping their heads axis). The ROPE kernels of a prefill read and write q and k once more
after the GEMM stored them (the Llama-3.2-1B shape at 2048 tokens: 32 launches, ~190 us of a 6.5 ms fp8 forward,
bench/NOTES.md session 41); the AQGEMM's epilogue rotates its tile before it stores it instead
(``codegen/kernels/rope_cols.py``; a library GEMM is followed by one in-place kernel over q's and k's heads).

Numerics: the reference computes exactly the unfused formula (the AQGEMM's output rounded, then ROPE on it in its
dtype: ``ops_fused.rope_columns_ref``); the fused kernel rotates the float32 value before its one rounding, so it
differs from the unfused kernels by at most a rounding of the output's dtype.

Where: after both quantizers (the AQGEMMs exist) and ``fold_norm_weight``. Only AQGEMMs: a 16-bit QKV GEMM is
cuBLAS's, with no epilogue of kiln's to rotate in. Declined, with the reason:
- an AQGEMM with glu, gate or residual, an output of rank other than 3, or one that is a graph output;
- a reader of its output other than a SLICE of the last axis (step 1), or a rotated slice whose view chain is read by
  anything else;
- rotated columns that are not whole heads of one D from column 0 up, or not-rotated slices reading below them;
- a ROPE read by anything but ATTENTION, through views (a decode step's ROPE(k) is written into the KV cache: the
  rope_kv kernel fuses those, ``codegen/schedule.py``), or q's and k's with different cos / sin.

Measured (H100, the 1B prefill of 2048 tokens, bench/NOTES.md session 42): the ROPE kernels' 170 us leave, the QKV
GEMM's epilogue grows by ~10 us a GEMM (its cos / sin loads and the heads' split in registers): about even so far.
"""
from __future__ import annotations

from ..ir.graph import Graph, Node
from .report import PassStats


def fuse_rope_epilogue(graph: Graph) -> PassStats:
    """ROPE(view(AQGEMM(..)[..., cols])) for q and k  ->  AQGEMM(.., cos, sin; rope) (module docstring)."""
    stats = PassStats()
    for gemm in [n for n in graph.nodes if n.op == "AQGEMM" and not n.attrs.get("rope_dim", 0)]:
        found = _match(graph, gemm)
        if isinstance(found, str):
            if found:  # ("": no ROPE reads it, nothing to say)
                stats.decline(found, gemm)
            continue
        ropes, dim, end, head_axis = found
        cos, sin = (_tables(graph, ropes[0].inputs[i], ropes[0], head_axis, dim) for i in (1, 2))
        attrs = {**gemm.attrs, "rope_dim": dim, "rope_end": end}
        new = graph.add("AQGEMM", [*gemm.inputs, cos, sin], name=f"{gemm.name}_rope", loc=gemm.loc, **attrs)
        graph.replace_all_uses(gemm, new)
        for r in ropes:
            graph.replace_all_uses(r, r.inputs[0])
        stats.rewritten += 1
        stats.notes.append(f"{gemm.name}: {len(ropes)} ROPE(s) over columns [0, {end}) in heads of {dim} folded in")
    if stats.rewritten:
        graph.remove_dead()
        graph.toposort()
    return stats


def _match(graph: Graph, gemm: Node) -> tuple | str:
    """(the ROPEs, head dim, rotated columns' end, the heads axis of the ROPEs' x) where ``gemm``'s readers fit the
    pattern, else why not ("" where no ROPE reads it)."""
    a = gemm.attrs
    if len(gemm.shape) != 3:
        return ""
    rotated, plain = [], []  # (start, end, rope, head dim, head axis) / (start, reader)
    for s in gemm.users:
        if s.op != "SLICE" or s.attrs["axis"] not in (2, -1) or s.attrs["step"] != 1 or s.inputs.count(gemm) != 1 \
                or not isinstance(s.attrs["start"], int) or not isinstance(s.attrs["end"], int):
            return f"{s.op} %{s.name} reads its output (not a SLICE of the last axis)" if _has_rope(gemm) else ""
        chain = _rope_chain(s)
        if isinstance(chain, tuple):
            rotated.append((s.attrs["start"], s.attrs["end"], *chain))
        else:
            plain.append((s.attrs["start"], chain))
    if not rotated:
        return ""
    if a["glu"] or a["gate"] or a["residual"]:
        return "it has a glu, gate or residual epilogue"
    if gemm in graph.outputs or any(r[2] in graph.outputs for r in rotated):
        return "its output or a ROPE's is a graph output"
    dims = {r[3] for r in rotated}
    if len(dims) != 1 or len({(r[2].inputs[1], r[2].inputs[2]) for r in rotated}) != 1 or len({r[4] for r in rotated}) != 1:
        return "its ROPEs differ in head dim, cos / sin or layout"
    (dim,) = dims
    for t in rotated[0][2].inputs[1:]:
        shape = [1] * (4 - len(t.shape)) + list(t.shape)
        if len(t.shape) > 4 or shape[rotated[0][4]] != 1 or shape[3] != dim:
            return f"cos / sin {list(t.shape)} vary over the heads or not over the head dims"
    rotated.sort(key=lambda r: r[0])
    end = 0
    for start, stop, rope, *_ in rotated:
        if start != end or (stop - start) % dim:
            return f"ROPE %{rope.name} rotates columns [{start}, {stop}): not whole heads of {dim} following column {end}"
        readers = _readers(rope)
        if readers != {"ATTENTION"}:
            return f"ROPE %{rope.name} is read by {sorted(readers)} (not only ATTENTION)"
        end = stop
    for start, why in plain:
        if start < end:
            return f"a slice reading columns from {start} is not rotated ({why}) but overlaps the rotated [0, {end})"
    return [r[2] for r in rotated], dim, end, rotated[0][4]


def _readers(n: Node) -> set[str]:
    """The ops reading ``n``, through PERMUTE / RESHAPE views (q roped before its transpose to [B, heads, S, D])."""
    return {op for u in n.users for op in (_readers(u) if u.op in ("PERMUTE", "RESHAPE") else {u.op})}


def _has_rope(gemm: Node) -> bool:
    return any(isinstance(_rope_chain(s), tuple) for s in gemm.users if s.op == "SLICE")


def _rope_chain(s: Node) -> tuple | str:
    """(the ROPE, head dim, heads axis of its x) where SLICE ``s`` is RESHAPEd to [B, S, heads, D] (then PERMUTEd to
    [B, heads, S, D]) and ROPE'd, each step the only reader of the last; else why not."""
    r = _only_user(s)
    if r is None or r.op != "RESHAPE" or len(r.shape) != 4 or list(r.shape[:2]) != list(s.shape[:2]) \
            or not isinstance(r.shape[3], int):
        return "not RESHAPEd to [B, S, heads, D]"
    x, axis = r, 2
    p = _only_user(r)
    if p is not None and p.op == "PERMUTE" and tuple(p.attrs["perm"]) == (0, 2, 1, 3):
        x, axis = p, 1
    rope = _only_user(x)
    if rope is None or rope.op != "ROPE" or rope.inputs[0] is not x or x in rope.inputs[1:]:
        return "its view is not read by one ROPE alone"
    return rope, r.shape[3], axis


def _only_user(n: Node) -> Node | None:
    users = list(n.users)
    return users[0] if len(users) == 1 and users[0].inputs.count(n) == 1 else None


def _tables(graph: Graph, t: Node, rope: Node, head_axis: int, dim: int) -> Node:
    """cos or sin ``t`` of ``rope`` (broadcasting to its x, heads at ``head_axis``) as [B or 1, S or 1, dim]: a RESHAPE
    dropping the heads axis (of size 1), or ``t`` itself where it has that shape already."""
    shape = [1] * (4 - len(t.shape)) + list(t.shape)  # (``_match`` checked: 1 at head_axis, dim last)
    want = tuple(d for k, d in enumerate(shape) if k != head_axis)
    return t if tuple(t.shape) == want else graph.add("RESHAPE", [t], name=f"{t.name}_rows", shape=want)
