"""kiln.codegen.kernels.attention: the flash-attention template against the ATTENTION op's reference in float64
(CPU: the Triton interpreter, float16/float32, irregular shapes; GPU: bfloat16 at DiT-XL / Llama shapes)."""

import pytest
import torch

import kiln.codegen.kernels.attention as A
from kiln.codegen.kernels.attention import attention, reference
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter  # CPU cases run under TRITON_INTERPRET=1; gpu-marked ones need it off

gen = torch.Generator().manual_seed(0)


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def qkv(b, hq, hk, sq, sk, d, dtype, dv=None):
    return r(b, hq, sq, d, dtype=dtype), r(b, hk, sk, d, dtype=dtype), r(b, hk, sk, dv or d, dtype=dtype)


def check(q, k, v, mask=None, split_d=True, split_v=None, out=None, **kw):
    got = attention(q, k, v, mask, split_d=split_d, split_v=split_v, out=out, **kw)
    want = reference(q.double(), k.double(), v.double(), mask if mask is None or mask.dtype == torch.bool
                     else mask.double(), **kw)
    assert got.dtype == q.dtype and got.shape == want.shape
    err = rel_err(got, want)
    assert err <= TOL[q.dtype], f"rel err {err:.2e} > {TOL[q.dtype]:.0e}"
    return got


# with the 16 x 16 interpreter tiles: Sq = 13 is one partial query tile, Sk = 29 two key tiles (one
# partial), D = 72 runs as 64 + 16 lanes (SPLIT), D = 16 is the fast case
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [16, 64, 72])
def test_irregular_shapes(dtype, d):
    check(*qkv(2, 2, 2, 13, 29, d, dtype))


@pytest.mark.parametrize("d,widths", [(72, (64, 16)), (96, (64, 32)), (40, (32, 16)), (80, (64, 16)), (24, None),
                                      (64, None), (112, None), (16, None)])
def test_split_widths(d, widths):
    # two tiles only where they are narrower than one padded to the next power of two
    assert A.split_widths(d) == widths


def test_configs_put_64_row_tiles_first_where_128_row_ones_leave_sms_idle():
    # DiT-XL/2 at the CFG batch of 2: 32 heads x 2 tiles of 128 rows = 64 programs for 132 SMs
    assert A.configs(256, heads=32, sms=132)[0]["BLOCK_M"] == 64
    assert A.configs(256, heads=256, sms=132)[0]["BLOCK_M"] == 128  # batch 16: 512 programs
    assert A.configs(256)[0]["BLOCK_M"] == 128  # nothing known of the device: the list's order
    assert sorted(map(str, A.configs(256, heads=32, sms=132))) == sorted(map(str, A.configs(256)))
    assert A.configs(16, heads=1, sms=132) == A.configs(16)  # short queries: their own tiles


@pytest.mark.parametrize("d,dv", [(40, 40), (72, 72), (96, 96), (72, 24), (24, 72), (72, 20)])
@pytest.mark.parametrize("split_d,split_v", [(True, False), (False, False), (True, True)])
def test_head_dims_between_powers_of_two_split_or_padded(d, dv, split_d, split_v):
    # q k^T as SPLIT tiles (tail lanes masked past D) or one padded tile; p v (split_v) as a main tile and a window
    # of v's last lanes (72: 64 + 56..71, 20: 16 + 4..19); causal with a bias mask and gqa
    q, k, v = qkv(2, 4, 2, 21, 29, d, torch.float16, dv=dv)
    bias = r(2, 1, 21, 29, dtype=torch.float16)
    bias[..., 3:7] = float("-inf")
    check(q, k, v, bias, causal=True, gqa=True, split_d=split_d, split_v=split_v)


def test_split_v_window_lanes_written_once_and_quantized_v(monkeypatch):
    # the window's lanes also in the main tile (56..63 of 72) are stored from the main tile only: a NaN planted in
    # out's buffer where neither store writes would survive; an int8 v cache with its scales takes the window too
    monkeypatch.setattr(A, "SPLIT_V", True)
    q, k, v = qkv(1, 2, 2, 9, 19, 72, torch.float16)
    out = torch.full((1, 2, 9, 72), float("nan"), dtype=torch.float16)
    got = check(q, k, v, out=out)
    assert got.data_ptr() == out.data_ptr() and not got.isnan().any()
    codes = torch.randint(-127, 128, v.shape, dtype=torch.int8)
    scale = torch.rand(v.shape[:-1]) * 0.02
    want = attention(q, k, (codes.float() * scale[..., None]).half(), split_v=False)
    assert rel_err(attention(q, k, codes, v_scale=scale), want) <= TOL[torch.float16]


def test_split_with_strided_qkv_and_out_given():
    # DiT's layout: q, k, v views of one fused [B, S, 3, H, D] projection; out written in place
    qkv_ = r(2, 13, 3, 2, 72, dtype=torch.float16)
    q, k, v = (qkv_[:, :, i].transpose(1, 2) for i in range(3))
    out = torch.full((2, 2, 13, 72), float("nan"), dtype=torch.float16)
    assert attention(q, k, v, out=out) is out
    assert rel_err(out, reference(q.double(), k.double(), v.double())) <= TOL[torch.float16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sq,sk", [(37, 37), (13, 29), (29, 13), (1, 20)])
def test_causal(dtype, sq, sk):
    # square, and non-square both ways: upper-left aligned like SDPA's is_causal (Sq > Sk: rows past Sk see all)
    check(*qkv(1, 2, 2, sq, sk, 16, dtype), causal=True)


@pytest.mark.parametrize("bm,bn", [(32, 16), (16, 32)])
def test_causal_split_with_unequal_tiles(monkeypatch, bm, bn):
    # BLOCK_N < BLOCK_M: several fully visible key blocks before the diagonal; BLOCK_N > BLOCK_M: the query
    # tile at row 16 starts mid key block, so that block must take the triangle test
    monkeypatch.setitem(A.INTERPRET_CONFIG, "BLOCK_M", bm)
    monkeypatch.setitem(A.INTERPRET_CONFIG, "BLOCK_N", bn)
    check(*qkv(1, 1, 1, 70, 70, 16, torch.float32), causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa(dtype, causal):
    # query heads 0, 1 read kv head 0; heads 2, 3 read kv head 1
    check(*qkv(2, 4, 2, 13, 21, 16, dtype), causal=causal, gqa=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("causal", [False, True])
def test_softcapped_scores(dtype, causal):
    # Gemma 2: the scaled scores t soft-capped to c * tanh(t / c) before the mask; c = 1.5 bends most of them (|t| ~ 1-3)
    q, k, v = qkv(2, 4, 2, 13, 21, 16, dtype)
    q = q * 3
    mask = torch.rand(2, 1, 13, 21, generator=gen) > 0.3
    got = check(q, k, v, mask, causal=causal, gqa=True, softcap=1.5)
    assert rel_err(got, reference(q.double(), k.double(), v.double(), mask, causal=causal, gqa=True)) > 0.05  # (it bends)


def test_single_kv_head_and_batch_broadcast():
    q, k, v = qkv(2, 4, 1, 13, 21, 16, torch.float32)
    check(q, k, v)  # one kv head broadcasts without gqa (MQA)
    check(q, k[:1], v[:1], gqa=True)  # kv batch 1 broadcasts too


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(13, 29), (2, 1, 1, 29), (2, 3, 13, 29), (1, 13, 1)])
def test_bool_mask(dtype, shape):
    q, k, v = qkv(2, 3, 3, 13, 29, 16, dtype)
    mask = torch.rand(*shape, generator=gen) < 0.7
    mask[..., 0] = True  # every row keeps a key: the non-degenerate case SDPA and the kernel agree on
    check(q, k, v, mask)


def test_padding_mask_with_causal_and_gqa():
    # Llama-style batch with left padding: [B, 1, 1, Sk] bool, causal, grouped heads
    q, k, v = qkv(2, 4, 2, 21, 21, 16, torch.float16)
    mask = torch.ones(2, 1, 1, 21, dtype=torch.bool)
    mask[1, ..., 5:9] = False
    check(q, k, v, mask, causal=True, gqa=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(13, 29), (2, 1, 1, 29), (3, 1, 29)])
def test_float_bias_mask(dtype, shape):
    q, k, v = qkv(2, 3, 3, 13, 29, 16, dtype)
    bias = r(*shape, dtype=dtype)
    bias[..., 3:7] = float("-inf")  # -inf entries mask, as an additive mask does
    check(q, k, v, bias)


@pytest.mark.parametrize("scale", [0.05, 1.0])
def test_custom_scale_and_value_head_dim(scale):
    check(*qkv(1, 2, 2, 13, 29, 16, torch.float32, dv=24), scale=scale)


def test_lower_ranks_and_strided_inputs():
    q, k, v = qkv(1, 1, 1, 13, 29, 16, torch.float32)
    assert check(q[0], k[0], v[0]).shape == (1, 13, 16)  # [H, S, D]
    assert check(q[0, 0], k[0, 0], v[0, 0], causal=True).shape == (13, 16)  # [S, D]
    # [B, S, H, D] storage viewed as [B, H, S, D] (what a fused QKV projection leaves behind)
    qs, ks, vs = (r(2, n, 3, 16).transpose(1, 2) for n in (13, 29, 29))
    check(qs, ks, vs)


def test_out_given():
    q, k, v = qkv(1, 2, 2, 13, 29, 16, torch.float16)
    out = torch.empty(1, 2, 13, 16, dtype=torch.float16)
    assert attention(q, k, v, out=out) is out
    assert rel_err(out, reference(q.double(), k.double(), v.double())) <= TOL[torch.float16]


def test_fully_masked_rows_give_zeros():
    # documented behaviour (module docstring): zeros, not NaN; other rows unaffected
    q, k, v = qkv(1, 2, 2, 13, 29, 16, torch.float32)
    mask = torch.rand(13, 29, generator=gen) < 0.7
    mask[:, 0] = True
    mask[4] = False
    bias = torch.zeros(13, 29).masked_fill(~mask, float("-inf"))
    keep = torch.arange(13) != 4
    want = reference(q.double(), k.double(), v.double(), mask)
    for m in (mask, bias):
        got = attention(q, k, v, m)
        assert torch.equal(got[:, :, 4], torch.zeros(1, 2, 16))
        assert rel_err(got[:, :, keep], want[:, :, keep]) <= TOL[torch.float32]
    assert torch.equal(attention(q, k[:, :, :0], v[:, :, :0]), torch.zeros(1, 2, 13, 16))  # no keys at all


@pytest.mark.parametrize("change,match", [
    (dict(k=(1, 2, 29, 24)), "head dim"),
    (dict(v=(1, 2, 28, 16)), "k .* and v .* differ"),
    (dict(q=(1, 4, 13, 16), k=(1, 3, 29, 16), v=(1, 3, 29, 16), gqa=True), "4 query heads do not group over 3"),
    (dict(q=(1, 4, 13, 16)), "pass gqa=True"),
    (dict(k=(2, 2, 29, 16), v=(2, 2, 29, 16)), "batch"),
    (dict(q=(13, 16)), "rank"),
    (dict(q=(1, 2, 13, 300), k=(1, 2, 29, 300)), "head dims"),
    (dict(mask=(13, 28)), "does not broadcast"),
    (dict(mask=(2, 2, 13, 29)), "does not broadcast"),  # would widen the batch
    (dict(mask_dtype=torch.float16), "mask dtype"),
    (dict(k_dtype=torch.float16), "k has dtype"),
    (dict(q_dtype=torch.int32), "q has dtype"),
    (dict(out=(1, 2, 13, 17)), "out"),
])
def test_bad_operands_raise(change, match):
    q = r(*change.get("q", (1, 2, 13, 16))).to(change.get("q_dtype", torch.float32))
    k = r(*change.get("k", (1, 2, 29, 16)), dtype=change.get("k_dtype", torch.float32))
    v = r(*change.get("v", (1, 2, 29, 16)))
    mask = r(*change["mask"]) if "mask" in change else None
    if "mask_dtype" in change:
        mask = r(13, 29, dtype=change["mask_dtype"])
    out = torch.empty(change["out"]) if "out" in change else None
    with pytest.raises(ValueError, match=match):
        attention(q, k, v, mask, gqa=change.get("gqa", False), out=out)


def test_bfloat16_refused_by_the_interpreter():
    if not A.INTERPRET:
        pytest.skip("interpreter only")
    with pytest.raises(ValueError, match="bfloat16"):
        attention(*qkv(1, 1, 1, 16, 16, 16, torch.bfloat16))


# ----------------------------------------------------------------------------- GPU (bf16, real shapes)


def cuda_qkv(b, hq, hk, s, d, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(b, h, s, d, generator=g, device="cuda", dtype=torch.float32).to(dtype) for h in (hq, hk, hk)]


def check_against_fp32(q, k, v, mask=None, split_d=True, config=None, split_v=None, **kw):
    wide = torch.float64 if q.dtype == torch.float32 else torch.float32
    want = reference(q.to(wide), k.to(wide), v.to(wide), mask if mask is None or mask.dtype == torch.bool
                     else mask.to(wide), **kw)
    got = attention(q, k, v, mask, split_d=split_d, config=config, split_v=split_v, **kw)
    torch.cuda.synchronize()
    assert got.dtype == q.dtype and got.shape == want.shape
    err = rel_err(got, want)
    assert err <= TOL[q.dtype], f"rel err {err:.2e} > {TOL[q.dtype]:.0e}"
    return got


@pytest.mark.gpu
@pytest.mark.parametrize("split_d", [True, False])
def test_gpu_dit_xl(split_d):
    # DiT-XL/2 256x256 at batch 8: 16 heads of 72 over 256 tokens, no mask (64 + 16 lanes, or padded to 128)
    check_against_fp32(*cuda_qkv(8, 16, 16, 256, 72), split_d=split_d)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 16, 256), (8, 16, 256), (2, 16, 1024), (1, 16, 4096)],
                         ids=["dit-cfg", "dit-b8", "pixart512-cfg", "pixart1024"])
def test_gpu_split_v_every_config(shape):
    # p v as 64 lanes + a window of v's last 16 (SPLIT_V) at DiT's and PixArt's head dim 72, every launch config the
    # tuner may take, against float32 (session 10's masked-tail form of it came out wrong under triton 3.6)
    b, h, s = shape
    q, k, v = cuda_qkv(b, h, h, s, 72)
    for c in A.configs(s, b * h, torch.cuda.get_device_properties(0).multi_processor_count):
        check_against_fp32(q, k, v, config=c, split_v=True)


@pytest.mark.gpu
def test_gpu_llama_prefill_causal_gqa():
    # Llama-3.2-1B prefill: 32 query heads over 8 kv heads of 64, 512 tokens, causal
    assert check_against_fp32(*cuda_qkv(1, 32, 8, 512, 64), causal=True, gqa=True).shape == (1, 32, 512, 64)


@pytest.mark.gpu
@pytest.mark.parametrize("d", [128, 256])
def test_gpu_wide_heads_with_padding_mask(d):
    q, k, v = cuda_qkv(2, 4, 4, 333, d)
    mask = torch.ones(2, 1, 1, 333, dtype=torch.bool, device="cuda")
    mask[1, ..., 300:] = False
    check_against_fp32(q, k, v, mask, causal=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_other_dtypes_decode(dtype):
    # one query row against a long cache (the short-query configs); float32 must use IEEE dots
    q, k, v = cuda_qkv(2, 8, 2, 1000, 64, dtype=dtype)
    check_against_fp32(q[:, :, :1], k, v, gqa=True)
