"""The kiln command: compile / run / bench / inspect, and how it reports errors."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import kiln
from kiln.cli import main
from kiln.models.registry import get


@pytest.fixture(scope="module")
def llama_kiln(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli")
    path = d / "lt.kiln"
    assert main(["compile", "--model", "llama-tiny", "-o", str(path), "-q", "--report-json", str(d / "r.json")]) == 0
    return path, d


def test_compile_writes_artifact_and_report_json(llama_kiln):
    path, d = llama_kiln
    report = json.loads((d / "r.json").read_text())
    assert {"passes", "ops_before", "ops_after"} <= set(report)
    assert report["passes"]["dce"]["enabled"] is True
    m = kiln.load(path)
    assert m.graph.symbols == {"batch": (1, 16), "seq": (1, 256)}
    spec = get("llama-tiny")
    x = spec.example_inputs(batch=2, seq=7)
    assert torch.allclose(m(**x), spec.build()(**x), rtol=1e-5, atol=1e-6)  # same seed, same random weights


def test_run_with_random_and_given_inputs(llama_kiln, capsys, tmp_path):
    path, _ = llama_kiln
    assert main(["run", str(path), "--dim", "seq=12", "--dim", "batch=3", "-q", "--repeat", "1"]) == 0
    text = capsys.readouterr().out
    assert "input_ids[3, 12]" in text and "[3, 12, 256]" in text and "median" in text
    ids = torch.randint(0, 256, (2, 5))
    save_file({"input_ids": ids}, tmp_path / "in.safetensors")
    assert main(["run", str(path), "--inputs", str(tmp_path / "in.safetensors"), "--save-outputs",
                 str(tmp_path / "out.safetensors"), "-q", "--repeat", "0"]) == 0
    assert torch.equal(load_file(tmp_path / "out.safetensors")["output"], kiln.load(path)(ids))


@pytest.mark.interpreter
def test_bench_kernels_against_reference_writes_json(llama_kiln, capsys, tmp_path):
    path, _ = llama_kiln
    out = tmp_path / "b.json"
    argv = ["bench", str(path), "--backend", "kernels", "--dim", "batch=2", "--dim", "seq=5", "-q", "--json", str(out)]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "kiln vs reference" in text and "input_ids[2, 5]" in text
    res = json.loads(out.read_text())
    assert [r["system"] for r in res["runs"]] == ["kiln", "reference"]
    assert res["rel_err_vs_reference"] <= 1e-5 and res["speedup_vs_reference"] > 0
    assert res["executor"]["backend"] == "kernels" and res["executor"]["plans"][0]["launches"]["gemm"] >= 4
    assert main(argv) == 1  # the JSON exists: not replaced without --force
    assert "already exists" in capsys.readouterr().err


def test_inspect(llama_kiln, capsys):
    path, _ = llama_kiln
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "input_ids" in text and "[batch, seq]" in text and "seq in [1, 256]" in text
    assert "LINEAR" in text and "ATTENTION" in text
    assert main(["inspect", str(path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format_version"] == 1


def test_errors_are_one_message_and_a_hint(llama_kiln, capsys, tmp_path):
    path, _ = llama_kiln
    assert main(["compile", "--model", "llama-tiny", "-o", str(path), "-q"]) == 1
    err = capsys.readouterr().err
    assert "already exists" in err and "--force" in err and "Traceback" not in err
    assert main(["compile", "--model", "lama-tiny", "-q"]) == 1
    assert "llama-tiny" in capsys.readouterr().err  # the known names, closest first
    assert main(["run", str(path), "--dim", "seq=999", "-q"]) == 1
    assert "seq = 999 is outside its range [1, 256]" in capsys.readouterr().err
    assert main(["run", str(path), "--dim", "nope=3", "-q"]) == 1
    assert "unknown dim 'nope'" in capsys.readouterr().err
    broken = tmp_path / "broken.kiln"
    broken.write_bytes(path.read_bytes()[:-100])
    assert main(["inspect", str(broken)]) == 1
    assert "error:" in capsys.readouterr().err
    save_file({"x": torch.zeros(1)}, tmp_path / "wrong.safetensors")
    assert main(["run", str(path), "--inputs", str(tmp_path / "wrong.safetensors"), "-q"]) == 1
    assert "lacks input(s) input_ids" in capsys.readouterr().err


def test_compile_pt2_and_console_script(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(6, 3), torch.nn.GELU())
    ep = torch.export.export(model, (torch.randn(2, 6),))
    torch.export.save(ep, tmp_path / "tiny.pt2")
    kiln_bin = os.path.join(os.path.dirname(sys.executable), "kiln")
    r = subprocess.run([kiln_bin, "compile", str(tmp_path / "tiny.pt2"), "-o", str(tmp_path / "tiny.kiln")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    x = torch.randn(2, 6)
    assert torch.allclose(kiln.load(tmp_path / "tiny.kiln")(x), model(x), atol=1e-6)
    r = subprocess.run([kiln_bin, "run", str(tmp_path / "missing.kiln")], capture_output=True, text=True)
    assert r.returncode == 1 and "no such file" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([kiln_bin, "run", str(tmp_path / "missing.kiln")], capture_output=True, text=True,
                       env={**os.environ, "KILN_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_disable_pass_switches_that_pass_off(llama_kiln, tmp_path, capsys):
    _, d = llama_kiln
    on = json.loads((d / "r.json").read_text())
    assert main(["compile", "--model", "llama-tiny", "-o", str(tmp_path / "off.kiln"), "-q", "--disable-pass", "fuse_norm",
                 "--disable-pass", "fuse_epilogue", "--report-json", str(tmp_path / "off.json")]) == 0
    off = json.loads((tmp_path / "off.json").read_text())
    for name in ("fuse_norm", "fuse_epilogue"):
        assert on["passes"][name]["enabled"] and on["passes"][name]["rewritten"] > 0
        assert off["passes"][name] == {"enabled": False, "rewritten": 0, "declined": [], "seconds": 0.0}
    assert on["ops_after"].get("RMSNORM") and not off["ops_after"].get("RMSNORM") and off["ops_after"].get("RSQRT")
    assert on["ops_after"].get("GEMM") and not off["ops_after"].get("GEMM")
    capsys.readouterr()
    assert main(["compile", "--model", "llama-tiny", "-o", str(tmp_path / "r.kiln"), "--report", "--disable-pass", "cse"]) == 0
    out = capsys.readouterr().out
    assert "fuse_horizontal_gemm" in out and "off" in out and "RMSNORM" in out
    assert main(["compile", "--model", "llama-tiny", "-o", str(tmp_path / "x.kiln"), "--disable-pass", "no_such"]) == 1
    assert "unknown pass name(s) to disable: no_such" in capsys.readouterr().err
