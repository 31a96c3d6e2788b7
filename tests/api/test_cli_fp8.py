"""The compute-bound quantize modes through the interfaces: CompileConfig(quantize="fp8" | "w8a8"), kiln compile
--quantize fp8 / w8a8 (--calib for an LLM; a DiT's default calibration, said in the report), --quantize-smoothing,
artifacts that keep the int8 / fp8 codes and load without quantizing again, and kiln.from_hf(..., quantize="fp8")."""
import json

import pytest
import torch
import transformers

import kiln
from kiln.cli import main
from kiln.errors import KilnError
from kiln.ir.interpret import interpret
from kiln.testing import rel_err

TINY = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5)


def test_compile_fp8_saves_the_codes_and_loads(tmp_path):
    path = tmp_path / "l.kiln"
    assert main(["compile", "--model", "llama-tiny", "--quantize", "fp8", "-o", str(path), "-q", "--report-json", str(tmp_path / "r.json")]) == 0
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["passes"]["quantize_acts"]["rewritten"] == 9 and report["passes"]["smooth"]["rewritten"] == 0
    m = kiln.load(path)
    codes = [n for n in m.graph.nodes if n.op == "AQGEMM"]
    assert len(codes) == 9 and all(m.graph.weights[n.inputs[1].attrs["name"]].dtype == torch.float8_e4m3fn for n in codes)
    ids = torch.randint(0, 256, (2, 5))
    assert rel_err(m(input_ids=ids), interpret(m.graph, [ids])[0]) <= 1e-6


def test_w8a8_needs_calib_for_an_llm(tmp_path, capsys):
    assert main(["compile", "--model", "llama-tiny", "--quantize", "w8a8", "-o", str(tmp_path / "x.kiln"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "searches its smoothing on calibration data: give --calib FILE" in err and "--quantize-smoothing off" in err
    assert not (tmp_path / "x.kiln").exists()
    assert main(["compile", "--model", "llama-tiny", "--quantize", "w8a8", "--quantize-smoothing", "1.5", "-o", str(tmp_path / "x.kiln"),
                 "-q"]) == 1
    assert "expected search, off or a strength in [0, 1]" in capsys.readouterr().err


def test_w8a8_with_calib_smooths(tmp_path):
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps([list(range(1, 200)), list(range(50, 120))]))
    assert main(["compile", "--model", "llama-tiny", "--quantize", "w8a8", "--calib", str(calib), "-o", str(tmp_path / "w.kiln"), "-q",
                 "--report-json", str(tmp_path / "r.json")]) == 0
    passes = json.loads((tmp_path / "r.json").read_text())["passes"]
    assert passes["quantize_acts"]["rewritten"] == 9 and len(passes["smooth"]["notes"]) == 9  # the LM head too
    assert all("calibration rows" in n for n in passes["quantize_acts"]["notes"])


def test_quantize_lm_head_off_keeps_it_float_and_needs_quantize(tmp_path, capsys):
    assert main(["compile", "--model", "llama-tiny", "--quantize", "fp8", "--quantize-lm-head", "off", "-o", str(tmp_path / "l.kiln"), "-q",
                 "--report-json", str(tmp_path / "r.json")]) == 0
    q = json.loads((tmp_path / "r.json").read_text())["passes"]["quantize_acts"]
    assert q["rewritten"] == 8 and any("output head (LM head)" in d["reason"] for d in q["declined"])
    assert main(["compile", "--model", "llama-tiny", "--quantize-lm-head", "on", "-o", str(tmp_path / "x.kiln"), "-q"]) == 1
    assert "--quantize-lm-head on applies to --quantize" in capsys.readouterr().err and not (tmp_path / "x.kiln").exists()


def test_a_dit_calibrates_w8a8_on_random_inputs_and_says_so(tmp_path):
    assert main(["compile", "--model", "dit-tiny", "--quantize", "w8a8", "--quantize-smoothing", "0.5", "-o", str(tmp_path / "d.kiln"),
                 "-q", "--report-json", str(tmp_path / "r.json")]) == 0
    r = json.loads((tmp_path / "r.json").read_text())
    assert any("calibrated on 4 x 2 random latents / timesteps / class labels" in n for n in r["notes"])
    assert r["passes"]["quantize_acts"]["rewritten"] > 0 and r["passes"]["smooth"]["rewritten"] > 0


def test_config_checks_the_modes():
    assert kiln.CompileConfig(quantize="fp8").quantize_spec().format == "fp8"
    assert kiln.CompileConfig(quantize="w8a8", quantize_smoothing=0.4).quantize_spec().smoothing == 0.4
    with pytest.raises(KilnError, match="one of w8a16, w8a16-gptq, w4a16, w4a16-gptq, fp8, w8a8"):
        kiln.CompileConfig(quantize="int8")
    with pytest.raises(KilnError, match="quantize smoothing 'maybe'"):
        kiln.CompileConfig(quantize="w8a8", quantize_smoothing="maybe")


def test_from_hf_quantizes_fp8_and_generates():
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY)).eval()
    g = kiln.from_hf(hf, max_seq=64, batch_buckets=(1,), eos_token_id=[], quantize="fp8",
                     config=kiln.CompileConfig(backend="reference"))
    assert g.compiled.graph.histogram()["AQGEMM"] == 9
    out = g.generate([[1, 2, 3, 4]], max_new_tokens=6)
    assert len(out.tokens[0]) == 6


def test_a_calib_npy_of_floats_is_refused(tmp_path, capsys):
    import numpy as np

    np.save(tmp_path / "calib.npy", np.array([[1.5, 2.0, 3.0]]))  # (astype int64 would make 1.5 token 1)
    assert main(["compile", "--model", "llama-tiny", "--quantize", "w8a8", "--calib", str(tmp_path / "calib.npy"),
                 "-o", str(tmp_path / "w.kiln"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "cannot read calibration data" in err and "2-d array of float64; token ids are a 1-d or 2-d integer array" in err
