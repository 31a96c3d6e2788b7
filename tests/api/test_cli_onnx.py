"""ONNX in the API and the kiln command: compile an .onnx file, its dims checked at run time;
--emit-onnx and inspect --onnx; bad files as one-line errors."""
import os
import subprocess
import sys
import warnings

import onnx
import onnxruntime as ort
import pytest
import torch

import kiln
from kiln.cli import main
from kiln.errors import InputError
from kiln.passes.pipeline import PASS_NAMES
from kiln.testing import TOL, rel_err


class Block(torch.nn.Module):
    """A small pre-norm MLP block with two outputs."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(16)
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 16)

    def forward(self, x, bias):
        h = x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))
        return h + bias, h.mean(-1)


@pytest.fixture(scope="module")
def block_onnx(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("onnx") / "block.onnx"
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(Block().eval(), (torch.randn(2, 5, 16), torch.randn(16)), path, dynamo=False,
                          input_names=["x", "bias"], output_names=["h", "m"],
                          dynamic_axes={"x": {0: "batch", 1: "seq"}}, opset_version=17)
    return path


def ort_outputs(path, feeds):
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in sess.run(None, {k: v.numpy() for k, v in feeds.items()})]


def test_compile_onnx_file(block_onnx):
    m = kiln.compile(block_onnx)
    assert m.graph.symbols == {"batch": (1, 2**31 - 1), "seq": (1, 2**31 - 1)}
    assert m.report().model["source"] == "ONNX"
    for shape in ((1, 3, 16), (4, 9, 16)):
        x, b = torch.randn(shape), torch.randn(16)
        out = m(x, bias=b)
        assert set(out) == {"h", "m"}  # several outputs: a dict by ONNX name
        want = ort_outputs(block_onnx, {"x": x, "bias": b})
        assert rel_err(out["h"], want[0]) <= TOL[torch.float32] and rel_err(out["m"], want[1]) <= TOL[torch.float32]


def test_cli_compile_onnx_honours_dims(block_onnx, tmp_path, capsys):
    out = tmp_path / "block.kiln"
    emitted = tmp_path / "optimized.onnx"
    assert main(["compile", str(block_onnx), "-o", str(out), "--dim", "seq=1:16", "--emit-onnx", str(emitted), "-q"]) == 0
    m = kiln.load(out)
    assert m.graph.symbols == {"batch": (1, 2**31 - 1), "seq": (1, 16)}
    x, b = torch.randn(2, 16, 16), torch.randn(16)
    assert rel_err(m(x, b)["h"], ort_outputs(block_onnx, {"x": x, "bias": b})[0]) <= TOL[torch.float32]
    with pytest.raises(InputError, match=r"input 'x': dim 1 \(seq\) is 17, outside the allowed range \[1, 16\]"):
        m(torch.randn(2, 17, 16), b)

    model = onnx.load(emitted)  # the optimized graph: opens in Netron; its dims are the file's dims
    onnx.checker.check_model(model)
    assert [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim[:2]] == ["batch", "seq"]
    assert [o.name for o in model.graph.output] == ["h", "m"]

    assert main(["compile", str(block_onnx), "-o", str(tmp_path / "b2.kiln"), "--dim", "tokens=1:16", "-q"]) == 1
    assert "no dynamic dim named 'tokens'; its dims are batch, seq" in capsys.readouterr().err


def test_inspect_writes_onnx(block_onnx, tmp_path, capsys):
    art = tmp_path / "b.kiln"
    kiln.compile(block_onnx, config=kiln.CompileConfig(disable=PASS_NAMES)).save(art)
    path = tmp_path / "b.onnx"
    assert main(["inspect", str(art), "--onnx", str(path)]) == 0
    assert f"wrote {path}" in capsys.readouterr().out
    x, b = torch.randn(3, 4, 16), torch.randn(16)
    got, want = ort_outputs(path, {"x": x, "bias": b}), kiln.load(art)(x, b)  # unfused: runs in onnxruntime
    assert rel_err(got[0], want["h"]) <= TOL[torch.float32]
    assert main(["inspect", str(art), "--onnx", str(path)]) == 1
    assert "already exists" in capsys.readouterr().err


def test_bad_onnx_files_are_one_line_errors(block_onnx, tmp_path):
    broken = tmp_path / "broken.onnx"
    broken.write_bytes(block_onnx.read_bytes()[: block_onnx.stat().st_size // 3])
    kiln_bin = os.path.join(os.path.dirname(sys.executable), "kiln")
    r = subprocess.run([kiln_bin, "compile", str(broken), "-o", str(tmp_path / "x.kiln"), "-q"], capture_output=True, text=True)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"error: {broken}: not a readable ONNX file: truncated or corrupt" in r.stderr.replace("\n", "")
    with pytest.raises(kiln.KilnError, match="broken.onnx: not a readable ONNX file"):
        kiln.compile(broken)
