"""Artifacts of several graphs: named components, each loaded with every check a single-graph load makes."""
import json
import zipfile

import pytest
import torch

import kiln
from kiln.runtime import artifact as art


def _rewrite(src, dst, change):
    """Copy a zip, letting ``change(name, data)`` return new bytes (or None to drop the member)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)


class Mlp(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        self.a, self.b = torch.nn.Linear(d, 2 * d), torch.nn.Linear(2 * d, d)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    torch.manual_seed(0)
    ma = kiln.compile(Mlp(6).eval(), (torch.randn(3, 6),), dynamic={"x": {0: ("rows", 1, 8)}})
    mb = kiln.compile(lambda x, y: torch.tanh(x) * y, (torch.randn(4), torch.randn(4)))
    path = tmp_path_factory.mktemp("comp") / "two.kiln"
    art.save_components(path, {"mlp": ma.as_component(), "fn": mb.as_component()}, extra={"note": {"k": 1}},
                        files={"vocab.txt": b"a\nb\n"})
    return ma, mb, path


def test_components_round_trip(two):
    ma, mb, path = two
    a, b = kiln.load(path, component="mlp"), kiln.load(path, component="fn")
    x, y = torch.randn(5, 6), torch.randn(4)
    assert torch.equal(a(x), ma(x)) and torch.equal(b(x[0, :4], y), mb(x[0, :4], y))
    assert a.manifest["component"] == "mlp" and a.manifest["note"] == {"k": 1} and a.manifest["symbols"] == {"rows": [1, 8]}
    assert a.files == {"vocab.txt": b"a\nb\n"} == b.files


def test_layout_and_versions(two, tmp_path):
    ma, _, path = two
    with zipfile.ZipFile(path) as zf:
        names = set(zf.namelist())
        manifest = json.loads(zf.read("manifest.json"))
    assert manifest["format_version"] == art.FORMAT_VERSION == 2 and set(manifest["components"]) == {"mlp", "fn"}
    for c in ("mlp", "fn"):
        assert {f"components/{c}/{m}" for m in ("graph.json", "report.json", "weights.safetensors")} <= names
        assert {"inputs", "outputs", "symbols", "signature", "config", "device"} <= set(manifest["components"][c])
    assert names - {"manifest.json"} == set(manifest["members"]) and "inputs" not in manifest
    single = ma.save(tmp_path / "one.kiln")  # one graph: the version-1 layout, readable by a kiln of format 1
    with zipfile.ZipFile(single) as zf:
        assert json.loads(zf.read("manifest.json"))["format_version"] == 1


def test_every_check_guards_a_component(two, tmp_path):
    _, _, path = two
    with pytest.raises(kiln.ArtifactError, match=r"holds several graphs \(components mlp, fn\)") as e:
        kiln.load(path)
    assert "component=NAME" in e.value.hint
    with pytest.raises(kiln.ArtifactError, match=r"no component 'vae' \(it holds: mlp, fn\)"):
        kiln.load(path, component="vae")
    tampered = tmp_path / "tampered.kiln"
    _rewrite(path, tampered, lambda n, d: d.replace(b'"RELU"', b'"RELX"') if n == "components/mlp/graph.json" else d)
    with pytest.raises(kiln.ArtifactError, match=r"checksum' failed for member 'components/mlp/graph.json'"):
        kiln.load(tampered, component="mlp")
    assert kiln.load(tampered, component="fn") is not None  # the other component's members are intact
    flipped = tmp_path / "flipped.kiln"
    _rewrite(path, flipped, lambda n, d: d[:-1] + bytes([d[-1] ^ 1]) if n == "components/fn/weights.safetensors" else d)
    with pytest.raises(kiln.ArtifactError, match=r"checksum' failed for member 'components/fn/weights.safetensors'"):
        kiln.load(flipped, component="fn")
    partial = tmp_path / "partial.kiln"
    _rewrite(path, partial, lambda n, d: None if n == "components/fn/report.json" else d)
    with pytest.raises(kiln.ArtifactError, match=r"member 'components/fn/report.json' is missing"):
        kiln.load(partial, component="fn")
    with pytest.raises(kiln.ArtifactError, match="no component 'mlp'"):
        kiln.load(two[0].save(tmp_path / "plain.kiln"), component="mlp")


def test_component_names_are_plain(two, tmp_path):
    ma = two[0]
    for bad in ("", "../x", "a/b", ".hidden"):
        with pytest.raises(kiln.KilnError, match="is not a plain name"):
            art.save_components(tmp_path / "bad.kiln", {bad: ma.as_component()})
    assert not (tmp_path / "bad.kiln").exists()
