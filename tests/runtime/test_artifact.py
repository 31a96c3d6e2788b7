"""The .kiln artifact: round trip in a fresh process, and every check that guards loading (of one graph, and of
each named component of an artifact of several)."""
import hashlib
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import kiln
from kiln.ir.graph import Graph
from kiln.models.registry import get
from kiln.runtime import artifact as art


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


def _member_start(data, path, name="weights.safetensors"):
    """Where the member's data starts in the file, and its size."""
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo(name)
    # the member's data starts after its 30-byte local header, name and extra field
    name_len = int.from_bytes(data[info.header_offset + 26: info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28: info.header_offset + 30], "little")
    return info.header_offset + 30 + name_len + extra_len, info.file_size


def _weights_artifact(path, weights: dict):
    """An artifact whose graph just returns ``weights``."""
    g = Graph()
    g.set_outputs([g.add_weight(name, t) for name, t in weights.items()])
    return art.save(path, g, signature={}, config={})


def test_flipped_byte_in_weights_is_caught(artifact, tmp_path):
    _, path = artifact
    bad = tmp_path / "bad.kiln"
    data = bytearray(path.read_bytes())
    start, size = _member_start(data, path)
    data[start + size // 2] ^= 0x01
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


_SAVE_WHEN_TOLD = (
    "import sys, time, pathlib, kiln\n"
    "m = kiln.load(sys.argv[1]); print('ready', flush=True)\n"
    "while not pathlib.Path(sys.argv[3]).exists(): time.sleep(0.001)\n"
    "try:\n    m.save(sys.argv[2]); print('wrote')\n"
    "except kiln.KilnError as e:\n    print('refused:', e.message)\n"
)


def test_two_processes_saving_one_path_at_once_one_wins(artifact, tmp_path):
    _, path = artifact
    dst, go = tmp_path / "same.kiln", tmp_path / "go"
    procs = [subprocess.Popen([sys.executable, "-c", _SAVE_WHEN_TOLD, str(path), str(dst), str(go)], stdout=subprocess.PIPE,
                              text=True, cwd=tmp_path) for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    go.touch()
    results = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert results[0].startswith("refused:") and "already exists" in results[0] and results[1] == "wrote", results
    assert kiln.load(dst)(torch.randint(0, 256, (1, 3))).shape == (1, 3, 256)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".kiln-")]


def test_the_name_is_claimed_atomically(tmp_path):
    """The last step of a save: a name that appeared while the file was being written is never replaced."""
    tmp, dst = tmp_path / "tmp", tmp_path / "dst"
    tmp.write_bytes(b"new")
    dst.write_bytes(b"theirs")
    with pytest.raises(kiln.KilnError, match="another process wrote it"):
        art._publish(str(tmp), str(dst), overwrite=False)
    assert dst.read_bytes() == b"theirs"
    art._publish(str(tmp), str(tmp_path / "fresh"), overwrite=False)
    assert (tmp_path / "fresh").read_bytes() == b"new"


def test_flipped_byte_in_weight_data_fails_the_sha256(tmp_path):
    path = _weights_artifact(tmp_path / "w.kiln", {"w": torch.randn(64, 1024)})
    data = bytearray(Path(path).read_bytes())
    start, size = _member_start(data, path)
    header = 8 + int.from_bytes(data[start:start + 8], "little")
    data[start + header + (size - header) // 2] ^= 0x40  # inside the tensor data, past the JSON header
    (tmp_path / "bad.kiln").write_bytes(bytes(data))
    with pytest.raises(kiln.ArtifactError, match=r"check 'checksum' failed for member 'weights.safetensors': sha256 "
                       r"[0-9a-f]{16}\.\.\. does not match the manifest \([0-9a-f]{16}\.\.\.\); the file is corrupt"):
        art.load(tmp_path / "bad.kiln")



@pytest.mark.parametrize("where", [0.1, 0.5, 0.95])
def test_weights_tree_hash_finds_a_flipped_byte_in_any_piece(tmp_path, monkeypatch, where):
    # small pieces: the 256 KB of weights hash as ~64 pieces from threads; a flip in any one fails the load
    monkeypatch.setattr(art, "_TREE_CHUNK", 4096)
    path = _weights_artifact(tmp_path / "w.kiln", {"w": torch.randn(64, 1024)})
    with zipfile.ZipFile(path) as zf:
        meta = json.loads(zf.read("manifest.json"))["members"]["weights.safetensors"]
        weights = zf.read("weights.safetensors")
    assert meta["sha256"] == hashlib.sha256(weights).hexdigest()  # the plain checksum stays, for any tool
    pieces = [weights[i:i + 4096] for i in range(0, len(weights), 4096)]
    assert meta["sha256_tree"] == {"chunk_bytes": 4096, "sha256": hashlib.sha256(
        b"".join(hashlib.sha256(p).digest() for p in pieces)).hexdigest()}
    art.load(path)
    data = bytearray(Path(path).read_bytes())
    start, size = _member_start(data, path)
    data[start + int(size * where)] ^= 0x01
    (tmp_path / "bad.kiln").write_bytes(bytes(data))
    with pytest.raises(kiln.ArtifactError, match=r"check 'checksum' failed for member 'weights.safetensors': sha256 "):
        art.load(tmp_path / "bad.kiln")


def test_weights_without_a_tree_hash_are_checked_whole(tmp_path):
    # an artifact written before the tree hash: its manifest has the sha256 alone, which load then checks
    src = _weights_artifact(tmp_path / "w.kiln", {"w": torch.randn(8, 16)})
    _with_weights_member(src, tmp_path / "old.kiln", lambda w: w)
    art.load(tmp_path / "old.kiln")
    _with_weights_member(src, tmp_path / "bad.kiln", lambda w: w[:-1] + bytes([w[-1] ^ 1]))
    with zipfile.ZipFile(tmp_path / "bad.kiln") as zf:
        manifest = json.loads(zf.read("manifest.json"))
    manifest["members"]["weights.safetensors"]["sha256"] = "0" * 64
    _rewrite(tmp_path / "bad.kiln", tmp_path / "bad2.kiln", lambda n, d: json.dumps(manifest).encode() if n == "manifest.json" else d)
    with pytest.raises(kiln.ArtifactError, match=r"sha256 [0-9a-f]{16}\.\.\. does not match the manifest \(0000000000000000"):
        art.load(tmp_path / "bad2.kiln")


def test_damaged_weights_header_reports_the_checksum(tmp_path):
    # the header check runs while the sha256 is still hashing; the checksum, the root cause, wins
    path = _weights_artifact(tmp_path / "w.kiln", {"w": torch.randn(4, 8)})
    data = bytearray(Path(path).read_bytes())
    start, _ = _member_start(data, path)
    data[start + 3] = 0x7f  # the header length is now far past the end of the member
    (tmp_path / "bad.kiln").write_bytes(bytes(data))
    with pytest.raises(kiln.ArtifactError, match=r"check 'checksum' failed for member 'weights.safetensors': sha256"):
        art.load(tmp_path / "bad.kiln")


def _with_weights_member(src, dst, change):
    """Rewrite the weights member with ``change(bytes)``, and the manifest to match it, so only the
    safetensors checks can object."""
    with zipfile.ZipFile(src) as zf:
        weights = change(zf.read("weights.safetensors"))
        manifest = json.loads(zf.read("manifest.json"))
    manifest["members"]["weights.safetensors"] = {"sha256": hashlib.sha256(weights).hexdigest(), "size": len(weights)}
    _rewrite(src, dst, lambda n, d: weights if n == "weights.safetensors" else
             json.dumps(manifest).encode() if n == "manifest.json" else d)


def _header_edit(edit):
    def change(member):
        n = int.from_bytes(member[:8], "little")
        header = json.loads(member[8:8 + n])
        edit(header)
        text = json.dumps(header).encode()
        return len(text).to_bytes(8, "little") + text + member[8 + n:]
    return change


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["w"].update(data_offsets=[0, 1 << 40]), r"data_offsets \[0, 1099511627776\] do not lie within"),
    (lambda h: h["w"].update(dtype="F8_E5M2"), r"unknown dtype 'F8_E5M2'"),
    (lambda h: h["w"].update(shape=[3, 5]), r"128 bytes of data for 15 x torch.float32 \(60 bytes\)"),
    (lambda h: h["b"].update(data_offsets=[32, 64]), r"data_offsets start at 32, expected 0 \(tensors overlap or leave a gap\)"),
])
def test_bad_safetensors_header_is_caught(tmp_path, edit, message):
    path = _weights_artifact(tmp_path / "w.kiln", {"w": torch.randn(4, 8), "b": torch.randn(8)})
    _with_weights_member(path, tmp_path / "bad.kiln", _header_edit(edit))
    with pytest.raises(kiln.ArtifactError, match=r"check 'weights' failed for member 'weights.safetensors': tensor '\w': " + message):
        art.load(tmp_path / "bad.kiln")


def test_truncated_weights_member_is_caught(tmp_path):
    path = _weights_artifact(tmp_path / "w.kiln", {"w": torch.randn(4, 8)})
    _with_weights_member(path, tmp_path / "bad.kiln", lambda m: m[:-4])
    with pytest.raises(kiln.ArtifactError, match=r"'weights' failed .*: tensor 'w': data_offsets \[0, 128\] do not lie within the 124 bytes"):
        art.load(tmp_path / "bad.kiln")


def test_weights_round_trip_exactly(tmp_path):
    weights = {
        "bf16": torch.randn(33, 7).to(torch.bfloat16),
        "i64": torch.tensor([[-(1 << 62), 3], [7, (1 << 62) + 1]]),
        "mask": torch.rand(5, 3) > 0.5,
        "empty": torch.zeros(0, 4, dtype=torch.float16),
        "scalar": torch.tensor(2.5, dtype=torch.float64),
        "u8": torch.arange(251, dtype=torch.uint8),
    }
    path = _weights_artifact(tmp_path / "w.kiln", weights)
    graph, *_ = art.load(path)
    assert set(graph.weights) == set(weights)
    for name, t in weights.items():
        got = graph.weights[name]
        assert got.dtype == t.dtype and got.shape == t.shape and torch.equal(got, t), name


def test_weights_are_in_place_views_that_never_write_the_file(tmp_path):
    path = _weights_artifact(tmp_path / "w.kiln", {"w": torch.ones(256, 256, dtype=torch.bfloat16),
                                                    "b": torch.arange(5)})
    before = Path(path).read_bytes()
    start, _ = _member_start(before, path)
    assert start % 64 == 0  # save aligns the weights, so load can view them without a copy
    graph, *_ = art.load(path)
    w = graph.weights["w"]
    w.mul_(3)  # writable: the map is copy-on-write
    assert torch.equal(w, torch.full((256, 256), 3.0, dtype=torch.bfloat16))
    assert Path(path).read_bytes() == before
    del graph
    assert w.sum().item() == 3 * 256 * 256  # the tensor keeps the mapping alive on its own
    assert torch.equal(art.load(path)[0].weights["w"], torch.ones(256, 256, dtype=torch.bfloat16))


def test_unaligned_weights_still_load(tmp_path):
    # an artifact whose weights start at an odd offset (as kiln wrote them before aligning them)
    path = _weights_artifact(tmp_path / "w.kiln", {"w": torch.randn(3, 5), "i": torch.arange(7)})
    _rewrite(path, tmp_path / "odd.kiln", lambda n, d: d)  # plain writestr: no alignment padding
    data = (tmp_path / "odd.kiln").read_bytes()
    assert _member_start(data, tmp_path / "odd.kiln")[0] % 8 != 0
    graph, *_ = art.load(tmp_path / "odd.kiln")
    original, *_ = art.load(path)
    for name in ("w", "i"):
        assert torch.equal(graph.weights[name], original.weights[name])
        assert graph.weights[name].data_ptr() % graph.weights[name].element_size() == 0


def test_compressed_weights_member_is_read_through_zipfile(tmp_path):
    path = _weights_artifact(tmp_path / "w.kiln", {"w": torch.randn(3, 5)})
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(tmp_path / "z.kiln", "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    assert torch.equal(art.load(tmp_path / "z.kiln")[0].weights["w"], art.load(path)[0].weights["w"])


# ----------------------------------------------------------------------------- artifacts of several graphs (components)


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


@pytest.mark.parametrize("refined, ok", [({"k": {"choice": "a", "alone": "b"}}, True), ([1], False),
                                         ({"k": {"alone": "b"}}, False), ({"k": "a"}, False)])
def test_tuning_refinements_are_checked(artifact, tmp_path, refined, ok):
    # runtime/refine.py's decisions travel in tuning.json; one without a choice name is refused when read, by which check
    from kiln.runtime import artifact as art
    m, _ = artifact
    path = art.save(tmp_path / "t.kiln", m.graph, signature={}, config={},
                    tuning={"format": 1, "decisions": {}, "refined": refined})
    if ok:
        assert art.load(path)[3]["refined"] == refined
    else:
        with pytest.raises(kiln.ArtifactError, match=r"check 'tuning' failed for member 'tuning.json': 'refined' is not"):
            art.load(path)
