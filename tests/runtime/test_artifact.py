"""The .kiln artifact: round trip in a fresh process, and every check that guards loading."""
import json
import os
import subprocess
import sys
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

import kiln
from kiln.models.registry import get


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    spec = get("llama-tiny")
    m = kiln.compile(spec.build(), (), spec.example_inputs(batch=2, seq=8), dynamic=spec.dynamic())
    path = tmp_path_factory.mktemp("art") / "llama.kiln"
    m.save(path)
    return m, path


def _rewrite(src, dst, change):
    """Copy a zip, letting ``change(name, data)`` return new bytes (or None to drop the member)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info.filename, data)


def test_round_trip_in_a_fresh_process(artifact, tmp_path):
    m, path = artifact
    ids = torch.randint(0, 256, (3, 11))
    save_file({"input_ids": ids}, tmp_path / "in.safetensors")
    script = (
        "import sys, kiln; from safetensors.torch import load_file, save_file\n"
        "m = kiln.load(sys.argv[1]); ids = load_file(sys.argv[2])['input_ids']\n"
        "save_file({'logits': m(ids)}, sys.argv[3])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path), str(tmp_path / "in.safetensors"),
                    str(tmp_path / "out.safetensors")], check=True, cwd=tmp_path)
    assert torch.equal(load_file(tmp_path / "out.safetensors")["logits"], m(ids))


def test_artifact_holds_data_only(artifact):
    _, path = artifact
    with zipfile.ZipFile(path) as zf:
        names = sorted(zf.namelist())
        manifest = json.loads(zf.read("manifest.json"))
    assert names == ["graph.json", "manifest.json", "report.json", "weights.safetensors"]
    assert set(manifest["members"]) == {"graph.json", "report.json", "weights.safetensors"}
    assert manifest["symbols"] == {"batch": [1, 16], "seq": [1, 256]}
    assert manifest["inputs"] == [{"name": "input_ids", "shape": ["batch", "seq"], "dtype": "int64"}]
    for key in ("format_version", "kiln_version", "torch_version", "triton_version", "config", "signature"):
        assert key in manifest


def test_flipped_byte_in_weights_is_caught(artifact, tmp_path):
    _, path = artifact
    bad = tmp_path / "bad.kiln"
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("weights.safetensors")
    # the member's data starts after its 30-byte local header, name and extra field
    name_len = int.from_bytes(data[info.header_offset + 26: info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28: info.header_offset + 30], "little")
    start = info.header_offset + 30 + name_len + extra_len
    data[start + info.file_size // 2] ^= 0x01
    bad.write_bytes(bytes(data))
    with pytest.raises(kiln.ArtifactError, match=r"check 'checksum' failed for member 'weights.safetensors'"):
        kiln.load(bad)


def test_tampered_member_with_intact_zip_is_caught(artifact, tmp_path):
    # a member rewritten consistently at the zip level (valid CRC) still fails its sha256
    _, path = artifact
    bad = tmp_path / "bad.kiln"
    _rewrite(path, bad, lambda n, d: d.replace(b'"EMBEDDING"', b'"EMBEDDINX"') if n == "graph.json" else d)
    with pytest.raises(kiln.ArtifactError, match=r"checksum' failed for member 'graph.json'.*sha256"):
        kiln.load(bad)


def test_newer_format_version_is_refused(artifact, tmp_path):
    _, path = artifact
    newer = tmp_path / "newer.kiln"

    def bump(name, data):
        if name != "manifest.json":
            return data
        man = json.loads(data)
        man["format_version"] = 99
        return json.dumps(man).encode()

    _rewrite(path, newer, bump)
    with pytest.raises(kiln.ArtifactError, match=r"check 'format version' failed: the artifact has format version 99") as e:
        kiln.load(newer)
    assert "upgrade kiln" in e.value.hint


def test_missing_member_and_not_a_zip(artifact, tmp_path):
    _, path = artifact
    partial = tmp_path / "partial.kiln"
    _rewrite(path, partial, lambda n, d: None if n == "graph.json" else d)
    with pytest.raises(kiln.ArtifactError, match=r"member 'graph.json' is missing"):
        kiln.load(partial)
    junk = tmp_path / "junk.kiln"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(kiln.ArtifactError, match="not a kiln artifact"):
        kiln.load(junk)
    with pytest.raises(kiln.ArtifactError, match="no such file"):
        kiln.load(tmp_path / "absent.kiln")


def test_save_never_overwrites_unasked(artifact, tmp_path):
    m, _ = artifact
    target = tmp_path / "model.kiln"
    target.write_bytes(b"something the user had")
    with pytest.raises(kiln.KilnError, match="already exists"):
        m.save(target)
    assert target.read_bytes() == b"something the user had"
    m.save(target, overwrite=True)
    assert kiln.load(target)(torch.randint(0, 256, (1, 3))).shape == (1, 3, 256)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".kiln-")]  # no temp files left behind
