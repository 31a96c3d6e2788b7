"""The Target is built once from CompileConfig and reaches everything that needs it: every cache entry a
compile writes (generated kernels, tuning choices) goes to ``CompileConfig.cache_dir``."""
import pytest
import torch

import kiln
from kiln.codegen.cache import Cache
from kiln.runtime.target import Target


class _Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 24)

    def forward(self, x):
        return torch.softmax(torch.nn.functional.gelu(self.fc(x), approximate="tanh") * 2, dim=-1)


@pytest.mark.interpreter
def test_cache_dir_moves_every_cache_entry(tmp_path, monkeypatch):
    default = tmp_path / "default"
    monkeypatch.setenv("KILN_CACHE_DIR", str(default))
    torch.manual_seed(0)
    model, x = _Mlp().eval(), torch.randn(3, 16)
    for name in ("a", "b"):
        cfg = kiln.CompileConfig(backend="kernels", cache_dir=str(tmp_path / name))
        m = kiln.compile(model, (x,), config=cfg)
        assert torch.allclose(m(x), model(x), rtol=1e-5, atol=1e-6)
        kinds = Cache(tmp_path / name).stats()["kinds"]
        assert kinds["pointwise"]["entries"] >= 1 and kinds["tuning"]["entries"] >= 1, kinds
    assert Cache(default).stats()["entries"] == 0  # nothing went to the default directory


def test_target_from_config():
    t = Target.from_config(kiln.CompileConfig(max_plans=3, kernels={"gemm": "cublas"}, cache_dir="/tmp/x"), default_device="cpu")
    assert (t.device, t.backend, t.max_plans, str(t.cache.root)) == (torch.device("cpu"), "reference", 3, "/tmp/x")
    assert t.tuner.force == {"gemm": "cublas"} and t.tuner.cache is t.cache
    assert Target.from_config(kiln.CompileConfig(backend="kernels")).backend == "kernels"
