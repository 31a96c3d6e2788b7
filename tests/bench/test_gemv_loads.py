"""bench/gemv_loads.py --smoke: the weight-stream kernel in both layouts under the interpreter, each checked against the
rows' XOR and timed cold, written as JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench"


def test_gemv_loads_smoke_checks_and_times_both_layouts(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="1")
    subprocess.run([sys.executable, str(BENCH / "gemv_loads.py"), "--smoke"], check=True, env=env, capture_output=True)
    res = json.loads((tmp_path / "gemv_loads.json").read_text())["smoke"]
    assert res["wrong"] == [] and res["failed"] == {}
    names = set(res["us"])
    assert {"torch row sum", "rows 16 x 64 B, 4 warps, 2 stages", "tiled 16 x 64 B, 4 warps, 2 stages",
            "rows 32 x 128 B, 4 warps, 2 stages", "tiled 32 x 128 B, 4 warps, 2 stages"} == names
    assert all(t > 0 for t in res["us"].values())
