"""GPTQ (Frantar et al. 2022, "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers"): weight-only quantization that minimises the layer's output error on calibration data.

    min_Q || X W^T - X Q^T ||^2        X [n, K] calibration inputs of the linear layer, W [N, K]
    H = 2/n X^T X                      [K, K], the Hessian of that loss in each row of W

Columns are quantized one at a time, left to right; the rounding error of column j is spread over the
columns not yet quantized, through the inverse Hessian of those columns:

    e = (w_j - q_j) / U[j, j]          U upper triangular, H^-1 = U^T U (Cholesky of the damped inverse)
    w_{j+1:} -= e U[j, j+1:]

Updates are lazy (the reference implementation's batching): inside a block of ``block`` columns they are
applied at once per column, to the rest of the weight once per block (a [N, B] x [B, K'] matmul).

Choices, and why:
- Grids (scale, zero point per row and group) come from ``kiln.ir.quant.fit_grid``. Without act_order
  a group's grid is fitted when the sweep reaches its first column, on the weights as updated so far
  (blocks are aligned to groups, so those are the exact current values); per-channel grids (group == K)
  are fitted on the original weight.
- act_order quantizes columns by descending H[j, j] (the inputs with the most energy first), then puts
  the codes back in the original order. kiln's format needs column k in group k // group of the STORED
  order, so with groups every grid is fitted up front on the original weight ("static groups", as in
  AutoGPTQ) and column perm[j] keeps its group perm[j] // group.
- Dead inputs (H[i, i] == 0: the input is zero on all calibration data) get H[i, i] = 1. Their row and
  column of H are zero, so the column is decoupled: it is rounded to nearest on its group's grid and its
  error goes nowhere. Its weights are kept (the reference zeroes them): an input silent in calibration
  need not be silent later.
- Damping adds damp * mean(diag H) to the diagonal. When a Cholesky factorization still fails, damp is
  multiplied by 10 (up to 4 times; 0 becomes 0.01) and a ``DampingWarning`` says which value was used.
The Hessian and its factorizations are float64; the sweep over the weight is float32.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable

import torch

from ..ir.quant import QuantWeight, check_layout, default_scale_dtype, dequantize, fit_grid, from_codes, round_to_grid


class DampingWarning(UserWarning):
    """GPTQ needed more damping than asked for to factor the Hessian."""


class HessianAccumulator:
    """Streaming H = 2/n sum_i x_i^T x_i over the rows x_i [K] of calibration activations [*, K]."""

    def __init__(self, k: int, dtype: torch.dtype = torch.float64, device=None):
        self.k, self.n = k, 0
        self.sum = torch.zeros(k, k, dtype=dtype, device=device)  # sum_i x_i^T x_i

    def add(self, x: torch.Tensor) -> None:
        if x.shape[-1] != self.k:
            raise ValueError(f"activations of last dim {x.shape[-1]} for a Hessian of K = {self.k}")
        x = x.detach().reshape(-1, self.k).to(self.sum)  # [rows, K]
        self.sum.addmm_(x.T, x)
        self.n += x.shape[0]

    def value(self) -> torch.Tensor:
        """H = 2/n sum x^T x, [K, K]."""
        if self.n == 0:
            raise ValueError("no calibration activations were added to the Hessian")
        return self.sum * (2.0 / self.n)


def _batches(xs) -> Iterable[torch.Tensor]:
    return (xs,) if isinstance(xs, torch.Tensor) else xs


def hessian(xs: torch.Tensor | Iterable[torch.Tensor], dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """H = 2/n sum x^T x [K, K] over calibration activations: one tensor [*, K] or an iterable of them
    (streamed: the same H as their concatenation)."""
    acc = None
    for x in _batches(xs):
        if acc is None:
            acc = HessianAccumulator(x.shape[-1], dtype, x.device)
        acc.add(x)
    if acc is None:
        raise ValueError("hessian: no calibration activations given")
    return acc.value()


@dataclass
class _Grids:
    """The grids of one weight: scales [N, G] (stored dtype) and zero points [N, G], filled up front or by
    ``fit`` when the sweep starts a group; ``gidx[j]`` is the group of the j-th column swept."""

    scales: torch.Tensor
    zero: torch.Tensor
    gidx: list[int]
    fit_as_swept: bool
    bits: int
    group: int
    symmetric: bool

    def fit(self, g: int, w: torch.Tensor) -> None:
        s, z = fit_grid(w, self.bits, self.group, self.symmetric, self.scales.dtype)  # [N, 1]
        self.scales[:, g], self.zero[:, g] = s[:, 0], z[:, 0]


def gptq(w: torch.Tensor, H: torch.Tensor, bits: int, group: int, symmetric: bool, act_order: bool = False,
         damp: float = 0.01, block: int = 128, scale_dtype: torch.dtype | None = None) -> QuantWeight:
    """Quantize w [N, K] with GPTQ against the Hessian H [K, K] of its calibration inputs (``hessian``).

    Returns a checked QuantWeight in kiln's format (codes in the original column order)."""
    n, k = _check_inputs(w, H, bits, group, damp)
    W = w.detach().float().clone()  # [N, K]
    H = H.detach().to(w.device, torch.float64).clone()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order else torch.arange(k, device=w.device)
    static = act_order or group == k
    if static:
        scales, zero = fit_grid(W, bits, group, symmetric, scale_dtype or default_scale_dtype(group, k))
    else:
        scales = torch.empty(n, k // group, dtype=scale_dtype or default_scale_dtype(group, k), device=w.device)
        zero = torch.empty(n, k // group, device=w.device)
    grids = _Grids(scales, zero, (perm // group).tolist(), not static, bits, group, symmetric)
    U = _inverse_cholesky(H[perm][:, perm], damp).float()  # [K, K]
    if not static:
        block = max(group, block // group * group)  # a group never straddles two blocks
    codes = _sweep(W[:, perm], U, grids, block)  # [N, K], swept order
    codes = codes[:, torch.argsort(perm)]
    return from_codes(codes, grids.scales, grids.zero, bits, group, symmetric)


def _check_inputs(w: torch.Tensor, H: torch.Tensor, bits: int, group: int, damp: float) -> tuple[int, int]:
    if w.dim() != 2:
        raise ValueError(f"gptq takes a weight [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    check_layout(bits, group, (n, k))
    if tuple(H.shape) != (k, k):
        raise ValueError(f"gptq: the Hessian must be [K, K] = [{k}, {k}] for a weight [{n}, {k}], got {tuple(H.shape)}")
    if not bool(torch.isfinite(H).all()):
        raise ValueError("gptq: the Hessian has non-finite values (NaN / inf in the calibration activations?)")
    if not bool(torch.isfinite(w).all()):
        raise ValueError("gptq: the weight has non-finite values")
    if not (damp >= 0 and math.isfinite(damp)):
        raise ValueError(f"gptq: damp must be a finite number >= 0, got {damp}")
    return n, k


def _inverse_cholesky(H: torch.Tensor, damp: float, retries: int = 4) -> torch.Tensor:
    """U upper triangular with U^T U = (H + damp * mean(diag H) I)^-1, [K, K] float64; damp grows 10x per
    failed factorization (``DampingWarning``)."""
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    mean_diag = torch.diagonal(H).mean()
    for attempt in range(retries + 1):
        d = damp if attempt == 0 else max(damp, 1e-3) * 10 ** attempt  # damp = 0 retries from 0.01
        L, info = torch.linalg.cholesky_ex(H + d * mean_diag * eye)
        if int(info) == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if int(info) == 0:
                if attempt:
                    warnings.warn(f"gptq: the Hessian could not be factored with damp={damp:g}; used damp={d:g}",
                                  DampingWarning, stacklevel=3)
                return U
    raise ValueError(f"gptq: the Hessian is not positive semi-definite: Cholesky failed up to damp={d:g}")


def _sweep(W: torch.Tensor, U: torch.Tensor, grids: _Grids, block: int) -> torch.Tensor:
    """Quantize the columns of W [N, K] left to right, spreading each column's error over the columns to
    its right (lazily: within a block per column, beyond it once per block). Returns float codes [N, K]."""
    n, k = W.shape
    codes = torch.empty_like(W)
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]  # [N, B], [B, B]
        E1 = torch.zeros_like(W1)  # scaled errors (w - dq) / U[j, j]
        for i in range(i2 - i1):
            j = i1 + i
            if grids.fit_as_swept and j % grids.group == 0:
                grids.fit(j // grids.group, W1[:, i:i + grids.group])
            g = grids.gidx[j]
            s, z = grids.scales[:, g].float(), grids.zero[:, g]  # [N]
            q = round_to_grid(W1[:, i], s, z, grids.bits)
            codes[:, j] = q
            E1[:, i] = (W1[:, i] - (q - z) * s) / U1[i, i]
            W1[:, i + 1:] -= E1[:, i:i + 1] * U1[i:i + 1, i + 1:]
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return codes


def layer_error(w: torch.Tensor, qw: QuantWeight | torch.Tensor, xs: torch.Tensor | Iterable[torch.Tensor]) -> float:
    """Relative output error ||x W^T - x Wq^T|| / ||x W^T|| over activations xs ([*, K] or an iterable of
    them), in float64; qw is a QuantWeight or an already dequantized weight [N, K]."""
    w = w.detach().double()
    wq = dequantize(qw, torch.float64) if isinstance(qw, QuantWeight) else qw.detach().double()
    num = den = 0.0
    for x in _batches(xs):
        x = x.detach().reshape(-1, w.shape[1]).to(w)  # [rows, K]
        num += float(((x @ (w - wq).T) ** 2).sum())
        den += float(((x @ w.T) ** 2).sum())
    return math.sqrt(num / den) if den > 0 else 0.0
