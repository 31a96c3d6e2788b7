"""DiT (Peebles & Xie) in plain PyTorch, a drop-in for diffusers' DiTTransformer2DModel (ada_norm_zero).

Parameter names are exactly diffusers' so its state_dict loads with strict=True. Like diffusers, every
block owns (and computes) its own timestep + class embedding, and the final layer reuses block 0's;
a graph pass deduplicates that later, the model keeps it on purpose.
Inference only: no class-label dropout, no attention/FF dropout.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import assign_checked, read_safetensors

TIME_PROJ_DIM = 256  # CombinedTimestepLabelEmbeddings: Timesteps(num_channels=256, ...)
ACTIVATIONS = {"gelu": "none", "gelu-approximate": "tanh"}  # diffusers name -> F.gelu(approximate=)
DIFFUSERS_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")


@dataclass
class DiTConfig:
    """Field names and defaults as diffusers' DiTTransformer2DModel (DiT-XL/2 at 256 px)."""

    num_attention_heads: int = 16
    attention_head_dim: int = 72
    in_channels: int = 4
    out_channels: int | None = None  # None: in_channels
    num_layers: int = 28
    sample_size: int = 32  # latent height = width
    patch_size: int = 2
    num_embeds_ada_norm: int = 1000  # number of classes
    norm_eps: float = 1e-5  # norm3 only; the adaLN norms use 1e-6 as in diffusers
    norm_elementwise_affine: bool = False
    attention_bias: bool = True
    activation_fn: str = "gelu-approximate"

    def __post_init__(self):
        if self.out_channels is None:
            self.out_channels = self.in_channels
        if self.activation_fn not in ACTIVATIONS:
            raise ValueError(f"unsupported activation_fn {self.activation_fn!r}; kiln supports {list(ACTIVATIONS)}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @classmethod
    def from_diffusers(cls, cfg: dict) -> DiTConfig:
        """Build from a diffusers config.json dict; unknown keys are ignored."""
        name = cfg.get("_class_name", "DiTTransformer2DModel")
        if name not in DIFFUSERS_CLASSES:
            raise ValueError(f"unsupported diffusers class {name!r}; kiln's DiT handles {DIFFUSERS_CLASSES}")
        if cfg.get("norm_type", "ada_norm_zero") != "ada_norm_zero":
            raise ValueError(f"unsupported norm_type {cfg['norm_type']!r} (only 'ada_norm_zero')")
        for key in ("cross_attention_dim", "num_vector_embeds"):
            if cfg.get(key) is not None:
                raise ValueError(f"unsupported {key}={cfg[key]!r}: kiln's DiT is class-conditional, continuous input")
        if cfg.get("num_embeds_ada_norm", 1) is None or cfg.get("patch_size", 1) is None:
            raise ValueError("ada_norm_zero DiT needs num_embeds_ada_norm and patch_size")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in cfg.items() if k in known})


def timestep_embedding(t: torch.Tensor, dim: int = TIME_PROJ_DIM) -> torch.Tensor:
    """[B] -> [B, dim]: cat(cos, sin)(t * exp(-ln(1e4) * i / (dim/2 - 1))).

    diffusers' get_timestep_embedding with flip_sin_to_cos=True and downscale_freq_shift=1 (note the
    `- 1`: the original DiT divides by dim/2).
    """
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(0, half, dtype=torch.float32, device=t.device) / (half - 1)
    emb = t[:, None].float() * torch.exp(exponent)[None, :]  # [B, half]
    return torch.cat([torch.cos(emb), torch.sin(emb)], dim=-1)


def sincos_pos_embed_2d(dim: int, grid: int, base_size: int, device=None) -> torch.Tensor:
    """[grid*grid, dim] float32, as diffusers' get_2d_sincos_pos_embed (interpolation_scale 1).

    The first dim/2 channels encode the column (w) coordinate, the last dim/2 the row (h): diffusers
    builds meshgrid(w, h) and feeds grid[0] (= w) to the half it calls emb_h.
    """
    coords = torch.arange(grid, dtype=torch.float32, device=device) / (grid / base_size)
    w, h = torch.meshgrid(coords, coords, indexing="xy")  # each [grid, grid]; w varies along columns
    omega = torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4.0)
    omega = 1.0 / 10000**omega  # [dim/4], float64 like diffusers on CPU/CUDA

    def embed_1d(pos: torch.Tensor) -> torch.Tensor:
        out = torch.outer(pos.reshape(-1), omega)  # [grid*grid, dim/4], float64
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    return torch.cat([embed_1d(w), embed_1d(h)], dim=1).float()


class PatchEmbed(nn.Module):
    """[B, C, H, W] -> [B, H/p * W/p, D]: a strided conv, flattened row-major, plus the fixed sin-cos table."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        p = cfg.patch_size
        self.grid = cfg.sample_size // p
        self.proj = nn.Conv2d(cfg.in_channels, cfg.inner_dim, kernel_size=(p, p), stride=p, bias=True)
        table = sincos_pos_embed_2d(cfg.inner_dim, self.grid, self.grid)[None]  # [1, N, D]
        self.register_buffer("pos_embed", table, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.grid * self.proj.stride[0],) * 2:
            raise ValueError(f"DiT expects {self.grid * self.proj.stride[0]}^2 latents, got {tuple(x.shape)}")
        y = self.proj(x).flatten(2).transpose(1, 2)  # [B, N, D]
        return (y + self.pos_embed).to(y.dtype)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(TIME_PROJ_DIM, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t_freq: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(t_freq)))


class LabelEmbedding(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, dim)  # last row: the CFG "null" class


class CombinedTimestepLabelEmbeddings(nn.Module):
    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        self.timestep_embedder = TimestepEmbedding(dim)
        self.class_embedder = LabelEmbedding(num_classes, dim)

    def forward(self, timestep: torch.Tensor, class_labels: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B], [B] -> conditioning [B, D]."""
        t = self.timestep_embedder(timestep_embedding(timestep).to(dtype))
        return t + self.class_embedder.embedding_table(class_labels)


class AdaLayerNormZero(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.emb = CombinedTimestepLabelEmbeddings(cfg.num_embeds_ada_norm, cfg.inner_dim)
        self.linear = nn.Linear(cfg.inner_dim, 6 * cfg.inner_dim)


class Attention(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d, self.heads = cfg.inner_dim, cfg.num_attention_heads
        self.to_q = nn.Linear(d, d, bias=cfg.attention_bias)
        self.to_k = nn.Linear(d, d, bias=cfg.attention_bias)
        self.to_v = nn.Linear(d, d, bias=cfg.attention_bias)
        self.to_out = nn.ModuleList([nn.Linear(d, d)])  # diffusers' to_out[1] is a parameterless Dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, D = x.shape
        q, k, v = (p(x).view(B, N, self.heads, -1).transpose(1, 2) for p in (self.to_q, self.to_k, self.to_v))
        y = F.scaled_dot_product_attention(q, k, v)  # [B, H, N, hd]
        return self.to_out[0](y.transpose(1, 2).reshape(B, N, D))


class GELUProj(nn.Module):
    def __init__(self, d_in: int, d_out: int, approximate: str):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        d = cfg.inner_dim
        # Slot 1 is diffusers' Dropout; the Identity keeps the output projection named ff.net.2.
        self.net = nn.Sequential(GELUProj(d, 4 * d, ACTIVATIONS[cfg.activation_fn]), nn.Identity(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.dim = cfg.inner_dim
        self.norm1 = AdaLayerNormZero(cfg)
        self.attn1 = Attention(cfg)
        self.norm3 = nn.LayerNorm(cfg.inner_dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_elementwise_affine)
        self.ff = FeedForward(cfg)

    def forward(self, x, timestep, class_labels) -> torch.Tensor:
        """x [B, N, D] -> [B, N, D]; the block's own conditioning from (timestep, class_labels)."""
        c = self.norm1.emb(timestep, class_labels, x.dtype)  # [B, D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.norm1.linear(F.silu(c)).chunk(6, dim=1)
        h = F.layer_norm(x, (self.dim,), eps=1e-6) * (1 + scale_msa[:, None]) + shift_msa[:, None]
        x = gate_msa.unsqueeze(1) * self.attn1(h) + x
        h = self.norm3(x) * (1 + scale_mlp[:, None]) + shift_mlp[:, None]
        return gate_mlp.unsqueeze(1) * self.ff(h) + x


class DiT(nn.Module):
    """(hidden_states [B, C, H, W], timestep [B], class_labels [B]) -> [B, out_channels, H, W]."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.config = cfg
        self.pos_embed = PatchEmbed(cfg)
        self.transformer_blocks = nn.ModuleList(DiTBlock(cfg) for _ in range(cfg.num_layers))
        self.proj_out_1 = nn.Linear(cfg.inner_dim, 2 * cfg.inner_dim)
        self.proj_out_2 = nn.Linear(cfg.inner_dim, cfg.patch_size**2 * cfg.out_channels)

    def reset_buffers(self) -> None:
        """Recompute the positional table (float32) on the parameters' device, e.g. after meta init."""
        grid = self.pos_embed.grid
        device = self.pos_embed.proj.weight.device
        self.pos_embed.pos_embed = sincos_pos_embed_2d(self.config.inner_dim, grid, grid, device=device)[None]

    def forward(self, hidden_states, timestep, class_labels) -> torch.Tensor:
        B, p, c_out, g = hidden_states.shape[0], self.config.patch_size, self.config.out_channels, self.pos_embed.grid
        x = self.pos_embed(hidden_states)  # [B, N, D]
        for block in self.transformer_blocks:
            x = block(x, timestep, class_labels)
        c = self.transformer_blocks[0].norm1.emb(timestep, class_labels, x.dtype)  # diffusers reuses block 0's
        shift, scale = self.proj_out_1(F.silu(c)).chunk(2, dim=1)
        x = F.layer_norm(x, (x.shape[-1],), eps=1e-6) * (1 + scale[:, None]) + shift[:, None]
        x = self.proj_out_2(x)  # [B, N, p*p*C]
        # Unpatchify: token (h, w) channel (p, q, c) -> pixel (c, h*p + p', w*p + q').
        x = x.reshape(B, g, g, p, p, c_out).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(B, c_out, g * p, g * p)


def load_dit(path: str | Path, dtype: torch.dtype = torch.float32) -> DiT:
    """Load a diffusers DiT directory (config.json + diffusion_pytorch_model.safetensors, or sharded with
    an index); a pipeline directory whose transformer/ holds them also works."""
    path = Path(path)
    if not (path / "config.json").is_file() and (path / "transformer" / "config.json").is_file():
        path = path / "transformer"
    cfg = DiTConfig.from_diffusers(json.loads((path / "config.json").read_text()))
    tensors, source, where = read_safetensors(path, "diffusion_pytorch_model")
    with torch.device("meta"):
        model = DiT(cfg)
    assign_checked(model, tensors, source, where)
    model.to(dtype)
    model.reset_buffers()
    return model.eval()
