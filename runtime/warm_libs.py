"""Load the GPU libraries a model will call while the rest of its start-up runs.

A warm start (an artifact loaded, its kernels in Triton's cache) spends much of its first call in one-time library
work that does not depend on the model's data: cuDNN's first convolution loads its libraries and engine heuristics
(~0.7 s for DiT-XL/2's patch embedding on the H200 machine), cuBLAS's first GEMM loads cuBLASLt, and Triton's first
cache lookup hashes Triton's own sources (``triton_key``, ~0.3 s). :func:`start` does that work in a background
thread as soon as the manifest says which libraries the graph calls (``libraries``), so it overlaps with reading the
weights and the graph; :func:`wait` joins it, and every kernels plan waits before its first GPU work (a CUDA graph
capture must not see another thread's CUDA calls). Everything the thread does is best effort: a failure only means
the plan's own first call does that work, as without it. The threads run for about a second after a load; a caller
that captures a CUDA graph of its own right after ``kiln.load`` (global capture mode) can call :func:`wait` first,
or turn the warming off with ``KILN_WARM_LIBS=0``.
"""
from __future__ import annotations

import contextlib
import os
import threading
from functools import partial

import torch

from ..codegen.tuning import INTERPRET

CONV_OPS = ("CONV2D", "CONV")  # ops whose kernels are cuDNN's
_THREADS: list[threading.Thread] = []
_LOCK = threading.Lock()


def libraries(ops) -> list[str]:
    """The libraries beyond cuBLAS that a graph of ``ops`` (op names) calls: what an artifact's manifest records."""
    return ["cudnn"] if any(op in CONV_OPS for op in ops) else []


def start(device: torch.device, libs, dtype: torch.dtype = torch.float16) -> None:
    """Warm Triton's cache key, cuBLAS and, where ``libs`` names it, cuDNN for ``device`` in a background thread (on
    CUDA only; nothing under the Triton interpreter)."""
    off = os.environ.get("KILN_WARM_LIBS", "1") == "0" or INTERPRET
    if off or device.type != "cuda" or not torch.cuda.is_available():
        return
    # one thread each: cuDNN's load alone outlasted a DiT artifact's load (the plan waited 0.4 s for one thread doing all)
    work = [_triton_key, partial(_gemm, device, dtype)] + ([partial(_conv, device, dtype)] if "cudnn" in (libs or ()) else [])
    for fn in work:
        t = threading.Thread(target=_quietly, args=(fn,), name="kiln-warm-libs", daemon=True)
        with _LOCK:
            _THREADS.append(t)
        t.start()


def wait() -> None:
    """Join every warming thread started so far."""
    while True:
        with _LOCK:
            if not _THREADS:
                return
            t = _THREADS.pop()
        t.join()


def _quietly(fn) -> None:
    with contextlib.suppress(Exception):
        fn()


def _triton_key() -> None:
    from triton.runtime.cache import triton_key

    triton_key()  # (cached for the process)


def _on_side_stream(device: torch.device, fn) -> None:
    with torch.cuda.device(device):
        stream = torch.cuda.Stream(device)  # (not the default stream: nothing the main thread runs waits on this)
        with torch.cuda.stream(stream):
            fn()
        stream.synchronize()


def _gemm(device: torch.device, dtype: torch.dtype) -> None:
    def run():
        a = torch.ones(64, 64, device=device, dtype=dtype)
        torch.mm(a, a)
    _on_side_stream(device, run)


def _conv(device: torch.device, dtype: torch.dtype) -> None:
    def run():
        x = torch.ones(1, 8, 8, 8, device=device, dtype=dtype)
        torch.nn.functional.conv2d(x, torch.ones(16, 8, 2, 2, device=device, dtype=dtype), stride=2)
    if torch.backends.cudnn.is_available():
        _on_side_stream(device, run)
