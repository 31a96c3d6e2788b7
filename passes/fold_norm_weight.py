"""Fold an RMSNorm's weight into the GEMMs that read the norm: the norm keeps only its statistics.

    RMSNORM(x, w) -> GEMM(., W[N, K])        =>  RMSNORM(x) -> GEMM(., W diag(w))        (W' = W * w[None, :])

since RMSNORM(x, w) @ W^T = (x * rstd * w) @ W^T = (x * rstd) @ (W diag(w))^T for each row's scalar rstd. The
weightless norm is then a per-row scale alone, which a GEMM can apply itself after its main loop (rstd * (x @ W'^T):
the Triton template's RSTD form, ``codegen/kernels/gemm.py``) instead of a norm kernel running before it. That is
what decode at 16 rows needs: Llama's post-attention norm feeds the gate/up GEMM, whose tuned template ran after a
norm launch of its own, 16 a step (bench/NOTES.md, session 18). Elsewhere the fold costs nothing: the norm kernel
without a weight, the same GEMM on W'.

Numerics: the reference rounds the norm's output twice, bf16(bf16(x * rstd) * w); the fold rounds W * w once at compile
time and x * rstd once (or not at all in the RSTD form). Both differ from float64 by a half-ulp of bf16 per factor:
the same tolerance as the norm fused into the GEMM's loads (``kernels/skinny.py``'s prologue), tested so.

Where: after every fusion and both quantization passes (the merged QKV / gate-up weight is folded once; a quantized
weight is left alone: folding w into W's columns would change what the quantizer rounds, and its per-row scales
would then carry the norm's large channels), before ``pad_gemm``. Declined, with the reason:
- a norm read by anything but a GEMM / LINEAR's x, or a graph output;
- a norm with a residual, over more than the last axis, or of mixed dtypes (w in float32 promotes the output);
- a GEMM weight that is computed, quantized, or read by anything else (a tied LM head: folding it would keep a
  second copy of the embedding table);
- a GEMM weight that is the model's own, not one horizontal fusion merged (``Graph.weight_parts``): a compiled model
  reads the caller's parameters in place, and the folded weight would be a copy (an untied LM head: 0.5-1 GB for one
  norm launch a step). A merged QKV / gate-up weight is the compiler's copy already. (A tensor-parallel rank's graph
  is a new one without that record: its norms keep their weights.)
The folded weight *replaces* the merged one (the model holds one copy), and ``kiln.jit`` re-folds from the imported
graph when a parameter changes, as it does for the other folds.
"""
from __future__ import annotations

import torch

from ..ir.graph import Graph, Node
from .quantize_acts import free_name
from .report import PassStats

_GEMMS = ("GEMM", "LINEAR")  # weight [N, K] as input 1
_FLOATS = ("float16", "bfloat16", "float32", "float64")


def fold_norm_weight(graph: Graph) -> PassStats:
    """RMSNORM(x, w) -> GEMMs(W)  =>  RMSNORM(x) -> GEMMs(W diag(w)), where every reader allows it (module docstring)."""
    stats = PassStats()
    for norm in [n for n in graph.nodes if n.op == "RMSNORM"]:
        if len(norm.inputs) != 2 or norm.attrs["residual"]:
            continue  # weightless already (or a residual form, which no importer makes with a weight)
        why = _why_not(graph, norm)
        if why is not None:
            stats.decline(why, norm)
            continue
        w = graph.weights[norm.inputs[1].attrs["name"]]
        new_norm = graph.add("RMSNORM", [norm.inputs[0]], name=f"{norm.name}_unit", loc=norm.loc, **norm.attrs)
        for g in list(norm.users):
            wn = g.inputs[1]
            t = graph.weights[wn.attrs["name"]]
            folded = graph.add_weight(free_name(graph, wn.attrs["name"], "normed"), _scaled(t, w))
            new_g = graph.add(g.op, [new_norm, folded, *g.inputs[2:]], name=f"{g.name}_normed", loc=g.loc, **g.attrs)
            graph.replace_all_uses(g, new_g)
        stats.rewritten += 1
        stats.notes.append(f"{norm.name}: weight {norm.inputs[1].attrs['name']} folded into {len(norm.users)} GEMM weight(s)")
    if stats.rewritten:
        graph.remove_dead()
        graph.toposort()
    return stats


def _scaled(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """t * w[None, :] rounded once to t's dtype. Two 16-bit floats of one dtype multiply in torch's float32 compute type,
    which holds their product exactly (8 + 8 or 11 + 11 significant bits): one rounding, the float64 product's, with no
    float64 copy of the weight (a 1B's gate/up: 268 MB; on the CPU a 1B's folds took 8.0 s, now 1.4). Two float32s (or
    float64s) multiply in their own type, correctly rounded (IEEE 754): the float64 product's rounding again (a float32
    1B's folds on the CPU took 11.2 s through float64, 4.9 now). Other pairs go through float64: a 16-bit weight times a
    float32 norm weight would round in float32, then again to 16 bits."""
    if t.dtype == w.dtype:  # (both floats: _why_not)
        return t * w
    return (t.double() * w.double()).to(t.dtype)


def _why_not(graph: Graph, norm: Node) -> str | None:
    """The reason ``norm``'s weight is not folded into its readers, or None."""
    p = norm.inputs[1]
    if p.op != "WEIGHT" or p.attrs["name"] not in graph.weights:
        return f"its weight is computed ({p.op}), not a stored WEIGHT"
    if norm.attrs["dims"] != 1:
        return f"it normalises the last {norm.attrs['dims']} axes: a GEMM reads one"
    if len({norm.dtype, norm.inputs[0].dtype, p.dtype}) != 1 or norm.dtype not in _FLOATS:
        return f"mixed dtypes (x {norm.inputs[0].dtype}, weight {p.dtype} -> {norm.dtype})"
    if norm in graph.outputs:
        return "the normalised value is a graph output"
    if not norm.users:
        return "nothing reads it"
    for g in norm.users:
        if g.op not in _GEMMS or g.inputs[0] is not norm or g.inputs.count(norm) != 1:
            return f"{g.op} %{g.name} reads it (not as a GEMM's x)"
        wn = g.inputs[1]
        if wn.op != "WEIGHT" or wn.attrs["name"] not in graph.weights:
            return f"{g.op} %{g.name}'s weight is computed ({wn.op}), not a stored WEIGHT"
        if wn.dtype not in _FLOATS or list(wn.shape)[-1:] != list(norm.shape)[-1:]:
            return f"{g.op} %{g.name}'s weight {wn.dtype}{list(wn.shape)} is not a float [N, K] weight"
        if list(wn.users) != [g] or g.inputs.count(wn) != 1:
            return f"{g.op} %{g.name}'s weight {wn.attrs['name']} is also read elsewhere: folding would keep a second copy"
        if wn.attrs["name"] not in graph.weight_parts:
            return (f"{g.op} %{g.name}'s weight {wn.attrs['name']} is the model's own: folding would copy it (a merged "
                    "weight is the compiler's copy already)")
    return None

