"""bench/ws_gemm.py --smoke: every operand kind (16-bit, fp8, fp8 with block-scaled x) under the interpreter, the WS
configs beside the pipelined ones, each output checked against its kind's first before it is "timed"."""
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench"


def test_ws_gemm_smoke_runs_every_kind_with_and_without_ws(tmp_path):
    out = tmp_path / "ws.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    subprocess.run([sys.executable, str(BENCH / "ws_gemm.py"), "--smoke", "--out", str(out)], check=True, env=env,
                   capture_output=True, timeout=600)
    shapes = {r["name"]: r for r in json.loads(out.read_text())["shapes"]}
    assert set(shapes) == {"smoke", "smoke glu"}
    for name, kinds in (("smoke", ("16-bit", "fp8", "fp8 xs_group128")), ("smoke glu", ("16-bit", "fp8"))):
        errors = shapes[name]["errors"]
        for kind in kinds:
            both = [e for key, e in errors.items() if key.startswith(kind + " tma ")]
            assert len(both) == 3 and all(isinstance(e, float) and e <= 2e-2 for e in both), (name, kind, errors)
