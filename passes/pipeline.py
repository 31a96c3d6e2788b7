"""THE pass order. Each line says why the pass sits where it does. Any pass can be switched off by
name (``CompileConfig(disable=[...])``, ``kiln compile --disable-pass NAME``). A pass that needs settings
gets them through keyword arguments from ``run_pipeline`` (the ``settings`` table there), nothing else."""
from __future__ import annotations

import os
import sys
import time

from ..ir.graph import Graph
from .canonicalize import canonicalize
from .cse import cse
from .dce import dce
from .fold_constants import fold_constants
from .fold_norm_weight import fold_norm_weight
from .fuse_attention import fuse_attention
from .fuse_conv import fuse_conv
from .fuse_epilogue import fuse_epilogue
from .fuse_horizontal_gemm import fuse_horizontal_gemm
from .fuse_norm import fuse_norm
from .fuse_rope_epilogue import fuse_rope_epilogue
from .pad_gemm import pad_gemm
from .smooth import smooth
from .quantize_acts import ActQuantSpec, quantize_acts
from .quantize_weights import QuantizeSpec, quantize_weights
from .report import Report
from .shard_tensor_parallel import shard_tensor_parallel

PIPELINE = [
    # the importers leave shape-only and assert-only values behind; drop them before anything reads the graph
    ("dce", dce),
    # weight-only subgraphs become weights and no-op casts/reshapes go, so the patterns below see the math
    ("fold_constants", fold_constants),
    # an imported graph is made to read like a captured one (ONNX's x @ W -> LINEAR, x * sigmoid(x) -> SILU), after
    # folding (a transposed weight is a weight by then) and before CSE and every fusion, which match the captured forms
    ("canonicalize", canonicalize),
    # weights equal by content and repeated subgraphs merge: DiT's per-block timestep embedding becomes one,
    # so its consumers share an input node for fuse_horizontal_gemm
    ("cse", cse),
    # norms become one op before attention / GEMM fusion look at their outputs (the QKV input is one RMSNORM node)
    ("fuse_norm", fuse_norm),
    # attention and RoPE before GEMM fusion: the q/k/v projections' consumers are then single ops
    ("fuse_attention", fuse_attention),
    # after CSE (shared inputs) and before epilogue fusion, which needs gate/up merged to see silu(gate) * up
    ("fuse_horizontal_gemm", fuse_horizontal_gemm),
    # activations, GLU, gates and residual adds fold into the (merged) matmuls
    ("fuse_epilogue", fuse_epilogue),
    # the convolutional counterpart (SiLU into group norms, residual adds and divisions into convs): it reads only
    # CONV2D / GROUP_NORM sites, which no pass above touches, after CSE and folding have settled the graph
    ("fuse_conv", fuse_conv),
    # after every fusion, so each rank keeps merged QKV / gate-up GEMMs and fused epilogues (split by their parts), and
    # before quantization, which then packs each rank's block of a weight with scales of its own; off at tp = 1
    ("shard_tensor_parallel", shard_tensor_parallel),
    # last: a merged QKV / gate-up / adaLN GEMM is quantized as ONE weight against its one input's Hessian, and its
    # fused epilogue carries over into the QGEMM; off unless CompileConfig.quantize is set
    ("quantize_weights", quantize_weights),
    # the compute-bound modes (fp8, w8a8), the alternative to quantize_weights, late for the same reasons. SmoothQuant
    # first: it rewrites the float graph (norm weights, GEMM weights) that quantize_acts then quantizes; after fusion,
    # so the inputs it smooths are those of the merged GEMMs. Off unless CompileConfig.quantize is "fp8" / "w8a8"
    ("smooth", smooth),
    ("quantize_acts", quantize_acts),
    # after both quantizers (a packed weight is left as packed; folding the norm into it would change what was rounded) and
    # every fusion (the merged QKV / gate-up weight folds once): the norm keeps its statistics, the GEMM weights its weight
    ("fold_norm_weight", fold_norm_weight),
    # after quantize_acts (it reads AQGEMMs: a 16-bit QKV is cuBLAS's, with no epilogue of kiln's) and fuse_attention (it
    # reads the ROPEs and ATTENTIONs that made): q's and k's RoPE into the merged QKV AQGEMM's epilogue
    ("fuse_rope_epilogue", fuse_rope_epilogue),
    # very last: it pads the GEMMs the graph finally computes, whatever the passes above made of them. Every fusion sees
    # the unpadded math (an epilogue rule matching act(LINEAR) is not blocked by the slice), tensor parallelism splits
    # the true vocab (a rank's shard is padded on its own), the quantizers find the LM head as they know it and keep
    # it float or pack it (a QGEMM is not padded: its kernels mask N); what stays a float GEMM of odd width is padded
    ("pad_gemm", pad_gemm),
]
PASS_NAMES = tuple(name for name, _ in PIPELINE)


def run_pipeline(graph: Graph, disable=(), report: Report | None = None, quantize: QuantizeSpec | ActQuantSpec | None = None,
                 calibration: list | None = None, tp: tuple[int, int] = (0, 1), prequantized: dict | None = None) -> Graph:
    """Run every enabled pass in order; verify the graph after each that changed it. ``KILN_DEBUG=1``
    verifies after every pass and prints the IR after each to stderr. ``quantize``: weight-only (QuantizeSpec) or
    weight-and-activation (ActQuantSpec) quantization (None: off) and its ``calibration`` samples (flat input lists,
    graph order); ``tp``: (rank, world) of the tensor-parallel shard to make (world 1: the whole graph);
    ``prequantized``: weights a checkpoint holds already quantized, by graph weight name (``quantize_weights`` packs
    them as given)."""
    weights = quantize if isinstance(quantize, QuantizeSpec) else None
    acts = quantize if isinstance(quantize, ActQuantSpec) else None
    settings = {"quantize_weights": dict(spec=weights, calibration=calibration, prequantized=prequantized),  # passes with settings
                "smooth": dict(spec=acts, calibration=calibration), "quantize_acts": dict(spec=acts, calibration=calibration),
                "shard_tensor_parallel": dict(rank=tp[0], world=tp[1])}
    for name, fn in PIPELINE:
        if name in disable:
            if report is not None:
                report.add_pass(name, None, 0.0)
            continue
        t0 = time.perf_counter()
        stats = fn(graph, **settings.get(name, {}))
        if stats is None or getattr(stats, "rewritten", 1) or os.environ.get("KILN_DEBUG"):  # a pass that changed nothing
            graph.toposort()  # leaves the graph as it was: skip the checks (the executor verifies the result once more)
            graph.verify()
        if report is not None:
            report.add_pass(name, stats, time.perf_counter() - t0)
        if os.environ.get("KILN_DEBUG"):
            print(f"--- IR after {name} ---\n{graph!r}", file=sys.stderr)
    return graph
