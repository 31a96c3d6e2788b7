"""Helpers for kiln's tests and benchmarks: the tolerance table and the error measure."""
from __future__ import annotations

import torch

# Relative error ||got - want|| / ||want|| allowed per dtype, in ONE place.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative L2 error in float64; shapes must agree and non-finite values must sit in the same places."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        raise AssertionError(f"shape {tuple(got.shape)} != {tuple(want.shape)}")
    if not torch.equal(torch.isfinite(got), torch.isfinite(want)):
        raise AssertionError("non-finite values differ")
    fin = torch.isfinite(want)
    return float((got[fin] - want[fin]).norm() / want[fin].norm().clamp_min(1e-30))


def check_pass(pass_fn, build, inputs, gen: torch.Generator):
    """Build a graph twice with the same random state, run ``pass_fn`` on one, and check both compute the same
    in float64 (dtypes included). Returns ``(stats, rewritten graph, original graph)``."""
    from .ir.interpret import interpret

    state = gen.get_state()
    ref = build()
    gen.set_state(state)
    g = build()
    stats = pass_fn(g)
    g.verify()
    want = interpret(ref, inputs, compute_dtype=torch.float64)
    got = interpret(g, inputs, compute_dtype=torch.float64)
    for a, b in zip(got, want):
        assert a.dtype == b.dtype and torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    return stats, g, ref
