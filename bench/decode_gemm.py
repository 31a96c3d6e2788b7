"""Decode GEMM bandwidth on the GPU: cuBLAS (F.linear) against kiln's skinny template on bf16, int8 and int4
weights, at Llama-3.2-1B / Llama-3.1-8B decode shapes, M = 1 and 16 rows, bf16 activations.

Decode is bound by reading each weight once per token, so the figure of merit is the effective bandwidth
(weight bytes, scales included, + activation bytes read and written) / time against the H200's 4.8 TB/s.
A measurement is the median of triton.testing.do_bench over the replay of ONE CUDA graph that calls the
kernel on ``copies`` distinct weights (together several times the 60 MB L2, as a model's layers are), divided
by ``copies``: every call reads its weight from HBM, and no Python or launch overhead is timed. Every
configuration of ``skinny.configs`` is timed; the best, the default (the first) and all are reported. Launched with
PDL (Hopper), each call of that chain starts while the one before finishes, so what a kernel reads before its wait
counts; ``--sweep`` also times each configuration as the tuner does (``cold alone``: one call after L2 is flushed, where
nothing overlaps) and names both bests: where they differ, the tuner's cold timing mis-ranks the chain.

    python bench/decode_gemm.py --out decode_gemm.json [--m 1 16] [--shapes "1b qkv" "8b down + residual"] [--kinds bf16 int8]
    python bench/decode_gemm.py --out sweep.json --m 16 --sweep --shapes "1b qkv"    every SWEEP_DOT_TILES config too
    python bench/decode_gemm.py --out q.json --m 1 --sweep --kinds int4_g128 int8     every SWEEP_WORDS_TILES config too
    python bench/decode_gemm.py --out smoke.json --smoke [--sweep]     CPU: tiny shapes, float16, the Triton interpreter
    python bench/decode_gemm.py --out norm.json --norm [--m 1 16]       the RMSNorm prologue: unfused against fused
    python bench/decode_gemm.py --out smoke.json --smoke --norm

``--norm`` (the 1B's qkv and gate/up GLU, which decode feeds from an RMSNorm) times, as the tuner does for a decode
GEMM (codegen/tuning.py ``time_candidates`` cold: one run a sample after a write over more than the L2), the tuner's
own candidates of the GEMM with its norm prologue (codegen/lower.py ``gemm``): kiln's norm kernel then cuBLAS, then
the Triton template, then each skinny configuration, and each fused ``triton-skinny-norm`` configuration; and each
fused one again with ``L2`` (the program's weight slice asked of the L2 before its statistics pass). Printed as a
table (the best of each kind first), every time in the JSON.

Weights: int8 per output channel (group = K) and int4 in groups of 128, both symmetric, rounded to nearest
from a random bf16 weight; scales float16. Each kernel's relative error against a float32 reference of its
own (dequantized) weight is reported too, and per configuration what Triton compiled: registers, spills and the
MMA instructions of its PTX (``wgmma``: Hopper's warpgroup MMA, which the swapped tl.dot tiles are for; ``mma``:
mma.sync). ``--smoke`` checks the script's paths on the CPU (no timing worth reading, no CUDA graph).
"""
import argparse
import json
import math
import os
import sys
import time

SMOKE = "--smoke" in sys.argv
if SMOKE:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel is defined

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from triton.testing import do_bench  # noqa: E402

from kiln.codegen import lower  # noqa: E402
from kiln.codegen.kernels import qgemm  # noqa: E402
from kiln.codegen.pointwise import launch as launch_pointwise  # noqa: E402
from kiln.codegen.schedule import schedule  # noqa: E402
from kiln.codegen.tuning import time_candidates  # noqa: E402
from kiln.ir.bind import bind_inputs  # noqa: E402
from kiln.ir.graph import Graph  # noqa: E402
from kiln.ir.types import dtype_name  # noqa: E402
from kiln.codegen.kernels.qgemm import dequantize  # noqa: E402
from kiln.codegen.kernels.skinny import (H200_SMS, PROGRAMS_PER_SM, Tile, _workspace_fits, configs, counter_bytes,  # noqa: E402
                                         skinny_gemm, tile_config, workspace_bytes)

# (name, K, weight rows N, epilogue): the decode GEMMs of Llama-3.2-1B and Llama-3.1-8B
SHAPES = [
    ("1b gate/up glu", 2048, 16384, {"act": "silu", "glu": True}),  # (the 1B's by bytes per step)
    ("1b down + residual", 8192, 2048, {"residual": True}),
    ("1b lm head", 2048, 128256, {}),
    ("1b qkv", 2048, 3072, {}),
    ("1b o + residual", 2048, 2048, {"residual": True}),
    ("8b qkv", 4096, 6144, {}),
    ("8b gate/up glu", 4096, 28672, {"act": "silu", "glu": True}),
    ("8b down + residual", 14336, 4096, {"residual": True}),
]
SMOKE_SHAPES = [  # --smoke: irregular N, K a multiple of int4's group of 128
    ("tiny qkv", 128, 48, {}),
    ("tiny gate/up glu", 128, 96, {"act": "silu", "glu": True}),
    ("tiny down + residual", 256, 40, {"residual": True}),
]
# --sweep: tiles beyond skinny.TILES (the GLU halving is skinny.tile_config's), each at split-K as skinny picks it and
# around it (sweep_splits): what the template can reach at the decode shapes. M = 1: GEMV tiles (measured in session 5)
SWEEP_TILES = [Tile(*t) for t in (
    (16, 256, 2, 4), (16, 256, 4, 4), (16, 512, 4, 3), (16, 512, 4, 4), (16, 512, 8, 3), (16, 1024, 4, 3),
    (16, 1024, 8, 3), (32, 128, 4, 4), (32, 128, 4, 6), (32, 256, 4, 3), (32, 256, 4, 4), (32, 256, 4, 5),
    (32, 256, 8, 3), (32, 256, 8, 4), (32, 512, 8, 2), (32, 512, 8, 3), (64, 128, 4, 3), (64, 128, 8, 4), (64, 256, 8, 3))]
# M = 2..16: tl.dot tiles, swapped (acc^T = W x^T on wgmma: 64 / 128 weight rows, one warpgroup per 64 of them, or
# two over 64) and two unswapped (mma.sync) for comparison. Each compiles for sm_90 without spilling at the 1B shapes,
# GLU and norm prologue included (triton 3.9: registers 32-255; the 4-warp 64 x 256 tiles reach 255 at 8 bits, and at
# 4 bits with the norm), shared memory up to 148 KB (plain 128 x 128, 4 stages)
SWEEP_DOT_TILES = [Tile(*t, True) for t in (
    (64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 4, 4), (64, 128, 8, 4), (64, 256, 4, 3), (64, 256, 8, 3),
    (128, 64, 8, 4), (128, 128, 8, 3), (128, 128, 8, 4))] + [Tile(32, 256, 4, 3), Tile(64, 128, 4, 3), Tile(64, 128, 8, 4),
                                                          Tile(64, 64, 4, 4)]  # (the last two: `_gemm_kernel`'s 16-row tiles)
# M = 1 on a quantized weight: tiles of the WORDS GEMV (the codes read as int32 words, scales applied a word; skinny.TILES
# has two per width), by bits; sweep_configs adds the register cap's A / B (skinny.Tile.maxnreg)
SWEEP_WORDS_TILES = {b: [Tile(*t, words=True) for t in ts] for b, ts in {
    4: ((16, 1024, 4, 3), (32, 1024, 8, 3), (32, 1024, 8, 4), (64, 512, 8, 3), (64, 1024, 8, 2), (32, 512, 4, 3), (128, 256, 8, 3),
        (32, 1024, 4, 3), (64, 512, 4, 3),  # (session 9: 4 rows a thread, 3.7-3.9 SASS instructions a code, 164-168 registers)
        (16, 2048, 4, 3), (16, 2048, 8, 3)),  # (session 29: the 1B's qkv / o whole at K = 2048, so the peel reads it all early)
    8: ((32, 512, 8, 3), (64, 256, 8, 3), (32, 256, 4, 3), (64, 512, 8, 3), (16, 512, 4, 4), (128, 256, 8, 3), (32, 1024, 8, 2),
        (16, 512, 4, 6), (16, 1024, 4, 4), (16, 2048, 8, 3)),  # (session 20, ncu: the 8B's int8 gate/up at 3.4 TB/s, stalled
        # on its loads; session 29: a whole K = 2048 step, all read before the PDL wait by the peel)
}.items()}
# M = 1 on a 4-bit weight: WORDS tiles with each word's sum by integer dot products (skinny.IDOT_TILES; more rows a thread
# share an x column's conversion to fixed point)
SWEEP_IDOT_TILES = [Tile(*t, words=True, idot=True) for t in (
    (16, 512, 4, 3), (32, 512, 4, 3), (64, 512, 4, 3), (64, 512, 8, 3), (128, 512, 8, 3), (32, 1024, 4, 3), (64, 1024, 8, 3),
    (64, 512, 4, 4), (32, 512, 4, 4), (32, 512, 4, 5),  # (these two: more weight bytes in flight a program, session 24)
    (16, 2048, 8, 3))]  # (session 29: a whole K = 2048 step for the peel)
# 1..16 rows on a 4-bit weight: MAGIC tiles (swapped tl.dot, codes dequantized for the tensor cores; skinny.MAGIC_TILES)
SWEEP_MAGIC_TILES = [Tile(*t, True, magic=True) for t in (
    (64, 64, 4, 4), (64, 128, 4, 3), (64, 128, 4, 4), (64, 128, 4, 6), (128, 128, 4, 3), (128, 128, 4, 4), (128, 128, 8, 3),
    (128, 128, 8, 4), (256, 128, 8, 3))]
NORM_SHAPES = ["1b qkv", "1b gate/up glu"]  # --norm's default shapes: the decode GEMMs an RMSNorm feeds
NORM_L2_BYTES = 64 << 10  # --norm: the fused configurations again with this L2 budget a program (skinny config "L2")
ROTATE_BYTES = 0 if SMOKE else 512 << 20  # weight bytes cycled through in one graph: over 8x the H200's L2
WARM = os.environ.get("DECODE_GEMM_WARM") == "1"  # (case_operands)
DEVICE = "cpu" if SMOKE else "cuda"
DTYPE = torch.float16 if SMOKE else torch.bfloat16  # (the interpreter's tl.dot on bfloat16 is wrong)


def quantize(w: torch.Tensor, bits: int, group: int) -> dict:
    """Symmetric round-to-nearest in kiln's format: skinny_gemm's weight keywords."""
    n, k = w.shape
    wg = w.float().view(n, k // group, group)
    scales = wg.abs().amax(-1).clamp_min(1e-8) / (2 ** (bits - 1) - 1)  # [N, K / group]
    q = (wg / scales[..., None]).round().add(2 ** (bits - 1)).clamp(0, 2 ** bits - 1).to(torch.uint8).view(n, k)
    if bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)  # byte j: k = 2j low nibble, k = 2j + 1 high nibble
    return dict(qweight=q.contiguous(), scales=scales.to(torch.float16), zeros=None, bits=bits, group=group)


def weight_bytes(kw: dict) -> int:
    return sum(t.numel() * t.element_size() for key, t in kw.items() if isinstance(t, torch.Tensor))


def graph_us(calls: list) -> float:
    """Median microseconds of one call, from one CUDA graph replaying all of ``calls`` (--smoke: one pass, no graph)."""
    for call in calls:  # compile and warm up outside the capture
        call()
    if SMOKE:
        t0 = time.perf_counter()
        for call in calls:
            call()
        return (time.perf_counter() - t0) * 1e6 / len(calls)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    ms = do_bench(graph.replay, warmup=10, rep=100, return_mode="median")
    return ms * 1e3 / len(calls)


def template_cache() -> dict:
    """The template's compiled kernels on this GPU (empty under the interpreter)."""
    caches = getattr(qgemm._wgemm_kernel, "device_caches", {})
    return next(iter(caches.values()))[0] if caches else {}


def compiled(before: set) -> dict:
    """Registers, spills and the PTX's MMA instructions of the kernel the template compiled since its cache held the
    keys ``before`` (empty when not exactly one)."""
    new = [kern for key, kern in template_cache().items() if key not in before]
    if len(new) != 1:
        return {}
    ptx = new[0].asm.get("ptx", "")
    return dict(regs=getattr(new[0], "n_regs", None), spills=getattr(new[0], "n_spills", None),
                wgmma=ptx.count("wgmma.mma_async"), mma=ptx.count("mma.sync"))


def copy_bandwidth() -> float:
    """Device-to-device copy of 2 GiB, bytes read + written per second: the achievable ceiling."""
    if SMOKE:
        return float("nan")
    a = torch.empty(2 << 30, dtype=torch.uint8, device=DEVICE)
    b = torch.empty_like(a)
    ms = do_bench(lambda: b.copy_(a), warmup=5, rep=50, return_mode="median")
    return 2 * a.numel() / (ms * 1e-3)


def case_operands(m: int, k: int, n: int, epi: dict, copies: int, make_weight):
    """x, ``copies`` weights (as skinny_gemm keywords), outputs and residual for one shape."""
    n_out = n // 2 if epi.get("glu") else n
    x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
    # DECODE_GEMM_WARM=1: one weight, the chain's calls all on it (after the first its bytes are in L2): what a call
    # costs in the chain where its weight need not come from HBM (a prefetch's ceiling)
    weights = [make_weight()] * copies if WARM else [make_weight() for _ in range(copies)]
    outs = [torch.empty(m, n_out, device=DEVICE, dtype=DTYPE) for _ in range(copies)]
    res = torch.randn(m, n_out, device=DEVICE, dtype=DTYPE) if epi.get("residual") else None
    return x, weights, outs, res


def reference(x, kw: dict, epi: dict, res):
    w = kw["w"].float() if "w" in kw else dequantize(kw["qweight"], kw["scales"], kw["zeros"], kw["bits"], kw["group"])
    h = F.linear(x.float(), w)
    if epi.get("glu"):
        g, u = h.chunk(2, -1)
        h = F.silu(g) * u
    return h + res.float() if res is not None else h


def sweep_configs(m: int, n: int, k: int, bits, glu: bool, group: int | None = None) -> list[dict]:
    """--sweep's configurations: every SWEEP_TILES (M = 1) or SWEEP_DOT_TILES (M > 1) entry at skinny's split of K for
    it, half and twice that. M = 1 as measured in session 5: where skinny's workspace rule allows (the partials' traffic a
    small share of the weight's). M > 1: four times too, and the rule not applied: at 16 rows it binds 16 times harder
    (skinny gives way only to reach one program an SM), so the sweep measures what more splits buy; at most twice
    skinny's target of programs (past it a split adds no loads in flight)."""
    out = []
    tiles = SWEEP_DOT_TILES if m > 1 else SWEEP_WORDS_TILES[bits] if bits else SWEEP_TILES
    tiles = tiles + (SWEEP_MAGIC_TILES if bits == 4 and group else []) + (SWEEP_IDOT_TILES if bits == 4 and m == 1 else [])
    for tile in tiles:
        c0 = tile_config(m, n, k, bits, glu, tile, group=group)
        s0, tiles = c0["SPLIT_K"], -(-(n // 2 if glu else n) // c0["BLOCK_N"])
        for split in (max(1, s0 // 2), s0, 2 * s0) + ((4 * s0,) if m > 1 else ()):
            c = tile_config(m, n, k, bits, glu, tile, split=split, group=group)
            if m == 1 and not tile.magic:
                keep = _workspace_fits(m, n, k, bits, c["SPLIT_K"])
            else:
                keep = c["SPLIT_K"] == s0 or tiles * c["SPLIT_K"] <= 2 * PROGRAMS_PER_SM * H200_SMS
            if keep and c not in out:
                out.append(c)
    if m == 1 and bits:  # the register cap measured both ways: skinny's capped tiles uncapped, 4-warp WORDS tiles capped
        # at 128 and 96 (session 20, ncu: the 8B's int4 WORDS gate/up at 118 registers, 4 programs an SM, 1.7 waves; at 96,
        # 24 bytes of stack, 5 an SM)
        capped = [c for c in configs(m, n, k, bits, glu) if "maxnreg" in c]
        out += [{key: v for key, v in c.items() if key != "maxnreg"} for c in capped]
        out += [dict(c, maxnreg=r) for c in list(out) if c.get("WORDS") and c["num_warps"] == 4 and "maxnreg" not in c
                for r in (128, 96)]
    return out


def time_config(m, n, k, epi, bits, x, weights, outs, res, c: dict, cold: bool = False) -> dict:
    """One configuration over all the weight copies: microseconds a call and what was compiled, or the error (a tile
    whose shared memory or registers the GPU refuses is a row, not the end of a sweep). ``cold``: also ``cold_us``, the
    call timed as the tuner times it (alone, after L2 is flushed), where ``us`` is a call in a chain of calls on other
    weights, each launched while the one before finishes (PDL): what a kernel reads before its wait counts only there."""
    glu, act = epi.get("glu", False), epi.get("act", "none")
    ws = torch.empty(max(1, workspace_bytes(m, n, k, bits, glu, config=c)), dtype=torch.uint8, device=DEVICE)
    # zeroed once, left zero by every call (as planned): no memset inside the timed graph
    cnt = torch.zeros(max(1, counter_bytes(m, n, k, bits, glu, config=c)), dtype=torch.uint8, device=DEVICE)
    calls = [lambda kw=kw, o=o: skinny_gemm(x, residual=res, act=act, glu=glu, out=o, workspace=ws, counters=cnt, config=c, **kw)
             for kw, o in zip(weights, outs)]
    before = set(template_cache())
    try:
        us = graph_us(calls)
    except Exception as e:  # noqa: BLE001  (out of resources, a compile error: recorded, the sweep goes on)
        return dict(config=c, error=f"{type(e).__name__}: {str(e)[:200]}")
    row = dict(config=c, us=us, **compiled(before))
    if cold:  # as the tuner times a decode GEMM: one call a sample after L2 is written over, alone in its graph
        ms, _ = time_candidates({"c": calls[0]}, torch.device(DEVICE), cold=True)
        row.update(cold_us=ms["c"] * 1e3 if "c" in ms else None)
    return row


def bench_skinny(m, k, n, epi, make_weight, peak, sweep: bool = False) -> dict:
    """Every configuration of one weight kind at one shape (``sweep``: also sweep_configs'): times, bandwidth, error of
    the best."""
    probe = make_weight()
    wbytes = weight_bytes(probe)
    copies = max(1, math.ceil(ROTATE_BYTES / wbytes))
    x, weights, outs, res = case_operands(m, k, n, epi, copies, make_weight)
    bits, glu, act = probe.get("bits"), epi.get("glu", False), epi.get("act", "none")
    act_bytes = x.numel() * 2 + outs[0].numel() * 2 * (2 if res is not None else 1)
    rows = []
    todo = configs(m, n, k, bits, glu, group=probe.get("group"))
    todo += [c for c in (sweep_configs(m, n, k, bits, glu, probe.get("group")) if sweep else []) if c not in todo]
    for i, c in enumerate(todo):
        rows.append(time_config(m, n, k, epi, bits, x, weights, outs, res, c, cold=sweep))
        if "us" in rows[-1]:
            rows[-1]["GBps"] = (wbytes + act_bytes) / rows[-1]["us"] * 1e-3
        if sweep:
            row = rows[-1]
            got = (f"{row['us']:.2f} us (cold alone {row.get('cold_us') or float('nan'):.2f}) {row['GBps']:.0f} GB/s "
                   f"{row.get('regs')} regs" if "us" in row else row["error"])
            print(f"    {i + 1}/{len(todo)} {c}: {got} wgmma {row.get('wgmma')}", flush=True)
    best = min((row for row in rows if "us" in row), key=lambda row: row["us"])
    if sweep and (timed := [row for row in rows if row.get("cold_us")]):  # what the tuner would take, and what it costs
        tuner = min(timed, key=lambda row: row["cold_us"])
        print(f"    chained best {best['us']:.2f} us {best['config']}; cold-alone best {tuner['cold_us']:.2f} us "
              f"{tuner['config']}, chained {tuner['us']:.2f} us", flush=True)
    got = skinny_gemm(x, residual=res, act=act, glu=glu, config=best["config"], **weights[0])
    err = float((got.float() - reference(x, weights[0], epi, res)).norm() / reference(x, weights[0], epi, res).norm())
    return dict(weight_bytes=wbytes, copies=copies, best_us=best["us"], best_config=best["config"], GBps=best["GBps"],
                pct_peak=100 * best["GBps"] * 1e9 / peak, default_us=rows[0].get("us"), rel_err=err, configs=rows)


def bench_cublas(m, k, n, epi, peak) -> dict:
    """F.linear alone, and F.linear followed by the epilogue in eager torch."""
    wbytes = n * k * 2
    copies = max(1, math.ceil(ROTATE_BYTES / wbytes))
    x, weights, _, res = case_operands(m, k, n, epi, copies, lambda: dict(w=torch.randn(n, k, device=DEVICE, dtype=DTYPE) * k ** -0.5))
    n_out = n // 2 if epi.get("glu") else n

    def with_epilogue(w):
        h = F.linear(x, w)
        if epi.get("glu"):
            g, u = h.chunk(2, -1)
            h = F.silu(g) * u
        return h + res if res is not None else h
    us = graph_us([lambda w=kw["w"]: F.linear(x, w) for kw in weights])
    us_epi = graph_us([lambda w=kw["w"]: with_epilogue(w) for kw in weights]) if epi else us
    gbps = (wbytes + (x.numel() + m * n) * 2) / us * 1e-3
    return dict(us=us, GBps=gbps, pct_peak=100 * gbps * 1e9 / peak, with_epilogue_us=us_epi, n_out=n_out)


def norm_kernel(x: torch.Tensor, nw: torch.Tensor, eps: float, y: torch.Tensor):
    """A closure running kiln's generated RMSNORM kernel (the plan's norm group) of x [M, K] with weight nw into y."""
    g = Graph()
    xi, wi = g.add_input("x", tuple(x.shape), dtype_name(x.dtype)), g.add_input("w", tuple(nw.shape), dtype_name(nw.dtype))
    g.set_outputs([g.add("RMSNORM", (xi, wi), eps=eps)])
    (group,) = [grp for grp in schedule(g) if grp.kind == "pointwise"]
    bindings = bind_inputs(g, [x, nw])
    return lambda: launch_pointwise(group, [x, nw], bindings, out=[y])


def norm_candidates(m: int, k: int, n: int, epi: dict) -> dict:
    """The tuner's candidates of one GEMM with its norm prologue (lower.py ``gemm``), plus every fused configuration
    with ``L2``: name -> closure, on one bf16 weight (the cold timing flushes L2 before each sample)."""
    glu, act, eps = epi.get("glu", False), epi.get("act", "none"), 1e-5
    x = torch.randn(m, k, device=DEVICE, dtype=DTYPE)
    nw = (1 + 0.2 * torch.randn(k, device=DEVICE)).to(DTYPE)
    w = torch.randn(n, k, device=DEVICE, dtype=DTYPE) * k ** -0.5
    y = torch.empty_like(x)
    res = torch.randn(m, n, device=DEVICE, dtype=DTYPE) if epi.get("residual") else None
    out = torch.empty(m, n // 2 if glu else n, device=DEVICE, dtype=DTYPE)
    tmp = torch.empty(m, n, device=DEVICE, dtype=DTYPE) if glu else None
    attrs = dict(act=act, glu=glu, bias=False, gate=False, residual=res is not None)
    device = torch.device(DEVICE)
    size = [f("GEMM", attrs, (m, k), (n, k), DTYPE, device) for f in (lower.workspace_bytes, lower.counter_bytes)]
    ws, cnt = (torch.zeros(max(1, b), dtype=torch.uint8, device=DEVICE) for b in size)
    norm = dict(x=x, w=nw, eps=eps, unit=False, run=norm_kernel(x, nw, eps, y))
    _, candidates = lower.gemm([y, w] + ([res] if res is not None else []), attrs, out, tmp, device, (ws, cnt), norm)
    # the norm's weight folded into the GEMM's (passes/fold_norm_weight.py): the template scaling its rows itself
    wf, ones = w * nw, torch.ones_like(nw)
    unit = dict(x=x, w=ones, eps=eps, unit=True, run=norm_kernel(x, ones, eps, y))
    _, folded = lower.gemm([y, wf] + ([res] if res is not None else []), attrs, out, tmp, device, (ws, cnt), unit)
    candidates.update({name: fn for name, fn in folded.items() if name.startswith("triton-rstd:")})
    candidates["unit norm + triton"] = folded[next(c for c in folded if c.startswith("triton:"))]
    for name in [c for c in candidates if c.startswith("triton-skinny-norm:")]:
        c = next(c for c in lower._skinny_configs(m, n, k, None, glu, device, True) if lower.config_name("triton-skinny-norm", c) == name)
        candidates[name + ":L2"] = (lambda c=c: skinny_gemm(x, w=w, residual=res, act=act, glu=glu, norm_weight=nw, norm_eps=eps,
                                                            out=out, workspace=ws, counters=cnt, config=dict(c, L2=NORM_L2_BYTES)))
    return candidates


def bench_norm(m: int, k: int, n: int, epi: dict) -> dict:
    """--norm: every candidate's cold microseconds (and the failures), the best of each kind, printed as a table."""
    ms, failed = time_candidates(norm_candidates(m, k, n, epi), torch.device(DEVICE), cold=True)
    us = {name: t * 1e3 for name, t in ms.items()}
    kinds = {"norm + cuBLAS": lambda s: s == "cublas", "norm + triton": lambda s: s.startswith("triton:"),
             "unit norm + triton": lambda s: s == "unit norm + triton", "rstd": lambda s: s.startswith("triton-rstd:"),
             "norm + skinny": lambda s: s.startswith("triton-skinny:"),
             "fused": lambda s: s.startswith("triton-skinny-norm:") and not s.endswith(":L2"),
             "fused + L2": lambda s: s.startswith("triton-skinny-norm:") and s.endswith(":L2")}
    best = {}
    for kind, match in kinds.items():
        names = [s for s in us if match(s)]
        if names:
            best[kind] = min(names, key=us.get)
            print(f"      {kind:14s} best {us[best[kind]]:7.2f} us  {best[kind]}", flush=True)
    for name in sorted(us, key=us.get):
        print(f"        {us[name]:7.2f} us  {name}", flush=True)
    for name, err in failed.items():
        print(f"        failed  {name}: {err}", flush=True)
    return dict(us=us, failed=failed, best={kind: dict(name=name, us=us[name]) for kind, name in best.items()})


def weight_kinds(n: int, k: int) -> dict:
    """Weight makers by kind name: skinny_gemm's weight keywords."""
    return dict(bf16=lambda: dict(w=torch.randn(n, k, device=DEVICE, dtype=DTYPE) * k ** -0.5),
                int8=lambda: quantize(torch.randn(n, k, device=DEVICE, dtype=DTYPE), 8, k),
                int4_g128=lambda: quantize(torch.randn(n, k, device=DEVICE, dtype=DTYPE), 4, 128))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="JSON results path")
    p.add_argument("--m", type=int, nargs="+", default=[1, 16], help="rows (decode batch), each <= 16")
    p.add_argument("--shapes", nargs="+", default=None, help=f"names among: {', '.join(s[0] for s in SHAPES + SMOKE_SHAPES)}")
    p.add_argument("--kinds", nargs="+", default=None, choices=("bf16", "int8", "int4_g128"),
                   help="weight kinds (default: all three; bf16 with --sweep)")
    p.add_argument("--sweep", action="store_true", help="every SWEEP_TILES (M = 1; quantized: SWEEP_WORDS_TILES) / SWEEP_DOT_TILES "
                   "(M > 1) configuration too")
    p.add_argument("--peak", type=float, default=4.8e12, help="HBM bandwidth the percentages refer to, bytes/s")
    p.add_argument("--smoke", action="store_true", help="CPU: SMOKE_SHAPES in float16 under the Triton interpreter")
    p.add_argument("--norm", action="store_true", help=f"the RMSNorm prologue, unfused against fused (default shapes: {NORM_SHAPES})")
    args = p.parse_args()
    names = args.shapes or (NORM_SHAPES if args.norm and not SMOKE else None)
    shapes = [s for s in (SMOKE_SHAPES if SMOKE else SHAPES) if names is None or s[0] in names]
    if args.norm:
        return main_norm(args, [s for s in shapes if "residual" not in s[3]])
    kinds = args.kinds or (["bf16"] if args.sweep else ["bf16", "int8", "int4_g128"])
    res = dict(device="cpu (interpreter)" if SMOKE else torch.cuda.get_device_name(), torch=torch.__version__,
               triton=triton.__version__, peak_GBps=args.peak / 1e9, copy_GBps=copy_bandwidth() / 1e9, rotate_bytes=ROTATE_BYTES, results=[])
    print(f"{res['device']}: device copy {res['copy_GBps']:.0f} GB/s", flush=True)
    for name, k, n, epi in shapes:
        for m in args.m:
            torch.manual_seed(0)
            row = dict(name=name, M=m, K=k, N=n, epilogue=epi, cublas=bench_cublas(m, k, n, epi, args.peak))
            for kind in kinds:
                row[kind] = bench_skinny(m, k, n, epi, weight_kinds(n, k)[kind], args.peak, sweep=args.sweep)
                if not SMOKE:
                    torch.cuda.empty_cache()
            res["results"].append(row)
            print(f"{name:20s} M={m:2d}  cuBLAS {row['cublas']['us']:7.1f} us {row['cublas']['pct_peak']:5.1f}%  " + "  ".join(
                f"{kind} {row[kind]['best_us']:7.1f} us {row[kind]['pct_peak']:5.1f}% (default {row[kind]['default_us'] or float('nan'):.1f}, "
                f"err {row[kind]['rel_err']:.1e})" for kind in kinds), flush=True)
            with open(args.out, "w") as f:  # after every row: a run cut short still leaves its figures
                json.dump(res, f, indent=1)


def main_norm(args, shapes: list) -> None:
    """--norm: bench_norm at each shape and row count, the JSON rewritten after each."""
    res = dict(device="cpu (interpreter)" if SMOKE else torch.cuda.get_device_name(), torch=torch.__version__,
               triton=triton.__version__, timing="cold (tuning.time_candidates)", l2_bytes=NORM_L2_BYTES, results=[])
    for name, k, n, epi in shapes:
        for m in args.m:
            torch.manual_seed(0)
            print(f"{name} M={m} (K {k}, N {n}) with its RMSNorm prologue:", flush=True)
            res["results"].append(dict(name=name, M=m, K=k, N=n, epilogue=epi, **bench_norm(m, k, n, epi)))
            with open(args.out, "w") as f:
                json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
