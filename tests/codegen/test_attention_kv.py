"""Attention on a quantized KV cache (int8 / float8 e4m3 codes + float32 scales, kiln.ir.kv_quant): the split-KV decode
kernel and the flash kernel dequantizing each K / V tile in registers, and the ATTENTION candidates of codegen/lower.py
(SDPA reading a scratch dequantized first), against float64 references on irregular shapes (CPU: the Triton
interpreter, float16 / float32; GPU: bfloat16 at Llama-3.2-1B shapes)."""
import pytest
import torch

from kiln.codegen import lower_attention as lower
from kiln.codegen.kernels.attention import attention
from kiln.codegen.kernels.decode_attention import decode_attention, reference
from kiln.ir.kv_quant import KV_DTYPES, quantize_kv
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter  # CPU cases run under TRITON_INTERPRET=1; gpu-marked ones need it off

gen = torch.Generator().manual_seed(0)


def r(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)


def operands(b, hq, hk, sq, s, d, dtype, kv, which="kv", device="cpu"):
    """q, k, v and the scales: k / v quantized as ``which`` says (their codes and scales), else of q's dtype."""
    q, k, v = r(b, hq, sq, d, dtype=dtype, device=device), r(b, hk, s, d, device=device), r(b, hk, s, d, device=device)
    k, ks = quantize_kv(k, kv) if "k" in which else (k.to(dtype), None)
    v, vs = quantize_kv(v, kv) if "v" in which else (v.to(dtype), None)
    return q, k, v, ks, vs


def left_padded(pads, sq, s, pos):
    """[B, 1, Sq, S] bool: row b attends keys pads[b] .. pos + i (its new tokens at slots pos .., causal)."""
    j = torch.arange(s)
    return (j >= torch.tensor(pads)[:, None, None, None]) & (j <= (pos + torch.arange(sq))[:, None])


def check(fn, q, k, v, ks, vs, mask=None, **kw):
    got = fn(q, k, v, mask, k_scale=ks, v_scale=vs, **kw)
    if kw.get("causal"):
        keep = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        mask = keep if mask is None else mask & keep
    want = reference(q.double(), k, v, mask, gqa=kw.get("gqa", False), k_scale=ks, v_scale=vs)
    assert got.dtype == q.dtype and got.shape == want.shape
    err = rel_err(got, want)
    assert err <= TOL[q.dtype], f"rel err {err:.2e} > {TOL[q.dtype]:.0e}"
    return got


# S = 45 keys with 16-key tiles: three chunks, the last partial; D = 64 and 128; GQA 4 / 2 with a left-padded mask
@pytest.mark.parametrize("kv", list(KV_DTYPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("sq", [1, 3])
def test_decode(kv, dtype, d, sq):
    q, k, v, ks, vs = operands(3, 4, 2, sq, 45, d, dtype, kv)
    check(decode_attention, q, k, v, ks, vs, left_padded([0, 7, 20], sq, 45, pos=40), gqa=True)


@pytest.mark.parametrize("kv", list(KV_DTYPES))
@pytest.mark.parametrize("which", ["k", "v"])
def test_decode_one_of_k_v_quantized_and_splits(kv, which):
    q, k, v, ks, vs = operands(1, 4, 2, 2, 61, 64, torch.float16, kv, which)
    one = check(decode_attention, q, k, v, ks, vs, gqa=True, splits=1)
    assert rel_err(check(decode_attention, q, k, v, ks, vs, gqa=True, splits=4), one) <= TOL[torch.float16]


# Sq = 13 (one partial query tile), Sk = 29 (two key tiles, one partial), D = 72 runs as 64 + 16 lanes (SPLIT)
@pytest.mark.parametrize("kv", list(KV_DTYPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [64, 72, 128])
def test_flash(kv, dtype, d):
    q, k, v, ks, vs = operands(2, 4, 2, 13, 29, d, dtype, kv)
    mask = torch.rand(2, 1, 13, 29, generator=gen) < 0.7
    mask[..., 0] = True
    check(attention, q, k, v, ks, vs, mask, gqa=True)


@pytest.mark.parametrize("which", ["k", "v"])
def test_flash_causal_one_of_k_v_quantized(which):
    q, k, v, ks, vs = operands(1, 2, 2, 37, 37, 64, torch.float16, "int8", which)
    check(attention, q, k, v, ks, vs, causal=True)


@pytest.mark.parametrize("fn", [attention, decode_attention])
def test_bad_scales_raise(fn):
    q, k, v, ks, vs = operands(1, 2, 2, 1, 20, 16, torch.float32, "int8")
    for kw, match in ((dict(k_scale=ks[..., :-1], v_scale=vs), "quantized k"), (dict(k_scale=ks.double(), v_scale=vs), "quantized k"),
                      (dict(k_scale=None, v_scale=vs), "k has dtype torch.int8"), (dict(k_scale=ks, v_scale=vs, kv=True), "quantized k")):
        kk = k.float() if kw.pop("kv", False) else k  # float values given a scale
        with pytest.raises(ValueError, match=match):
            fn(q, kk, v, **kw)


# ----------------------------------------------------------------------------- the candidates (codegen/lower.py)


def candidates(q, k, v, ks, vs, mask):
    """lower.attention's candidates for ATTENTION(q, k, v, mask, ks, vs), with the scratch the kernels plan gives."""
    attrs = dict(causal=False, scale=None, gqa=True, k_scale=ks is not None, v_scale=vs is not None)
    shape = lower.attention_scratch(tuple(q.shape), tuple(k.shape), tuple(v.shape), attrs, q.dtype, q.device)
    scratch = torch.full(shape, float("nan"), dtype=q.dtype) if shape else None
    out = torch.empty_like(q)
    args = [q, k, v, mask] + [s for s in (ks, vs) if s is not None]
    what, cands = lower.attention(args, attrs, out, scratch, q.device)
    return shape, what, cands, out


@pytest.mark.parametrize("kv", list(KV_DTYPES))
def test_prefill_candidates_include_sdpa_on_a_dequantized_scratch(kv):
    # 33 query rows x 4 heads per kv head = 132 rows: more than the decode kernel takes, so SDPA is offered, on a scratch
    q, k, v, ks, vs = operands(2, 8, 2, 33, 40, 16, torch.float32, kv)
    mask = left_padded([0, 5], 33, 40, pos=7)
    shape, what, cands, out = candidates(q, k, v, ks, vs, mask)
    assert shape == (2 * k.numel(),) and what["codes"] == [str(k.dtype)] * 2
    assert sorted(c.split(":")[0] for c in cands) == ["kiln", "sdpa"]
    want = reference(q.double(), k, v, mask, gqa=True, k_scale=ks, v_scale=vs)
    for name, run in cands.items():
        out.fill_(float("nan"))
        run()
        assert rel_err(out, want) <= TOL[torch.float32], name


def test_decode_candidates_read_the_codes_alone():
    # a decode step: no scratch (it would cost a dequantized copy of the cache), so no SDPA; a plain cache keeps SDPA
    q, k, v, ks, vs = operands(2, 8, 2, 1, 40, 16, torch.float32, "int8", which="v")
    mask = left_padded([0, 5], 1, 40, pos=30)
    shape, _, cands, out = candidates(q, k, v, ks, vs, mask)
    assert shape is None and sorted(c.split(":")[0] for c in cands) == ["kiln", "kiln-decode", "kiln-decode-whole"]
    want = reference(q.double(), k, v, mask, gqa=True, v_scale=vs)
    for name, run in cands.items():
        run()
        assert rel_err(out, want) <= TOL[torch.float32], name
    _, _, plain, _ = candidates(q, k, v.float() * vs[..., None], None, None, mask)
    assert "sdpa" in plain


@pytest.mark.parametrize("s", [lower.WHOLE_MAX_KEYS, lower.WHOLE_MAX_KEYS + 1])
def test_one_split_offered_only_on_a_short_cache(s):
    # tuned at the prompt's length, one split would look cheap and then stream a long context in a few programs alone
    q, k, v, _, _ = operands(1, 4, 2, 1, s, 16, torch.float32, "int8", which="")
    _, what, cands, _ = candidates(q, k, v, None, None, left_padded([0], 1, s, pos=10))
    whole = ["kiln-decode-whole"] if s <= lower.WHOLE_MAX_KEYS else []
    assert sorted(c.split(":")[0] for c in cands) == ["kiln", "kiln-decode", *whole, "sdpa"]
    assert what["decode"] == lower.DECODE_CANDIDATES == 7


def test_a_decode_attention_is_timed_at_the_prompt_and_at_the_whole_cache():
    # tuned at its first step, the plan then runs while the mask grows to the cache's end: each candidate's timing runs
    # it over the example mask, then over every key (the plan itself runs the candidate alone)
    q, k, v, _, _ = operands(1, 4, 2, 1, 40, 16, torch.float32, "int8", which="")
    mask = left_padded([0], 1, 40, pos=6)
    _, what, cands, out = candidates(q, k, v, None, None, mask)
    assert what["cache"] == "cold"  # (and timed after L2 is flushed: the step reads the cache once)
    want = {m: decode_attention(q, k, v, mm, gqa=True) for m, mm in (("prompt", mask), ("cache", torch.ones_like(mask)))}
    assert rel_err(want["prompt"], want["cache"]) > 0.1
    for name, fn in cands.items():
        fn()
        assert rel_err(out, want["prompt"]) <= TOL[torch.float32], name
        fn.timing()
        assert rel_err(out, want["cache"]) <= TOL[torch.float32], name  # (its last run: every key attended)


# ----------------------------------------------------------------------------- GPU (bf16, real shapes)


@pytest.mark.gpu
@pytest.mark.parametrize("kv", list(KV_DTYPES))
@pytest.mark.parametrize("b,s", [(1, 4096), (16, 2048), (64, 384)])
def test_gpu_llama_decode(kv, b, s):
    # Llama-3.2-1B decode: 32 query heads over 8 kv heads of 64, one new token, a left-padded cache
    q, k, v, ks, vs = operands(b, 32, 8, 1, s, 64, torch.bfloat16, kv, device="cuda")
    mask = left_padded([i * 7 % 100 for i in range(b)], 1, s, pos=s - 1).cuda()
    check(decode_attention, q, k, v, ks, vs, mask, gqa=True)


@pytest.mark.gpu
@pytest.mark.parametrize("kv", list(KV_DTYPES))
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_llama_prefill(kv, d):
    q, k, v, ks, vs = operands(2, 32, 8, 512, 512, d, torch.bfloat16, kv, device="cuda")
    check(attention, q, k, v, ks, vs, causal=True, gqa=True)
