"""The load-only ceiling of a one-row GEMV's weight stream, by tile shape and weight layout: is a quantized GEMV slow for
its arithmetic, or for how its loads meet the HBM?

The one-row quantized GEMVs run at 1.3-2.6 TB/s on the H200 (bench/NOTES.md, session 23: the 8B's int8 gate/up 2.6, int4
gate/up 1.9, int8 o 1.3) where the bf16 ones reach ~3.9. IDOT halved a 4-bit code's instructions (session 21) and the
8B's int4 gate/up went only from 1.67 to 1.9 TB/s, so the bound is not the issue rate alone. One difference left: a
program's step reads BLOCK_N rows of BLOCK_K codes, and at the quantized tiles that is 256 bytes a row (int8 x 256,
int4 x 512) against the bf16 tiles' 1 KB. Here the same walk with no arithmetic: each program of a grid over the weight's
rows XORs its [BLOCK_N, row bytes] tiles into a register tile (one LOP3 a word) while Triton's pipeline streams them
through cp.async, as the GEMV's do. Two layouts:

  rows    the weight row-major, as the GEMVs read it today: a step reads BLOCK_N segments of ``row bytes`` at a
          stride of the row (4 KB for the 8B's int8 K = 4096)
  tiled   the weight laid out tile by tile ([N / BLOCK_N, K / row bytes, BLOCK_N, row bytes] contiguous): a step's
          tile is one contiguous block and a program's whole stream one run of memory

If "rows" at 256-byte segments stays near the quantized GEMVs' rates while "tiled" (or longer segments) reaches the
bf16 GEMVs', the weight's layout is the lever (pack the codes tile by tile, as Marlin does), not the arithmetic.
Reference: torch's row sum of the same bytes (one read of the weight). Every case cold (L2 flushed), as the tuner times.

    python3 bench/gemv_loads.py [--shapes 8b-int8,8b-int4,1b-int4] [--smoke]       writes $OUT/gemv_loads.json

``--smoke``: tiny shapes under the Triton interpreter (a CPU test runs it), each kernel checked against torch.
"""
import argparse
import os

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--shapes", default="8b-int8,8b-int4,8b-down-int4,1b-int4")
ap.add_argument("--smoke", action="store_true")
a = ap.parse_args()
if a.smoke:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kiln.codegen.tuning import time_candidates  # noqa: E402

from common import report_problems, write_json  # noqa: E402

DEV = torch.device("cpu" if a.smoke else "cuda")
# name -> (weight rows N, bytes a row): the 8B's gate/up (GLU: both halves' rows) at 8 and 4 bits, its down at 4, the 1B's
# gate/up at 4 (K codes at 8 / 4 bits a code)
SHAPES = {"8b-int8": (28672, 4096), "8b-int4": (28672, 2048), "8b-down-int4": (4096, 7168), "1b-int4": (16384, 1024),
          "smoke": (64, 256)}
# (BLOCK_N, row bytes a step, num_warps, num_stages): the GEMV tiles' walks (int8 32 x 256, int4 32 x 512 and 16 x 1024
# are 256 / 256 / 512 bytes a row) and longer ones
TILES = [(16, 256, 4, 4), (32, 256, 4, 3), (64, 256, 4, 3), (16, 512, 4, 3), (32, 512, 4, 3), (16, 1024, 4, 3),
         (32, 1024, 4, 3), (16, 2048, 4, 3), (8, 4096, 4, 3)]
SMOKE_TILES = [(16, 64, 4, 2), (32, 128, 4, 2)]


@triton.jit
def _stream_kernel(w_ptr, out_ptr, KW, TILED: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr):
    # program p: rows [p * BLOCK_N, (p + 1) * BLOCK_N) of a weight of KW int32 words a row, BLOCK_W words a step; the
    # XOR of each row's words to out (so no load is dead). Triton pipelines none of these loads (its pipeline takes
    # loads that reach shared memory; the GEMVs' weight tiles do, through cp.async, and keep num_stages - 1 steps in
    # flight), so the next step's tile is loaded before this one is used: two tiles in flight a program, as the
    # GEMVs' 3-stage pipelines hold (num_stages is passed all the same)
    p = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_W)
    if TILED:  # [N / BLOCK_N, KW / BLOCK_W, BLOCK_N, BLOCK_W]: step s's tile at (p * KW / BLOCK_W + s) * BLOCK_N * BLOCK_W
        ptrs = w_ptr + p * BLOCK_N * KW + rows[:, None] * BLOCK_W + cols[None, :]
        step = BLOCK_N
    else:
        ptrs = w_ptr + (p * BLOCK_N + rows[:, None]) * KW + cols[None, :]
        step = 1
    acc = tl.zeros([BLOCK_N, BLOCK_W], dtype=tl.int32)
    cur = tl.load(ptrs)
    for k in range(BLOCK_W, KW, BLOCK_W):
        nxt = tl.load(ptrs + k * step)
        acc ^= cur
        cur = nxt
    acc ^= cur
    tl.store(out_ptr + p * BLOCK_N + rows, tl.reduce(acc, 1, _xor))


@triton.jit
def _xor(x, y):
    return x ^ y


def tiled(w: torch.Tensor, block_n: int, block_w: int) -> torch.Tensor:
    """``w`` [N, KW] laid out tile by tile: [N / block_n, KW / block_w, block_n, block_w], contiguous."""
    n, kw = w.shape
    return w.view(n // block_n, block_n, kw // block_w, block_w).permute(0, 2, 1, 3).contiguous()


def cases(n: int, row_bytes: int, tiles: list, gen: torch.Generator) -> tuple[dict, torch.Tensor]:
    """name -> a callable streaming the weight once, and the XOR of each row (what every kernel must store)."""
    kw = row_bytes // 4
    w = torch.randint(-2 ** 31, 2 ** 31 - 1, (n, kw), generator=gen, dtype=torch.int32).to(DEV)
    want = w[:, 0].clone()
    for j in range(1, kw):
        want ^= w[:, j]
    out = torch.empty(n, dtype=torch.int32, device=DEV)
    f = {"torch row sum": lambda: w.sum(dim=1, dtype=torch.int32)}
    layouts = {}
    for bn, step, warps, stages in tiles:
        bw = step // 4
        if n % bn or kw % bw:
            continue
        for layout in ("rows", "tiled"):
            src = w if layout == "rows" else layouts.setdefault((bn, bw), tiled(w, bn, bw))

            def run(src=src, bn=bn, bw=bw, warps=warps, stages=stages, t=layout == "tiled"):
                _stream_kernel[(n // bn,)](src, out, kw, TILED=t, BLOCK_N=bn, BLOCK_W=bw, num_warps=warps, num_stages=stages)
                return out
            f[f"{layout} {bn} x {step} B, {warps} warps, {stages} stages"] = run
    return f, want


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    names = ["smoke"] if a.smoke else a.shapes.split(",")
    res = {"device": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu"}
    for name in names:
        n, row_bytes = SHAPES[name]
        f, want = cases(n, row_bytes, SMOKE_TILES if a.smoke else TILES, gen)
        wrong = [k for k, fn in f.items() if k != "torch row sum" and not torch.equal(fn(), want)]
        ms, failed = time_candidates(f, DEV, cold=True)
        mb = n * row_bytes / 1e6
        res[name] = {"MB": mb, "us": {k: round(v * 1e3, 2) for k, v in ms.items()},
                     "TB/s": {k: round(mb / 1e6 / (v / 1e3), 3) for k, v in ms.items()}, "wrong": wrong, "failed": failed}
        print(f"{name}: {n} rows x {row_bytes} B ({mb:.1f} MB), cold: us, TB/s", flush=True)
        for k in f:
            if k in ms:
                print(f"  {k:40s} {ms[k] * 1e3:8.2f} {res[name]['TB/s'][k]:7.2f}")
        report_problems(wrong, failed)
    write_json(res, "gemv_loads.json")


if __name__ == "__main__":
    main()
