"""The error measure kiln reports (verify, bench) and its tests use."""
from __future__ import annotations

import torch


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """Relative L2 error in float64; shapes must agree and non-finite values must sit in the same places."""
    got, want = got.detach().double().cpu(), want.detach().double().cpu()
    if got.shape != want.shape:
        raise AssertionError(f"shape {tuple(got.shape)} != {tuple(want.shape)}")
    if not torch.equal(torch.isfinite(got), torch.isfinite(want)):
        raise AssertionError("non-finite values differ")
    fin = torch.isfinite(want)
    return float((got[fin] - want[fin]).norm() / want[fin].norm().clamp_min(1e-30))
