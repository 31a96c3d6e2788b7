"""kiln.codegen.cache: round trips, the KILN_CACHE_DIR override, atomic writes, corrupt entries rebuilt,
two processes building one key at once, importing generated modules, warm starts."""
import json
import subprocess
import sys
import time

import pytest
import torch

from kiln.codegen.cache import ENV_VAR, Cache, default_root, fingerprint, key
from kiln.config import CompileConfig
from kiln.errors import KilnError

SOURCE = "import math\n\n\ndef area(r):\n    return math.pi * r * r\n"


def leftovers(root):
    return list(root.rglob("*.tmp"))


def test_key_is_canonical():
    assert key({"a": 1, "b": [1, 2]}) == key({"b": (1, 2), "a": 1})
    assert key(torch.float16, (4, 8)) == key("torch.float16", torch.Size([4, 8]))
    assert key("x") != key("y") and len(key("x")) == 64
    with pytest.raises(TypeError, match="no canonical form"):
        key(object())
    fp = fingerprint("cpu")
    assert fp["device"] == "cpu" and fp["torch_version"] == torch.__version__ and key(fp) == key(fingerprint())


def test_text_and_json_round_trip(tmp_path):
    c = Cache(tmp_path)
    k = key("round trip")
    assert c.get_text("pointwise", k) is None and c.get_json("tuning", k) is None
    path = c.put_text("pointwise", k, SOURCE + "# ünïcode\n")
    assert path == c.path_for("pointwise", k) and path.parent == tmp_path / "pointwise"
    assert c.get_text("pointwise", k) == SOURCE + "# ünïcode\n"
    choice = {"impl": "triton", "BLOCK_M": 64, "ms": 0.125, "shape": [37, 1000]}
    c.put_json("tuning", k, choice)
    assert c.get_json("tuning", k) == choice
    assert json.loads(c.path_for("tuning", k, "json").read_text())["value"] == choice  # plain JSON on disk
    st = c.stats()
    assert st["entries"] == 2 and st["bytes"] > len(SOURCE) and set(st["kinds"]) == {"pointwise", "tuning"}
    assert not leftovers(tmp_path)  # atomic writes leave no temp files
    with pytest.raises(KilnError, match="sha256"):
        c.path_for("pointwise", "../../etc/passwd")
    with pytest.raises(KilnError, match="identifier"):
        c.path_for("../x", k)
    with pytest.raises(KilnError, match="plain JSON"):
        c.put_json("tuning", k, {"t": torch.zeros(1)})


def test_root_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert "kiln" in str(default_root())
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env"))  # read when the cache is opened, not at import
    assert Cache().root == tmp_path / "env" == Cache.from_config(CompileConfig()).root
    assert Cache.from_config(CompileConfig(cache_dir=str(tmp_path / "cfg"))).root == tmp_path / "cfg"
    assert Cache(tmp_path / "explicit").root == tmp_path / "explicit"
    Cache().put_text("pointwise", key(1), "x = 1\n")
    assert (tmp_path / "env" / "pointwise" / f"{key(1)}.py").is_file()


@pytest.mark.parametrize("damage", ["empty", "truncated", "edited", "garbage"])
def test_corrupt_entry_is_rebuilt(tmp_path, damage):
    c = Cache(tmp_path)
    k = key("corrupt", damage)
    for kind, value in [("pointwise", SOURCE), ("tuning", {"impl": "cublas", "ms": [0.5, 0.25]})]:
        path = c.put_text(kind, k, value) if isinstance(value, str) else c.put_json(kind, k, value)
        raw = path.read_bytes()
        path.write_bytes({"empty": b"", "truncated": raw[: len(raw) // 2], "edited": raw.replace(b"5", b"6"),
                          "garbage": b"\xff\xfe{not json"}[damage])
        assert c._get(kind, k) is None  # reads as a miss, never raises
        calls = []
        assert c.get_or_create(kind, k, lambda: calls.append(1) or value) == value
        assert calls == [1] and c._get(kind, k) == value
    assert c.counts["rebuilt"] == 2


def test_warm_start_skips_build(tmp_path):
    calls = []

    def build():
        calls.append(1)
        return {"impl": "triton", "config": (64, 64, 32)}

    k = key("warm")
    first = Cache(tmp_path).get_or_create("tuning", k, build)
    warm = Cache(tmp_path)  # a fresh process would open it like this
    assert warm.get_or_create("tuning", k, build) == first == {"impl": "triton", "config": [64, 64, 32]}
    assert calls == [1] and warm.counts == {"hits": 1, "misses": 0, "rebuilt": 0}


def test_load_module(tmp_path):
    c = Cache(tmp_path)
    k = key(SOURCE)
    assert c.get_or_create("pointwise", k, lambda: SOURCE) == SOURCE
    mod = c.load_module("pointwise", k)
    assert mod.area(2.0) == pytest.approx(12.566370614359172)
    assert c.load_module("pointwise", k) is mod
    assert not list(tmp_path.rglob("__pycache__"))
    with pytest.raises(KilnError, match="no valid cache entry"):
        c.load_module("pointwise", key("absent"))


@pytest.mark.interpreter
def test_load_module_triton_kernel(tmp_path):
    pytest.importorskip("triton")
    src = ("import triton\nimport triton.language as tl\n\n\n@triton.jit\ndef add_one(x_ptr, n, BLOCK: tl.constexpr):\n"
           "    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)\n    mask = offs < n\n"
           "    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=mask) + 1.0, mask=mask)\n")
    c = Cache(tmp_path)
    k = key(src)
    c.put_text("pointwise", k, src)
    mod = c.load_module("pointwise", k)
    x = torch.arange(37, dtype=torch.float32, device="cuda" if torch.cuda.is_available() else "cpu")
    mod.add_one[(2,)](x, 37, BLOCK=32)
    assert torch.equal(x.cpu(), torch.arange(37, dtype=torch.float32) + 1)


def test_unwritable_dir_names_dir_and_env_var(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")  # works even as root, unlike chmod
    c = Cache(blocker / "cache")
    assert c.get_text("pointwise", key(1)) is None
    for call in (lambda: c.put_text("pointwise", key(1), "x"), lambda: c.get_or_create("pointwise", key(1), lambda: "x")):
        with pytest.raises(KilnError) as e:
            call()
        assert str(blocker / "cache") in str(e.value) and ENV_VAR in str(e.value)


def test_clear(tmp_path):
    c = Cache(tmp_path)
    for i in range(3):
        c.get_or_create("pointwise", key(i), lambda: SOURCE)
    (tmp_path / "pointwise" / ".stale.tmp").write_text("")
    (tmp_path / "notes.txt").write_text("mine")  # not the cache's: kept
    assert c.clear() == 3
    assert c.stats()["entries"] == 0 and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


WORKER = """
import os, sys, time
from kiln.codegen.cache import Cache
root, k, counter, go = sys.argv[1:]

def build():
    with open(counter, "a") as f:
        f.write(f"{os.getpid()}\\n")
    time.sleep(0.5)
    return "def f():\\n    return 42\\n"

open(go + f".{os.getpid()}", "w").close()
while not os.path.exists(go):
    time.sleep(0.01)
c = Cache(root)
assert c.get_or_create("pointwise", k, build) == "def f():\\n    return 42\\n"
assert c.load_module("pointwise", k).f() == 42
print(c.counts)
"""


def test_two_processes_build_once(tmp_path):
    """Two processes asking for the same key at the same moment: both succeed, build runs once, one entry."""
    root, counter, go = tmp_path / "cache", tmp_path / "counter", tmp_path / "go"
    k = key("concurrent")
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(root), k, str(counter), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    deadline = time.monotonic() + 120
    # both have imported kiln (seconds): release them together so they race for the key
    while len(list(tmp_path.glob("go.*"))) < 2 and time.monotonic() < deadline and all(p.poll() is None for p in procs):
        time.sleep(0.02)
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err
    assert len(counter.read_text().splitlines()) == 1
    assert sorted(out.strip() for out, _ in outs) == ["{'hits': 0, 'misses': 1, 'rebuilt': 0}",
                                                      "{'hits': 1, 'misses': 0, 'rebuilt': 0}"]
    c = Cache(root)
    assert c.stats()["entries"] == 1 and c.get_text("pointwise", k) == "def f():\n    return 42\n"
    assert not leftovers(root)
