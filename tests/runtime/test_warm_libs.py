"""Warming the GPU libraries while an artifact loads (runtime/warm_libs.py)."""
import json
import zipfile

import pytest
import torch

import kiln
from kiln.runtime import warm_libs


class _PatchEmbed(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 2, stride=2)
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(self.conv(x).flatten(2).transpose(1, 2))


def test_libraries_name_cudnn_for_convolutions_only():
    assert warm_libs.libraries(["GEMM", "CONV2D", "ADD"]) == ["cudnn"]
    assert warm_libs.libraries(iter(["CONV"])) == ["cudnn"]
    assert warm_libs.libraries(["GEMM", "RMSNORM"]) == []


@pytest.mark.parametrize("module, want", [(_PatchEmbed, ["cudnn"]), (lambda: torch.nn.Linear(8, 8), [])])
def test_manifest_records_the_libraries(tmp_path, module, want):
    torch.manual_seed(0)
    m = module().eval()
    x = torch.randn(2, 4, 8, 8) if want else torch.randn(2, 8)
    path = kiln.compile(m, (x,)).save(tmp_path / "m.kiln")
    with zipfile.ZipFile(path) as zf:
        assert json.loads(zf.read("manifest.json"))["libraries"] == want


def test_nothing_starts_when_turned_off(monkeypatch):
    monkeypatch.setenv("KILN_WARM_LIBS", "0")
    warm_libs.start(torch.device("cuda"), ["cudnn"])
    assert not warm_libs._THREADS


def test_nothing_starts_off_cuda():
    warm_libs.start(torch.device("cpu"), ["cudnn"])
    assert not warm_libs._THREADS
    warm_libs.wait()


@pytest.mark.gpu
def test_a_conv_artifact_loads_and_runs_with_the_libraries_warming(tmp_path):
    torch.manual_seed(0)
    m = _PatchEmbed().cuda().half().eval()
    x = torch.randn(2, 4, 16, 16, device="cuda", dtype=torch.half)
    kiln.compile(m, (x,)).save(tmp_path / "m.kiln")
    loaded = kiln.load(tmp_path / "m.kiln")  # starts the warming thread; the plan of the first call waits for it
    out = loaded(x)
    assert not warm_libs._THREADS
    torch.testing.assert_close(out.float(), m.float()(x.float()), atol=2e-2, rtol=2e-2)
