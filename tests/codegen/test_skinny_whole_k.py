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
def test_wide_whole_k_tile_where_k_is_two_steps(monkeypatch, bits):
    """Where K is more than the whole-K tile's step and at most twice it (the 8B's qkv / o / gate/up, K 4096; a 3B's
    3072), that tile also comes over one step twice as long on twice the warps (WIDE_WHOLE_K), with the norm its
    NORM_POST twin; nowhere else, and not with the switch off. It computes the reference's product (the GLU with the
    norm prologue, K 3072: the step's tail masked)."""
    def wide(n, k, glu=False, norm=False):
        return [c for c in configs(1, n, k, bits, glu, norm=norm, group=128) if c.get("num_warps") == 16]
    tile = dict(BLOCK_N=16, BLOCK_K=4096, SPLIT_K=1, DOT=False, WORDS=True, num_warps=16, num_stages=3) | (
        {"IDOT": True} if bits == 4 else {})
    assert wide(28672, 4096, glu=True, norm=True) == [tile, dict(tile, NORM_POST=True)]
    assert wide(6144, 4096) == wide(5120, 3072) == [tile]
    assert wide(16384, 2048, glu=True) == wide(2048, 2048) == wide(2048, 8192) == wide(4096, 14336) == []
    monkeypatch.setattr(S, "WIDE_WHOLE_K", False)
    assert wide(6144, 4096) == []
    n, k = 16, 3072
    x = r(1, k, dtype=torch.float16)
    nw = r(k, dtype=torch.float16, scale=0.2) + 1
    wq = weight(2 * n, k, bits, torch.float16, group=128)[0]
    got = skinny_gemm(x, act="silu", glu=True, norm_weight=nw, norm_eps=1e-5, **wq, config=tile)
    want = S.reference(x.double(), act="silu", glu=True, norm_weight=nw.double(), norm_eps=1e-5,
                       **{k_: (v.double() if k_ == "scales" else v) for k_, v in wq.items()})
    assert rel_err(got, want) <= TOL[torch.float16]


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


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("name,k,n,epi", [DECODE_SHAPES[0], DECODE_SHAPES[1], ("1b o + residual", 2048, 2048, {"residual": True}),
                                          DECODE_SHAPES[4], DECODE_SHAPES[5]])
def test_gpu_whole_k_words_tiles(monkeypatch, name, k, n, epi, bits):
    # the configurations WHOLE_K_WORDS adds at the 1B's and 8B's shapes compile and are right (WIDE_WHOLE_K's at the 8B's)
    glu = epi.get("glu", False)
    monkeypatch.setattr(S, "WHOLE_K_WORDS", False)
    base = configs(1, n, k, bits, glu)
    monkeypatch.setattr(S, "WHOLE_K_WORDS", True)
    new = [c for c in configs(1, n, k, bits, glu) if c not in base]
    # the whole-K tile, and at the 8B's K of two of its steps the wide one (one step on 16 warps: WIDE_WHOLE_K)
    assert [(c["SPLIT_K"], c["num_warps"]) for c in new] == [(1, 8)] + ([(1, 16)] if k == 4096 else [])
    x, kwargs, res, want = cuda_decode_case(1, k, n, bits, epi, group=128, sym=True)
    for c in new:
        ws, counters = cuda_scratch(1, n, k, bits, glu, c)
        got = skinny_gemm(x, residual=res, act=epi.get("act", "none"), glu=glu, workspace=ws, counters=counters, config=c, **kwargs)
        assert rel_err(got, want) <= TOL[torch.bfloat16], c
