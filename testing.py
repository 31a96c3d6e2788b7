"""Helpers for kiln's tests and benchmarks: the tolerance table and the error measure."""
from __future__ import annotations

import torch

from .ir.interpret import interpret
from .numerics import rel_err  # noqa: F401  (the tests and benchmarks import it from here)

# Relative error ||got - want|| / ||want|| allowed per dtype, in ONE place.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}




def check_pass(pass_fn, build, inputs, gen: torch.Generator):
    """Build a graph twice with the same random state, run ``pass_fn`` on one, and check both compute the same
    in float64 (dtypes included). Returns ``(stats, rewritten graph, original graph)``."""
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


# ----------------------------------------------------------------------------- models and exports the tests share


def perturbed(model):
    """``model`` in eval mode with every parameter nudged: HF / diffusers zero- or ones-init biases, norms and adaLN,
    which would hide mistakes."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


class LlamaLogits(torch.nn.Module):
    """An HF causal LM as a function of (input_ids[, attention_mask]) -> logits, for exporters."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, input_ids, attention_mask=None):
        return self.m(input_ids, attention_mask=attention_mask, use_cache=False).logits


class DiTSample(torch.nn.Module):
    """A diffusers DiT as a function of (hidden_states, timestep, class_labels) -> sample, for exporters."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, hidden_states, timestep, class_labels):
        return self.m(hidden_states, timestep=timestep, class_labels=class_labels).sample


def export_onnx(module, args, path, dims: dict, dynamo: bool) -> str:
    """torch.onnx.export by either exporter, inputs named as ``dims`` ({input: {axis: dim name}}) lists them,
    those axes dynamic."""
    import warnings

    names = list(dims)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        if dynamo:
            shared: dict = {}
            ds = {k: {i: shared.setdefault(n, torch.export.Dim(n)) for i, n in per.items()} for k, per in dims.items()}
            torch.onnx.export(module, args, path, dynamo=True, input_names=names, output_names=["out"],
                              dynamic_shapes=ds, opset_version=18, verbose=False)
        else:
            torch.onnx.export(module, args, path, dynamo=False, input_names=names, output_names=["out"],
                              dynamic_axes=dims, opset_version=17)
    return str(path)


def dit_xl2(tied: bool = True, seed: int = 0, device="cpu"):
    """diffusers DiTTransformer2DModel at DiT-XL/2 256x256 (28 layers, 16 heads x 72, patch 2), random weights
    nudged off their zero / one inits, float32, initialised on ``device`` (on the GPU: seconds, not a minute).
    ``tied``: every block's ``norm1.emb`` holds the same tensors, as in real checkpoints converted to diffusers
    (the benchmarks' model)."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(seed)
    with torch.device(device):
        model = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
                                      sample_size=32, patch_size=2, num_embeds_ada_norm=1000).eval()
    with torch.no_grad():  # ada_norm_zero zero-inits the modulation
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    if tied:
        src = model.transformer_blocks[0].norm1.emb.state_dict()
        for blk in model.transformer_blocks[1:]:
            blk.norm1.emb.load_state_dict(src)
    return model


def dit_inputs(batch: int, dtype=torch.bfloat16, device="cuda", seed: int | None = None) -> dict:
    """Random DiT-XL/2 256x256 inputs: latents [batch, 4, 32, 32], timesteps and class labels."""
    g = torch.Generator(device=device).manual_seed(batch if seed is None else seed)
    return {"hidden_states": torch.randn(batch, 4, 32, 32, device=device, generator=g).to(dtype),
            "timestep": torch.randint(0, 1000, (batch,), device=device, generator=g),
            "class_labels": torch.randint(0, 1000, (batch,), device=device, generator=g)}


DIT_DYNAMIC = {k: {0: "batch"} for k in ("hidden_states", "timestep", "class_labels")}


SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, latent_channels=4, sample_size=512)
TINY_VAE = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=32)


def vae(config: dict, noise: float = 0.1, seed: int = 0, device="cpu"):
    """diffusers AutoencoderKL of ``config`` (``SD_VAE``: Stable Diffusion's VAE architecture; ``TINY_VAE``), random
    weights with every parameter nudged by ``noise`` * N(0, 1) (its norms init to ones / zeros), float32, eval mode,
    initialised on ``device``."""
    from diffusers import AutoencoderKL

    blocks = len(config["block_out_channels"])
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoencoderKL(down_block_types=("DownEncoderBlock2D",) * blocks, up_block_types=("UpDecoderBlock2D",) * blocks,
                              **config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    return model.eval()


class VAEDecode(torch.nn.Module):
    """``vae.decode(z).sample`` as a module of the latents ``z`` [batch, 4, h, w] (kiln.compile, exporters)."""

    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, z):
        return self.m.decode(z).sample
