"""Weight-only quantization: a matmul on a stored weight becomes a QGEMM on that weight packed at compile time.

    LINEAR(x, W[, b])  /  MATMUL(x, W^T)  /  GEMM(x, W[, b][, gate][, residual]; act, glu)
        ->  QGEMM(x, q, s[, z][, b][, gate][, residual]; act, glu, bits, group)      W ~ (q - z) * s

The packed format is ``ir/quant.py``'s; W is packed by rounding to nearest (``quantize_rtn``) or by GPTQ
(``passes/gptq.py``), which needs the Hessian H = 2/n X^T X of the GEMM's inputs X on calibration data.

Why last in the pipeline: after horizontal fusion a merged QKV / gate-up / adaLN GEMM is ONE weight with ONE
input, so it is quantized as one weight against one Hessian (quantization-aware horizontal fusion), and the
epilogues fused into it stay fused in the QGEMM.

Calibration: the float graph (this graph, before the rewrite) runs on each calibration sample (a flat list of
input tensors, graph order) with the reference ops (``ir/interpret.py``'s ``eval_node``), and every quantized
GEMM's input rows are added to its weight's Hessian as they are computed (streaming: one sample's values
at a time, each freed after its last reader). A weight read by several GEMMs (CSE merged them) gets one
Hessian over all their inputs and is packed once.

Measured error, per quantized weight: the relative output error on the calibration data, from the Hessian
(exact, no second pass): ||X (W - Wq)^T|| / ||X W^T|| = sqrt(tr(D H D^T) / tr(W H W^T)), D = W - Wq, of the
matmul before its epilogue. Without calibration data: the weight's own relative error ||D|| / ||W||.

Choices, and why:
- 8-bit weights have one group per output channel (int8 per channel is near lossless); 4-bit ones groups of
  ``QuantizeSpec.group`` input features (32 / 64 / 128, or per channel).
- The output head (an LM head: a GEMM whose weight is also an embedding table, or whose result is a graph
  output through views / casts only) is quantized by default at 8 bits (per output channel) in every mode: its
  rounding noise lands in the logits unfiltered by any later layer, and at 4 bits that is the single largest loss
  (bench/quality.py on the shared pyllama model: GPTQ +0.56% held-out perplexity, +1.47% with the head at 4 bits as
  well); at 8 bits it costs nothing measurable, and the head is a large share of a small LLM's bytes per token
  (Llama-3.2-1B: 21% of the bf16 weights, 52% of a w4a16 step's with the head kept in bf16).
  ``QuantizeSpec.lm_head`` True quantizes it at the mode's bits, False keeps it float. A tied head keeps its float
  table for the embedding.
- Weights a checkpoint holds already quantized (``prequantized``, e.g. a GPTQ checkpoint's, ``models/gptq.py``) are
  packed as given, method "checkpoint", and measured like the others against the float weight the graph holds (its
  dequantized codes). A weight horizontal fusion merged is built from its parts (``Graph.weight_parts``) when all are
  quantized alike, else quantized as usual with a note; the checkpoint decides which weights stay float. An act-order
  checkpoint's weight (a ``QuantWeight.perm``) is read on x's features gathered in its packed order:
  QGEMM(INDEX(x, perm), ...), one gather of x per GEMM; where x is another QGEMM's output read only there (a down
  projection after the gate / up GEMM) that QGEMM's rows are permuted at compile time instead.
- GPTQ needs a Hessian of full rank: a weight with fewer calibration rows than input features (an LM head in
  a step graph sees one row per sample) is rounded to nearest instead, and a note says so.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, replace

import torch

from ..errors import KilnError
from ..ir.graph import Graph, Node
from ..ir.quant import GROUPS, QuantWeight, check_layout, dequantize, quantize_rtn
from .calibrate import observe_inputs
from .gptq import HessianAccumulator, gptq
from .report import PassStats

MODES = {"w8a16": (8, "rtn"), "w8a16-gptq": (8, "gptq"), "w4a16": (4, "rtn"), "w4a16-gptq": (4, "gptq")}
CALIBRATION_HINT = ("give calibration data: kiln.compile(..., calibration=[inputs, ...]), kiln.from_hf(..., calibration=texts), "
                    "Generator.from_pretrained(..., calibration=...), or kiln compile ... --calib FILE; or use a rounding mode "
                    "(w8a16, w4a16)")
_VIEWS = ("RESHAPE", "SLICE", "PERMUTE", "EXPAND", "CAST")


@dataclass(frozen=True)
class QuantizeSpec:
    """What ``quantize_weights`` does (built from ``CompileConfig.quantize*`` by ``CompileConfig.quantize_spec``)."""

    mode: str  # one of MODES: "w<bits>a16" rounds to nearest, "-gptq" runs GPTQ on calibration data
    group: int | None = 128  # 4-bit group (32 / 64 / 128; None: per output channel); 8-bit is per output channel
    symmetric: bool = True  # False: a zero point per group (uint8 zeros)
    lm_head: bool | None = None  # the output head: True at the mode's bits, False float, None at 8 bits (module docstring)
    act_order: bool = False  # GPTQ quantizes inputs by descending Hessian diagonal
    damp: float = 0.01  # GPTQ damping, a fraction of mean(diag H)

    def __post_init__(self):
        if self.mode not in MODES:
            raise KilnError(f"quantize mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.group is not None and self.group not in GROUPS:
            raise KilnError(f"quantize group {self.group!r} is not one of {', '.join(map(str, GROUPS))} (or None: per channel)")

    @property
    def bits(self) -> int:
        return MODES[self.mode][0]

    @property
    def method(self) -> str:
        return MODES[self.mode][1]

    def group_for(self, k: int) -> int:
        return k if self.bits == 8 or self.group is None else self.group

    def head_spec(self, graph: Graph, n: Node) -> QuantizeSpec | None:
        """How output head ``n`` of ``graph`` is quantized: this spec, its 8-bit form (lm_head None at 4 bits), or None
        (kept float)."""
        if self.lm_head is False:
            return None
        if self.lm_head is None and self.bits != 8:
            return replace(self, mode=self.mode.replace("w4", "w8", 1))
        return self


def quantize_weights(graph: Graph, spec: QuantizeSpec | None = None, calibration: list | None = None,
                     prequantized: dict[str, QuantWeight] | None = None) -> PassStats:
    """LINEAR / MATMUL / GEMM on a stored 2-d weight -> QGEMM on the weight packed by ``spec`` (module docstring).

    ``calibration``: samples, each a flat list of input tensors in graph order; required by GPTQ, optional for
    rounding (it then only measures each GEMM's output error). ``spec`` None: nothing to do.
    ``prequantized``: weights already quantized (a GPTQ checkpoint's), by graph weight name: those are packed as
    given (method "checkpoint"; a merged weight whose parts all are, from its parts), every other weight stays float."""
    stats = PassStats()
    if spec is None:
        return stats
    sites = _sites(graph, spec, stats, prequantized)
    if not sites:
        return stats
    if spec.method == "gptq" and not calibration and prequantized is None:
        raise KilnError(f"quantize={spec.mode!r} runs GPTQ, which needs calibration data; none was given", hint=CALIBRATION_HINT)
    hessians = _hessians(graph, sites, calibration) if calibration else {}
    if prequantized is not None:
        stats.notes.append(f"weights pre-quantized in the checkpoint: {len(prequantized)} packed from its codes, not quantized again")
    gathers, rounded = [], []
    for name, nodes in sites.items():
        w = _float_weight(graph, nodes[0])  # [N, K]
        acc = hessians.get(name)
        qw, why = checkpoint_weight(graph, name, prequantized) if prequantized is not None else (None, "")
        head = next((n for n in nodes if _is_output_head(graph, n)), None)
        site_spec = spec if head is None else spec.head_spec(graph, head)
        qw, method, why = (qw, "checkpoint", "") if qw is not None else _pack(w, acc, site_spec, why)
        if spec.method == "gptq" and method == "rtn" and (head is None or site_spec.bits < 8):
            rounded.append((name, acc.n if acc is not None else 0, w.shape[1]))
        packed = _add_packed(graph, name, qw)
        perm = _add_weight(graph, f"{name.removesuffix('^T').removesuffix('.weight')}.perm", qw.perm) if qw.perm is not None else None
        for n in nodes:
            q = _build(graph, n, packed, qw, perm)
            gathers += [q.inputs[0]] if perm is not None else []
            graph.replace_all_uses(n, q)
            stats.rewritten += 1
            stats.rules[method] = stats.rules.get(method, 0) + 1
        H = acc.value() if acc is not None else None
        where = f"output error {_output_error(w, qw, H):.2e} on {acc.n} calibration rows" if H is not None else \
            f"weight error {_output_error(w, qw, None):.2e} (no calibration data)"
        order = ", input features in the checkpoint's act order" if perm is not None else ""
        stats.notes.append(f"{name} [{qw.shape[0]}, {qw.shape[1]}] -> {qw.bits}-bit g{qw.group} {method}{order}: {where}"
                           + (f" ({why})" if why else "") + f"; read by {', '.join(n.name for n in nodes)}")
    if rounded:
        _warn_rounded(spec, rounded, len(sites))
    graph.remove_dead()  # (the float matmuls replaced: the users counted below are the live ones)
    folded = sum(_fold_gather(graph, n) for n in gathers)
    if folded:
        stats.notes.append(f"act order: {folded} of the {len(gathers)} gathers of x folded into the producing QGEMM's output "
                           f"order at compile time, {len(gathers) - folded} run")
        graph.remove_dead()
    graph.toposort()
    return stats


def _warn_rounded(spec: QuantizeSpec, rounded: list[tuple[str, int, int]], sites: int) -> None:
    """GPTQ asked for, rounding done: a weight's Hessian needs at least K calibration rows (its input features). Said
    once for all such weights (their report notes say it each); an output head at 8 bits (the default), which rounding
    to nearest keeps near-lossless, is not counted."""
    rows, k = min(r for _, r, _ in rounded), max(k for _, _, k in rounded)
    warnings.warn(f"quantize={spec.mode!r}: {len(rounded)} of {sites} weights were rounded to nearest, not GPTQ-fitted: "
                  f"their GEMMs saw {rows} calibration rows where GPTQ needs at least their input features (up to {k}), "
                  f"e.g. {rounded[0][0]}. Give more calibration tokens (at least {k} in all)", stacklevel=3)


def _fold_gather(graph: Graph, n: Node) -> bool:
    """INDEX(y, perm) where y is a QGEMM's output read only here (an act-order down projection reading the gate / up
    GEMM): the QGEMM's output features permuted at compile time instead, i.e. its packed rows, scales, zeros and bias
    (both halves of a GLU alike), and no gather at run time."""
    y, perm = n.inputs
    if y.op != "QGEMM" or y.attrs["gate"] or y.attrs["residual"] or len(y.users) != 1 or y in graph.outputs:
        return False
    if any(o.op != "WEIGHT" or len(o.users) != 1 for o in y.inputs[1:]):  # (packed for this GEMM alone)
        return False
    idx = graph.weights[perm.attrs["name"]]
    rows = torch.cat([idx, idx + len(idx)]) if y.attrs["glu"] else idx
    for o in y.inputs[1:]:
        t = graph.weights[o.attrs["name"]]
        graph.weights[o.attrs["name"]] = t.index_select(0, rows.to(t.device)).contiguous()
    graph.replace_all_uses(n, y)
    return True


# ----------------------------------------------------------------------------- pattern / guard


def _sites(graph: Graph, spec: QuantizeSpec, stats: PassStats, prequantized: dict | None = None) -> dict[str, list[Node]]:
    """The matmuls to quantize, by the name of their stored weight (declined ones noted with their reason); a
    weight that a MATMUL reads as [K, N] and another matmul as [N, K] is two sites ("name" and "name^T")."""
    sites: dict[str, list[Node]] = {}
    for n in graph.nodes:
        if n.op not in ("LINEAR", "MATMUL", "GEMM") or (n.op == "MATMUL" and n.inputs[1].op != "WEIGHT"):
            continue  # (a MATMUL of two activations, attention's q @ k^T, has no weight to quantize)
        why = _why_not(graph, n, spec) if prequantized is None else _why_not_checkpoint(graph, n, prequantized)
        if why is None:
            sites.setdefault(n.inputs[1].attrs["name"] + ("^T" if n.op == "MATMUL" else ""), []).append(n)
        else:
            stats.decline(why, n)
    return sites


def _why_not(graph: Graph, n: Node, spec: QuantizeSpec) -> str | None:
    w = n.inputs[1]
    if w.op != "WEIGHT" or w.attrs["name"] not in graph.weights:
        return f"weight is computed ({w.op}), not a stored WEIGHT: cannot pack it at compile time"
    if len(w.shape) != 2:
        return f"weight is {len(w.shape)}-d {list(w.shape)}; only 2-d weights are quantized"
    if w.dtype not in ("float32", "float16", "bfloat16"):
        return f"weight is {w.dtype}, not a float"
    k = w.shape[1] if n.op != "MATMUL" else w.shape[0]
    if _is_output_head(graph, n):
        head_spec = spec.head_spec(graph, n)
        if head_spec is None:
            what = " (LM head)" if is_lm_head(graph, n) else ""
            return (f"output head{what} kept in {w.dtype}: its error reaches the outputs unfiltered "
                    "(CompileConfig.quantize_lm_head=True quantizes it)")
        spec = head_spec
    try:
        check_layout(spec.bits, spec.group_for(k), (1, k))
    except ValueError as e:
        return f"{spec.bits}-bit layout: {e}"
    return None


def _why_not_checkpoint(graph: Graph, n: Node, prequantized: dict[str, QuantWeight]) -> str | None:
    """With a quantized checkpoint, the checkpoint decides: a weight none of whose parts it quantized stays float."""
    w = n.inputs[1]
    if w.op != "WEIGHT" or n.op == "MATMUL":
        return f"{'a MATMUL' if w.op == 'WEIGHT' else 'a computed'} weight: not one of the checkpoint's quantized linears"
    parts = graph.weight_parts.get(w.attrs["name"], ((w.attrs["name"], 0, 0),))
    if not any(p in prequantized for p, _, _ in parts):
        return "kept in float: the checkpoint stores this weight unquantized"
    return None


def checkpoint_weight(graph: Graph, name: str, prequantized: dict[str, QuantWeight]) -> tuple[QuantWeight | None, str]:
    """The checkpoint's QuantWeight of weight ``name``: given, or a merged weight's parts' concatenated along N (codes,
    scales, zeros: exact, the rows of each part in order). (None, why) when the parts are not all quantized alike."""
    if name in prequantized:
        return prequantized[name], ""
    parts = graph.weight_parts.get(name, ())
    qws = [prequantized.get(p) for p, _, _ in parts]
    if not qws or any(q is None for q in qws):
        return None, f"parts {', '.join(p for p, _, _ in parts if p not in prequantized)} are not quantized in the checkpoint"
    layouts = {(q.bits, q.group, q.symmetric, q.scales.dtype, q.shape[1]) for q in qws}
    if len(layouts) > 1:
        return None, "its parts are quantized with different bits / groups / symmetry in the checkpoint"
    perm = qws[0].perm
    if any((q.perm is None) != (perm is None) or (perm is not None and not torch.equal(q.perm, perm)) for q in qws):
        return None, "its parts order their input features differently in the checkpoint (act order)"
    zeros = None if qws[0].symmetric else torch.cat([q.zeros for q in qws])
    qw = QuantWeight(torch.cat([q.qweight for q in qws]), torch.cat([q.scales for q in qws]), zeros, qws[0].bits,
                     qws[0].group, (sum(q.shape[0] for q in qws), qws[0].shape[1]), perm)
    return qw.check(), ""


def _is_output_head(graph: Graph, n: Node) -> bool:
    """The weight is also an embedding table (a tied LM head), or the result is a graph output through views /
    casts only (and a tensor-parallel rank's vocab gather)."""
    return any(u.op == "EMBEDDING" for u in n.inputs[1].users) or _head_output(graph, n) is not None


def _head_output(graph: Graph, n: Node) -> Node | None:
    """The graph output ``n`` reaches through views / casts only (and a tensor-parallel rank's vocab gather), or None."""
    outputs = set(graph.outputs)
    while n not in outputs:
        if len(n.users) != 1 or next(iter(n.users)).op not in (*_VIEWS, "ALL_GATHER"):
            return None
        n = next(iter(n.users))
    return n


def is_lm_head(graph: Graph, n: Node) -> bool:
    """``n`` is an output head (``_is_output_head``) whose outputs are token logits: its weight is an embedding table
    (tied), or its output reaches the graph with as many features as some embedding table of the graph has rows (a
    vocabulary; a tensor-parallel rank's head after its vocab gather). DiT's proj_out (32 features; its class table 1001
    rows) is an output head but no LM head."""
    if any(u.op == "EMBEDDING" for u in n.inputs[1].users):
        return True
    out = _head_output(graph, n)
    return out is not None and any(m.op == "EMBEDDING" and m.inputs[0].shape[0] == out.shape[-1] for m in graph.nodes)


# ----------------------------------------------------------------------------- calibration


def _hessians(graph: Graph, sites: dict[str, list[Node]], calibration) -> dict[str, HessianAccumulator]:
    """Each site weight's Hessian over its GEMMs' inputs, the float graph run on every calibration sample."""
    device = next(iter(graph.weights.values())).device
    # float32 sums, as the GPTQ reference keeps them: twice the speed of float64 on a CPU, half the memory on a GPU
    # (a 1B model's 8192-wide down projections: 256 MiB each); GPTQ factors them in float64
    accs = {name: HessianAccumulator(nodes[0].inputs[0].shape[-1], torch.float32, device) for name, nodes in sites.items()}
    observe_inputs(graph, {n: accs[name].add for name, nodes in sites.items() for n in nodes}, calibration)
    return accs


# ----------------------------------------------------------------------------- builder


def _float_weight(graph: Graph, n: Node) -> torch.Tensor:
    """The stored weight as [N, K] (out, in); MATMUL's [K, N] transposed."""
    w = graph.weights[n.inputs[1].attrs["name"]]
    return w.t() if n.op == "MATMUL" else w


def _pack(w: torch.Tensor, acc: HessianAccumulator | None, spec: QuantizeSpec, why: str = "") -> tuple[QuantWeight, str, str]:
    """(packed weight, the method used, why it is not the one asked for or ``why``)."""
    n, k = w.shape
    group = spec.group_for(k)
    if spec.method == "gptq":
        if acc is not None and acc.n >= k:
            return gptq(w.float(), acc.value(), spec.bits, group, spec.symmetric, spec.act_order, spec.damp), "gptq", why
        why = f"{acc.n if acc is not None else 0} calibration rows < K = {k}: too few for GPTQ's Hessian"
        return quantize_rtn(w.float(), spec.bits, group, spec.symmetric), "rtn", why
    return quantize_rtn(w.float(), spec.bits, group, spec.symmetric), "rtn", why


def _add_packed(graph: Graph, name: str, qw: QuantWeight) -> list[Node]:
    """WEIGHT nodes of the packed weight: [qweight, scales] (+ [zeros])."""
    base = name.removesuffix("^T").removesuffix(".weight")
    parts = [("qweight", qw.qweight), ("scales", qw.scales)] + ([("zeros", qw.zeros)] if qw.zeros is not None else [])
    return [_add_weight(graph, f"{base}.{suffix}", t) for suffix, t in parts]


def _add_weight(graph: Graph, key: str, t: torch.Tensor) -> Node:
    """A WEIGHT node of ``t`` under ``key`` (or ``key_2``, ``key_3``, ... where taken)."""
    name, k = key, 2
    while name in graph.weights:
        name, k = f"{key}_{k}", k + 1
    return graph.add_weight(name, t.contiguous())


def _build(graph: Graph, n: Node, packed: list[Node], qw: QuantWeight, perm: Node | None = None) -> Node:
    """The QGEMM computing what ``n`` computes, on the packed weight (a GEMM keeps its epilogue and its operands); with
    a ``perm`` (an act-order checkpoint's), on x's features gathered in the packed order: INDEX(x, perm) on x's last axis."""
    a = dict(n.attrs) if n.op == "GEMM" else dict(bias=len(n.inputs) > 2, act="none", glu=False, gate=False, residual=False)
    x = n.inputs[0]
    if perm is not None:
        x = graph.add("INDEX", [x, perm], name=f"{n.name}_act_order", loc=n.loc, axes=(len(x.shape) - 1,))
    return graph.add("QGEMM", [x, *packed, *n.inputs[2:]], name=f"{n.name}_q{qw.bits}", loc=n.loc, bits=qw.bits,
                     group=qw.group, zeros=qw.zeros is not None, **a)


def _output_error(w: torch.Tensor, qw: QuantWeight, H: torch.Tensor | None, rows: int = 4096) -> float:
    """sqrt(tr(D H D^T) / tr(W H W^T)) with D = W - Wq (H None: the identity), float64, ``rows`` rows at a time (each
    chunk dequantized on its own: no float64 copy of the whole weight, 0.9 GB for an 8B's gate/up)."""
    num = den = 0.0
    H = H.double() if H is not None else None
    for i in range(0, w.shape[0], rows):
        wi = w[i:i + rows].double()
        d = wi - dequantize(qw.rows(i, min(i + rows, w.shape[0])), torch.float64)
        num += float((d * (d @ H if H is not None else d)).sum())
        den += float((wi * (wi @ H if H is not None else wi)).sum())
    return math.sqrt(max(num, 0.0) / den) if den > 0 else 0.0
