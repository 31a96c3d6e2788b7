"""Quantized generators: kiln.from_hf / Generator.compile with quantize= and calibration= (text or token ids run as
the generator's own prefill steps), artifacts that keep the packed weights and load without quantizing again, the
kernels backend's greedy tokens equal to the reference backend's (TRITON_INTERPRET on CPU), and the CLI's
--quantize / --calib."""
import json

import numpy as np
import pytest
import torch
import transformers

import kiln
from kiln.cli import main
from kiln.codegen.tuning import Tuner
from kiln.errors import KilnError
from kiln.llm.generator import CALIBRATION_WINDOW, Generator, calibration_steps, new_caches

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)
CALIB = [list(range(1, 97)) * 3, [7, 8, 9] * 20]  # 288 tokens (windows of 256 + 32) and 60 tokens


def hf_model():
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


@pytest.fixture(scope="module")
def gptq_generator():
    return kiln.from_hf(hf_model(), max_seq=300, batch_buckets=(1, 2), eos_token_id=[], quantize="w4a16-gptq",
                        calibration=CALIB, config=kiln.CompileConfig(quantize_group=32, backend="reference"))


def notes(g) -> list[str]:
    return g.compiled.report().to_dict()["passes"]["quantize_weights"]["notes"]


def test_calibration_runs_as_prefill_steps():
    spec = dict(vocab_size=97, num_layers=2, kv_heads=2, head_dim=16, sliding_window=None, max_seq=300)
    steps = calibration_steps(CALIB, None, spec, torch.float32, "cpu")
    # 288 tokens -> windows of 256 and 32; 60 tokens -> one window padded to the 64 bucket, left, like a prompt
    assert [s["input_ids"].shape for s in steps] == [(1, 256), (1, 32), (1, 64)]
    assert steps[2]["input_ids"][0, :4].tolist() == [0, 0, 0, 0] and steps[2]["input_ids"][0, 4:].tolist() == CALIB[1]
    assert steps[2]["positions"][0, 4].item() == 0 and not steps[2]["mask"][0, 0, 10, 3]  # padding hidden, as in prefill
    assert set(steps[0]) == {"input_ids", "positions", "slots", "mask", *new_caches(spec, 1, torch.float32, "cpu")}
    one = calibration_steps(torch.arange(1, 40), None, spec, torch.float32, "cpu")  # one 1-d sequence is one item
    assert len(one) == 1 and one[0]["input_ids"].shape == (1, 64)
    assert CALIBRATION_WINDOW == 256
    with pytest.raises(KilnError, match="is text, but there is no tokenizer"):
        calibration_steps("def f():", None, spec, torch.float32, "cpu")
    with pytest.raises(KilnError, match="token id 97 outside"):
        calibration_steps([[1, 97]], None, spec, torch.float32, "cpu")


def test_from_hf_quantizes_with_calibration(gptq_generator):
    g = gptq_generator
    assert g.compiled.config.quantize == "w4a16-gptq" and g.compiled.graph.histogram()["QGEMM"] == 9
    lines = notes(g)
    # every GEMM's Hessian saw all calibration prefill rows (256 + 32 + 64): the LM head (at 8 bits) too, though the
    # step computes it on each sample's last row (calibrate.py: every row of the final norm's input, normalised)
    assert len(lines) == 9 and all("gptq: output error" in n and "352 calibration rows" in n for n in lines)
    assert lines[8].startswith("lm_head.weight [97, 64] -> 8-bit g64 gptq: output error")
    r = g.generate([[5, 6, 7], [1, 2]], max_new_tokens=8)
    assert [len(t) for t in r.tokens] == [8, 8]


def test_artifact_keeps_packed_weights_and_loads_without_quantizing(gptq_generator, tmp_path, monkeypatch):
    g = gptq_generator
    want = g.generate([[5, 6, 7]], max_new_tokens=6).tokens
    path = g.save(tmp_path / "q.kiln")

    def refuse(*a, **k):
        raise AssertionError("quantized again on load")

    import kiln.passes.quantize_weights as qw

    monkeypatch.setattr(qw, "gptq", refuse)
    monkeypatch.setattr(qw, "quantize_rtn", refuse)
    loaded = Generator.load(path, backend="reference")
    assert loaded.generate([[5, 6, 7]], max_new_tokens=6).tokens == want
    packed = {k: t.dtype for k, t in loaded.compiled.graph.weights.items() if k.endswith((".qweight", ".scales"))}
    assert len(packed) == 18 and set(packed.values()) == {torch.uint8, torch.float16, torch.float32}  # (8 bits: float32 scales)
    assert loaded.compiled.config.quantize == "w4a16-gptq"


def test_gptq_without_calibration_is_a_clear_error():
    with pytest.raises(KilnError, match="needs calibration data") as e:
        kiln.from_hf(hf_model(), max_seq=64, batch_buckets=(1,), quantize="w4a16-gptq", config=kiln.CompileConfig(quantize_group=32))
    assert "calibration=texts" in e.value.hint


@pytest.mark.interpreter
def test_kernels_backend_generates_the_reference_tokens(gptq_generator, tmp_path):
    path = gptq_generator.save(tmp_path / "q.kiln")
    ref = Generator.load(path, backend="reference")
    ker = Generator.load(path, backend="kernels")
    ker.compiled.executor.target.tuner = Tuner(force={"gemm": "triton", "attention": "kiln-decode"})
    prompts = [[5, 6, 7, 8], [1, 2]]
    assert ker.generate(prompts, max_new_tokens=3).tokens == ref.generate(prompts, max_new_tokens=3).tokens


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("ext", [".json", ".npy"])
def test_cli_compile_quantize_with_calibration_file(tmp_path, capsys, ext):
    calib = tmp_path / f"calib{ext}"
    ids = np.random.default_rng(0).integers(1, 256, size=(2, 300))
    if ext == ".json":
        calib.write_text(json.dumps(ids.tolist()))
    else:
        np.save(calib, ids.astype(np.uint16))
    out = tmp_path / "g.kiln"
    args = ["compile", "--model", "llama-tiny", "--generate", "--max-seq", "128", "--batch-buckets", "1", "--quantize",
            "w4a16-gptq", "--quantize-group", "32", "--calib", str(calib), "-o", str(out), "-q", "--report"]
    assert main(args) == 0
    text = capsys.readouterr().out
    # the report lists every quantized GEMM: the 8 of the layers and the LM head (at 8 bits) by GPTQ
    assert text.count("gptq: output error") == 9 and text.count("8-bit g64 gptq: output error") == 1
    g = Generator.load(out)
    assert g.compiled.graph.histogram()["QGEMM"] == 9 and len(g.generate([[1, 2, 3]], max_new_tokens=4).tokens[0]) == 4


def test_cli_quantize_plain_model_and_errors(tmp_path, capsys):
    calib = tmp_path / "c.json"
    calib.write_text(json.dumps(list(range(1, 200))))
    out = tmp_path / "m.kiln"
    assert main(["compile", "--model", "llama-tiny", "--quantize", "w8a16-gptq", "--calib", str(calib), "-o", str(out), "-q",
                 "--report-json", str(tmp_path / "r.json")]) == 0
    rep = json.loads((tmp_path / "r.json").read_text())["passes"]["quantize_weights"]
    assert rep["rewritten"] == 9 and rep["rules"] == {"gptq": 9}
    assert kiln.load(out).graph.histogram()["QGEMM"] == 9
    assert main(["compile", "--model", "llama-tiny", "--quantize", "w4a16-gptq", "-o", str(tmp_path / "x.kiln"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "needs calibration data" in err and "--calib FILE" in err
    assert main(["compile", "--model", "dit-tiny", "--quantize", "w8a16", "--calib", str(calib), "-o", str(tmp_path / "d.kiln")]) == 1
    assert "--calib calibrates LLMs" in capsys.readouterr().err


def test_cli_says_when_gptq_had_too_few_rows(tmp_path, capsys):
    # 40 calibration tokens where llama-tiny's GEMMs read 64..256 input features: rounded, and the CLI says so in a line
    calib = tmp_path / "c.json"
    calib.write_text(json.dumps(list(range(1, 41))))
    assert main(["compile", "--model", "llama-tiny", "--quantize", "w8a16-gptq", "--calib", str(calib), "-o", str(tmp_path / "m.kiln"), "-q",
                 "--report-json", str(tmp_path / "r.json")]) == 0
    err = capsys.readouterr().err
    assert "warning: quantize='w8a16-gptq': 8 of 9 weights were rounded to nearest, not GPTQ-fitted" in err and ".py:" not in err
    assert json.loads((tmp_path / "r.json").read_text())["passes"]["quantize_weights"]["rules"] == {"rtn": 9}
