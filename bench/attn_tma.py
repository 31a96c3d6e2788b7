"""An experiment, not a kiln kernel: attention at head dim 72 (DiT-XL/2, PixArt) with q, k, v read by TMA.

kiln's attention template (codegen/kernels/attention.py) loads its tiles with per-thread pointers: at DiT-XL/2's CFG
shape its 64 x 64 tile compiles to 232-254 registers a thread and the 128-row tiles spill (sm_90, triton 3.6), and
it runs 11.1-11.5 us against cuDNN's 7.5 (bench/NOTES.md, session 11). Here the same online softmax with every tile
read by the Tensor Memory Accelerator from host descriptors over the [B, H, S, D] views (4-d: a fused projection's
strided q / k / v need no copy): no address registers, rows past S zero-filled. Head dim 72 as 64 lanes and a
16-lane window of the last lanes (56..71: TMA boxes need no mask), for q k^T with q's window lanes 56..63 zeroed (so
they count once) and for p v with only the window's lanes 64..71 stored. No mask, not causal: the diffusion shapes.

    python3 bench/attn_tma.py [--smoke]        writes $OUT/attn_tma.json; --smoke: the interpreter, tiny shapes

Each candidate captured 20 times in one CUDA graph, do_bench median / 20, against kiln's template (its three configs
for the shape, SPLIT_V off and on), SDPA + the plan's copy, and float32 for the error.
"""
import argparse
import json
import os

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--smoke", action="store_true")
a = ap.parse_args()
if a.smoke:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
import triton.testing as tt  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

from kiln.codegen.kernels import attention as ta  # noqa: E402
from kiln.testing import rel_err  # noqa: E402

DEV = "cpu" if a.smoke else "cuda"
DT = torch.float16 if a.smoke else torch.bfloat16
REPS = 20
MAIN, WIN = 64, 16  # head dim 72 = lanes 0..63 + the window 56..71
SHAPES = {"dit-xl-2 256, CFG 2": (2, 16, 256), "dit-xl-2 256, CFG 16": (16, 16, 256), "pixart 512, CFG 2": (2, 16, 1024),
          "pixart 1024, CFG 2": (2, 16, 4096)}
CONFIGS = [(64, 64, 4, 3), (64, 64, 4, 2), (64, 128, 4, 2), (64, 32, 4, 3), (128, 64, 8, 3), (128, 64, 8, 2),
           (128, 128, 8, 2), (128, 32, 8, 3)]
if a.smoke:
    SHAPES = {"tiny": (1, 2, 40)}
    CONFIGS = [(16, 16, 4, 2)]


@triton.jit
def _tma_attention_kernel(q_desc, k_desc, v_desc, qw_desc, kw_desc, vw_desc, out_ptr, stride_ob, stride_oh, stride_om, H, S, D, qk_scale,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MAIN: tl.constexpr, WIN: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    m0 = pid_m * BLOCK_M
    w0 = D - WIN  # the window's first lane
    q = q_desc.load([b, h, m0, 0]).reshape(BLOCK_M, MAIN)
    q2 = qw_desc.load([b, h, m0, w0]).reshape(BLOCK_M, WIN)
    lanes = w0 + tl.arange(0, WIN)
    q2 = tl.where(lanes[None, :] >= MAIN, q2, tl.zeros_like(q2))  # the window's lanes below MAIN count once (in q)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, MAIN], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, WIN], dtype=tl.float32)
    for n0 in range(0, S, BLOCK_N):
        k = k_desc.load([b, h, n0, 0]).reshape(BLOCK_N, MAIN)
        k2 = kw_desc.load([b, h, n0, w0]).reshape(BLOCK_N, WIN)
        s = tl.dot(q, k.T)
        s = tl.dot(q2, k2.T, s) * qk_scale
        if n0 + BLOCK_N > S:  # (the last tile of a length not a multiple of BLOCK_N: zero-filled keys masked)
            s = tl.where((n0 + tl.arange(0, BLOCK_N))[None, :] < S, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = v_desc.load([b, h, n0, 0]).reshape(BLOCK_N, MAIN)
        v2 = vw_desc.load([b, h, n0, w0]).reshape(BLOCK_N, WIN)
        pb = p.to(v.dtype)
        acc = tl.dot(pb, v, acc * alpha[:, None])
        acc2 = tl.dot(pb, v2, acc2 * alpha[:, None])
        m_i = m_new
    offs_m = m0 + tl.arange(0, BLOCK_M)
    base = out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + offs_m[:, None] * stride_om
    rows = offs_m[:, None] < S
    tl.store(base + tl.arange(0, MAIN)[None, :], (acc / l_i[:, None]).to(out_ptr.dtype.element_ty), mask=rows)
    tl.store(base + lanes[None, :], (acc2 / l_i[:, None]).to(out_ptr.dtype.element_ty),
             mask=rows & (lanes[None, :] >= MAIN))


def tma_attention(q, k, v, out, config):
    """q, k, v [B, H, S, 72] (any strides TMA takes: inner 1, others 16-byte multiples), out [B, H, S, 72] (inner 1).
    A descriptor has one box: the main lanes' and the window's are two descriptors a tensor."""
    bm, bn, warps, stages = config
    bq, h, s, d = q.shape
    descs = [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, lanes])
             for lanes in (MAIN, WIN) for t, rows in ((q, bm), (k, bn), (v, bn))]
    _tma_attention_kernel[(triton.cdiv(s, bm), bq * h)](
        *descs, out, out.stride(0), out.stride(1), out.stride(2), h, s, d, d ** -0.5 * 1.4426950408889634,
        BLOCK_M=bm, BLOCK_N=bn, MAIN=MAIN, WIN=WIN, num_warps=warps, num_stages=stages)
    return out


def graphed(fn):
    """``fn`` REPS times in one CUDA graph: the replay's median / REPS, in us (on the CPU: one call's, 0)."""
    fn()
    if a.smoke:
        return 0.0
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(REPS):
            fn()
    return tt.do_bench(g.replay, warmup=10, rep=100, return_mode="median") * 1e3 / REPS


rows = []
for name, (b, h, s) in SHAPES.items():
    d = 72
    proj = torch.randn(b, s, 3, h, d, device=DEV, dtype=DT)  # as a fused projection leaves q, k, v
    q, k, v = (proj[:, :, i].transpose(1, 2) for i in range(3))
    want = ta.reference(q.float(), k.float(), v.float())
    out = torch.empty(b, h, s, d, device=DEV, dtype=DT)
    cands = {}
    if not a.smoke:
        cands["sdpa + copy"] = lambda: out.copy_(F.scaled_dot_product_attention(q, k, v))
        sms = torch.cuda.get_device_properties(0).multi_processor_count
        for c in ta.configs(s, b * h, sms)[:3]:
            for split_v in (False, True):
                tag = f"kiln {c['BLOCK_M']}x{c['BLOCK_N']} w{c['num_warps']} s{c['num_stages']}{' pv 64+16' if split_v else ''}"
                cands[tag] = lambda c=c, split_v=split_v: ta.attention(q, k, v, out=out, config=c, split_v=split_v)
    for c in CONFIGS:
        cands["tma {}x{} w{} s{}".format(*c)] = lambda c=c: tma_attention(q, k, v, out, c)
    for tag, fn in cands.items():
        try:
            out.zero_()
            us = graphed(fn)
            err = rel_err(out.float(), want)
        except Exception as e:  # (a config that does not compile: recorded, the others go on)
            rows.append({"shape": name, "candidate": tag, "failed": f"{type(e).__name__}: {str(e)[:160]}"})
            print(f"  {name}: {tag} failed: {type(e).__name__}: {str(e)[:160]}")
            continue
        rows.append({"shape": name, "candidate": tag, "us": round(us, 2), "err": float(f"{err:.3g}")})
    print(name)
    for r in sorted((r for r in rows if r["shape"] == name and "us" in r), key=lambda r: r["us"]):
        print(f"  {r['us']:8.2f} us  err {r['err']:.2e}  {r['candidate']}")
    bad = [r for r in rows if r["shape"] == name and r.get("err", 0) > 2e-2]
    if bad:
        print("  WRONG:", [r["candidate"] for r in bad])
path = os.path.join(os.environ.get("OUT", "/tmp"), "attn_tma.json")
with open(path, "w") as f:
    json.dump({"device": "cpu" if a.smoke else torch.cuda.get_device_name(), "rows": rows}, f, indent=1)
print("wrote", path)
