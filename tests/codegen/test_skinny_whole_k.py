"""WHOLE_K_WORDS: one row's 16-row WORDS tiles (IDOT at 4 bits) over a whole K step of 2048 codes, unsplit, so that the
peel reads a 1B qkv / o program's whole weight slice before its PDL wait. CPU: the configurations the switch adds and
their sums against the float64 reference under the interpreter; GPU: bfloat16 at the 1B's shapes."""
import importlib.util
from pathlib import Path

import pytest
import torch

import kiln.codegen.kernels.skinny as S
from kiln.codegen.kernels.skinny import configs, skinny_gemm
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter

_spec = importlib.util.spec_from_file_location("_test_skinny", Path(__file__).parent / "test_skinny.py")
_skinny_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_skinny_tests)
r, weight, check = _skinny_tests.r, _skinny_tests.weight, _skinny_tests.check
DECODE_SHAPES, cuda_decode_case, cuda_scratch = _skinny_tests.DECODE_SHAPES, _skinny_tests.cuda_decode_case, _skinny_tests.cuda_scratch


@pytest.mark.parametrize("bits", [4, 8])
def test_whole_k_words_tiles_offered_with_the_switch(monkeypatch, bits):
    """With skinny.WHOLE_K_WORDS (the default) one row of a quantized weight also tries a 16-row WORDS tile (IDOT at 4
    bits) over a whole K step of 2048 codes, unsplit, and with the norm its NORM_POST twin; without it, nothing else
    changes. Each computes the reference's product at the interpreter's scale (K = 256: the step capped at K), the GLU
    and the norm included."""
    n, k = 48, 256
    monkeypatch.setattr(S, "WHOLE_K_WORDS", False)
    base, rows3 = configs(1, n, k, bits, norm=True, group=64), configs(3, n, k, bits, norm=True)
    monkeypatch.setattr(S, "WHOLE_K_WORDS", True)
    cs = configs(1, n, k, bits, norm=True, group=64)
    new = [c for c in cs if c not in base]
    whole = dict(BLOCK_N=16, BLOCK_K=k, SPLIT_K=1, DOT=False, WORDS=True, num_warps=8, num_stages=3) | (
        {"IDOT": True} if bits == 4 else {})
    assert new == [whole, dict(whole, NORM_POST=True)] and [c for c in cs if c not in new] == base
    assert dict(whole, BLOCK_K=2048) in configs(1, 3072, 2048, bits)  # (the 1B's qkv: its K in one step)
    assert configs(3, n, k, bits, norm=True) == rows3  # (one row only)
    x = r(1, k, dtype=torch.float16)
    nw = r(k, dtype=torch.float16, scale=0.2) + 1
    wq = weight(2 * n, k, bits, torch.float16, group=64)
    got = skinny_gemm(x, act="silu", glu=True, norm_weight=nw, norm_eps=1e-5, **wq[0], config=dict(whole, NORM_POST=True))
    want = S.reference(x.double(), act="silu", glu=True, norm_weight=nw.double(), norm_eps=1e-5,
                       **{k_: (v.double() if k_ == "scales" else v) for k_, v in wq[0].items()})
    assert rel_err(got, want) <= TOL[torch.float16]
    check(x, weight(n, k, bits, torch.float16, group=64), residual=r(1, n, dtype=torch.float16), config=whole)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("post", [False, True])
def test_whole_k_step_without_the_loop_gives_the_same_bits(monkeypatch, bits, post):
    """qgemm.ONE_STEP: a whole-K WORDS tile runs its one step without the K loop (whose pipelined prologue loaded a
    next step that never came), its words read before the PDL wait (the peel) or not: the bits of the loop, for the
    GLU with the norm prologue or NORM_POST and for a residual."""
    from kiln.codegen.kernels import pdl, qgemm
    n, k = 40, 256
    whole = dict(BLOCK_N=16, BLOCK_K=k, SPLIT_K=1, DOT=False, WORDS=True, num_warps=8, num_stages=3) | (
        {"IDOT": True} if bits == 4 else {}) | ({"NORM_POST": True} if post else {})
    x = r(1, k, dtype=torch.float16)
    nw = r(k, dtype=torch.float16, scale=0.2) + 1
    glu = dict(weight(2 * n, k, bits, torch.float16, group=64)[0], norm_weight=nw, norm_eps=1e-5, act="silu", glu=True)
    res = dict(weight(n, k, bits, torch.float16, group=64, sym=False)[0], residual=r(1, n, dtype=torch.float16))
    outs = []
    for one_step in (False, True):
        for peel in (False, True):
            monkeypatch.setattr(qgemm, "ONE_STEP", one_step)
            monkeypatch.setattr(pdl, "prefetch", lambda t, rows=1, peel=peel: peel)  # (PDL is off on the CPU: the
            monkeypatch.setattr(pdl, "prefetch_words", lambda t, b, peel=peel: peel)  # peel asked for by both)
            outs.append([skinny_gemm(x, **glu, config=whole),
                         skinny_gemm(x, **res, config={c: v for c, v in whole.items() if c != "NORM_POST"})])
    for got in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, outs[0]))


@pytest.mark.parametrize("bits", [4, 8])
def test_one_step_splits_offered_where_k_spans_several_steps(monkeypatch, bits):
    """Where K spans 2..ONE_STEP_SPLITS of the whole-K tile's steps, that tile also comes split to one step a split (the
    1B's down: 4 of 2048 codes; the 8B's gate/up GLU: 2 of 2048 codes of each half, with NORM_POST's twin); a K of one step,
    more steps than ONE_STEP_SPLITS, or the switch at 0 adds nothing."""
    def split_whole(n, k, glu=False):
        return [c for c in configs(1, n, k, bits, glu, norm=glu, group=128)
                if c.get("WORDS") and c["BLOCK_N"] == 16 and c["BLOCK_K"] == 2048 and c["SPLIT_K"] > 1]
    whole = dict(BLOCK_N=16, BLOCK_K=2048, DOT=False, WORDS=True, num_warps=8, num_stages=3, REDUCE="last") | (
        {"IDOT": True} if bits == 4 else {})
    assert split_whole(2048, 8192) == [dict(whole, SPLIT_K=4)]
    assert split_whole(28672, 4096, glu=True) == [dict(whole, SPLIT_K=2), dict(whole, SPLIT_K=2, NORM_POST=True)]
    assert split_whole(3072, 2048) == [] and split_whole(2048, 9 * 2048) == []
    monkeypatch.setattr(S, "ONE_STEP_SPLITS", 0)
    assert split_whole(2048, 8192) == []


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("post", [False, True])
def test_one_step_splits_give_the_loops_bits(monkeypatch, bits, post):
    """A WORDS tile split to one step a split (qgemm.ONE_STEP with SPLIT_K > 1, the last program summing the splits) gives
    the bits of the same split run through the K loop, peeled or not, and the float64 reference's value: the GLU with the
    norm prologue or NORM_POST (its sums of squares across the splits) and a residual."""
    from kiln.codegen.kernels import pdl, qgemm
    n, k = 40, 512
    split = dict(BLOCK_N=16, BLOCK_K=128, SPLIT_K=4, REDUCE="last", DOT=False, WORDS=True, num_warps=8, num_stages=3) | (
        {"IDOT": True} if bits == 4 else {}) | ({"NORM_POST": True} if post else {})
    x = r(1, k, dtype=torch.float16)
    nw = r(k, dtype=torch.float16, scale=0.2) + 1
    glu = dict(weight(2 * n, k, bits, torch.float16, group=64)[0], norm_weight=nw, norm_eps=1e-5, act="silu", glu=True)
    res = dict(weight(n, k, bits, torch.float16, group=64, sym=False)[0], residual=r(1, n, dtype=torch.float16))
    plain = {c: v for c, v in split.items() if c != "NORM_POST"}
    outs = []
    for one_step in (False, True):
        for peel in (False, True):
            monkeypatch.setattr(qgemm, "ONE_STEP", one_step)
            monkeypatch.setattr(pdl, "prefetch", lambda t, rows=1, peel=peel: peel)
            monkeypatch.setattr(pdl, "prefetch_words", lambda t, b, peel=peel: peel)
            outs.append([skinny_gemm(x, **glu, config=split), skinny_gemm(x, **res, config=plain)])
    for got in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(got, outs[0]))
    want = S.reference(x.double(), **{k_: (v.double() if k_ in ("scales", "norm_weight") else v) for k_, v in glu.items()})
    assert rel_err(outs[-1][0], want) <= TOL[torch.float16]
    want = S.reference(x.double(), **{k_: (v.double() if k_ in ("scales", "residual") else v) for k_, v in res.items()})
    assert rel_err(outs[-1][1], want) <= TOL[torch.float16]


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name,k,n,epi", [DECODE_SHAPES[0], DECODE_SHAPES[1], ("1b o + residual", 2048, 2048, {"residual": True}),
                                          DECODE_SHAPES[2], DECODE_SHAPES[5]])
def test_gpu_whole_k_words_tiles(monkeypatch, name, k, n, epi, bits):
    # the configurations WHOLE_K_WORDS adds at the 1B's shapes compile and are right (bench/decode_refine.py offers them)
    glu = epi.get("glu", False)
    monkeypatch.setattr(S, "WHOLE_K_WORDS", False)
    base = configs(1, n, k, bits, glu)
    monkeypatch.setattr(S, "WHOLE_K_WORDS", True)
    new = [c for c in configs(1, n, k, bits, glu) if c not in base]
    # the unsplit tile, and where K spans several of its steps the one-step splits (skinny.ONE_STEP_SPLITS)
    assert new[0]["SPLIT_K"] == 1 and [c["SPLIT_K"] for c in new[1:]] == ([k // 2048] if k > 2048 else [])
    x, kwargs, res, want = cuda_decode_case(1, k, n, bits, epi, group=128, sym=True)
    for c in new:
        ws, counters = cuda_scratch(1, n, k, bits, glu, c)
        got = skinny_gemm(x, residual=res, act=epi.get("act", "none"), glu=glu, workspace=ws, counters=counters, config=c, **kwargs)
        assert rel_err(got, want) <= TOL[torch.bfloat16], c
