"""Kernel timings on the GPU: kiln's Triton GEMM (fused epilogues) and attention vs what torch eager runs
for the same math (cuBLAS + separate epilogue ops; SDPA), at DiT-XL/2 and Llama-3.2-1B shapes, bf16.
Medians of triton.testing.do_bench, all in ONE process. Writes $OUT/kernels.json.
(Not named kernels.py: a file of that name on sys.path shadows the `kernels` package transformers imports.)"""
import json
import os

import torch
import torch.nn.functional as F
import triton

from kiln.codegen.kernels.attention import attention
from kiln.codegen.kernels.gemm import gemm
from kiln.testing import rel_err

dev, bf = "cuda", torch.bfloat16
res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__, "gemm": [], "attention": []}


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def r(*s):
    return torch.randn(*s, device=dev, dtype=bf)


GEMMS = [  # (name, M-shape, K, N, epilogue)
    ("dit b8 qkv", (8, 256), 1152, 3456, {}),
    ("dit b8 fc1+gelu_tanh", (8, 256), 1152, 4608, {"act": "gelu_tanh", "bias": True}),
    ("dit b8 fc2+gate+residual", (8, 256), 4608, 1152, {"bias": True, "gate": True, "residual": True}),
    ("dit b1 fc1+gelu_tanh", (1, 256), 1152, 4608, {"act": "gelu_tanh", "bias": True}),
    ("dit adaLN b1 (28x6x1152)", (1,), 1152, 193536, {"bias": True}),
    ("llama1b prefill512 gate/up glu", (1, 512), 2048, 16384, {"glu": True, "act": "silu"}),
    ("llama1b prefill512 down+residual", (1, 512), 8192, 2048, {"residual": True}),
    ("llama1b decode b1 qkv", (1, 1), 2048, 3072, {}),
]
for name, lead, k, n, e in GEMMS:
    x, w = r(*lead, k), r(n, k) * k ** -0.5
    n_out = n // 2 if e.get("glu") else n
    b = r(n) if e.get("bias") else None
    g = r(lead[0], 1, n_out) if e.get("gate") else None
    res_t = r(*lead, n_out) if e.get("residual") else None
    act, glu = e.get("act", "none"), e.get("glu", False)

    def eager():
        h = F.linear(x, w, b)
        if glu:
            a, u = h.chunk(2, -1)
            h = F.silu(a) * u
        elif act == "gelu_tanh":
            h = F.gelu(h, approximate="tanh")
        if g is not None:
            h = g * h
        return h + res_t if res_t is not None else h

    def ours():
        return gemm(x, w, bias=b, gate=g, residual=res_t, act=act, glu=glu)
    err = rel_err(ours().float(), eager().float())
    t_k, t_e, t_mm = bench(ours), bench(eager), bench(lambda: F.linear(x, w, b))
    m = x.numel() // k
    res["gemm"].append({"name": name, "M": m, "K": k, "N": n, "kiln_ms": t_k, "torch_eager_ms": t_e, "cublas_matmul_only_ms": t_mm,
                        "kiln_tflops": 2 * m * n * k / t_k / 1e9, "rel_err_vs_eager": err})
    print(res["gemm"][-1], flush=True)

ATTN = [  # (name, B, Hq, Hk, S, D, causal)
    ("dit b8", 8, 16, 16, 256, 72, False),
    ("dit b1", 1, 16, 16, 256, 72, False),
    ("llama1b prefill 512", 1, 32, 8, 512, 64, True),
    ("llama1b prefill 2048", 1, 32, 8, 2048, 64, True),
]
for name, bsz, hq, hk, s, d, causal in ATTN:
    q, k, v = r(bsz, hq, s, d), r(bsz, hk, s, d), r(bsz, hk, s, d)

    def ours():
        return attention(q, k, v, causal=causal, gqa=hq != hk)

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hk)
    err = rel_err(ours().float(), sdpa().float())
    res["attention"].append({"name": name, "kiln_ms": bench(ours), "sdpa_ms": bench(sdpa), "rel_err_vs_sdpa": err})
    print(res["attention"][-1], flush=True)

with open(os.path.join(os.environ.get("OUT", "/tmp"), "kernels.json"), "w") as f:
    json.dump(res, f, indent=1)
