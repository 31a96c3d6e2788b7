"""kiln.codegen.kernels.decode_attention with ``rope=``: RoPE of q and k (Qwen3: after their per-head norms) and the
KV-cache writes of k and v in the attention's own launch, against kernels/rope_kv.py then the attention (the same bits:
the same float32 expressions, rounded once; with norms within a rounding) and a float64 reference. CPU: the Triton
interpreter, float16 / float32, 16-key tiles; GPU: bfloat16 at Llama-3.2-1B's decode shapes, replayed from a CUDA
graph."""

import zlib

import pytest
import torch

import kiln.codegen.kernels.decode_attention as DA
from kiln.codegen.kernels.decode_attention import decode_attention, reference
from kiln.codegen.kernels.rope_kv import rope_kv
from kiln.ir.ops_fused import rotate_half
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter

gen = torch.Generator().manual_seed(5)


@pytest.fixture(autouse=True)
def _seeded(request):
    # each test's operands from its own seed, whichever tests ran before it in this process (pytest -n 2 spreads them)
    gen.manual_seed(zlib.crc32(request.node.name.encode()))


def step(B, H, KV, T, D, S, pos, dtype, device="cpu"):
    """A decode step's operands: q / k / v as views of one [B, T, (H + 2 KV) D] QKV output, cos / sin of random angles,
    the T slots pos .. pos + T - 1 of an S-slot cache that already holds values, and the mask attending 0 .. its slot."""
    qkv = torch.randn(B, T, (H + 2 * KV) * D, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    q, k, v = (x.view(B, T, -1, D).transpose(1, 2) for x in qkv.split([H * D, KV * D, KV * D], -1))
    angles = torch.rand(B, 1, T, D // 2, generator=gen, dtype=torch.float64) * 20
    angles = torch.cat((angles, angles), -1).to(device)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    slots = torch.arange(pos, pos + T, device=device)
    caches = [torch.randn(B, KV, S, D, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for _ in range(2)]
    mask = torch.arange(S, device=device) <= slots[:, None]  # [T, S]
    return q, k, v, cos, sin, slots, caches, mask.expand(B, 1, T, S)


def both(args, mode, early=False, norms=None, **kw):
    """(fused output, its caches), (rope_kv then the attention: output, caches), from the same starting caches.
    ``early``: the fused kernel loads each chunk's first K / V tile before the new keys are written; ``norms``: q's and
    k's RMSNORM over each head first (rope_kv's)."""
    q, k, v, cos, sin, slots, caches, mask = args
    B, KV = k.shape[:2]
    mode_kw = dict(splits=1) if mode == "direct" else \
        dict(counters=torch.zeros(DA.counter_bytes(B, KV), dtype=torch.uint8, device=q.device)) if mode == "last" else {}
    kc, vc = (c.clone() for c in caches)
    q_roped = torch.empty_like(q)
    rope_kv(q, k, v, cos, sin, slots, q_roped, kc, vc, norms)
    want = decode_attention(q_roped, kc, vc, mask, gqa=True, **mode_kw, **kw)
    kc2, vc2 = (c.clone() for c in caches)
    got = decode_attention(q, kc2, vc2, mask, gqa=True, rope=(k, v, cos, sin, slots, norms), early=early, **mode_kw, **kw)
    assert "counters" not in mode_kw or not mode_kw["counters"].any()
    return (got, kc2, vc2), (want, kc, vc)


def float64_answer(args, norms=None):
    q, k, v, cos, sin, slots, caches, mask = (a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                                              for a in args)
    kc, vc = (c.double() for c in caches)
    for n, x in zip(norms or (), "qk"):
        if n is not None:
            y = q if x == "q" else k
            y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + n[1]) * (1 if n[0] is None else n[0].double())
            q, k = (y, k) if x == "q" else (q, y)
    kc[:, :, slots] = k * cos + rotate_half(k) * sin
    vc[:, :, slots] = v
    return reference(q * cos + rotate_half(q) * sin, kc, vc, mask, gqa=True)


# S = 45 in 16-key tiles: the new key in the first, middle or last chunk; two new tokens straddling chunks
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["reduce", "last", "direct"])
@pytest.mark.parametrize("T,pos", [(1, 3), (1, 20), (1, 44), (2, 31)])
@pytest.mark.parametrize("D", [64, 72])
@pytest.mark.parametrize("early", [False, True])
def test_the_same_bits_as_rope_kv_then_attention(dtype, mode, T, pos, D, early):
    args = step(2, 4, 2, T, D, 45, pos, dtype)
    (got, kc, vc), (want, kc_want, vc_want) = both(args, mode, early)
    assert torch.equal(kc, kc_want) and torch.equal(vc, vc_want)
    assert torch.equal(got, want)
    assert rel_err(got, float64_answer(args)) <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["last", "direct"])
@pytest.mark.parametrize("which", ["both weighted", "k unweighted", "float32 weights"])
def test_qwen3_norms_as_rope_kv_then_attention(dtype, mode, which):
    # q_norm / k_norm over each head before RoPE: the caches and the output as rope_kv(norms) then the attention give
    # (within a rounding: the head's squares summed in another order), and float64's; heads of very different scales.
    # (Gemma 3's norms: float32 weights on 16-bit q and k)
    q, k, v, cos, sin, slots, caches, mask = step(2, 4, 2, 2, 72, 45, 20, dtype)
    q = q * torch.tensor([0.01, 1.0, 30.0, 3.0], dtype=dtype)[:, None, None]
    wdt = torch.float32 if which == "float32 weights" else dtype
    w = [torch.randn(72, generator=gen, dtype=torch.float64).to(wdt) + 1 for _ in range(2)]
    norms = [None, (None, 1e-5)] if which == "k unweighted" else [(w[0], 1e-6), (w[1], 1e-5)]
    args = (q, k, v, cos, sin, slots, caches, mask)
    (got, kc, vc), (want, kc_want, vc_want) = both(args, mode, True, norms)
    assert rel_err(kc, kc_want) <= TOL[dtype] and torch.equal(vc, vc_want) and rel_err(got, want) <= TOL[dtype]
    assert rel_err(got, float64_answer(args, norms)) <= TOL[dtype]


def test_a_slot_nobody_attends_is_still_written():
    # the mask attends keys 0 .. 9 only; the new key goes to slot 40 (past every attended key): written all the same
    q, k, v, cos, sin, slots, caches, mask = step(1, 4, 2, 1, 64, 45, 40, torch.float32)
    mask = (torch.arange(45) < 10).expand(1, 1, 1, 45)
    (got, kc, vc), (want, kc_want, vc_want) = both((q, k, v, cos, sin, slots, caches, mask), "reduce", True, splits=3)
    assert torch.equal(kc, kc_want) and torch.equal(vc, vc_want) and torch.equal(got, want)
    assert not torch.equal(kc[:, :, 40], caches[0][:, :, 40])


def test_errors():
    q, k, v, cos, sin, slots, (kc, vc), mask = step(1, 4, 2, 1, 64, 45, 3, torch.float32)
    with pytest.raises(ValueError, match="rope must be"):
        decode_attention(q, kc, vc, mask, gqa=True, rope=(k, v, cos, sin))
    with pytest.raises(ValueError, match="slots"):
        decode_attention(q, kc, vc, mask, gqa=True, rope=(k, v, cos, sin, slots[None]))
    with pytest.raises(ValueError, match="cos / sin"):
        decode_attention(q, kc, vc, mask, gqa=True, rope=(k, v, cos[..., :32], sin[..., :32], slots))
    with pytest.raises(ValueError, match="must write this step's keys itself"):
        decode_attention(q, kc, vc, mask, gqa=True, early=True)
    scale = torch.ones(1, 2, 45)
    with pytest.raises(ValueError, match="16-bit cache"):
        decode_attention(q, kc.to(torch.int8), vc.to(torch.int8), mask, gqa=True, k_scale=scale, v_scale=scale,
                         rope=(k, v, cos, sin, slots))


@pytest.mark.gpu
@pytest.mark.parametrize("norm", [False, True], ids=["llama", "qwen3-norms"])
@pytest.mark.parametrize("B", [1, 16])
@pytest.mark.parametrize("mode", ["reduce", "last"])
@pytest.mark.parametrize("early", [False, True])
def test_llama_1b_decode_on_cuda(B, mode, early, norm):
    """Llama-3.2-1B at batch 1 / 16, 384 slots, the new key at 200: against rope_kv then the attention (within a bf16
    rounding: the GPU may contract the float32 products otherwise in the two kernels) and float64, replayed from a
    CUDA graph with the counters left zero. (``norm``: with Qwen3's q / k norms.)"""
    args = step(B, 32, 8, 1, 64, 384, 200, torch.bfloat16, "cuda")
    w = [torch.randn(64, generator=gen).to("cuda", torch.bfloat16) + 1 for _ in range(2)]
    norms = [(w[0], 1e-6), (w[1], 1e-6)] if norm else None
    cfg = dict(BLOCK_N=64, num_warps=4, num_stages=2)
    (got, kc, vc), (want, kc_want, vc_want) = both(args, mode, early, norms, config=cfg)
    assert rel_err(kc, kc_want) <= 1e-2 and torch.equal(vc, vc_want)
    assert rel_err(got, want) <= 1e-2 and rel_err(got, float64_answer(args, norms)) <= TOL[torch.bfloat16]
    q, k, v, cos, sin, slots, _, mask = args
    counters = torch.zeros(DA.counter_bytes(B, 8), dtype=torch.uint8, device="cuda") if mode == "last" else None
    out = torch.empty_like(q)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, kc, vc, mask, gqa=True, config=cfg, counters=counters, out=out,
                         rope=(k, v, cos, sin, slots, norms), early=early)
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, got) and (counters is None or not counters.any())
