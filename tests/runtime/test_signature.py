"""runtime/signature.py: outputs rebuilt in the eager structure; a ModelOutput whose library this process has not
imported comes back as kiln's ModelOutput (same fields), and a loaded artifact imports no model library."""
import os
import subprocess
import sys
import textwrap

import torch

import kiln
from kiln.runtime.signature import ModelOutput, _build


def test_an_output_class_of_an_unimported_module_is_kilns_model_output():
    s = {"type": "model_output", "class": "diffusers.not_imported_here.Out", "keys": ["sample", "extra", "more"],
         "children": [{"leaf": True}, {"type": "none"}, {"leaf": True}]}
    a, b = torch.ones(2), torch.zeros(3)
    out = _build(s, iter([a, b]))
    assert type(out) is ModelOutput and out.sample is a and out["more"] is b and out.extra is None
    assert out[0] is a and out[1] is b and out.to_tuple() == (a, b) and out[-1:] == (b,)
    assert list(out) == ["sample", "extra", "more"]


def test_an_imported_model_output_class_is_used():
    from transformers.modeling_outputs import BaseModelOutput

    s = {"type": "model_output", "class": "transformers.modeling_outputs.BaseModelOutput", "keys": ["last_hidden_state"],
         "children": [{"leaf": True}]}
    out = _build(s, iter([torch.ones(1)]))
    assert type(out) is BaseModelOutput and out.last_hidden_state.shape == (1,)


def test_a_loaded_dit_artifact_imports_neither_diffusers_nor_onnx(tmp_path):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1,
                                sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero").eval()
    x = dict(hidden_states=torch.randn(1, 4, 8, 8), timestep=torch.tensor([3]), class_labels=torch.tensor([1]))
    path = str(tmp_path / "dit.kiln")
    kiln.compile(dit, (), x).save(path)
    torch.save(x, tmp_path / "x.pt")
    with torch.no_grad():
        want = dit(**x).sample
    torch.save(want, tmp_path / "want.pt")
    code = textwrap.dedent(f"""
        import sys, torch, kiln
        x = torch.load({str(tmp_path / 'x.pt')!r})
        out = kiln.load({path!r})(**x)
        bad = [m for m in ("diffusers", "transformers", "onnx") if m in sys.modules]
        assert not bad, bad
        assert type(out).__name__ == "ModelOutput", type(out)
        err = ((out.sample - torch.load({str(tmp_path / 'want.pt')!r})).norm() / out.sample.norm()).item()
        assert err < 1e-4 and torch.equal(out[0], out.sample), err
    """)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
