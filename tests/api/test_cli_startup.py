"""`kiln bench` reports where start-up time goes: process start to kiln imported, load, and the first call's
phases (layouts, memory, buffers, calls, tuning; warmup and CUDA-graph capture on the GPU)."""
import json

import pytest

import kiln
from kiln.cli import main
from kiln.models.registry import get


@pytest.mark.interpreter
def test_bench_breaks_start_up_into_phases(tmp_path, capsys):
    spec = get("llama-tiny")
    m = kiln.compile(spec.build(), (), spec.example_inputs(batch=1, seq=4), dynamic=spec.dynamic())
    path = m.save(tmp_path / "t.kiln")
    out = tmp_path / "b.json"
    assert main(["bench", str(path), "--backend", "kernels", "--no-reference", "--dim", "seq=3", "-q", "--json", str(out)]) == 0
    assert "start-up:" in capsys.readouterr().out
    st = json.loads(out.read_text())["startup"]
    assert st["load_s"] > 0 and st["first_call_s"] > 0 and st["process_to_kiln_imported_s"] > 0
    assert {"layouts", "memory", "buffers", "calls", "tuning"} <= set(st["first_call_phases"])
    assert sum(st["first_call_phases"].values()) <= st["first_call_s"]
