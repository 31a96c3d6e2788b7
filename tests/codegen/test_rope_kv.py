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


def run_check(args, dtype):
    q, k, v, cos, sin, slots, q_out, kc, vc = args
    want = [t.double() for t in (q_out, kc, vc)]
    reference(q.double(), k.double(), v.double(), cos.double(), sin.double(), slots, *want)
    rope_kv(*args)
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


def test_check_declines_with_a_reason():
    q, k, v, cos, sin, slots, q_out, kc, vc = operands(1, 1, 4, 2, 18, 40, torch.float32)
    assert check(q, k, v, cos, sin, slots, q_out, kc, vc) is None
    assert "k_cache" in check(q, k, v, cos, sin, slots, q_out, kc[..., :16], vc)
    assert "cos" in check(q, k, v, cos[..., :16], sin, slots, q_out, kc, vc)
    assert "slots" in check(q, k, v, cos, sin, slots.float(), q_out, kc, vc)
    with pytest.raises(ValueError, match="rope_kv"):
        rope_kv(q, k, v[..., :16], cos, sin, slots, q_out, kc, vc)


@pytest.mark.gpu
@pytest.mark.parametrize("B,H,KV", [(1, 32, 8), (16, 32, 8)])
def test_rope_kv_bfloat16_llama_decode_shapes(B, H, KV):
    run_check(operands(B, 1, H, KV, 128, 4096, torch.bfloat16, device="cuda"), torch.bfloat16)
