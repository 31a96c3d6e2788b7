"""bench/decode_attn.py --smoke: every form of the decode attention (and the empty kernel) timed cold and warm under the
interpreter, written as JSON; and bench/decode_summary.py's one line per case of a decode.py JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench"


def test_decode_attn_smoke_times_every_form(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="1")
    subprocess.run([sys.executable, str(BENCH / "decode_attn.py"), "--smoke"], check=True, env=env, capture_output=True)
    res = json.loads((tmp_path / "decode_attn.json").read_text())
    row = res["smoke"]["keys 45"]
    want = {"empty", "last", "last, no mask", "partial + reduce", "one split", "rope-last", "rope-last, early", "last, 2 splits"}
    assert "failed" not in row and want <= set(row["cold"]) and set(row["cold"]) == set(row["warm"])
    assert all(t > 0 for t in row["cold"].values()) and res["smoke"]["default_splits"] == 3


def test_decode_summary_one_line_per_case(tmp_path):
    case = {"kiln": {"decode_tok_s": 1667.6}, "kiln_variant": {"decode_tok_s": 1545.2}, "peer": {"decode_tok_s": 354.3},
            "kiln_speedup": 4.707, "ab_tok_s": [[1668, 1667], [1546, 1544]]}
    path = tmp_path / "decode.json"
    path.write_text(json.dumps({"device": "cpu", "new_tokens": 256, "1b": {"compile_s": 2.0, "bs1": case}}))
    out = subprocess.run([sys.executable, str(BENCH / "decode_summary.py"), str(path)], capture_output=True, text=True,
                         check=True).stdout.splitlines()
    assert out == ["1b bs1 {'kiln': 1668, 'kiln_variant': 1545, 'peer': 354} kiln / peer 4.71x [[1668, 1667], [1546, 1544]]"]
