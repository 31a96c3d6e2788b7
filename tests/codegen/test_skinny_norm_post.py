"""NORM_POST: the skinny template's RMSNorm prologue without its statistics pass. RMSNORM(x) @ W^T = rstd * ((x * w)
@ W^T) for each row's scalar rstd, so the main loop multiplies x's tiles (which it loads anyway) by the norm weight and
sums their squares, and the epilogue scales each row's products by 1 / rms (split-K: the splits' sums of squares added
in split order by the last program). Against the float64 reference of RMSNORM then the GEMM."""
import importlib.util
from pathlib import Path

import pytest
import torch

from kiln.codegen.kernels import pdl
from kiln.codegen.kernels.skinny import configs, counter_bytes, skinny_gemm, workspace_bytes
from kiln.testing import TOL, rel_err

_spec = importlib.util.spec_from_file_location("_test_skinny", Path(__file__).parent / "test_skinny.py")
_skinny_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_skinny_tests)
r, weight, check_norm, config = _skinny_tests.r, _skinny_tests.weight, _skinny_tests.check_norm, _skinny_tests.config
cuda_scratch, DECODE_SHAPES = _skinny_tests.cuda_scratch, _skinny_tests.DECODE_SHAPES


def scaled_rows(m, k, dtype):
    # rows of very different scale and a norm weight with a few large channels: a missed rstd or weight shows
    x = r(m, k, dtype=dtype) * torch.logspace(-1, 1, m, dtype=torch.float64)[:, None].to(dtype)
    nw = (1 + r(k, scale=0.2)).to(dtype)
    nw[[3, 77, k - 1]] = 8.0
    return x, nw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("m,swap", [(1, False), (3, False), (5, True), (16, True)])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_norm_post(bits, m, swap, split, dtype):
    # K = 200: 7 steps of 32, the last partial (its columns masked out of the squares too); the GEMV at one row, tl.dot
    # (swapped or not) at more; split-K's sums of squares reduced by the last program of each tile
    x, nw = scaled_rows(m, 200, dtype)
    check_norm(x, weight(37, 200, bits, dtype, group="K"), nw, config=dict(config(split, swap=swap), NORM_POST=True))


@pytest.mark.parametrize("split", [1, 2])
def test_norm_post_swapped_tile_wider_than_its_rows(split):
    # SWAP with BLOCK_N (64) > BLOCK_M (16), no GLU: the up half's accumulator is the unswapped first value and must not
    # be scaled (the tuner's candidates of this shape failed to compile on the H200, session 23)
    x, nw = scaled_rows(4, 96, torch.float16)
    post = dict(BLOCK_N=64, BLOCK_K=32, SPLIT_K=split, DOT=True, SWAP=True, NORM_POST=True)
    check_norm(x, weight(97, 96, None, torch.float16), nw, config=post)
    check_norm(x, weight(96, 96, None, torch.float16), nw, act="silu", glu=True, config=post)


@pytest.mark.parametrize("m", [1, 4])
def test_norm_post_epilogues_magic_and_prefetch(monkeypatch, m):
    # GLU with a bias, a residual; the MAGIC tile of a 4-bit weight (x times the norm weight before its permutation);
    # the first K step peeled (PREFETCH): the same bits as the loop
    x, nw = scaled_rows(m, 256, torch.float16)
    post = dict(config(2, dot=True, swap=True), NORM_POST=True)
    check_norm(x, weight(96, 256, None, torch.float16), nw, act="silu", glu=True, bias=r(96, dtype=torch.float16), config=post)
    check_norm(x, weight(40, 256, 8, torch.float16, group="K"), nw, residual=r(m, 40, dtype=torch.float16), config=post)
    magic = dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=2, DOT=True, SWAP=True, MAGIC=True, NORM_POST=True)
    wq = weight(96, 256, 4, torch.float16, group=64)
    check_norm(x, wq, nw, act="silu", glu=True, config=magic)
    wp = weight(40, 256, None, torch.float16)[0]
    plain = skinny_gemm(x, **wp, norm_weight=nw, norm_eps=1e-5, config=post)
    monkeypatch.setattr(pdl, "prefetch", lambda t, rows=1: True)
    assert torch.equal(skinny_gemm(x, **wp, norm_weight=nw, norm_eps=1e-5, config=post), plain)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits,group", [(4, 32), (8, "K")])
@pytest.mark.parametrize("split", [1, 3])
def test_words_norm_post(bits, group, split, dtype):
    # the WORDS GEMV (one row, x de-interleaved as the int32 words are) with NORM_POST: each step's x times the norm
    # weight and the word columns' squares summed, the row's 1 / rms after the loop. K = 416: steps of 16 words, the last
    # partial (its masked words add no squares); split-K reduced by the last program; GLU with a residual-free bias
    x, nw = scaled_rows(1, 416, dtype)
    c = dict(BLOCK_N=16, BLOCK_K=512 // bits, SPLIT_K=split, WORDS=True, NORM_POST=True)
    check_norm(x, weight(37, 416, bits, dtype, group=group), nw, config=c)
    check_norm(x, weight(64, 416, bits, dtype, group=group), nw, act="silu", glu=True, bias=r(64, dtype=dtype), config=c)


@pytest.mark.parametrize("bits", [4, 8])
def test_words_norm_post_prefetched_gives_the_same_bits(monkeypatch, bits):
    # the WORDS peel (its first step's words read before the PDL wait) with NORM_POST: bit for bit the plain loop
    x, nw = scaled_rows(1, 416, torch.float16)
    kw = weight(40, 416, bits, torch.float16, group="K")[0]
    c = dict(BLOCK_N=16, BLOCK_K=512 // bits, SPLIT_K=2, WORDS=True, NORM_POST=True)
    plain = skinny_gemm(x, **kw, norm_weight=nw, norm_eps=1e-5, config=c)
    monkeypatch.setattr(pdl, "prefetch_words", lambda t, bits: True)
    monkeypatch.setattr(pdl, "prefetch", lambda t, rows=1: True)  # (PDL is off on the CPU: without it no peel ran)
    assert torch.equal(skinny_gemm(x, **kw, norm_weight=nw, norm_eps=1e-5, config=c), plain)


def test_norm_post_config_checks():
    x, nw = scaled_rows(1, 128, torch.float32)
    kw = weight(16, 128, 4, torch.float32, group="K")[0]
    with pytest.raises(ValueError, match="needs split-K reduced by the last"):  # the two-launch reduction: no squares
        skinny_gemm(x, **kw, norm_weight=nw, norm_eps=1e-5, config=dict(config(2), REDUCE="separate", NORM_POST=True))
    with pytest.raises(ValueError, match="give norm_weight"):
        skinny_gemm(x, **kw, config=dict(config(1), NORM_POST=True))


@pytest.mark.parametrize("m,n,k,bits,glu", [(16, 3072, 2048, None, False), (16, 16384, 2048, None, True),
                                            (1, 3072, 2048, None, False), (1, 16384, 2048, 4, True)])
def test_norm_configs_offer_norm_post(m, n, k, bits, glu):
    normed = configs(m, n, k, bits, glu, norm=True)
    post = [c for c in normed if c.get("NORM_POST")]
    assert post and all(c.get("REDUCE", "last") == "last" for c in post)
    words = [c for c in normed if c.get("WORDS") and not c.get("NORM_POST")]
    assert [dict(c, NORM_POST=True) for c in words] == [c for c in post if c.get("WORDS")]  # (one row of a quantized weight)
    assert bool(words) == (m == 1 and bits is not None)
    assert not any(c.get("NORM_POST") for c in configs(m, n, k, bits, glu))
    for c in post:  # its sums of squares are workspace too
        splits = c["SPLIT_K"]
        if splits > 1:
            assert workspace_bytes(m, n, k, bits, glu, config=c) > workspace_bytes(m, n, k, bits, glu, config=dict(c, NORM_POST=False))
        assert counter_bytes(m, n, k, bits, glu, config=c) == counter_bytes(m, n, k, bits, glu, config=dict(c, NORM_POST=False))


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [None, 4, 8])
@pytest.mark.parametrize("name,k,n,epi", [DECODE_SHAPES[0], DECODE_SHAPES[1], DECODE_SHAPES[4], DECODE_SHAPES[5]])
def test_gpu_norm_post_every_config(name, k, n, epi, bits):
    # each NORM_POST configuration the tuner tries, 1 and 16 rows, bf16, against the float32 reference
    glu, act = epi.get("glu", False), epi.get("act", "none")
    for m in (1, 16):
        group = 128 if bits == 4 else "K"
        x, kwargs, _, _ = _skinny_tests.cuda_decode_case(m, k, n, bits, epi, group=group)
        nw = (1 + 0.2 * torch.randn(k, generator=torch.Generator().manual_seed(1))).to("cuda", torch.bfloat16)
        w32 = dict(w=kwargs["w"].float()) if bits is None else dict(kwargs, scales=kwargs["scales"].float())
        want = _skinny_tests.S.reference(x.float(), **w32, act=act, glu=glu, norm_weight=nw.float(), norm_eps=1e-5)
        for c in [c for c in configs(m, n, k, bits, glu, norm=True, group=128 if bits == 4 else None) if c.get("NORM_POST")]:
            ws, counters = cuda_scratch(m, n, k, bits, glu, c)
            got = skinny_gemm(x, act=act, glu=glu, norm_weight=nw, norm_eps=1e-5, workspace=ws, counters=counters,
                              config=c, **kwargs)
            err = rel_err(got, want)
            assert err <= TOL[torch.bfloat16], f"{name} m={m} bits={bits} {c}: rel err {err:.2e}"
            assert not counters.any(), c
