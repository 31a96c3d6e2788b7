"""A DiT's per-step conditioning, hoisted out of the denoising loop.

Each DiT block modulates its norms with ``linear(silu(emb(t, y)))`` ([2B, 6D]: shift, scale, gate of attention and
MLP), and the output layer with ``proj_out_1(silu(emb_0(t, y)))`` ([2B, 2D]). They depend on the step's timestep and
the labels alone, yet a step graph computing them reads their weights every step: 28 x 6 x 1152 x 1152 + 2 x 1152 x
1152 values, 446 MB in bf16 for DiT-XL/2, ~110 us of the H200's bandwidth in each 1.9 ms step. Hoisted, one
``DiTConditioning`` call computes them for K steps at once (one GEMM of K x 2B rows a block, the weights read once),
and the step graph reads its step's row of that table:

    conditioning(timesteps [T], start [], class_labels [B]) -> modulation [K, 2, B, W]   (rows start .. start + K - 1;
                                                                                           2: the labels, the null label)
    step(..., modulation): row = modulation[step % K] -> [2B, W] = [block 0's 6D | ... | block L-1's 6D | output 2D]

The pipeline runs the conditioning graph before steps 0, K, 2K, ... (no host synchronisation: the timesteps and the
start are device tensors). ``transformer_view`` is the diffusers transformer with its blocks' ``norm1`` and its
``proj_out_1`` swapped for modules that read the row; the user's model is not changed (the view shares its weights).
"""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from .steps import cfg_labels

# steps a conditioning call covers: one call for the common 20-32 step schedules, 2 for 50. The table is K x 2B x W
# (25 MB at batch 1 for DiT-XL/2); the GEMM of K x 2B rows still reads its weights at batch 1 rather than computing
CONDITIONING_STEPS = 32


def hoistable(transformer) -> bool:
    """Whether ``transformer`` is a diffusers DiT whose conditioning this module can hoist: adaLN-Zero blocks, each
    with its timestep / class embedder, and the output layer's ``proj_out_1``."""
    blocks = getattr(transformer, "transformer_blocks", None)
    return (blocks is not None and len(blocks) > 0 and isinstance(getattr(transformer, "proj_out_1", None), nn.Linear)
            and all(getattr(b, "norm_type", None) == "ada_norm_zero" and type(b.norm1).__name__ == "AdaLayerNormZero"
                    and getattr(b.norm1, "emb", None) is not None for b in blocks))


def widths(transformer) -> tuple[int, int]:
    """(a block's modulation width 6D, the output layer's 2D)."""
    return transformer.transformer_blocks[0].norm1.linear.out_features, transformer.proj_out_1.out_features


class DiTConditioning(nn.Module):
    """(timesteps [T], start [] int64, class_labels [B]) -> modulation [K, 2, B, W] (module docstring): the rows of
    steps start .. start + K - 1 (past T - 1: the last timestep's), for the labels then the null label ``null_class``.
    Holds the embedders, the blocks' adaLN linears and ``proj_out_1`` only, not the rest of the transformer."""

    def __init__(self, transformer, null_class: int, steps: int = CONDITIONING_STEPS):
        super().__init__()
        blocks = transformer.transformer_blocks
        self.embedders = nn.ModuleList(b.norm1.emb for b in blocks)
        self.linears = nn.ModuleList(b.norm1.linear for b in blocks)
        self.proj_out_1 = transformer.proj_out_1
        self.null_class, self.steps = int(null_class), int(steps)

    def forward(self, timesteps, start, class_labels):
        labels = cfg_labels(class_labels, self.null_class)  # [2B]
        n, K = labels.shape[0], self.steps
        rows = (start + torch.arange(K, device=timesteps.device)).clamp(max=timesteps.shape[0] - 1)
        t = timesteps.index_select(0, rows)[:, None].expand(K, n).reshape(-1)  # [K * 2B], step-major
        y = labels[None].expand(K, n).reshape(-1)
        dtype = self.proj_out_1.weight.dtype  # (diffusers: the hidden states' dtype, the model's)
        embs = [e(t, y, hidden_dtype=dtype) for e in self.embedders]  # (tied embedders: CSE computes one)
        parts = [lin(F.silu(e)) for lin, e in zip(self.linears, embs)]
        parts.append(self.proj_out_1(F.silu(embs[0])))  # diffusers' output layer reads block 0's embedder
        return torch.cat(parts, 1).reshape(K, 2, n // 2, -1)


class _Row:
    """The step's modulation row, handed from block 0's ``norm1.emb`` to the output layer within one forward."""
    value: torch.Tensor | None = None


class _RowEmbedder(nn.Module):
    """Block 0's ``norm1.emb`` in the view: the output layer calls it with the row as ``timestep``; it returns the row
    (and keeps it for ``_OutputModulation``)."""

    def __init__(self, row: _Row):
        super().__init__()
        self.row = row

    def forward(self, timestep, class_labels=None, hidden_dtype=None):
        self.row.value = timestep
        return timestep


class _OutputModulation(nn.Module):
    """``proj_out_1`` in the view: the output layer's (shift, scale), the row's last 2D columns (its input, silu of the
    row, is left unused and removed as dead code)."""

    def __init__(self, row: _Row, start: int):
        super().__init__()
        self.row, self.start = row, start

    def forward(self, x):
        value, self.row.value = self.row.value, None
        return value[:, self.start:]


class _TableAdaLNZero(nn.Module):
    """A block's ``norm1`` (diffusers' AdaLayerNormZero) reading its 6D columns of the row passed as ``timestep``."""

    def __init__(self, norm1, index: int, width: int, row: _Row):
        super().__init__()
        self.norm = norm1.norm
        self.lo, self.hi = index * width, (index + 1) * width
        if index == 0:
            self.emb = _RowEmbedder(row)

    def forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = timestep[:, self.lo:self.hi].chunk(6, dim=1)
        x = self.norm(x) * (1 + scale_msa[:, None]) + shift_msa[:, None]  # (as AdaLayerNormZero.forward)
        return x, gate_msa, shift_mlp, scale_mlp, gate_mlp


def _shallow(module: nn.Module) -> nn.Module:
    """A new module object sharing ``module``'s parameters and buffers, with its own table of children."""
    view = copy.copy(module)
    view._modules = dict(module._modules)
    return view


def transformer_view(transformer) -> nn.Module:
    """The diffusers DiT ``transformer`` called with the modulation row [2B, W] as its ``timestep`` (class labels
    unused): its blocks' norm1 and its proj_out_1 read the row; every other module and weight is the transformer's."""
    row, (width, _) = _Row(), widths(transformer)
    view = _shallow(transformer)
    blocks = []
    for i, block in enumerate(transformer.transformer_blocks):
        b = _shallow(block)
        b._modules["norm1"] = _TableAdaLNZero(block.norm1, i, width, row)
        blocks.append(b)
    view._modules["transformer_blocks"] = nn.ModuleList(blocks)
    view._modules["proj_out_1"] = _OutputModulation(row, len(blocks) * width)
    return view
