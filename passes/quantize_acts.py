"""Compute-bound quantization: a matmul on a stored weight becomes an AQGEMM, weights AND activations in 8 bits.

    LINEAR(x, W[, b])  /  MATMUL(x, W^T)  /  GEMM(x, W[, b][, gate][, residual]; act, glu)
        ->  AQGEMM(x, qw, sw[, b][, gate][, residual]; format, act, glu)       W ~ qw * sw[:, None]
    MUL(x, c) read only by such matmuls (smooth.py's 1 / s where no norm weight absorbs it), c a stored [K] vector:
        ->  AQGEMM(x, qw, sw, c, ...; smooth)      the quantizing kernel multiplies by c as it reads x: no extra pass

Formats (``ir/quant.py``'s ``quantize_rows``): "fp8" (e4m3, qmax 448) and "w8a8" (int8, qmax 127). The weight is
quantized here per output channel; the activations per token, at run time, by the op (``ir/ops_fused.py``).
Where Hopper's FP8 / int8 tensor cores double the bf16 rate, this is for the compute-bound GEMMs: DiT, LLM
prefill. "w8a8" expects smooth.py to have run first (SmoothQuant: int8 activations lose to outlier channels).

Why last in the pipeline (with quantize_weights): a merged QKV / gate-up GEMM is one weight with one input,
quantized once, its input quantized once per call, and the fused epilogues stay fused in the AQGEMM.

Measured error, per quantized weight, on calibration data when given: the relative output error of the matmul
before its epilogue, ||X W^T - Q(X) Q(W)^T|| / ||X W^T|| over up to ``ROWS`` rows of its inputs X (``RowSample``);
without calibration data the weight's own relative error ||W - Q(W)|| / ||W||.

The output head: quantized by default in "fp8" (e4m3's relative step is uniform: no outlier problem) and, in "w8a8",
where it is an LM head (``quantize_weights.is_lm_head``: its features a vocabulary) — measured on pyllama (bench/NOTES.md,
session 27): +0.06% held-out perplexity against +0.02% with the head in bf16, and the 1B shape's prefill of 2048 tokens
1.25x -> 1.31x bf16's on an H100 (session 28), the logits' error unchanged. Any other output head (DiT's proj_out, whose
error reaches the image unfiltered) stays float in "w8a8". ``lm_head`` overrides both.

Per-sample GEMMs stay in their float dtype (``per_sample``, the default ``ActQuantSpec.keep_float``): a GEMM reading
[B, K], one row per sample, in a graph whose token GEMMs read [B, T.., K] (DiT's adaLN modulation and timestep
embedder; not an LLM's, whose every GEMM has a token axis, nor the output head, which the rule above decides). It is
memory-bound (M = B): 8 bits buy it no compute; and its output, the modulation's scales / shifts / gates, multiplies
the residual stream of every token in every block. Measured on DiT-XL/2 (bench/dit_fp8_error.py, CPU, batch 1): in
fp8 its three per-sample weights alone give an output error of 5.8e-2, its 112 token GEMMs 6.3e-2, all 9.5e-2.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import KilnError
from ..ir.graph import Graph, Node
from ..ir.quant import dequantize_rows, quantize_rows
from ..ir.types import dims_equal, numel, shape_str
from .calibrate import RowSample, observe_inputs
from .quantize_weights import _float_weight, _is_output_head, _sites, is_lm_head
from .report import PassStats

MODES = {"fp8": "fp8", "w8a8": "int8"}  # mode -> ir/quant.py's ACT_FORMATS entry
ROWS = 512  # calibration rows kept per GEMM input for measuring errors (and for smooth.py's search)
MATMULS = ("LINEAR", "MATMUL", "GEMM")
ACT_BLOCKS = (0, 128)  # ActQuantSpec.act_blocks: the kernels' K steps (64 / 128 codes) and tiles (128 / 256 columns)


def per_sample(graph: Graph, n: Node) -> str | None:
    """Why matmul ``n`` stays in its float dtype (module docstring), or None: n reads x [B, K] with no token axis while
    a matmul on a stored weight reads [B, T.., K'] (T.. not all 1), and n is not the output head."""
    x = n.inputs[0]
    if len(x.shape) != 2 or _is_output_head(graph, n):
        return None
    for m in graph.nodes:
        t = m.inputs[0].shape if m.op in MATMULS and m.inputs[1].op == "WEIGHT" else ()
        if len(t) >= 3 and dims_equal(t[0], x.shape[0]) and numel(t[1:-1]) != 1:
            return (f"one row per sample ({shape_str(x.shape)}; the token GEMMs read e.g. {shape_str(t)}): memory-bound, 8 bits "
                    "buy it no compute, and its output (e.g. adaLN scales / shifts / gates) multiplies the whole residual stream")
    return None


@dataclass(frozen=True)
class ActQuantSpec:
    """What ``smooth`` and ``quantize_acts`` do (built by ``CompileConfig.quantize_spec``)."""

    mode: str  # one of MODES
    smoothing: str | float = "search"  # w8a8: "search" (per GEMM input, smooth.py), "off", or a fixed strength in [0, 1]
    lm_head: bool | None = None  # quantize the output head; None: in fp8, and an LM head in w8a8 (module docstring)
    # G > 0: an AQGEMM whose x is another matmul's output quantizes it with a scale per token and G columns (``blocks``)
    act_blocks: int = 0
    # (graph, matmul) -> why it stays float, or None: quantize it; None: every site (bench/dit_fp8_error.py's ablations)
    keep_float: Callable[[Graph, Node], str | None] | None = per_sample

    def __post_init__(self):
        if self.mode not in MODES:
            raise KilnError(f"quantize mode {self.mode!r} is not one of {', '.join(MODES)}")
        s = self.smoothing
        if s not in ("search", "off") and not (isinstance(s, (int, float)) and not isinstance(s, bool) and 0 <= s <= 1):
            raise KilnError(f"quantize smoothing {s!r} must be 'search', 'off' or a strength in [0, 1]")
        if self.act_blocks not in ACT_BLOCKS:
            raise KilnError(f"quantize act_blocks {self.act_blocks!r} must be one of {', '.join(map(str, ACT_BLOCKS))}",
                            hint="0: one scale a token; 128: a scale a token and 128 input features where x is a matmul's output")

    @property
    def format(self) -> str:
        return MODES[self.mode]

    # what quantize_weights' site selection asks of a spec: 8 bits, one group per output channel
    bits = 8

    def group_for(self, k: int) -> int:
        return k

    def head_spec(self, graph: Graph, n: Node) -> ActQuantSpec | None:
        """Output head ``n``'s spec (quantize_weights' site selection): this one, or None where it stays float (by
        default in w8a8 a head that is not an LM head: module docstring)."""
        if self.lm_head is not None:
            return self if self.lm_head else None
        return self if self.mode == "fp8" or is_lm_head(graph, n) else None


def quantize_acts(graph: Graph, spec: ActQuantSpec | None = None, calibration: list | None = None) -> PassStats:
    """LINEAR / MATMUL / GEMM on a stored 2-d weight -> AQGEMM (module docstring). ``calibration``: samples, each a flat
    list of input tensors in graph order, to measure each GEMM's error on (optional). ``spec`` None: nothing to do."""
    stats = PassStats()
    if spec is None:
        return stats
    sites = act_sites(graph, spec, stats)
    if not sites:
        return stats
    samples = row_samples(graph, sites, calibration) if calibration else {}
    smooths: dict[Node, Node] = {}
    for name, nodes in sites.items():
        w = _float_weight(graph, nodes[0]).float()  # [N, K]
        qw, sw = quantize_rows(w, spec.format)
        codes = [graph.add_weight(free_name(graph, name, suffix), t.contiguous()) for suffix, t in (("qweight", qw), ("wscales", sw))]
        group = 0
        for n in nodes:
            built = _build(graph, n, codes, spec, smooths)
            group = built.attrs["act_group"]
            graph.replace_all_uses(n, built)
        stats.rewritten += len(nodes)
        stats.rules[spec.mode] = stats.rules.get(spec.mode, 0) + len(nodes)
        if group:
            stats.rules[f"act-blocks-{group}"] = stats.rules.get(f"act-blocks-{group}", 0) + len(nodes)
        sample = samples.get(name)
        where = f"output error {matmul_error(sample.rows, w, spec.format, group=group):.2e} on {sample.rows.shape[0]} " \
            "calibration rows" if sample is not None else f"weight error {_weight_error(w, qw, sw):.2e} (no calibration data)"
        per = f", its input's scales by {group} features" if group else ""
        stats.notes.append(f"{name} [{w.shape[0]}, {w.shape[1]}] -> {spec.mode}{per}: {where}; read by "
                           f"{', '.join(n.name for n in nodes)}")
    if smooths:
        stats.rules["smooth-into-aqgemm"] = len(smooths)
    graph.remove_dead()
    graph.toposort()
    return stats


def act_sites(graph: Graph, spec: ActQuantSpec, stats: PassStats) -> dict[str, list[Node]]:
    """quantize_weights' sites (by weight name) less the matmuls ``spec.keep_float`` keeps in float: each declined with
    its reason, and a note per weight naming it, its shape and dtype, and why."""
    sites = _sites(graph, spec, stats)
    if spec.keep_float is None:
        return sites
    for name in list(sites):
        kept = {n: why for n in sites[name] if (why := spec.keep_float(graph, n)) is not None}
        if not kept:
            continue
        for n, why in kept.items():
            stats.decline(f"kept in {n.inputs[1].dtype}: {why}", n)
        w, why = next(iter(kept)).inputs[1], next(iter(kept.values()))
        stats.notes.append(f"{name} {shape_str(w.shape)} kept in {w.dtype}: {why}; read by {', '.join(n.name for n in kept)}")
        sites[name] = [n for n in sites[name] if n not in kept]
        if not sites[name]:
            del sites[name]
    return sites


def row_samples(graph: Graph, sites: dict, calibration) -> dict:
    """key -> ``RowSample`` of the inputs of the nodes ``sites[key]``, the float graph run on ``calibration``."""
    per_call = ROWS // max(1, len(calibration))
    samples = {key: RowSample(per_call) for key in sites}
    observe_inputs(graph, {n: samples[key].add for key, nodes in sites.items() for n in nodes}, calibration)
    return samples


def matmul_error(x: torch.Tensor, w: torch.Tensor, fmt: str, want: torch.Tensor | None = None, group: int = 0) -> float:
    """||x W^T - Q(x) Q(W)^T|| / ||x W^T|| for rows x [R, K] and a weight w [N, K] (float32, on x's device); ``want``:
    x W^T when known (smoothing does not change it); ``group``: Q(x)'s scales by groups of that many features (0: a row)."""
    w = w.to(x.device, torch.float32)
    want = x @ w.T if want is None else want
    qx, sx = quantize_rows(x, fmt, group=group or None)
    qw, sw = quantize_rows(w, fmt)
    got = (dequantize_rows(qx, sx) @ qw.float().T) * sw if group else (qx.float() @ qw.float().T) * sx[:, None] * sw
    den = float(want.norm())
    return float((got - want).norm()) / den if den > 0 else 0.0


def _weight_error(w: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor) -> float:
    den = float(w.norm())
    return float((dequantize_rows(qw, sw) - w).norm()) / den if den > 0 else 0.0


# ----------------------------------------------------------------------------- builder


def free_name(graph: Graph, name: str, suffix: str) -> str:
    """A weight name not yet in ``graph``: ``name`` less ".weight" / "^T", then ".suffix" (and "_2", "_3", .. if taken)."""
    base = name.removesuffix("^T").removesuffix(".weight")
    key, k = f"{base}.{suffix}", 2
    while key in graph.weights:
        key, k = f"{base}.{suffix}_{k}", k + 1
    return key


def _absorbable(graph: Graph, x: Node, n: Node) -> Node | None:
    """The stored [K] vector c when ``x`` is MUL(a, c) / MUL(c, a) in a's dtype, else None. (Another reader of x keeps the
    MUL alive: still correct, x * c is then computed twice.)"""
    if x.op != "MUL":
        return None
    k = n.inputs[0].shape[-1]
    for a, c in (x.inputs, x.inputs[::-1]):
        if c.op == "WEIGHT" and c.attrs["name"] in graph.weights and len(c.shape) == 1 and c.shape[0] == k \
                and a.dtype == x.dtype and tuple(a.shape) == tuple(x.shape):
            return c
    return None


def _build(graph: Graph, n: Node, codes: list[Node], spec: ActQuantSpec, smooths: dict) -> Node:
    """The AQGEMM computing what ``n`` computes (a GEMM keeps its epilogue and its operands)."""
    a = dict(n.attrs) if n.op == "GEMM" else dict(bias=len(n.inputs) > 2, act="none", glu=False, gate=False, residual=False)
    x, extra = n.inputs[0], []
    c = _absorbable(graph, x, n)
    if c is not None:
        if x not in smooths:
            vec = graph.weights[c.attrs["name"]].float()
            smooths[x] = graph.add_weight(free_name(graph, x.name, "smooth"), vec.contiguous())
        x, extra = x.inputs[0] if x.inputs[1] is c else x.inputs[1], [smooths[n.inputs[0]]]
    return graph.add("AQGEMM", [x, *codes, *extra, *n.inputs[2:]], name=f"{n.name}_{spec.mode}", loc=n.loc,
                     format=spec.format, smooth=bool(extra), act_group=blocks(x, spec), **a)


def blocks(x: Node, spec: ActQuantSpec) -> int:
    """The act_group of an AQGEMM reading ``x``: ``spec.act_blocks`` where x is a matmul's output (an LLM's gate / up
    GEMM feeding the down projection, DiT's fc1 feeding fc2: that GEMM's epilogue then stores x's codes, a group's scale
    being its own tile's, with no pass over x) and the groups divide its row; else 0, one scale a token."""
    g = spec.act_blocks
    k = x.shape[-1] if x.shape else None
    return g if g and x.op in (*MATMULS, "AQGEMM") and isinstance(k, int) and k % g == 0 else 0

