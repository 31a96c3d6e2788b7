"""kiln.models.dit against diffusers' DiTTransformer2DModel on tiny random configs (CPU)."""

import pytest
import torch

from kiln.testing import TOL, rel_err
from diffusers import DiTTransformer2DModel
from safetensors.torch import load_file, save_file

from kiln.models.dit import DiT, DiTConfig, load_dit
from kiln.models.registry import export_dims, get


SMALL = dict(
    num_attention_heads=2,
    attention_head_dim=8,
    in_channels=4,
    out_channels=8,
    num_layers=2,
    sample_size=8,
    patch_size=2,
    num_embeds_ada_norm=10,
)
VARIANTS = {
    "dit": {},
    "affine-gelu-nobias": dict(
        norm_elementwise_affine=True, activation_fn="gelu", attention_bias=False, out_channels=None
    ),
}


def diffusers_model(**kw) -> DiTTransformer2DModel:
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**{**SMALL, **kw}).eval()
    with torch.no_grad():  # ada_norm_zero zero-inits adaLN and output projections: perturb everything
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def inputs(batch: int, float_timestep: bool = False, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(batch, generator=g) * 999 if float_timestep else torch.randint(0, 1000, (batch,), generator=g)
    return {
        "hidden_states": torch.randn(batch, 4, 8, 8, generator=g),
        "timestep": t,
        "class_labels": torch.randint(0, 11, (batch,), generator=g),  # 10 = the CFG null class
    }




@torch.no_grad()
def reference(model, x):
    return model(**x).sample


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("batch, float_timestep", [(1, False), (3, False), (3, True)])
@torch.no_grad()
def test_matches_diffusers(variant, batch, float_timestep):
    ref = diffusers_model(**VARIANTS[variant])
    model = DiT(DiTConfig.from_diffusers(dict(ref.config))).eval()
    model.load_state_dict(ref.state_dict(), strict=True)
    x = inputs(batch, float_timestep)
    out = model(**x)
    assert out.shape == (batch, ref.out_channels, 8, 8)
    assert rel_err(out, reference(ref, x)) <= TOL[torch.float32]


def test_pos_embed_is_diffusers_non_persistent_buffer():
    ref = diffusers_model()
    model = DiT(DiTConfig.from_diffusers(dict(ref.config)))
    assert torch.equal(model.pos_embed.pos_embed, ref.pos_embed.pos_embed)
    assert "pos_embed.pos_embed" not in model.state_dict()


def test_every_block_owns_its_embedding():
    names = DiT(DiTConfig(**SMALL)).state_dict()
    for i in range(SMALL["num_layers"]):
        assert f"transformer_blocks.{i}.norm1.emb.timestep_embedder.linear_1.weight" in names
        assert f"transformer_blocks.{i}.norm1.emb.class_embedder.embedding_table.weight" in names


@pytest.mark.parametrize("layout", ["flat", "pipeline", "sharded"])
@torch.no_grad()
def test_load_saved_checkpoint(layout, tmp_path):
    ref = diffusers_model()
    target = tmp_path / "transformer" if layout == "pipeline" else tmp_path
    shard = "10KB" if layout == "sharded" else "10GB"
    ref.save_pretrained(target, safe_serialization=True, max_shard_size=shard)
    if layout == "sharded":
        assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    model = load_dit(tmp_path)
    x = inputs(3)
    assert rel_err(model(**x), reference(ref, x)) <= TOL[torch.float32]
    assert not model.training


@torch.no_grad()
def test_load_bfloat16_matches_diffusers(tmp_path):
    diffusers_model().save_pretrained(tmp_path, safe_serialization=True)
    ref = DiTTransformer2DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16).eval()
    model = load_dit(tmp_path, dtype=torch.bfloat16)
    x = inputs(3)
    x["hidden_states"] = x["hidden_states"].bfloat16()
    out = model(**x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, reference(ref, x)) <= TOL[torch.bfloat16]


def test_missing_tensor_is_named(tmp_path):
    diffusers_model().save_pretrained(tmp_path, safe_serialization=True)
    file = tmp_path / "diffusion_pytorch_model.safetensors"
    tensors = load_file(file)
    del tensors["transformer_blocks.1.attn1.to_k.bias"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="transformer_blocks.1.attn1.to_k.bias.*diffusion_pytorch_model.safetensors"):
        load_dit(tmp_path)


@pytest.mark.parametrize(
    "cfg, name",
    [
        ({**SMALL, "norm_type": "ada_norm_single"}, "ada_norm_single"),
        ({**SMALL, "activation_fn": "geglu"}, "geglu"),
        ({**SMALL, "_class_name": "UNet2DModel"}, "UNet2DModel"),
        ({**SMALL, "_class_name": "Transformer2DModel", "cross_attention_dim": 768}, "cross_attention_dim"),
    ],
)
def test_from_diffusers_rejects_unsupported(cfg, name):
    with pytest.raises(ValueError, match=name):
        DiTConfig.from_diffusers(cfg)


def test_wrong_latent_size_is_an_error():
    with pytest.raises(ValueError, match="8\\^2"):
        DiT(DiTConfig(**SMALL))(torch.randn(1, 4, 6, 6), torch.tensor([1]), torch.tensor([1]))


@torch.no_grad()
def test_export_dynamic_batch():
    spec = get("dit-tiny")
    model = spec.build()
    prog = torch.export.export(
        model, (), spec.example_inputs(batch=2), dynamic_shapes=export_dims(spec.dynamic()), strict=False
    )
    for batch in (5, 1):
        x = spec.example_inputs(batch=batch, seed=1)
        assert rel_err(prog.module()(**x), model(**x)) <= TOL[torch.float32]
