"""kiln.codegen.kernels.rope_kv: RoPE of q and k plus the KV-cache write of k and v in one launch, against a float64
reference (ROPE and index_copy in float64). CPU: the Triton interpreter, float16 / float32, irregular shapes, q / k / v
as strided views of one fused QKV output like the decode plan passes them; GPU: bfloat16 at Llama decode shapes."""

import pytest
import torch

from kiln.codegen.kernels.rope_kv import check, reference, rope_kv
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter

gen = torch.Generator().manual_seed(3)


def operands(B, T, H, KV, D, S, dtype, device="cpu", batch_cos=True):
    """q, k, v as views of one [B, T, (H + 2 KV) D] QKV output (what the step graph reads), cos / sin of random
    angles, T distinct slots of an S-slot cache, and caches that already hold values."""
    qkv = torch.randn(B, T, (H + 2 * KV) * D, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
    q, k, v = (x.view(B, T, -1, D).transpose(1, 2) for x in qkv.split([H * D, KV * D, KV * D], -1))
    angles = torch.rand(B if batch_cos else 1, 1, T, D // 2, generator=gen, dtype=torch.float64) * 20
    angles = torch.cat((angles, angles), -1).to(device)
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    slots = torch.randperm(S, generator=gen)[:T].to(device)
    caches = [torch.randn(B, KV, S, D, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for _ in range(2)]
    return q, k, v, cos, sin, slots, torch.empty_like(q), *caches


def run_check(args, dtype, norms=None):
    q, k, v, cos, sin, slots, q_out, kc, vc = args
    want = [t.double() for t in (q_out, kc, vc)]
    wide = None if norms is None else [None if n is None else (None if n[0] is None else n[0].double(), n[1]) for n in norms]
    reference(q.double(), k.double(), v.double(), cos.double(), sin.double(), slots, *want, wide)
    rope_kv(*args, norms)
    for got, w, name in zip((q_out, kc, vc), want, ("q_out", "k_cache", "v_cache")):
        assert rel_err(got, w) <= TOL[dtype], (name, rel_err(got, w))
    untouched = torch.ones(kc.shape[2], dtype=torch.bool)
    untouched[slots.cpu()] = False
    assert torch.equal(kc[:, :, untouched].double(), want[1][:, :, untouched])  # other slots keep their values


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("B,T,H,KV,D,S", [(1, 1, 4, 2, 18, 40), (3, 1, 6, 3, 72, 37), (2, 5, 4, 4, 26, 11)])
def test_rope_kv_matches_float64_reference(dtype, B, T, H, KV, D, S):
    run_check(operands(B, T, H, KV, D, S, dtype), dtype)


def test_rope_kv_cos_shared_by_rows_and_contiguous_q():
    q, k, v, cos, sin, slots, q_out, kc, vc = operands(3, 2, 4, 2, 36, 9, torch.float32, batch_cos=False)
    run_check((q.contiguous(), k, v, cos, sin, slots, q_out, kc, vc), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("which", ["q and k weighted", "q weighted", "k unweighted", "float32 weights"])
def test_rope_kv_with_per_head_norms(dtype, which):
    # Qwen3's q_norm / k_norm (schedule.rope_norm): each head's D values RMS-normalised before RoPE; q and k read as the
    # norms' inputs, strided views of the QKV output; heads of very different scales, so a norm that skips shows.
    # Gemma 3's: float32 weights (1 + w), applied before the one rounding
    args = list(operands(2, 3, 4, 2, 26, 11, dtype))
    args[0], args[1] = args[0] * torch.tensor([0.01, 1.0, 30.0, 3.0], dtype=dtype)[:, None, None], args[1] * 7
    wdt = torch.float32 if which == "float32 weights" else dtype
    w = [torch.randn(26, generator=gen, dtype=torch.float64).to(wdt) + 1 for _ in range(2)]
    norms = {"q and k weighted": [(w[0], 1e-6), (w[1], 1e-5)], "q weighted": [(w[0], 1e-6), None],
             "k unweighted": [None, (None, 1e-5)], "float32 weights": [(w[0], 1e-6), (w[1], 1e-6)]}[which]
    run_check(args, dtype, norms)


def test_the_reference_applies_a_float32_weight_before_rounding():
    # Gemma 3's q / k norm: (x.float() * rstd * w).to(x's dtype), one rounding (Qwen3's rounds before the weight)
    q, k, v, cos, sin, slots, q_out, kc, vc = operands(1, 1, 4, 2, 18, 40, torch.float16)
    w = torch.rand(18, generator=gen) + 0.5
    x = q.float()
    want = (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w).half()
    ones, zeros = torch.ones_like(cos), torch.zeros_like(sin)
    reference(q, k, v, ones, zeros, slots, q_out, kc, vc, [(w, 1e-6), None])
    assert torch.equal(q_out, want)


def test_check_declines_with_a_reason():
    q, k, v, cos, sin, slots, q_out, kc, vc = operands(1, 1, 4, 2, 18, 40, torch.float32)
    assert check(q, k, v, cos, sin, slots, q_out, kc, vc) is None
    assert "k_cache" in check(q, k, v, cos, sin, slots, q_out, kc[..., :16], vc)
    assert "cos" in check(q, k, v, cos[..., :16], sin, slots, q_out, kc, vc)
    assert "slots" in check(q, k, v, cos, sin, slots.float(), q_out, kc, vc)
    with pytest.raises(ValueError, match="rope_kv"):
        rope_kv(q, k, v[..., :16], cos, sin, slots, q_out, kc, vc)
    assert "k's norm weight [16]" in check(q, k, v, cos, sin, slots, q_out, kc, vc, [None, (torch.ones(16), 1e-6)])
    assert "q's norm weight" in check(q, k, v, cos, sin, slots, q_out, kc, vc, [(torch.ones(36)[::2], 1e-6), None])


@pytest.mark.gpu
@pytest.mark.parametrize("norm", [False, True], ids=["llama", "qwen3-norms"])
@pytest.mark.parametrize("B,H,KV", [(1, 32, 8), (16, 32, 8)])
def test_rope_kv_bfloat16_llama_decode_shapes(B, H, KV, norm):
    w = [torch.randn(128, generator=gen).to("cuda", torch.bfloat16) + 1 for _ in range(2)]
    run_check(operands(B, 1, H, KV, 128, 4096, torch.bfloat16, device="cuda"), torch.bfloat16,
              [(w[0], 1e-6), (w[1], 1e-6)] if norm else None)
