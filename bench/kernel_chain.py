"""What a kernel boundary costs in a decode step's chain of kernels, and what a dependent round trip to L2 costs inside
one: the floor under the one-row GEMVs' ~4.5 us a call above their bytes' time.

A Llama-3.2-1B w4a16 step on the H200 is 0.604 ms for 750 MB of weights (187 us at 4 TB/s): its 65 GEMVs sum to 488 us
under the profiler, ~4.5 us a call more than their bytes, the small ones (qkv 3 MB, o 2 MB) 5-6 us for < 1 us of bytes
(bench/NOTES.md, sessions 23-24). Fusing kernels (the o-projection into the attention, a layer's GEMVs on one persistent
grid) pays only as far as that time is the boundary between kernels rather than each kernel's own chain of dependent
loads (x, then the weights; split-K's partials, the counter, the last program's reload). Here both, with no bytes to
speak of, in one CUDA graph as the step runs:

  chain   K kernels, each program of each reading the value its predecessor's program stored (one float), adding 1,
          storing it: K boundaries, K dependent loads. Grids of 1, 132 (one program an SM) and 528 programs (four), with
          programmatic dependent launch (PDL, as kiln's decode kernels launch) and without.
  hops    one kernel whose programs each make H dependent atomic adds (each operand the last result), H = 1, 4, 16: what
          a dependent L2 round trip costs (the split-K counter's, a reload of partials another SM wrote).
  barrier the chain's K steps in ONE launch of one program an SM, a grid-wide barrier between steps (each program
          counts itself in with an atomic, then spins until the round's count is full): what a persistent kernel pays
          where a chain pays a kernel boundary (the o-projection inside the attention's launch, a layer's GEMVs on one
          grid). The programs must all be resident at once, so never more than the SMs.

us a kernel (a barrier's step) = the graph's replay / K (warm: the chain's values stay in L2, as a step's activations
do); a hops call's whole.

    python3 bench/kernel_chain.py [--kernels 64] [--smoke]          writes $OUT/kernel_chain.json

``--smoke``: a short chain under the Triton interpreter (a CPU test runs it), each result checked.
"""
import argparse
import os

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--kernels", type=int, default=64, help="kernels a chain (the 1B's step: 65 GEMVs, 16 attentions)")
ap.add_argument("--smoke", action="store_true")
a = ap.parse_args()
if a.smoke:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kiln.codegen.kernels import pdl  # noqa: E402
from kiln.codegen.kernels.pdl import gdc  # noqa: E402
from kiln.codegen.tuning import time_candidates  # noqa: E402

from common import report_problems, write_json  # noqa: E402

DEV = torch.device("cpu" if a.smoke else "cuda")
K = 4 if a.smoke else a.kernels
GRIDS = (1, 4) if a.smoke else (1, 132, 528)
HOPS = (1, 2) if a.smoke else (1, 4, 16)


@triton.jit
def _link_kernel(src_ptr, dst_ptr, PDL: tl.constexpr):
    gdc(PDL)
    p = tl.program_id(0)
    tl.store(dst_ptr + p, tl.load(src_ptr + p) + 1.0)


@triton.jit
def _hops_kernel(ptr, HOPS: tl.constexpr, PDL: tl.constexpr):
    gdc(PDL)
    p = tl.program_id(0)
    v = tl.atomic_add(ptr + p, 1.0)
    for _ in tl.static_range(HOPS - 1):  # each add's operand depends on the last one's result: one round trip at a time
        v = tl.atomic_add(ptr + p, v * 0.0 + 1.0)


@triton.jit
def _barrier_kernel(a_ptr, b_ptr, cnt_ptr, ROUNDS: tl.constexpr, PDL: tl.constexpr):
    # ROUNDS steps of the chain, each program p reading what the program p - 1 (its neighbour: another SM) stored the
    # step before, a grid barrier between steps. The counter only grows (every launch adds programs x ROUNDS), so a
    # round's target is the next multiple of the grid above the count a program found: no reset, no race with it
    gdc(PDL)
    p = tl.program_id(0)
    n = tl.num_programs(0)
    for r in tl.static_range(ROUNDS):
        src, dst = (a_ptr, b_ptr) if r % 2 == 0 else (b_ptr, a_ptr)
        tl.store(dst + p, tl.load(src + (p + n - 1) % n, volatile=True) + 1.0)
        tl.debug_barrier()  # (every thread's store before the count)
        old = tl.atomic_add(cnt_ptr, 1, sem="acq_rel")
        target = (old // n + 1) * n
        seen = old + 1
        while seen < target:
            seen = tl.atomic_add(cnt_ptr, 0, sem="acquire")
        tl.debug_barrier()


def cases() -> tuple[dict, list]:
    """name -> a callable running it once, and checks: (name, a callable returning (got, want)) after one run."""
    f, checks = {}, []
    for grid in GRIDS:
        for on in (False, True):
            if on and DEV.type != "cuda":
                continue
            bufs = [torch.zeros(grid, device=DEV), torch.zeros(grid, device=DEV)]
            kw = pdl.kwargs(bufs[0]) if on else {"PDL": False}

            def chain(bufs=bufs, grid=grid, kw=kw):
                for i in range(K):
                    _link_kernel[(grid,)](bufs[i % 2], bufs[(i + 1) % 2], **kw)
            name = f"chain, {grid} programs, PDL {'on' if on else 'off'}"
            f[name] = chain
            checks.append((name, chain, lambda bufs=bufs: (bufs[K % 2], bufs[(K - 1) % 2] + 1.0)))
    sms = torch.cuda.get_device_properties(DEV).multi_processor_count if DEV.type == "cuda" else 1
    bar = [torch.zeros(sms, device=DEV), torch.zeros(sms, device=DEV), torch.zeros(1, dtype=torch.int32, device=DEV)]

    def barrier(bar=bar):
        _barrier_kernel[(sms,)](*bar, ROUNDS=K, **pdl.kwargs(bar[0]))
    name = f"barrier, {sms} programs"
    f[name] = barrier
    # after a launch: what program p stored last is what its neighbour p - 1 stored the step before, + 1 (step r writes
    # b where r is even, a where odd)
    checks.append((name, barrier, lambda bar=bar: (bar[K % 2], torch.roll(bar[(K - 1) % 2], 1) + 1.0)))
    for hops in HOPS:
        buf = torch.zeros(132 if DEV.type == "cuda" else 4, device=DEV)

        def one(buf=buf, hops=hops):
            _hops_kernel[(buf.numel(),)](buf, HOPS=hops, **pdl.kwargs(buf))
        f[f"hops {hops}, {buf.numel()} programs"] = one
    return f, checks


def main() -> None:
    f, checks = cases()
    wrong = []
    for name, run, result in checks:
        run()
        got, want = result()
        if not torch.equal(got, want):
            wrong.append(name)
    ms, failed = time_candidates(f, DEV)
    us = {name: round(t * 1e3 / (K if name.startswith(("chain", "barrier")) else 1), 3) for name, t in ms.items()}
    res = {"device": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu", "kernels": K, "us": us,
           "wrong": wrong, "failed": failed}
    print(f"us a kernel (chains of {K}), a step (the barrier's {K}) or a call (hops), warm, one CUDA graph:")
    for name in f:
        if name in us:
            print(f"  {name:36s} {us[name]:8.3f}")
    report_problems(wrong, failed)
    write_json(res, "kernel_chain.json")


if __name__ == "__main__":
    main()
