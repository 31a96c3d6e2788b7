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
