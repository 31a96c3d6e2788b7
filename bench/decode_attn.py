"""Where the decode attention's time goes at batch 1: kiln's split-KV kernel in the forms a decode plan can run, each
timed as the tuner times it (codegen/tuning.py: cold, one run from a CUDA graph after L2 is flushed; warm, back-to-back
runs in one graph), beside an empty kernel timed the same way (the floor of the method: the graph launch and one
kernel's start and end). So "rope-last" minus "empty" is what the plan's attention costs of its own, and the forms
between name its phases: the mask scan (mask None against a mask), RoPE with the new key's write (rope against not),
the splits' reduction by the last program (-last against one split, against partial + a reduce launch), the chunking
(splits swept). bf16 on the GPU.

    python3 bench/decode_attn.py [--shapes 1b,8b,qwen3-0.6b] [--slots 384] [--smoke]

``--smoke``: float16 under the Triton interpreter, tiny shapes (a CPU test runs it). Writes $OUT/decode_attn.json.
"""
import argparse
import os

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--shapes", default="1b,8b,qwen3-0.6b")
ap.add_argument("--slots", type=int, default=384, help="the cache's slots (the bench's 128 + 256 tokens)")
ap.add_argument("--smoke", action="store_true")
a = ap.parse_args()
if a.smoke:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from kiln.codegen.kernels import decode_attention as da  # noqa: E402
from kiln.codegen.kernels import pdl  # noqa: E402
from kiln.codegen.kernels.pdl import gdc  # noqa: E402
from kiln.codegen.tuning import time_candidates  # noqa: E402

from common import report_problems, write_json  # noqa: E402

DEV = torch.device("cpu" if a.smoke else "cuda")
DT = torch.float16 if a.smoke else torch.bfloat16
# name -> (query heads, kv heads, head dim, q / k norms)
SHAPES = {"1b": (32, 8, 64, False), "8b": (32, 8, 128, False), "qwen3-0.6b": (16, 8, 128, True), "smoke": (4, 2, 16, True)}
CONFIG = da.INTERPRET_CONFIG if a.smoke else dict(BLOCK_N=32, num_warps=4, num_stages=3)  # the plans' choice (session 23)


@triton.jit
def _empty_kernel(out_ptr, PDL: tl.constexpr = False):
    gdc(PDL)  # (as the kiln kernels call it)
    tl.store(out_ptr, 1.0)


def operands(hq: int, hk: int, d: int, slots: int, attended: int, gen: torch.Generator) -> dict:
    """One decode step at batch 1: q, this step's key and value, cos / sin, a cache of ``slots`` holding values, the
    new token's slot ``attended - 1`` and a mask attending 0 .. that slot."""
    def r(*shape):
        return torch.randn(*shape, generator=gen).to(DEV, DT)
    angles = torch.rand(1, 1, 1, d // 2, generator=gen) * 20
    angles = torch.cat((angles, angles), -1).to(DEV)
    mask = (torch.arange(slots, device=DEV) < attended).expand(1, 1, 1, slots)
    return dict(q=r(1, hq, 1, d), k=r(1, hk, 1, d), v=r(1, hk, 1, d), cos=angles.cos().to(DT), sin=angles.sin().to(DT),
                slots=torch.tensor([attended - 1], device=DEV), kc=r(1, hk, slots, d), vc=r(1, hk, slots, d), mask=mask,
                norms=((r(d) + 1, 1e-6), (r(d) + 1, 1e-6)))


def forms(o: dict, norms: bool, splits: list[int]) -> dict:
    """name -> a callable running that form once (into one output, the counters left zero)."""
    q, kc, vc, mask = o["q"], o["kc"], o["vc"], o["mask"]
    out, flag = torch.empty_like(q), torch.empty(1, device=DEV)
    counters = torch.zeros(da.counter_bytes(1, kc.shape[1]), dtype=torch.uint8, device=DEV)
    rope = (o["k"], o["v"], o["cos"], o["sin"], o["slots"], o["norms"] if norms else None)

    def run(m=mask, config=CONFIG, **kw):
        return lambda: da.decode_attention(q, kc, vc, m, gqa=True, out=out, config=config, **kw)
    f = {"empty": lambda: _empty_kernel[(1,)](flag, **pdl.kwargs(q)),
         "last": run(counters=counters), "last, no mask": run(None, counters=counters),
         "partial + reduce": run(), "one split": run(splits=1),
         "rope-last": run(counters=counters, rope=rope), "rope-last, early": run(counters=counters, rope=rope, early=True)}
    f.update({f"last, {n} splits": run(counters=counters, splits=n) for n in splits})
    if not a.smoke:  # the plan's form in fewer / more warps (fewer: fewer cross-warp barriers in its reductions)
        f.update({f"rope-last, early, {w} warps": run(counters=counters, rope=rope, early=True, config=dict(CONFIG, num_warps=w))
                  for w in (1, 2, 8)})
    return f


def main() -> None:
    gen = torch.Generator().manual_seed(0)
    names = ["smoke"] if a.smoke else a.shapes.split(",")
    slots = 45 if a.smoke else a.slots
    res = {"device": torch.cuda.get_device_name() if DEV.type == "cuda" else "cpu", "slots": slots, "config": CONFIG}
    for name in names:
        hq, hk, d, norms = SHAPES[name]
        default = da._chunking(slots, da.default_splits(1, hk, slots, CONFIG["BLOCK_N"], da._sm_count(DEV)),
                               CONFIG["BLOCK_N"])[0]
        sweep = sorted({n for n in (2, 3, 4, 6, 8, 12, 16, 24, 32) if n <= 2 * default} - {default})  # (1: "one split")
        res[name] = {"default_splits": default}
        for attended in [slots] if a.smoke else [slots // 3 + 1, slots]:
            f = forms(operands(hq, hk, d, slots, attended, gen), norms, sweep)
            row = {}
            for cold in (True, False):
                ms, failed = time_candidates(f, DEV, cold=cold)
                row["cold" if cold else "warm"] = {k: round(v * 1e3, 2) for k, v in ms.items()}
                row.update({"failed": failed} if failed else {})
            res[name][f"keys {attended}"] = row
            print(f"{name}, {attended} of {slots} keys attended, default {default} splits: us (cold / warm)", flush=True)
            for k in f:
                print(f"  {k:28s} {row['cold'].get(k, float('nan')):8.2f} {row['warm'].get(k, float('nan')):8.2f}")
            report_problems(failed=row.get("failed"))
    write_json(res, "decode_attn.json")


if __name__ == "__main__":
    main()
