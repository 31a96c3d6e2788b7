"""bench/decode_refine.py --smoke: the decode plan built again with each decision's alternative, every plan timed, the
alternatives combined and the two generators' tok/s and tokens compared, written as JSON (under the interpreter)."""
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench"


def test_decode_refine_smoke_times_each_alternative_in_the_step(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="1", KILN_CACHE_DIR=str(tmp_path / "cache"))
    subprocess.run([sys.executable, str(BENCH / "decode_refine.py"), "--smoke"], check=True, env=env, capture_output=True)
    res = json.loads((tmp_path / "decode_refine_smoke_bf16.json").read_text())["smoke"]
    decisions = res["decisions"]
    assert len(decisions) == 3 and all(d["uses"] == 2 for d in decisions)  # (two layers: each decision consulted twice)
    for d in decisions:
        assert d["choice"] in d["alone_us"] and len(d["step_delta_us"]) == 1 and not d.get("failed")
        assert set(d["step_delta_us"]) <= set(d["alone_us"]) - {d["choice"]}
    assert res["step_ms"] > 0 and set(res["combined_step_ms"]) == {"tuner", "combined"}
    assert len(res["combined"]) == 3 and len(res["tok_s"]) == 2 and res["same_tokens"] in (True, False)
