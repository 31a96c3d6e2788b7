"""bench/kernel_chain.py --smoke: the chains of dependent kernels, the one-launch chain with grid barriers (one program:
the interpreter runs programs one after another, so more would spin forever) and the atomic round trips under the
interpreter, each chain's last values checked, timed and written as JSON."""
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench"


def test_kernel_chain_smoke_checks_and_times_every_case(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), TRITON_INTERPRET="1")
    subprocess.run([sys.executable, str(BENCH / "kernel_chain.py"), "--smoke"], check=True, env=env, capture_output=True)
    res = json.loads((tmp_path / "kernel_chain.json").read_text())
    assert res["wrong"] == [] and res["failed"] == {} and res["kernels"] == 4
    assert set(res["us"]) == {"chain, 1 programs, PDL off", "chain, 4 programs, PDL off", "barrier, 1 programs",
                              "hops 1, 4 programs", "hops 2, 4 programs"}
    assert all(t > 0 for t in res["us"].values())
