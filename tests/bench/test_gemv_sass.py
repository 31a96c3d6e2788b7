"""bench/gemv_sass.py --check: the one-row quantized GEMV configurations at the 1B's gate/up (norm prologue and plain)
and down shapes compile for sm_90 (Triton's own ptxas; no GPU) within its bounds on spills and SASS instructions a
weight code, with the Triton installed here (CI: 3.9). Session 9 found the WORDS GEMV with the norm prologue spilling
6-13 KB a thread (85 instructions a code) only by reading its SASS, under triton 3.6 (the GPU machine's; 3.9 compiled
that code without the spills): the CPU tests, under the interpreter, cannot see what a compiler makes of a kernel, so
the script is also run with triton 3.6 before a GPU session (bench/NOTES.md). The o projection's whole-K tile is checked
for the registers of a step without the K loop (qgemm.ONE_STEP)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import triton

SCRIPT = Path(__file__).parents[2] / "bench" / "gemv_sass.py"
BIN = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.mark.skipif(not (BIN / "ptxas").exists() or not (BIN / "cuobjdump").exists(), reason="Triton without its CUDA tools")
@pytest.mark.parametrize("bits", [4, 8])  # (two processes under xdist: ~20 s each)
def test_quantized_gemv_sass_within_bounds(bits):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # (kiln: the installed package)
    out = subprocess.run([sys.executable, str(SCRIPT), "--check", "--shapes", "gate/up", "down", "o", "--bits", str(bits)],
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith(f"int{bits} ")]
    assert len(rows) >= 10 and any("WORDS" in line and " norm " in line for line in rows), out.stdout
    if bits == 4:
        assert any("'IDOT': True" in line and " norm " in line for line in rows), out.stdout  # (dp4a's PTX compiles)
    assert any(line.startswith(f"int{bits} o ") and "'BLOCK_K': 2048, 'SPLIT_K': 1" in line for line in rows), out.stdout
