"""kiln.codegen.kernels.skinny: the decode GEMM (M <= 16) on plain, 8-bit and 4-bit weights, with and without
split-K, against a float64 reference (the weight built from its codes in float64, F.linear, the GEMM op's
epilogue). Split-K reduced in one launch (the last program of a tile) must give the two-launch form's bits, and
leave its counters zero. CPU: the Triton interpreter, float16 / float32, irregular shapes; GPU: bfloat16 at Llama
decode shapes."""

import importlib.util
from pathlib import Path

import pytest
import torch

import kiln.codegen.kernels.qgemm as Q
import kiln.codegen.kernels.skinny as S
from kiln.codegen.kernels import pdl
from kiln.codegen.kernels.gemm import reference
from kiln.codegen.kernels.skinny import configs, counter_bytes, skinny_gemm, workspace_bytes
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter  # CPU cases run under TRITON_INTERPRET=1; gpu-marked ones need it off

# the format helpers of the qgemm tests (loaded by path: tests/ is no package)
_spec = importlib.util.spec_from_file_location("_test_qgemm", Path(__file__).parent / "test_qgemm.py")
_qgemm_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_qgemm_tests)
random_qweight = _qgemm_tests.random_qweight

gen = torch.Generator().manual_seed(1)


def r(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def weight(n, k, bits, dtype, group=32, sym=False):
    """``(kwargs for skinny_gemm's weight, float64 weight)``: bits None is a plain weight in ``dtype``."""
    if bits is None:
        w = r(n, k, dtype=dtype, scale=k ** -0.5)
        return dict(w=w), w.double()
    qweight, scales, zeros, bits, g, w64 = random_qweight(n, k, bits, group, sym, generator=gen)
    return dict(qweight=qweight, scales=scales, zeros=zeros, bits=bits, group=g), w64


def check(x, wq, bias=None, gate=None, residual=None, act="none", glu=False, **kw):
    kwargs, w64 = wq
    got = skinny_gemm(x, bias=bias, gate=gate, residual=residual, act=act, glu=glu, **kwargs, **kw)
    want = reference(*(t.double() if t is not None else None for t in (x, w64, bias, gate, residual)), act=act, glu=glu)
    assert got.dtype == x.dtype and got.shape == want.shape
    err = rel_err(got, want)
    assert err <= TOL[x.dtype], f"rel err {err:.2e} > {TOL[x.dtype]:.0e}"
    return got


def config(split=1, dot=None, block_k=32, swap=False):
    c = dict(BLOCK_N=16, BLOCK_K=block_k, SPLIT_K=split) | ({"SWAP": True} if swap else {})
    return c if dot is None else dict(c, DOT=dot)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_weights_rows_and_split_k(bits, m, split, dtype):
    # N = 37, K = 192 against 16 x 32 tiles: partial tiles in N, 6 K steps over 3 splits; M = 1 runs the
    # GEMV path, M = 3 and 16 the tl.dot one
    check(r(m, 192, dtype=dtype), weight(37, 192, bits, dtype), config=config(split))


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 64, "K"])
@pytest.mark.parametrize("bits", [8, 4])
def test_groups_and_zero_points(bits, group, sym):
    wq = weight(37, 192, bits, torch.float32, group, sym)
    for m, dtype in ((1, torch.float32), (16, torch.float16)):
        check(r(m, 192, dtype=dtype), wq, config=config(split=2))


@pytest.mark.parametrize("bits,group", [(4, 32), (8, 64), (4, "K")])
@pytest.mark.parametrize("m", [1, 5])
def test_steps_spanning_groups(bits, group, m):
    # BLOCK_K 128 / 256 against groups of 32, 64 and a whole row of 192: several groups (or a partial one) a step
    for block_k in (128, 256):
        check(r(m, 192), weight(37, 192, bits, torch.float32, group), act="silu", config=config(2, block_k=block_k))


@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("bias,gate,residual,act,glu", [
    (True, None, None, "none", False),
    (False, None, None, "silu", False),
    (True, None, None, "gelu_tanh", False),
    (True, None, None, "silu", True),                 # merged [gate; up]: 96 weight rows -> 48 outputs
    (False, "b1n", None, "none", False),              # DiT-style gate [B, 1, N]
    (False, None, "full", "none", False),             # residual
    (True, "b1n", "full", "gelu_tanh", False),
    (True, "b1n", "full", "silu", True),
])
def test_epilogues(m, split, bias, gate, residual, act, glu):
    # x [B, S, K]: B = m rows of one token each (decode), or 1 x m
    lead = (m, 1) if gate else (1, m)
    n_out = 48
    wq = weight(2 * n_out if glu else n_out, 64, 4, torch.float32)
    check(r(*lead, 64), wq, r(2 * n_out if glu else n_out) if bias else None, r(lead[0], 1, n_out) if gate else None,
          r(*lead, n_out) if residual else None, act=act, glu=glu, config=config(split))


@pytest.mark.parametrize("bits", [None, 4])
def test_strided_x_and_3d_input(bits):
    wq = weight(40, 64, bits, torch.float32)
    check(r(3, 100)[:, 20:84], wq, act="gelu", config=config(2))  # x a column slice: stride_xm != K
    check(r(2, 8, 64), wq, gate=r(2, 1, 40), residual=r(2, 8, 40), config=config(2))


@pytest.mark.parametrize("m", [1, 4])
def test_plain_weight_stored_transposed(m):
    w = r(64, 40, scale=64 ** -0.5).t()  # [40, 64] with stride_wk = 40
    check(r(m, 64), (dict(w=w), w.double()), bias=r(40), act="silu", config=config(2))


def test_out_given_and_in_place_residual():
    kwargs, w64 = weight(24, 64, 8, torch.float16)
    x, b, res = r(4, 64, dtype=torch.float16), r(24, dtype=torch.float16), r(4, 24, dtype=torch.float16)
    want = reference(x.double(), w64, b.double(), residual=res.double(), act="silu")
    for split in (1, 2):
        out = torch.empty(4, 24, dtype=torch.float16)
        assert skinny_gemm(x, bias=b, residual=res, act="silu", out=out, config=config(split), **kwargs) is out
        assert rel_err(out, want) <= TOL[torch.float16]
    got = skinny_gemm(x, bias=b, residual=res, act="silu", out=res, config=config(2), **kwargs)  # out IS the residual
    assert got is res and rel_err(res, want) <= TOL[torch.float16]


def test_workspace_planned_by_the_caller():
    # K = 192, BLOCK_K = 32, SPLIT_K = 4: chunks of 64, so 3 splits run and the workspace holds 3 x M x N floats
    kwargs, w64 = weight(37, 192, 4, torch.float32)
    x, c = r(5, 192), config(split=4)
    need = workspace_bytes(5, 37, 192, bits=4, config=c)
    assert need == 4 * 3 * 5 * 37 and workspace_bytes(5, 37, 192, bits=4, config=config(1)) == 0
    want = skinny_gemm(x, config=c, **kwargs)
    assert rel_err(want, x.double() @ w64.t()) <= TOL[torch.float32]
    ws_float = torch.full((need // 4,), float("nan"))  # every element is written before it is read
    assert torch.equal(skinny_gemm(x, config=c, workspace=ws_float, **kwargs), want)  # deterministic
    arena = torch.zeros(need + 64, dtype=torch.uint8)  # a byte arena slice at a 4-byte aligned offset
    assert torch.equal(skinny_gemm(x, config=c, workspace=arena[16:16 + need], **kwargs), want)
    for ws in (torch.empty(need // 4 - 1), arena[1:1 + need], torch.empty(need // 4, dtype=torch.float16)):
        with pytest.raises(ValueError, match="workspace must be"):
            skinny_gemm(x, config=c, workspace=ws, **kwargs)


# ----------------------------------------------------------------------------- the swapped product (SWAP)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [3, 16])
@pytest.mark.parametrize("bits", [None, 8, 4])
def test_swapped_product(bits, m, dtype):
    # acc^T [BLOCK_N, 16] = W x^T, transposed once after the loop: N = 37 (a partial tile), K = 208 in 3 splits
    # (7 steps of 32, the last partial; groups of 16: two a step), reduced by the last program; bias and silu after
    wq = weight(37, 208, bits, dtype, group=16)
    check(r(m, 208, dtype=dtype), wq, bias=r(37, dtype=dtype), act="silu", config=config(3, swap=True))


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("m", [3, 16])
def test_swapped_glu_residual_and_both_reductions(m, bits):
    # the up half swapped too (96 weight rows -> 48 outputs) with bias and residual: whole K, and K = 200 in 4 splits
    # reduced by the last program and by a second launch, the same bits; a 64-row tile as on the H200 (one, masked)
    wq = weight(96, 200, bits, torch.float16, group="K")
    x, b, res = r(m, 200, dtype=torch.float16), r(96, dtype=torch.float16), r(m, 48, dtype=torch.float16)
    ops = dict(bias=b, residual=res, act="silu", glu=True)
    check(x, wq, **ops, config=dict(BLOCK_N=64, BLOCK_K=64, SWAP=True))
    c = config(4, swap=True)
    counters = counters_for(m, 96, 200, bits, True, c)
    one = check(x, wq, **ops, config=c, counters=counters)
    assert not counters.any()
    assert torch.equal(one, skinny_gemm(x, **wq[0], **ops, config=dict(c, REDUCE="separate")))


@pytest.mark.parametrize("m,bits,split", [(3, 8, 1), (16, None, 3)])
def test_swapped_norm_prologue_and_prefetched_first_step(monkeypatch, m, bits, split):
    # RMSNORM folded into x's loads feeds tl.dot's second operand, x^T; with the first K step peeled (the PREFETCH
    # path, which the CPU runs without the PDL wait) the same bits
    x = r(m, 200) * torch.logspace(-1, 1, m, dtype=torch.float64)[:, None].float()
    nw = 1 + r(200, scale=0.2)
    wq = weight(37, 200, bits, torch.float32, group="K")
    c = config(split, swap=True)
    check_norm(x, wq, nw, config=c)
    plain = skinny_gemm(x, **wq[0], norm_weight=nw, norm_eps=1e-5, config=c)
    monkeypatch.setattr(pdl, "prefetch", lambda t, rows=1: True)
    assert torch.equal(skinny_gemm(x, **wq[0], norm_weight=nw, norm_eps=1e-5, config=c), plain)


# ----------------------------------------------------------------------------- split-K in one launch


def counters_for(m, n, k, bits=None, glu=False, config=None):
    """Zeroed int32 counters of ``counter_bytes``, as a plan holds them."""
    return torch.zeros(max(1, counter_bytes(m, n, k, bits, glu, config) // 4), dtype=torch.int32)


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_one_launch_split_k_is_the_two_launch_sum(m, bits):
    # the last program of a tile adds the partials in the order the reduce kernel does: the same bits, on a plain
    # GEMM (N = 37, K = 72: 2 splits of 64 and 8 columns) and a GLU with every epilogue (96 weight rows -> 48
    # outputs, K = 200: 3 splits of 96, 96, 8); called twice on the same counters, which each call leaves zero
    for (n, k, dtype, split, epi) in ((37, 72, torch.float32, 2, {}),
                                      (96, 200, torch.float16, 3, dict(bias=True, residual=True, act="silu", glu=True))):
        wq = weight(n, k, bits, dtype, group="K")  # (no power of two >= 16 divides K: one group a row)
        n_out = n // 2 if epi.get("glu") else n
        ops = dict(bias=r(n, dtype=dtype) if epi.get("bias") else None, residual=r(m, n_out, dtype=dtype) if epi.get("residual") else None,
                   act=epi.get("act", "none"), glu=epi.get("glu", False))
        c = config(split)
        assert S._chunking(k, split, 32)[0] == split and counter_bytes(m, n, k, bits, ops["glu"], c) == 4 * -(-n_out // 16)
        counters = counters_for(m, n, k, bits, ops["glu"], c)
        check(r(m, k, dtype=dtype), wq, **ops, config=c, counters=counters)
        x = r(m, k, dtype=dtype)
        one = check(x, wq, **ops, config=c, counters=counters)  # a second call on the same counters
        assert not counters.any()
        two = skinny_gemm(x, **wq[0], **ops, config=dict(c, REDUCE="separate"))
        assert torch.equal(one, two), (n, k, (one - two).abs().max())


def test_one_launch_split_k_with_the_norm_prologue():
    # RMSNORM folded into the loads, 4-bit gate/up GLU, 7 splits of one 32-wide K step (K = 200): two launches' bits
    x, nw = r(3, 200, dtype=torch.float16), (1 + r(200, scale=0.2)).to(torch.float16)
    wq = weight(96, 200, 4, torch.float16, group="K")
    c, ops = config(7), dict(act="silu", glu=True)
    counters = counters_for(3, 96, 200, 4, True, c)
    one = skinny_gemm(x, **wq[0], **ops, norm_weight=nw, norm_eps=1e-5, counters=counters, config=c)
    two = skinny_gemm(x, **wq[0], **ops, norm_weight=nw, norm_eps=1e-5, config=dict(c, REDUCE="separate"))
    assert torch.equal(one, two) and not counters.any()
    check_norm(x, wq, nw, **ops, counters=counters, config=c)


@pytest.mark.parametrize("bits", [None, 4])
def test_residual_loaded_early_and_splits_summed_unrolled_change_no_bits(monkeypatch, bits):
    # qgemm.EARLY_RESIDUAL (one row, no split: the residual's tile loaded right after the wait) and qgemm.SUM_UNROLL
    # (the last program's sum of 3 splits in straight-line code): the bits of the residual loaded after the loop and
    # of the loop over the splits
    x, wq, res = r(1, 200, dtype=torch.float16), weight(40, 200, bits, torch.float16, group="K"), r(1, 40, dtype=torch.float16)

    def run(split):
        c = config(split)
        return skinny_gemm(x, **wq[0], residual=res, act="silu", config=c,
                           counters=counters_for(1, 40, 200, bits, False, c) if split > 1 else None)
    on = [run(1), run(3)]
    monkeypatch.setattr(Q, "EARLY_RESIDUAL", False)
    monkeypatch.setattr(Q, "SUM_UNROLL", False)
    off = [run(1), run(3)]
    assert all(torch.equal(a, b) for a, b in zip(on, off))


def test_counters_planned_by_the_caller():
    # counters: one int32 per output tile (37 columns in tiles of 16: 3), as int32 or as a byte slice of an arena;
    # none where K is not split or the partials are reduced by a second launch
    kwargs, w64 = weight(37, 192, 8, torch.float32)
    x, c = r(5, 192), config(split=4)
    assert counter_bytes(5, 37, 192, 8, config=c) == 4 * 3
    assert counter_bytes(5, 37, 192, 8, config=config(1)) == 0
    assert counter_bytes(5, 37, 192, 8, config=dict(c, REDUCE="separate")) == 0
    assert counter_bytes(5, 74, 192, 8, glu=True, config=c) == 4 * 3  # a GLU's tiles are of its 37 outputs
    want = skinny_gemm(x, config=dict(c, REDUCE="separate"), **kwargs)
    arena = torch.zeros(64, dtype=torch.uint8)
    for _ in range(2):
        assert torch.equal(skinny_gemm(x, config=c, counters=arena[8:20], **kwargs), want)
        assert not arena.any()
    bad = (torch.zeros(2, dtype=torch.int32), torch.zeros(3), arena[1:13], torch.zeros(6, dtype=torch.int32)[::2])
    for counters in bad:
        with pytest.raises(ValueError, match="counters must be"):
            skinny_gemm(x, config=c, counters=counters, **kwargs)


def test_a_call_stopped_part_way_leaves_the_counters_zero(monkeypatch):
    # the interpreter runs programs one after another in Python: an exception between them leaves some tiles counted.
    # The launcher zeroes the counters before re-raising, so the next call reduces at the right program.
    kwargs, w64 = weight(37, 192, None, torch.float32)
    x, c = r(3, 192), config(split=3)
    counters = counters_for(3, 37, 192, None, False, c)
    real = S.launch

    def stopped(*args, split=None, **kw):
        split.counters[:2] += 1  # the first split of two tiles arrived
        raise KeyboardInterrupt
    monkeypatch.setattr(S, "launch", stopped)
    with pytest.raises(KeyboardInterrupt):
        skinny_gemm(x, config=c, counters=counters, **kwargs)
    assert not counters.any()
    monkeypatch.setattr(S, "launch", real)
    check(x, (kwargs, w64), config=c, counters=counters)
    assert not counters.any()


def test_empty_and_vector_inputs():
    kwargs, w64 = weight(24, 64, 8, torch.float32)
    assert skinny_gemm(torch.zeros(0, 64), **kwargs).shape == (0, 24)
    x = r(64)
    got = skinny_gemm(x, **kwargs)
    assert got.shape == (24,) and rel_err(got, w64 @ x.double()) <= TOL[torch.float32]


@pytest.mark.parametrize("m,n,k,bits,glu", [
    (1, 3072, 2048, None, False),     # Llama-3.2-1B qkv
    (16, 3072, 2048, 8, False),
    (1, 16384, 2048, 4, True),        # gate / up
    (1, 2048, 8192, 4, False),        # down: few tiles, split-K
    (16, 2048, 8192, None, False),
    (1, 128256, 2048, 8, False),      # lm head: tiles enough, no split
    (16, 28672, 4096, 4, True),       # Llama-3.1-8B gate / up
    (16, 2048, 2048, 4, False),       # 1B o: 16 tiles of 128 rows, where the workspace rule alone would not split
])
def test_configs_for_llama_shapes(m, n, k, bits, glu):
    cs = configs(m, n, k, bits, glu)
    # (after TILES', one row of a 4-bit weight: the IDOT tiles; of a quantized one: the unsplit whole-K WORDS tile)
    whole = [S.tile_config(m, n, k, bits, glu, S.whole_k_words_tile(bits, glu), split=1)] if m == 1 and bits else []
    if whole:  # (2048 codes a step, a GLU's of each half)
        assert whole[0]["BLOCK_K"] == min(2048, k) and whole[0]["SPLIT_K"] == 1
    base = [c for c in cs if not c.get("IDOT") and c not in whole]
    assert 1 <= len(base) <= (5 if m == 1 and bits else 4) and len({tuple(sorted(c.items())) for c in cs}) == len(cs)
    assert cs[:len(base)] == base and (len(cs) > len(base)) == (m == 1 and bits is not None) and all(c in cs for c in whole)
    for c in cs:
        split_keys = {"REDUCE"} if c["SPLIT_K"] > 1 else set()  # REDUCE only where K is split, SWAP where swapped
        optional = {key for key in ("SWAP", "WORDS", "AHEAD", "maxnreg", "IDOT") if key in c}
        assert set(c) == {"BLOCK_N", "BLOCK_K", "SPLIT_K", "DOT", "num_warps", "num_stages"} | split_keys | optional
        assert c["DOT"] == (m > 1) and c["SPLIT_K"] >= 1 and (c["DOT"] or c["BLOCK_N"] <= 32 or c.get("WORDS"))
        if "WORDS" in c:  # the GEMV of a quantized weight, its K whole words of codes
            assert c["WORDS"] is True and m == 1 and bits in (4, 8) and k % (32 // bits) == 0
        if "AHEAD" in c:  # the byte-tile GEMV of a quantized weight, the default's tile with its scales a step ahead
            assert c["AHEAD"] is True and m == 1 and bits in (4, 8) and "WORDS" not in c
            same = ("AHEAD", "maxnreg")  # (int8's AHEAD tile is not capped: it spills at 128 with the norm prologue)
            assert {k_: v for k_, v in c.items() if k_ not in same} == {k_: v for k_, v in cs[0].items() if k_ not in same}
        if "IDOT" in c:  # the WORDS GEMV of a 4-bit weight, its words summed by dp4a
            assert c["IDOT"] is True and c.get("WORDS") and m == 1 and bits == 4
        if "maxnreg" in c:  # a GEMV of a quantized weight, capped so that 4 programs of 4 warps fit an SM
            assert c["maxnreg"] == 128 and m == 1 and bits in (4, 8)
        if "SWAP" in c:  # only where swapped: tl.dot, on at least wgmma's 64 rows a warpgroup
            assert c["SWAP"] is True and c["DOT"] and c["BLOCK_N"] >= 64
        splits, _ = S._chunking(k, c["SPLIT_K"], c["BLOCK_K"])
        assert splits == c["SPLIT_K"]  # configs name the splits that actually run
        assert workspace_bytes(m, n, k, bits, glu, config=c) == (0 if splits == 1 else 4 * splits * m * n)
        tiles = -(-(n // 2 if glu else n) // c["BLOCK_N"])
        assert counter_bytes(m, n, k, bits, glu, config=c) == (4 * tiles if c.get("REDUCE") == "last" else 0)
        # no SM left idle, unless the splits are as many as K allows (MIN_SPLIT_STEPS steps each); a tile split fewer
        # times (one 8-warp program an SM) may leave a few
        busy = S.H200_SMS * (0.9 if c.get("WORDS") else 1)
        assert tiles * splits >= busy or splits >= -(-k // c["BLOCK_K"]) // S.MIN_SPLIT_STEPS
    # 2..16 rows: the swapped product first, the unswapped one measured beside it; one row of a quantized weight: a
    # WORDS tile among them
    assert ("SWAP" in cs[0]) == (m > 1) and (m == 1 or any(c["DOT"] and "SWAP" not in c for c in cs))
    assert any("WORDS" in c for c in cs) == (m == 1 and bits is not None)
    # a default that splits reduces in its last program (one launch); its two-launch twin is measured too
    if cs[0]["SPLIT_K"] > 1:
        assert cs[0]["REDUCE"] == "last" and dict(cs[0], REDUCE="separate") in cs
    # the default splits K only as far as the target of programs: 2048 rows in tiles of 32 are 64 programs
    # for 132 SMs and must pass 2 per SM; 16384 / 2 and 128256 rows fill the GPU without splitting
    tiles = -(-(n // 2 if glu else n) // cs[0]["BLOCK_N"])
    target = S.PROGRAMS_PER_SM * S.H200_SMS
    assert cs[0]["SPLIT_K"] == 1 or tiles * cs[0]["SPLIT_K"] <= 1.5 * target
    if (n, k) == (2048, 8192):
        assert tiles * cs[0]["SPLIT_K"] >= 2 * S.H200_SMS
    if n in (16384, 128256):
        assert cs[0]["SPLIT_K"] == 1


@pytest.mark.parametrize("k", [32, 64, 96, 128, 256, 2048])
def test_every_config_of_a_narrow_weight_resolves(k):
    # tile_config caps BLOCK_K at K's power of two: a WORDS tile of a 4-bit weight of K = 64 was offered with 8 words a
    # step, which skinny_gemm refuses (a 64-wide tiny Llama in w4a16 failed to plan on a GPU)
    for m, bits, glu, norm in ((1, 4, False, False), (1, 4, True, True), (1, 8, False, True), (1, None, False, True), (4, 4, True, True)):
        for c in configs(m, 3 * k, k, bits, glu, norm=norm, group=32 if bits == 4 else None):
            assert S._resolve(m, 3 * k, k, bits, glu, c)["BLOCK_K"] == c["BLOCK_K"], c
            assert workspace_bytes(m, 3 * k, k, bits, glu, c) >= 0


def test_configs_refuse_rows_outside_1_to_16():
    for m in (0, 17):
        with pytest.raises(ValueError, match="1..16"):
            configs(m, 64, 64)


@pytest.mark.parametrize("kwargs,match", [
    (dict(m=17), "M = 17 rows .* at most 16"),
    (dict(both=True), "exactly one weight"),
    (dict(neither=True), "exactly one weight"),
    (dict(plain_with_scales=True), "scales / zeros / bits / group describe a qweight"),
    (dict(qweight=torch.zeros(37, 192, dtype=torch.uint8)), "qweight .* does not fit x's K = 192 at 4 bits"),
    (dict(qweight=torch.zeros(37, 96, dtype=torch.int32)), "qweight must be a uint8"),
    (dict(bits=None), "bits must be 4 or 8"),
    (dict(group=100), "group 100 must be K = 192 or a power of two"),
    (dict(group=128), "group 128 must be K = 192 or a power of two >= 16 dividing"),
    (dict(scales=torch.ones(37, 6, dtype=torch.bfloat16)), "scales must be float16 / float32"),
    (dict(zeros=torch.zeros(37, 5, dtype=torch.uint8)), "zeros must be None"),
    (dict(k=191), "K = 191 is odd"),
    (dict(config=dict(BLOCK_N=16, BLOCK_K=32, DOT=False)), "GEMV path \\(DOT False\\) takes one row"),
    (dict(m=1, config=dict(BLOCK_N=16, BLOCK_K=32, SWAP=True)), "SWAP transposes tl.dot's product, it needs DOT"),
    (dict(config=dict(BLOCK_N=12, BLOCK_K=32)), "needs BLOCK_N"),
    (dict(config=dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=0)), "SPLIT_K must be a positive int"),
    (dict(config=dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=2, REDUCE="atomic")), "REDUCE must be one of 'last', 'separate'"),
])
def test_bad_operands_raise(kwargs, match):
    k = kwargs.pop("k", 192)
    qweight, scales, zeros, bits, g, _ = random_qweight(37, k - k % 2, 4, 32 if k % 32 == 0 else "K", False)
    ops = dict(qweight=qweight, scales=scales, zeros=zeros, bits=bits, group=g)
    x = r(kwargs.pop("m", 3), k)
    if kwargs.pop("both", False):
        ops["w"] = r(37, k)
    if kwargs.pop("neither", False):
        ops = {}
    if kwargs.pop("plain_with_scales", False):
        ops = dict(w=r(37, k), scales=scales)
    ops.update(kwargs)
    with pytest.raises(ValueError, match=match):
        skinny_gemm(x, **ops)


# ----------------------------------------------------------------------------- the RMSNorm prologue


def check_norm(x, wq, nw, eps=1e-5, **kw):
    """skinny_gemm with a norm prologue against RMSNORM then the GEMM, both in float64."""
    kwargs, w64 = wq
    got = skinny_gemm(x, norm_weight=nw, norm_eps=eps, **kwargs, **kw)
    epi = {k: kw[k] for k in ("act", "glu") if k in kw}
    operands = {k: kw[k].double() for k in ("bias", "residual") if kw.get(k) is not None}
    want = S.reference(x.double(), w64, norm_weight=nw.double(), norm_eps=eps, **operands, **epi)
    err = rel_err(got, want)
    assert got.dtype == x.dtype and err <= TOL[x.dtype], f"rel err {err:.2e} > {TOL[x.dtype]:.0e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("m", [1, 3, 16])
@pytest.mark.parametrize("bits", [None, 4])
def test_norm_prologue(bits, m, split, dtype):
    # K = 200: 7 K steps of 32, the last partial (the row statistics must mask it); rows of very different scale
    # and a norm weight with a few large channels, so a missed rstd or weight shows
    x = r(m, 200, dtype=dtype) * torch.logspace(-1, 1, m, dtype=torch.float64)[:, None].to(dtype)
    nw = (1 + r(200, scale=0.2)).to(dtype)
    nw[[3, 77, 190]] = 8.0
    check_norm(x, weight(37, 200, bits, dtype, group="K"), nw, config=config(split))


@pytest.mark.parametrize("m", [1, 4])
def test_norm_prologue_with_epilogues_and_strided_rows(m):
    # the final norm + LM head reads x[:, -1] of [B, T, K] (stride_xm = T * K); gate/up with silu GLU; a residual
    x = r(m, 3, 64)[:, -1]
    nw = 1 + r(64, scale=0.3)
    check_norm(x, weight(37, 64, None, torch.float32), nw, eps=1e-6, config=config(2))
    check_norm(x, weight(96, 64, 8, torch.float32), nw, act="silu", glu=True, bias=r(96), config=config(2))
    check_norm(x, weight(40, 64, None, torch.float32), nw, residual=r(m, 40), config=config(1))


@pytest.mark.parametrize("m,swap,split,dtype", [
    (2, False, 1, torch.float32), (2, True, 3, torch.float16), (5, True, 1, torch.float32),
    (5, False, 3, torch.float16), (16, True, 1, torch.float16), (16, True, 3, torch.float32), (16, False, 2, torch.float32)])
def test_norm_prologue_2_to_16_rows_wide_statistics(m, swap, split, dtype):
    # tl.dot rows (2..16), swapped or not, split or not; K = 600 > the statistics' tile (16 rows x 256): three
    # pipelined steps, the last one partial (88 columns), and the K loop's last step partial too (600 = 18 x 32 + 24)
    x = r(m, 600, dtype=dtype) * torch.logspace(-1, 1, m, dtype=torch.float64)[:, None].to(dtype)
    nw = (1 + r(600, scale=0.2)).to(dtype)
    nw[[0, 255, 256, 599]] = 8.0  # the statistics' tile edges and the last column
    check_norm(x, weight(37, 600, None, dtype), nw, config=config(split, swap=swap))


@pytest.mark.parametrize("m,split", [(1, 1), (1, 3), (4, 2), (16, 1)])
def test_norm_statistics_tile_edges(monkeypatch, m, split):
    # statistics tiles of 256 values (16 rows x 16 columns, one row x 256): many steps, a partial last one, for the GEMV
    # too; with the first K step peeled (PREFETCH) the norm weight loaded a step ahead gives the same bits
    from kiln.codegen.kernels import qgemm
    monkeypatch.setattr(qgemm, "STATS_ELEMS", 256)
    k = 328  # 16 x 20 + 8 columns: a partial last statistics step at 16 rows; 256 + 72 for the GEMV
    x = r(m, k) * torch.logspace(-1, 1, m, dtype=torch.float64)[:, None].float()
    nw = 1 + r(k, scale=0.2)
    nw[[15, 16, k - 1]] = 8.0
    wq = weight(40, k, 8, torch.float32, group="K")
    c = config(split)
    check_norm(x, wq, nw, config=c)
    plain = skinny_gemm(x, **wq[0], norm_weight=nw, norm_eps=1e-5, config=c)
    monkeypatch.setattr(pdl, "prefetch", lambda t, rows=1: True)
    assert torch.equal(skinny_gemm(x, **wq[0], norm_weight=nw, norm_eps=1e-5, config=c), plain)


def test_norm_config_with_an_l2_prefetch():
    # a config's L2 (bytes each program asks the L2 for first; a hint the interpreter skips): the same bits
    x, nw = r(16, 200), 1 + r(200, scale=0.2)
    wq = weight(80, 200, None, torch.float32)
    c = config(2, swap=True)
    plain = skinny_gemm(x, **wq[0], norm_weight=nw, norm_eps=1e-5, config=c)
    assert torch.equal(skinny_gemm(x, **wq[0], norm_weight=nw, norm_eps=1e-5, config=dict(c, L2=4096)), plain)
    with pytest.raises(ValueError, match="L2 must be a number of bytes"):
        skinny_gemm(x, **wq[0], config=dict(c, L2=-1))


@pytest.mark.parametrize("m,n,k,glu", [(16, 3072, 2048, False), (16, 16384, 2048, True), (4, 2048, 8192, False),
                                       (1, 3072, 2048, False), (16, 128256, 2048, False)])
def test_norm_configs(m, n, k, glu):
    # with the norm prologue: the plain list's swapped and unswapped tiles, and where the default splits at 2..16 rows
    # the default tile at half its splits (the statistics pass reads x's rows whole in every program); at one row and
    # where nothing splits, the plain list; then NORM_POST's (test_skinny_norm_post.py)
    plain, normed = configs(m, n, k, None, glu), configs(m, n, k, None, glu, norm=True)
    normed = [c for c in normed if not c.get("NORM_POST")]
    assert 1 <= len(normed) <= 4 and normed[:3] == plain[:3]
    if m > 1 and plain[0]["SPLIT_K"] > 1:
        half = normed[3]
        assert dict(half, SPLIT_K=plain[0]["SPLIT_K"]) == plain[0] and half["SPLIT_K"] < plain[0]["SPLIT_K"]
        assert any("SWAP" in c for c in normed) and any("SWAP" not in c for c in normed)
        for c in normed:  # (the statistics pass's list needs no more scratch than the plain list)
            assert workspace_bytes(m, n, k, None, glu, config=c) <= max(workspace_bytes(m, n, k, None, glu, config=p) for p in plain)
            assert counter_bytes(m, n, k, None, glu, config=c) <= max(counter_bytes(m, n, k, None, glu, config=p) for p in plain)
    else:
        assert normed == plain


@pytest.mark.parametrize("kwargs,match", [
    (dict(norm_weight=torch.ones(191)), "norm_weight must be a contiguous \\[192\\] tensor"),
    (dict(norm_weight=torch.ones(192, dtype=torch.float16)), "norm_weight must be .* of x's dtype"),
    (dict(norm_weight=torch.ones(192)), "norm_eps must be a number"),
    (dict(norm_eps=1e-5), "norm_eps without norm_weight"),
])
def test_bad_norm_operands_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        skinny_gemm(r(2, 192), w=r(37, 192), **kwargs)


# ----------------------------------------------------------------------------- GPU (bf16, real shapes)

# (name, K, weight rows N, epilogue): Llama-3.2-1B and Llama-3.1-8B decode
DECODE_SHAPES = [
    ("1b qkv", 2048, 3072, {}),
    ("1b gate/up glu", 2048, 16384, {"act": "silu", "glu": True}),
    ("1b down + residual", 8192, 2048, {"residual": True}),
    ("1b lm head", 2048, 128256, {}),
    ("8b qkv", 4096, 6144, {}),
    ("8b gate/up glu", 4096, 28672, {"act": "silu", "glu": True}),
    ("8b down + residual", 14336, 4096, {"residual": True}),
]


def cuda_decode_case(m, k, n, bits, epi, group=128, sym=True):
    """bf16 operands on the GPU and the float32 reference: ``(x, weight kwargs, residual, want)``."""
    g = torch.Generator().manual_seed(0)
    if bits is None:
        w = (torch.randn(n, k, generator=g) * k ** -0.5).to("cuda", torch.bfloat16)
        kwargs, w32 = dict(w=w), w.float()
    else:
        qweight, scales, zeros, bits, group, w64 = random_qweight(n, k, bits, group, sym, torch.float16, g, "cuda")
        kwargs, w32 = dict(qweight=qweight, scales=scales, zeros=zeros, bits=bits, group=group), w64.float()
    x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
    n_out = n // 2 if epi.get("glu") else n
    res = torch.randn(m, n_out, generator=g).to("cuda", torch.bfloat16) if epi.get("residual") else None
    want = reference(x.float(), w32, None, None, res.float() if res is not None else None,
                     act=epi.get("act", "none"), glu=epi.get("glu", False))
    return x, kwargs, res, want


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("name,k,n,epi", DECODE_SHAPES)
def test_gpu_llama_decode(name, k, n, epi, m, bits):
    x, kwargs, res, want = cuda_decode_case(m, k, n, bits, epi)
    got = skinny_gemm(x, residual=res, act=epi.get("act", "none"), glu=epi.get("glu", False), **kwargs)
    torch.cuda.synchronize()
    err = rel_err(got, want)
    assert err <= TOL[torch.bfloat16], f"{name} m={m} bits={bits}: rel err {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("name,k,n,epi", [DECODE_SHAPES[0], DECODE_SHAPES[2], DECODE_SHAPES[5]])
def test_gpu_every_config_is_correct(name, k, n, epi):
    # the tuner measures every entry of configs(): each must compile and be right, with a planned workspace
    for m, bits in ((1, None), (1, 4), (1, 8), (3, 8), (16, 4)):
        x, kwargs, res, want = cuda_decode_case(m, k, n, bits, epi, group=64, sym=False)
        for c in configs(m, n, k, bits, epi.get("glu", False)):
            ws, counters = cuda_scratch(m, n, k, bits, epi.get("glu", False), c)
            got = skinny_gemm(x, residual=res, act=epi.get("act", "none"), glu=epi.get("glu", False), workspace=ws, counters=counters,
                              config=c, **kwargs)
            err = rel_err(got, want)
            assert err <= TOL[torch.bfloat16], f"{name} m={m} bits={bits} {c}: rel err {err:.2e}"
            assert not counters.any(), c


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("name,k,n,epi", [s for s in DECODE_SHAPES if s[0].startswith("1b")]
                         + [("1b o + residual", 2048, 2048, {"residual": True})])
def test_gpu_swapped_tiles_at_1b_shapes(name, k, n, epi, bits):
    # each swapped tile of skinny's for 2..16 rows (wgmma on sm_90), at its split of K and at twice it, M = 16 (and 5
    # rows of a plain weight), with the norm prologue where decode folds it (qkv, gate/up, LM head): bf16 against the
    # float32 reference
    glu, act = epi.get("glu", False), epi.get("act", "none")
    for m in (16, 5) if bits is None else (16,):
        x, kwargs, res, want = cuda_decode_case(m, k, n, bits, epi, group=64)
        norm = {}
        if not epi.get("residual"):
            nw = (1 + 0.2 * torch.randn(k, generator=torch.Generator().manual_seed(1))).to("cuda", torch.bfloat16)
            norm = dict(norm_weight=nw, norm_eps=1e-5)
            w32 = dict(w=kwargs["w"].float()) if bits is None else kwargs
            want = S.reference(x.float(), **w32, act=act, glu=glu, norm_weight=nw.float(), norm_eps=1e-5)
        for tile in [t for t in S.TILES[(True, bits or 0)] if t.swap]:
            c0 = S.tile_config(m, n, k, bits, glu, tile)
            for c in (c0, S.tile_config(m, n, k, bits, glu, tile, split=2 * c0["SPLIT_K"])):
                ws, counters = cuda_scratch(m, n, k, bits, glu, c)
                got = skinny_gemm(x, residual=res, act=act, glu=glu, workspace=ws, counters=counters, config=c, **norm, **kwargs)
                err = rel_err(got, want)
                assert err <= TOL[torch.bfloat16], f"{name} m={m} bits={bits} {c}: rel err {err:.2e}"
                assert not counters.any(), c


def cuda_scratch(m, n, k, bits, glu, c):
    """A planned workspace and zeroed counters for ``c``, as byte tensors on the GPU (a plan's arena slices)."""
    ws = torch.empty(max(4, workspace_bytes(m, n, k, bits, glu, config=c)), dtype=torch.uint8, device="cuda")
    return ws, torch.zeros(max(4, counter_bytes(m, n, k, bits, glu, config=c)), dtype=torch.uint8, device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16])
def test_gpu_split_k_is_deterministic_and_graph_capturable(m):
    # both reductions captured in a CUDA graph and replayed: the same bits every replay, the one-launch form's equal
    # to the two-launch form's, the counters zero after each replay (no memset in the graph)
    x, kwargs, res, _ = cuda_decode_case(m, 8192, 2048, 4, {"residual": True})
    c = configs(m, 2048, 8192, 4)[0]
    assert c["SPLIT_K"] > 1 and c["REDUCE"] == "last"
    outs = {}
    for reduce in ("last", "separate"):
        cr = dict(c, REDUCE=reduce)
        ws, counters = cuda_scratch(m, 2048, 8192, 4, False, cr)
        out = torch.empty(m, 2048, dtype=torch.bfloat16, device="cuda")
        skinny_gemm(x, residual=res, out=out, workspace=ws, counters=counters, config=cr, **kwargs)  # compile outside the capture
        first = out.clone()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            skinny_gemm(x, residual=res, out=out, workspace=ws, counters=counters, config=cr, **kwargs)
        for _ in range(3):
            out.zero_()
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(out, first) and not counters.any()
        outs[reduce] = first
    assert torch.equal(outs["last"], outs["separate"])


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("m", [1, 3, 16])
def test_gpu_one_launch_split_k_under_contention(m, bits):
    # many splits of few tiles (2048 outputs, K = 14336 in up to 28 splits), replayed back to back 200 times from one
    # CUDA graph: every replay's last program must see every partial (the barrier, the acq_rel count and the .cg
    # loads), so each output equals the two-launch form's bits and the counters end zero
    n, k = 2048, 14336
    x, kwargs, res, _ = cuda_decode_case(m, k, n, bits, {"residual": True})
    base = configs(m, n, k, bits)[0]
    for split in (base["SPLIT_K"], S._chunking(k, 28, base["BLOCK_K"])[0]):
        c = dict(base, SPLIT_K=split, REDUCE="last")
        ws, counters = cuda_scratch(m, n, k, bits, False, c)
        want = skinny_gemm(x, residual=res, config=dict(c, REDUCE="separate"), **kwargs)
        outs = torch.empty(200, m, n, dtype=torch.bfloat16, device="cuda")
        skinny_gemm(x, residual=res, out=outs[0], workspace=ws, counters=counters, config=c, **kwargs)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for i in range(200):
                skinny_gemm(x, residual=res, out=outs[i], workspace=ws, counters=counters, config=c, **kwargs)
        outs.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert all(torch.equal(o, want) for o in outs), (m, bits, c)
        assert not counters.any()


@pytest.mark.gpu
@pytest.mark.parametrize("name,k,n,epi", [DECODE_SHAPES[0], DECODE_SHAPES[1], DECODE_SHAPES[3]])
def test_gpu_norm_prologue_every_config(name, k, n, epi):
    # the decode norms fold into the QKV, gate/up and LM head GEMMs: each configuration the tuner tries, in bf16
    for m in (1, 16):
        x, kwargs, _, _ = cuda_decode_case(m, k, n, None, epi)
        nw = (1 + 0.2 * torch.randn(k, generator=torch.Generator().manual_seed(1))).to("cuda", torch.bfloat16)
        want = S.reference(x.float(), kwargs["w"].float(), act=epi.get("act", "none"), glu=epi.get("glu", False),
                           norm_weight=nw.float(), norm_eps=1e-5)
        cs = configs(m, n, k, None, epi.get("glu", False), norm=True)
        for c in cs + [dict(cs[0], L2=64 << 10)]:  # (L2: bench/decode_gemm.py --norm's variant)
            ws, counters = cuda_scratch(m, n, k, None, epi.get("glu", False), c)
            got = skinny_gemm(x, act=epi.get("act", "none"), glu=epi.get("glu", False), norm_weight=nw, norm_eps=1e-5,
                              workspace=ws, counters=counters, config=c, **kwargs)
            err = rel_err(got, want)
            assert err <= TOL[torch.bfloat16], f"{name} m={m} {c}: rel err {err:.2e}"


# ----------------------------------------------------------------------------- the WORDS GEMV


def words(split=1, block_k=None, bits=4):
    """A WORDS configuration at the interpreter's scale: 16 int32 words a row a step (128 int4 / 64 int8 codes)."""
    return dict(BLOCK_N=16, BLOCK_K=block_k or 512 // bits, SPLIT_K=split, WORDS=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bits,group,sym", [(4, 32, True), (4, 64, False), (4, "K", True), (8, "K", True), (8, 32, False)])
@pytest.mark.parametrize("split", [1, 3])
def test_words_gemv(bits, group, sym, split, dtype):
    """One row against a 4- / 8-bit weight read as int32 words (scales applied a word): groups narrower than a step
    and per channel, zero points, K past a whole step (its words masked), split-K reduced in the last program."""
    x = r(1, 448 if bits == 4 else 224, dtype=dtype)  # 3.5 steps of 16 words
    check(x, weight(37, x.shape[1], bits, dtype, group=group, sym=sym), config=words(split, bits=bits))


@pytest.mark.parametrize("bits", [4, 8])
def test_words_gemv_glu_norm_residual(bits):
    """The WORDS GEMV with the GLU epilogue and the norm prologue (the gate/up projection's decode form), and a residual
    (down's): the same bits as the byte-tile GEMV's, within rounding of the float32 sums' order."""
    k = 256
    x, nw = r(1, k, dtype=torch.float16), r(k, dtype=torch.float16, scale=0.2) + 1
    wq = weight(2 * 24, k, bits, torch.float16, group=64, sym=False)
    got = skinny_gemm(x, act="silu", glu=True, norm_weight=nw, norm_eps=1e-5, **wq[0], config=words(2, bits=bits))
    ref = skinny_gemm(x, act="silu", glu=True, norm_weight=nw, norm_eps=1e-5, **wq[0], config=dict(BLOCK_N=16, BLOCK_K=32))
    want = S.reference(x.double(), act="silu", glu=True, norm_weight=nw.double(), norm_eps=1e-5,
                       **{k_: (v.double() if k_ == "scales" else v) for k_, v in wq[0].items()})
    assert rel_err(got, want) <= TOL[torch.float16] and rel_err(got, ref) <= TOL[torch.float16]
    res = r(1, 24, dtype=torch.float16)
    check(x, weight(24, k, bits, torch.float16, group=64), residual=res, config=words(1, bits=bits))


def test_words_config_checks():
    x = r(1, 132, dtype=torch.float16)
    with pytest.raises(ValueError, match="whole int32 words"):  # K = 132: not whole words of 8 int4 codes
        skinny_gemm(x, **weight(16, 132, 4, torch.float16, group=132)[0], config=words())
    x3 = r(3, 128, dtype=torch.float16)
    with pytest.raises(ValueError, match="WORDS is the GEMV"):  # 3 rows: the tl.dot path
        skinny_gemm(x3, **weight(16, 128, 4, torch.float16)[0], config=dict(words(), DOT=True))
    with pytest.raises(ValueError, match="WORDS is the GEMV"):  # a plain weight
        skinny_gemm(x3[:1], w=r(16, 128, dtype=torch.float16), config=words())
    kw = weight(16, 128, 4, torch.float16)[0]
    kw["qweight"] = torch.empty(16, 66, dtype=torch.uint8)[:, 1:65]  # rows off 4-byte alignment
    with pytest.raises(ValueError, match="4-byte aligned"):
        skinny_gemm(x3[:1], **kw, config=words())


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group,sym", [(8, "K", True), (4, 128, True), (8, 128, False), (4, 128, False)])
@pytest.mark.parametrize("name,k,n,epi", [s for s in DECODE_SHAPES if s[0].startswith("1b")])
def test_gpu_words_gemv_with_the_norm_prologue(name, k, n, epi, bits, group, sym):
    # every WORDS tile of skinny's at the 1B shapes, one row, the norm prologue where decode folds it: bf16 against the
    # float32 reference of the dequantized weight; per channel or groups of 128, zero points (the 8-bit codes' PRMT
    # path starts each word's sum from its zero's term)
    glu, act = epi.get("glu", False), epi.get("act", "none")
    x, kwargs, res, want = cuda_decode_case(1, k, n, bits, epi, group=group, sym=sym)
    norm = {}
    if not epi.get("residual"):
        nw = (1 + 0.2 * torch.randn(k, generator=torch.Generator().manual_seed(1))).to("cuda", torch.bfloat16)
        norm = dict(norm_weight=nw, norm_eps=1e-5)
        want = S.reference(x.float(), **kwargs, act=act, glu=glu, norm_weight=nw.float(), norm_eps=1e-5)
    for tile in [t for t in S.TILES[(False, bits)] if t.words]:
        c0 = S.tile_config(1, n, k, bits, glu, tile)
        for c in [c0] + ([dict(c0, NORM_POST=True)] if norm else []):  # (the norm's statistics in the loop too)
            ws, counters = cuda_scratch(1, n, k, bits, glu, c)
            got = skinny_gemm(x, residual=res, act=act, glu=glu, workspace=ws, counters=counters, config=c, **norm, **kwargs)
            err = rel_err(got, want)
            assert err <= TOL[torch.bfloat16], f"{name} bits={bits} {c}: rel err {err:.2e}"


@pytest.mark.parametrize("bits,group,sym", [(4, 32, False), (4, "K", True), (8, "K", True), (8, 32, False)])
@pytest.mark.parametrize("split", [1, 3])
def test_scales_ahead_is_the_byte_gemv(bits, group, sym, split):
    """AHEAD (each step's scales loaded a step before) computes the byte-tile GEMV's sums in the same order: the same bits,
    with the GLU epilogue and the norm prologue too, and within tolerance of the float64 reference."""
    x = r(1, 192, dtype=torch.float16)  # 6 steps of 32
    wq = weight(37, 192, bits, torch.float16, group=group, sym=sym)
    c = dict(config(split), DOT=False)
    check(x, wq, config=dict(c, AHEAD=True))
    assert torch.equal(skinny_gemm(x, **wq[0], config=dict(c, AHEAD=True)), skinny_gemm(x, **wq[0], config=c))
    nw = r(192, dtype=torch.float16, scale=0.2) + 1
    glu = weight(2 * 24, 192, bits, torch.float16, group=group, sym=sym)[0]
    kw = dict(act="silu", glu=True, norm_weight=nw, norm_eps=1e-5, **glu)
    assert torch.equal(skinny_gemm(x, **kw, config=dict(c, AHEAD=True)), skinny_gemm(x, **kw, config=c))
    with pytest.raises(ValueError, match="AHEAD is the byte-tile GEMV"):
        skinny_gemm(x, **wq[0], config=dict(words(), AHEAD=True))


def test_register_cap_config():
    # maxnreg (ptxas's cap on registers a thread; skinny.Tile.maxnreg) changes no sums: the interpreter ignores it, and
    # a value ptxas cannot take is refused before a launch
    x = r(1, 128, dtype=torch.float16)
    kw = weight(40, 128, 4, torch.float16)[0]
    c = dict(BLOCK_N=16, BLOCK_K=32, SPLIT_K=2)
    assert torch.equal(skinny_gemm(x, **kw, config=dict(c, maxnreg=128)), skinny_gemm(x, **kw, config=c))
    for bad in (16, 256, 128.0):
        with pytest.raises(ValueError, match="maxnreg must be an int in 24..255"):
            skinny_gemm(x, **kw, config=dict(c, maxnreg=bad))
