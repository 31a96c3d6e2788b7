"""Compile-only SASS analysis of the one-row quantized GEMV (skinny.py / qgemm.py) for an H200 (sm_90), no GPU needed.

Every skinny configuration of one row of x against an int4 (groups of 128) and an int8 (per channel) weight at the
Llama-3.2-1B decode shapes, with and without the RMSNORM prologue where decode folds one (qkv, gate/up), compiled by
Triton for sm_90 (its own ptxas) and read back with cuobjdump: registers a thread, spilled bytes (stack), and the main
K loop's SASS: instructions a thread a step, per weight code, the mix. What session 9 found this way: the byte tiles'
150-168 registers (3 programs an SM), the WORDS loop's strided x loads and its norm prologue's spills (85 instructions a
code; under triton 3.6, the GPU machine's: 3.9 compiles that code without them, so run it with both). Run with
TRITON_INTERPRET unset (another Triton: its unpacked wheel first on PYTHONPATH):

    python3 bench/gemv_sass.py                    every configuration, a line each
    python3 bench/gemv_sass.py --check            exit 1 past CHECK's bounds (tests/bench/test_gemv_sass.py)
    python3 bench/gemv_sass.py --json out.json --mix --shapes gate/up down
    python3 bench/gemv_sass.py --dtype bfloat16 --shapes "8b gate/up"      the 8B's, with the models' x dtype

The CUDA driver is replaced by one that names sm_90 and launches nothing: kernels are compiled (``warmup``), never run.
"""
import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

SHAPES = {"qkv": (2048, 3072, False, True), "gate/up": (2048, 16384, True, True), "down": (8192, 2048, False, False),
          "o": (2048, 2048, False, False),  # name: K, N (weight rows), GLU, fed by an RMSNorm; the 1B's, then the 8B's
          "8b qkv": (4096, 6144, False, True), "8b gate/up": (4096, 28672, True, True), "8b down": (14336, 4096, False, False)}
# --check's bounds, far from what triton 3.6 and 3.9 compile today (spills 0-96 bytes, outside the loop or reloaded
# there; 4.2-4.8 SASS instructions a code for WORDS at 4 bits, 3.7-5.7 at 8, 6.6-7.2 for the byte tiles) and below the
# regressions they are for (the WORDS norm prologue's 6-13 KB of spills, 85 instructions a code; the 8-bit codes' PRMT
# lost: 6.0-7.5 a code with the norm prologue, as before session 20); IDOT (4 bits, dp4a): 2.2-3.6 under triton 3.6
# A WORDS tile whose one step spans K runs without the K loop (qgemm.ONE_STEP): the 1B o's whole-K tile 40 / 100
# registers a thread at 4 / 8 bits here (triton 3.9, no PDL), against 103 / 174 when the loop's pipelined prologue was
# compiled for a next step that never came (with PDL, 3.6: 48 / 79 against 128 / 240; session 34)
CHECK = dict(spill_bytes=256, per_code={(4, True): 5.5, (8, True): 6.0, (4, False): 8.5, (8, False): 8.5, (4, "IDOT"): 4.0},
             one_step_regs={4: 72, 8: 136})
CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


class CompileOnlyDriver:
    """What Triton's JIT asks of the active driver to compile for sm_90 (device 0, stream 0); nothing runs."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


def compiling():
    """Route kernel launches to compiles: returns the list each launch appends its CompiledKernel to."""
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("gemv_sass.py compiles for the GPU: run it with TRITON_INTERPRET unset")
    driver.set_active(CompileOnlyDriver())
    compiled, run = [], JITFunction.run

    def compile_only(self, *args, grid, warmup, **kw):
        kernel = run(self, *args, grid=grid, warmup=True, **kw)
        compiled.append(kernel)
        return kernel
    JITFunction.run = compile_only
    return compiled


def sass_of(kernel) -> tuple[str, str]:
    """(cuobjdump's resource line, the SASS) of a compiled kernel."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        res = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([CUOBJDUMP, "-sass", f.name], capture_output=True, text=True, check=True).stdout
    return " ".join(line.strip() for line in res.splitlines() if "REG:" in line), sass


def loop_mix(sass: str) -> collections.Counter:
    """Opcodes of the longest backward-branch range (the K loop)."""
    ins = [(int(m.group(1), 16), m.group(2).strip()) for m in
           (re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line) for line in sass.splitlines()) if m]
    loops = [(int(m.group(1), 16), a) for a, t in ins if (m := re.search(r"BRA .*0x([0-9a-f]+)", t)) and int(m.group(1), 16) < a]
    if not loops:
        return collections.Counter()
    lo, hi = max(loops, key=lambda r: r[1] - r[0])
    return collections.Counter(re.sub(r"^@!?U?P\w+\s+", "", t).split()[0].split(".")[0] for a, t in ins if lo <= a <= hi)


def analyse(compiled: list, shapes=tuple(SHAPES), dtype=torch.float16, bits_of=(4, 8)) -> list[dict]:
    from kiln.codegen.kernels import qgemm
    from kiln.codegen.kernels.skinny import configs, counter_bytes, skinny_gemm, workspace_bytes
    from kiln.ir.quant import quantize_rtn

    qgemm.INTERPRET = True  # (skinny_gemm's check that x is on CUDA; the kernels compile for sm_90 all the same)
    check = qgemm.check_operands  # (and its refusal of bfloat16 x, for the interpreter's tl.dot: nothing runs here)
    qgemm.check_operands = lambda fn, x, *a: check(fn, x.half() if x.dtype == torch.bfloat16 else x, *a)
    rows = []
    for bits in bits_of:
        for name, (k, n, glu, normed) in ((name, SHAPES[name]) for name in shapes):
            qw = quantize_rtn(torch.randn(n, k) * k ** -0.5, bits, 128 if bits == 4 else k, True)
            x = torch.randn(1, k).to(dtype)
            for norm in (False, True) if normed else (False,):
                extra = dict(norm_weight=torch.randn(k).to(dtype), norm_eps=1e-5) if norm else {}
                for c in configs(1, n, k, bits, glu=glu, norm=norm, group=qw.group):
                    ws = torch.empty(max(1, workspace_bytes(1, n, k, bits, glu, config=c)), dtype=torch.uint8)
                    cnt = torch.zeros(max(1, counter_bytes(1, n, k, bits, glu, config=c)), dtype=torch.uint8)
                    compiled.clear()
                    skinny_gemm(x, qweight=qw.qweight, scales=qw.scales, zeros=qw.zeros, bits=bits, group=qw.group,
                                act="silu" if glu else "none", glu=glu, workspace=ws, counters=cnt, config=c, **extra)
                    res, sass = sass_of(compiled[0])
                    mix = loop_mix(sass)
                    codes = c["BLOCK_N"] * (2 if glu else 1) * c["BLOCK_K"] / (32 * c["num_warps"])  # a thread's, a step
                    rows.append(dict(bits=bits, shape=name, norm=norm, config=c,
                                     regs=int(re.search(r"REG:(\d+)", res).group(1)),
                                     spill_bytes=int(re.search(r"STACK:(\d+)", res).group(1)),
                                     loop_instructions=sum(mix.values()), per_code=sum(mix.values()) / codes, mix=dict(mix)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a configuration passes CHECK's bounds")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--bits", nargs="+", type=int, default=[4, 8], choices=[4, 8], help="the codes' widths")
    ap.add_argument("--json", help="write every row here")
    ap.add_argument("--mix", action="store_true", help="print each loop's instruction mix")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16"], help="x's dtype (the models': bfloat16)")
    a = ap.parse_args()
    rows = analyse(compiling(), a.shapes, getattr(torch, a.dtype), a.bits)
    for r in rows:
        c = {k: v for k, v in r["config"].items() if k != "DOT"}
        print(f"int{r['bits']} {r['shape']:10s}{' norm' if r['norm'] else '     '} regs {r['regs']:3d} spill {r['spill_bytes']:5d} B"
              f"  loop {r['loop_instructions']:5d} ({r['per_code']:.2f} a code)  {c}", flush=True)
        if a.mix:
            print("    ", sorted(r["mix"].items(), key=lambda kv: -kv[1])[:16])
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(triton=triton.__version__, target="sm_90", rows=rows), fh, indent=1)
    bad = [r for r in rows if r["spill_bytes"] > CHECK["spill_bytes"]
           or r["per_code"] > CHECK["per_code"][(r["bits"], "IDOT" if r["config"].get("IDOT") else bool(r["config"].get("WORDS")))]
           or (r["config"].get("WORDS") and r["config"]["BLOCK_K"] >= SHAPES[r["shape"]][0] and r["regs"] > CHECK["one_step_regs"][r["bits"]])]
    if a.check and bad:
        sys.exit(f"{len(bad)} of {len(rows)} configurations past the bounds {CHECK}: " +
                 "; ".join(f"int{r['bits']} {r['shape']}{' norm' if r['norm'] else ''} {r['config']}: {r['spill_bytes']} B "
                           f"spilled, {r['per_code']:.2f} instructions a code, {r['regs']} registers" for r in bad))


if __name__ == "__main__":
    main()
