"""cuBLASLt's other algorithms for a 16-bit GEMM, as tuning candidates (through nvmath-python, where installed).

torch.addmm asks cuBLASLt's heuristic for one algorithm and runs its first; TunableOp cannot choose on CUDA builds. At
DiT-XL/2's 512-row GEMMs that first is not the fastest the heuristic lists: measured on an H100 (bench/blaslt_algos.py,
kernel times, bench/NOTES.md session 46) fc2 1152 <- 4608 13.52 -> 12.09 us (96 x 64 tiles against torch's 72 x 64),
qkv 9.43 -> 9.03, o 5.32 -> 5.17; at 2048-8192 rows 0-7%. In the DiT one-image step -2.1% (1,656 -> 1,621 us; the
pipeline 44.7 -> 43.9 ms), at eight images level. So kiln plans the same product with nvmath-python's
``Matmul`` and offers each algorithm the heuristic lists (up to ``LIMIT``) beside torch's call; the tuner keeps what it
measures fastest, as for every other candidate (``lower.gemm``, above decode's 16 rows):

    out  = x @ w^T (+ bias)                 cuBLASLt epilogue BIAS (none without a bias)
    out  = gelu_tanh(x @ w^T + bias)        GELU_BIAS (cuBLASLt's GELU is the tanh form)
    out += x @ w^T (+ bias)                 a residual the plan gave the GEMM's own buffer (in place): C = out, beta = 1

cuBLASLt's bias runs along the result's rows in its column-major view, so the product planned is out^T = w @ x^T: w
[N, K] row-major, x^T a view of x [M, K], and out^T a view of the output [M, N] (row-major), written in place (nvmath's
``inplace``: the result is operand C, with beta 0 where there is no residual). One probe plan per problem (shapes,
strides, dtype, epilogue) names the algorithms; each candidate makes its own ``Matmul`` over its group's tensors at its
first run (outside any CUDA graph capture: the tuner's runs or the plan's warm-up), planned with that one algorithm,
so a plan holds the workspace of the algorithms it chose and no other. Candidates are offered only where every
operand is 256-byte aligned (the plan's arena buffers are), so the heuristic saw the same alignments for every group
that shares a decision.
"""
from __future__ import annotations

import functools
import os
import threading

import torch

# KILN_BLASLT=0: not offered (torch's cuBLAS call and kiln's kernels only), as without nvmath-python
ENABLED = os.environ.get("KILN_BLASLT", "1") != "0"
LIMIT = 8  # algorithms asked of the heuristic (it listed 8 at every shape measured, H100, session 46)
DTYPES = (torch.float16, torch.bfloat16)
ALIGN = 256
_PROBES: dict[tuple, list] = {}  # problem -> [(name, the algorithm as nvmath's numpy record)] the heuristic listed
_LOCK = threading.Lock()  # (the tuner runs a decision's candidates from threads once: warm_in_parallel)


@functools.cache
def _nvmath():
    """nvmath.linalg.advanced, or None where nvmath-python is not installed (or cannot load its CUDA libraries)."""
    try:
        import nvmath.linalg.advanced as nla
    except Exception:  # ImportError, or a binding that cannot find libcublasLt
        return None
    return nla


def available(device: torch.device) -> bool:
    """Whether the candidates can be offered on ``device``: a CUDA device, nvmath-python importable, ENABLED."""
    return ENABLED and device.type == "cuda" and _nvmath() is not None


def _epilog(act: str, bias) -> str | None:
    """The cuBLASLt epilogue computing ``act(h + bias)``; "" for none; None where there is none for it."""
    if act == "none":
        return "BIAS" if bias is not None else ""
    if act == "gelu_tanh" and bias is not None:
        return "GELU_BIAS"
    return None


def _aligned(*ts) -> bool:
    return all(t is None or t.data_ptr() % ALIGN == 0 for t in ts)


def offered(x2: torch.Tensor, w: torch.Tensor, bias, act: str, residual_in_place: bool, out2: torch.Tensor) -> bool:
    """Whether ``x2`` [M, K] @ ``w``^T [K, N] (+ bias, act; + out2 in place) into ``out2`` [M, N] has candidates here:
    16-bit operands of one dtype, unit inner strides, a cuBLASLt epilogue for (act, bias) (with a residual: none but the
    bias), every operand 256-byte aligned."""
    epi = _epilog(act, bias)
    return (x2.dtype in DTYPES and w.dtype == x2.dtype and out2.dtype == x2.dtype and epi is not None
            and (not residual_in_place or act == "none") and (bias is None or bias.dtype == x2.dtype and bias.is_contiguous())
            and x2.stride(-1) == 1 and w.stride(-1) == 1 and out2.stride(-1) == 1 and _aligned(x2, w, bias, out2))


def _matmul(x2, w, bias, act: str, accumulate: bool, out2, algorithms=None):
    """nvmath's Matmul of out2^T = w @ x2^T (+ bias, act; + out2^T when ``accumulate``) in place into out2^T, planned:
    the heuristic's algorithms (``algorithms`` None) or those given. Returns (the Matmul, its algorithms)."""
    nla = _nvmath()
    mm = nla.Matmul(w, x2.t(), c=out2.t(), beta=1.0 if accumulate else 0.0, options={"inplace": True})
    epi = _epilog(act, bias)
    algos = mm.plan(preferences={"limit": LIMIT}, algorithms=algorithms, epilog=getattr(nla.MatmulEpilog, epi) if epi else None,
                    epilog_inputs={"bias": bias} if bias is not None else None)
    return mm, algos


def _problem(x2, w, bias, act: str, accumulate: bool, out2) -> tuple:
    return (str(x2.device), str(x2.dtype), tuple(x2.shape), x2.stride(), tuple(w.shape), w.stride(), out2.stride(),
            _epilog(act, bias), accumulate)


def algorithm_name(i: int, algo) -> str:
    """A candidate's name: its place in the heuristic's list, its tile and split-K (the list is the same for the same
    problem, GPU and library versions: the tuner's key holds the versions)."""
    try:
        tile = algo.tile
    except KeyError:  # (a tile id newer than nvmath's table)
        tile = "?"
    tile = "x".join(str(t) for t in tile) if isinstance(tile, tuple) else str(tile)
    return f"blaslt:{i},{tile},{algo.split_k}"


def candidates(x2: torch.Tensor, w: torch.Tensor, bias, act: str, accumulate: bool, out2: torch.Tensor) -> dict:
    """name -> a callable running that algorithm once (``offered`` must hold; ``accumulate``: out2 += the product)."""
    key = _problem(x2, w, bias, act, accumulate, out2)
    with _LOCK:
        if key not in _PROBES:
            try:
                probe, algos = _matmul(x2, w, bias, act, accumulate, out2)
                # (copies: neither the probe nor its operands are kept past this call)
                _PROBES[key] = [(algorithm_name(i, a), a.as_numpy()) for i, a in enumerate(algos)]
                probe.free()
            except Exception:  # (a problem nvmath or the heuristic declines: torch's call and kiln's kernels remain)
                _PROBES[key] = []
        listed = _PROBES[key]

    def runner(record):
        held = []  # its Matmul, made at the first run: the chosen candidate's closure holds its own and no other

        def run() -> None:
            if not held:
                with _LOCK:
                    if not held:
                        algo = _nvmath().Algorithm.from_numpy(record)
                        held.append(_matmul(x2, w, bias, act, accumulate, out2, [algo])[0])
            held[0].execute()  # (on torch's current stream: the capture's inside a CUDA graph capture)
        return run
    return {name: runner(record) for name, record in listed}
