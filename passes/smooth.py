"""SmoothQuant (Xiao et al. 2023) with a searched strength: move activation outliers into the weights before W8A8.

    x W^T = (x / s) (W s)^T              s [K] > 0, one factor per input channel j
    s_j = max|X_j|^a / max|W_j|^(1-a)    X: the GEMM's calibration inputs; W: every weight reading x, stacked

A few channels of an LLM's (or DiT's) activations are 10-100x the rest, so one int8 scale per token spends its
range on them; dividing them by s_j flattens x, and W's columns absorb the factor, where per-output-channel
weight scales barely notice. The rewrite, on the float graph (it changes no value beyond rounding):

    NORM(h, w[, b]) -> GEMMs       =>  NORM(h, w / s[, b / s]) -> GEMMs(W s)     (RMSNORM / LAYERNORM with stored params)
    x -> GEMMs (anything else)     =>  MUL(x, 1 / s) -> GEMMs(W s)               (quantize_acts folds the MUL into the
                                                                                AQGEMM's smooth operand: no extra pass)

The strength ``a`` is searched per GEMM input on the calibration rows (the piecewise grid 0, 0.05, .., 1 of
Paddle's PSS, plus "no smoothing"), minimising the quantized matmul's error ||X W^T - Q(X / s) Q(W s)^T|| / ||X W^T||
(``quantize_acts.matmul_error``), for the stacked weight of every GEMM reading x: a merged QKV or gate-up GEMM, or
separate q / k / v projections of one input, share ONE s, and their input is smoothed and quantized once.

Choices, and why:
- s is rounded to a power of two: x / s and W s are then exact in every float format, so the smoothed float graph
  computes exactly what the original does (bf16 weights included) and the norm fold is exact.
- Folding into the norm needs the norm's output to be read by the smoothed GEMMs only, and its weight (and bias)
  to be stored; the folded parameters are new weights (CSE may have merged one norm weight for many norms).
  DiT's LAYERNORM_MODULATE (scale and shift are graph values) takes the MUL.
- Without calibration data there is nothing to search: a clear error, unless ``smoothing="off"``.
"""
from __future__ import annotations

import torch

from ..errors import KilnError
from ..ir.graph import Graph, Node
from ..ir.types import torch_dtype
from .quantize_acts import ActQuantSpec, act_sites, blocks, free_name, matmul_error, row_samples
from .quantize_weights import CALIBRATION_HINT, _float_weight
from .report import PassStats

GRID = tuple(round(0.05 * i, 2) for i in range(21))  # the searched strengths
NORMS = {"RMSNORM": 1, "LAYERNORM": 2}  # norm op -> how many parameters (weight, bias) follow x
SMOOTH_HINT = CALIBRATION_HINT.replace("or use a rounding mode (w8a16, w4a16)", "or CompileConfig(quantize_smoothing='off'); fp8 "
                                       "needs no calibration")


def smooth(graph: Graph, spec: ActQuantSpec | None = None, calibration: list | None = None) -> PassStats:
    """Smooth the inputs of the GEMMs ``quantize_acts`` will quantize to int8 (module docstring); off unless
    ``spec.mode == "w8a8"`` and ``spec.smoothing != "off"``. ``calibration``: samples, flat input lists in graph order."""
    stats = PassStats()
    if spec is None or spec.mode != "w8a8" or spec.smoothing == "off":
        return stats
    groups: dict[Node, list[Node]] = {}
    for nodes in act_sites(graph, spec, PassStats()).values():  # (quantize_acts reports the declined ones)
        for n in nodes:
            groups.setdefault(n.inputs[0], []).append(n)
    if not groups:
        return stats
    if not calibration:
        raise KilnError("quantize='w8a8' searches its smoothing on calibration data; none was given", hint=SMOOTH_HINT)
    samples = row_samples(graph, groups, calibration)
    renamed: dict[Node, Node] = {}  # a smoothed GEMM -> its rewrite, which may be the input of a later group
    for x0, nodes in groups.items():
        x = renamed.get(x0, x0)
        w = torch.cat([_float_weight(graph, n).float() for n in nodes])  # [sum N, K]
        strength, s, err, err_off = search(samples[x0], w, spec.smoothing, blocks(x0, spec))
        names = ", ".join(n.name for n in nodes)
        if s is None:
            stats.notes.append(f"{x.name} -> {names}: not smoothed (int8 error {err_off:.2e} unsmoothed, no strength does better)")
            continue
        how = _apply(graph, x, nodes, s, renamed)
        stats.rewritten += 1
        stats.rules[how] = stats.rules.get(how, 0) + 1
        stats.notes.append(f"{x.name} -> {names}: strength {strength:g} into the {how}, int8 error {err_off:.2e} -> {err:.2e} "
                           f"on {samples[x0].rows.shape[0]} calibration rows")
    graph.remove_dead()
    graph.toposort()
    return stats


def factors(amax_x: torch.Tensor, amax_w: torch.Tensor, strength: float) -> torch.Tensor:
    """s_j = max|X_j|^a / max|W_j|^(1-a) rounded to a power of two (1 where a column is all zero), [K] float32."""
    s = amax_x.double().clamp_min(1e-30) ** strength / amax_w.double().clamp_min(1e-30) ** (1 - strength)
    s = torch.exp2(torch.round(torch.log2(s)).clamp(-24, 24))
    return torch.where((amax_x > 0) & (amax_w > 0), s, torch.ones_like(s)).float()


def search(sample, w: torch.Tensor, smoothing, group: int = 0) -> tuple:
    """(strength, s, error at it, error unsmoothed) for the rows of ``sample`` (a ``RowSample``) and the stacked weight
    w [N, K]; s None when no strength of the grid beats no smoothing ("search"), or ``smoothing`` is the fixed strength.
    ``group``: the AQGEMM's act_group (x's scales by groups of that many features; 0: one a row)."""
    x = sample.rows  # [R, K]
    w = w.to(x.device)
    want = x @ w.T  # [R, N]: what every strength approximates
    err_off = matmul_error(x, w, "int8", want, group)
    amax_w = w.abs().amax(0)
    best = (None, None, err_off)
    for a in GRID if smoothing == "search" else (float(smoothing),):
        s = factors(sample.amax, amax_w, a)
        err = matmul_error(x / s, w * s, "int8", want, group)
        if err < best[2] or smoothing != "search":
            best = (a, s, err)
    return (*best, err_off)


def _foldable(graph: Graph, x: Node, nodes: list[Node]) -> bool:
    """x is a norm with stored parameters, read by ``nodes`` only."""
    if x.op not in NORMS or x.attrs["dims"] != 1 or set(x.users) != set(nodes):
        return False
    params = x.inputs[1:len(x.inputs) - int(x.attrs["residual"])]
    return len(params) >= 1 and all(p.op == "WEIGHT" and p.attrs["name"] in graph.weights for p in params)


def _apply(graph: Graph, x: Node, nodes: list[Node], s: torch.Tensor, renamed: dict) -> str:
    """Rewrite x -> nodes into x / s -> nodes(W s) (``renamed``: each of ``nodes`` -> its rewrite); returns where 1 / s
    went: "norm weight" or "mul"."""
    if _foldable(graph, x, nodes):
        nparams = len(x.inputs) - 1 - int(x.attrs["residual"])
        params = [_scaled(graph, p, 1 / s.double()) for p in x.inputs[1:1 + nparams]]
        new_x, how = graph.add(x.op, [x.inputs[0], *params, *x.inputs[1 + nparams:]], name=f"{x.name}_smoothed", loc=x.loc,
                               **x.attrs), "norm weight"
    else:
        inv = graph.add_weight(free_name(graph, x.name, "smooth"), (1 / s).to(torch_dtype(x.dtype)))
        new_x, how = graph.add("MUL", [x, inv], name=f"{x.name}_smoothed", loc=x.loc), "mul"
    for n in nodes:
        w = _scaled(graph, n.inputs[1], s.double()[:, None] if n.op == "MATMUL" else s.double())  # MATMUL's weight is [K, N]
        renamed[n] = graph.add(n.op, [new_x, w, *n.inputs[2:]], name=f"{n.name}_smoothed", loc=n.loc, **n.attrs)
        graph.replace_all_uses(n, renamed[n])
    return how


def _scaled(graph: Graph, p: Node, factor: torch.Tensor) -> Node:
    """A new WEIGHT: stored weight ``p`` times ``factor`` (powers of two: exact), in p's dtype."""
    t = graph.weights[p.attrs["name"]]
    return graph.add_weight(free_name(graph, p.attrs["name"], "smoothed"), (t.double() * factor).to(t.dtype))
