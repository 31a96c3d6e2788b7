"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's chain of small kernels.

A decode step is ~120 kernels of a few microseconds each, every one reading what the one before wrote. Between two
kernels of a CUDA graph the GPU drains the first, flushes its writes, then launches and rasterises the second: a gap
of about half a microsecond, plus the second kernel's ramp before its loads reach full bandwidth. With PDL the second
kernel is launched while the first is still running: its programs start, and wait (``griddepcontrol.wait``) until
the first grid has completed and its memory is visible, before they touch anything.

The contract, for a kernel launched with ``launch_pdl``: ``gdc`` runs at its top, before any load of a value an
earlier kernel wrote and before any store (a store could overwrite what an earlier kernel still reads: the arena
reuses memory). ``gdc`` also signals that the next kernel may launch (``griddepcontrol.launch_dependents``): the
next kernel's programs then wait in their own ``gdc``. The wait covers the whole chain (a grid completes only after
its own wait), and a kernel launched without PDL (cuBLAS, torch) waits for everything before it as usual.

On for CUDA devices of compute capability >= 9 whose Triton has the GDC ops; ``KILN_PDL=0`` turns it off (read at
each launch). Measured on the H200 (bench/NOTES.md, session 4): Llama-3.2-1B decode step 1.012 -> 0.968 ms at
batch 1 (976 -> 1020 tok/s), the same greedy tokens, and a ping-pong chain of split-K GEMMs and split-KV attention in
a CUDA graph bit for bit the plain launches' (tests/codegen/test_pdl.py). ``KILN_PDL=prefetch`` also has the
weight-streaming GEMM load its first K step's weight tiles before its wait (weights are never written by a kernel),
overlapping them with the previous kernel's tail: the same sums (tested), its speed not yet measured.
"""
from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

ENV = "KILN_PDL"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def gdc(PDL: tl.constexpr):
    """At a kernel's top: let the next kernel launch, then wait for the previous one (module docstring)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@functools.cache
def _device_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9 and hasattr(tl.extra.cuda, "gdc_wait")


def enabled(t: torch.Tensor) -> bool:
    """Whether kernels on ``t``'s device launch with PDL: a CUDA device of capability >= 9, not the interpreter, and
    ``KILN_PDL`` not "0". Read at each launch (a CUDA graph keeps what it captured), so a process may compare both."""
    return (os.environ.get(ENV, "1") != "0" and not INTERPRET and t.is_cuda
            and _device_ok(t.device.index if t.device.index is not None else torch.cuda.current_device()))


def prefetch(t: torch.Tensor) -> bool:
    """Whether the weight-streaming GEMM (qgemm.py) also loads its first weight tiles before the wait, overlapping
    them with the previous kernel's tail: ``KILN_PDL=prefetch`` (PDL on), until the H200 says it pays."""
    return os.environ.get(ENV) == "prefetch" and enabled(t)


def kwargs(t: torch.Tensor) -> dict:
    """The launch keywords of a kernel taking ``gdc``'s ``PDL`` constexpr, for tensors on ``t``'s device."""
    return {"PDL": True, "launch_pdl": True} if enabled(t) else {"PDL": False}
