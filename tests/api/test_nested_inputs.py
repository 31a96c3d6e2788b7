"""Arguments that are containers of tensors and Nones (diffusers' ``added_cond_kwargs={"resolution": None,
"aspect_ratio": None}``) capture: torch.export gets dynamic_shapes of the arguments' own structure."""
import torch
from diffusers import PixArtTransformer2DModel

import kiln
from kiln.testing import TOL, rel_err


class _Nested(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6)

    def forward(self, x, extra=None, pair=(None, None)):
        y = self.lin(x)
        if extra["scale"] is not None:
            y = y * extra["scale"]
        if pair[1] is not None:
            y = y + pair[1]
        return y


def test_containers_of_tensors_and_nones():
    torch.manual_seed(0)
    mod = _Nested().eval()
    x, s, b = torch.randn(3, 6), torch.randn(6), torch.randn(6)
    kw = {"extra": {"scale": s, "shift": None}, "pair": (None, b)}
    m = kiln.compile(mod, (x,), kw, dynamic={"x": {0: ("n", 1, 8)}})
    x2 = torch.randn(5, 6)
    assert rel_err(m(x2, **kw), mod(x2, **kw)) <= TOL[torch.float32]


def test_pixart_transformer_captures_with_added_cond_kwargs_of_nones():
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                                     cross_attention_dim=16, caption_channels=12, sample_size=8, patch_size=2,
                                     norm_type="ada_norm_single", use_additional_conditions=False).eval()
    with torch.no_grad():
        for p in model.parameters():  # off the zero / one inits, which would hide mistakes
            p.add_(torch.randn_like(p) * 0.1)

    def inputs(batch, seed):
        g = torch.Generator().manual_seed(seed)
        return dict(hidden_states=torch.randn(batch, 4, 8, 8, generator=g), encoder_hidden_states=torch.randn(batch, 5, 12, generator=g),
                    timestep=torch.randint(0, 1000, (batch,), generator=g), added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    dims = {k: {0: "batch"} for k in ("hidden_states", "encoder_hidden_states", "timestep")}
    m = kiln.compile(model, (), inputs(2, 0), dynamic=dims)
    for batch in (1, 3):
        kw = inputs(batch, batch)
        with torch.no_grad():
            want = model(**kw).sample
        assert rel_err(m(**kw).sample, want) <= TOL[torch.float32]
