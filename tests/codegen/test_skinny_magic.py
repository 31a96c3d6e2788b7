"""The MAGIC tiles of the skinny template (qgemm.py MAGIC, qweight_tiles.py): a 4-bit weight's codes minus their zero,
exactly, in x's dtype for tl.dot (the tensor cores on the GPU), K permuted alike in the codes and x inside a step, the
group's scale applied once a step. Under the interpreter the codes go through the float path (the packed bit operations
are inline PTX): these tests pin the permutation, the scales, the zeros, split-K and the epilogues; the GPU tests the
PTX against the float32 reference."""
import importlib.util
from pathlib import Path

import pytest
import torch

import kiln.codegen.kernels.skinny as S
from kiln.codegen.kernels.skinny import configs, skinny_gemm
from kiln.testing import TOL, rel_err

_spec = importlib.util.spec_from_file_location("_test_skinny", Path(__file__).parent / "test_skinny.py")
_skinny_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_skinny_tests)
r, weight, check, check_norm = _skinny_tests.r, _skinny_tests.weight, _skinny_tests.check, _skinny_tests.check_norm
random_qweight, cuda_scratch, DECODE_SHAPES = (_skinny_tests.random_qweight, _skinny_tests.cuda_scratch,
                                               _skinny_tests.DECODE_SHAPES)


def magic(split=1, block_k=32, block_n=16):
    return dict(BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, DOT=True, SWAP=True, MAGIC=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("group,sym", [(32, True), (64, False), ("K", False), ("K", True)])
@pytest.mark.parametrize("m,split", [(1, 1), (1, 3), (3, 2), (16, 1)])
def test_magic_rows_groups_zeros_splits(m, split, group, sym, dtype):
    """1, 3 and 16 rows against a 4-bit weight (groups of 32 / 64 or one a row, zero points or not), K past a whole
    step where the group allows (its codes and x masked), 37 rows of weight (a partial tile), split-K reduced in the
    last program."""
    k = 320 if group == 64 else 224  # 7 steps of 32 (a group of 64 divides K: 5 groups, 10 steps)
    x = r(m, k, dtype=dtype)
    check(x, weight(37, k, 4, dtype, group=group, sym=sym), config=magic(split))


@pytest.mark.parametrize("m", [1, 5])
def test_magic_glu_norm_bias_residual(m):
    """The gate/up form (GLU, the norm prologue, the x tile normalised before its permutation) and down's (a residual),
    a bias: within the float16 tolerance of float64, and close to the byte tiles' result."""
    k = 256
    x, nw = r(m, k, dtype=torch.float16), r(k, dtype=torch.float16, scale=0.2) + 1
    wq = weight(2 * 24, k, 4, torch.float16, group=64, sym=False)
    check_norm(x, wq, nw, act="silu", glu=True, config=magic(2, block_k=64))
    res, bias, wq = r(m, 24, dtype=torch.float16), r(24, dtype=torch.float16), weight(24, k, 4, torch.float16, group=64)
    got = check(x, wq, bias=bias, residual=res, config=magic(1))
    base = skinny_gemm(x, bias=bias, residual=res, **wq[0], config=dict(magic(1), MAGIC=False))
    assert rel_err(got, base) <= TOL[torch.float16]


def test_magic_k_order_is_permuted_alike():
    """One nonzero code at each k in turn (x all ones but that column's 2): every k reaches its own output, so the
    codes' and x's permutations inside a step agree (a mismatch sums another column's x)."""
    k, n = 64, 16
    q = torch.full((n, k), 8, dtype=torch.uint8)  # code 8 = the symmetric zero: weight 0
    q[torch.arange(n), torch.arange(n) * 4 + 1] = 11  # row i: weight 3 at column 4 i + 1
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()
    scales = torch.ones(n, 1, dtype=torch.float16)
    x = torch.ones(1, k, dtype=torch.float16)
    x[0, torch.arange(n) * 4 + 1] = torch.arange(2, 2 + n, dtype=torch.float16)
    got = skinny_gemm(x, qweight=packed, scales=scales, zeros=None, bits=4, group=k, config=magic(1, block_k=64))
    assert torch.equal(got[0].float(), 3 * torch.arange(2, 2 + n, dtype=torch.float32))


def test_magic_config_checks():
    x = r(1, 128, dtype=torch.float16)
    with pytest.raises(ValueError, match="MAGIC is the swapped tl.dot tile"):  # an 8-bit weight
        skinny_gemm(x, **weight(16, 128, 8, torch.float16)[0], config=magic())
    with pytest.raises(ValueError, match="MAGIC is the swapped tl.dot tile"):  # not swapped
        skinny_gemm(x, **weight(16, 128, 4, torch.float16)[0], config=dict(magic(), SWAP=False))
    with pytest.raises(ValueError, match="at most the group"):  # a step over two groups of 32
        skinny_gemm(x, **weight(16, 128, 4, torch.float16, group=32)[0], config=magic(block_k=64))


@pytest.mark.parametrize("m", [1, 16])
@pytest.mark.parametrize("group", [128, 64, 2048, 0])
def test_configs_offer_magic_tiles_for_4_bit_weights(m, group):
    cs = configs(m, 16384, 2048, 4, glu=True, group=group)
    magic_cs = [c for c in cs if c.get("MAGIC")]
    assert magic_cs and all(c["DOT"] and c["SWAP"] for c in magic_cs)
    assert all(c["BLOCK_K"] <= group for c in magic_cs if 0 < group < 2048)
    assert [c for c in cs if not c.get("MAGIC")] == configs(m, 16384, 2048, 4, glu=True)  # the others as without group
    assert not any(c.get("MAGIC") for c in configs(m, 16384, 2048, 8, glu=True, group=group))
    assert not any(c.get("MAGIC") for c in configs(m, 16384, 2048, 4, glu=True))


# ----------------------------------------------------------------------------- on the GPU


def cuda_magic_case(m, k, n, epi, group, sym, dtype):
    """Operands in ``dtype`` on the GPU and the float32 reference: ``(x, weight kwargs, residual, want)``."""
    g = torch.Generator().manual_seed(0)
    qweight, scales, zeros, bits, group, w64 = random_qweight(n, k, 4, group, sym, torch.float16, g, "cuda")
    x = torch.randn(m, k, generator=g).to("cuda", dtype)
    res = torch.randn(m, n // 2 if epi.get("glu") else n, generator=g).to("cuda", dtype) if epi.get("residual") else None
    want = S.reference(x.float(), qweight=qweight, scales=scales.float(), zeros=zeros, bits=4, group=group,
                       residual=res.float() if res is not None else None, act=epi.get("act", "none"), glu=epi.get("glu", False))
    return x, dict(qweight=qweight, scales=scales, zeros=zeros, bits=4, group=group), res, want


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,group,sym", [(torch.bfloat16, 128, True), (torch.bfloat16, 64, False),
                                             (torch.float16, "K", False)])
@pytest.mark.parametrize("name,k,n,epi", DECODE_SHAPES[:3] + DECODE_SHAPES[5:])
def test_gpu_magic_tiles(name, k, n, epi, group, sym, dtype):
    # every MAGIC tile skinny offers at 1, 5 and 16 rows (the packed bit operations and the wgmma operand layout),
    # symmetric (the constant zero operand) and with zero points, bf16 and fp16: against the float32 reference
    glu, act = epi.get("glu", False), epi.get("act", "none")
    for m in (1, 5, 16):
        x, kwargs, res, want = cuda_magic_case(m, k, n, epi, group, sym, dtype)
        for c in [c for c in configs(m, n, k, 4, glu, group=kwargs["group"]) if c.get("MAGIC")]:
            ws, counters = cuda_scratch(m, n, k, 4, glu, c)
            got = skinny_gemm(x, residual=res, act=act, glu=glu, workspace=ws, counters=counters, config=c, **kwargs)
            err = rel_err(got, want)
            assert err <= TOL[dtype], f"{name} m={m} {dtype} group={group} sym={sym} {c}: rel err {err:.2e}"
            assert not counters.any(), c


@pytest.mark.gpu
@pytest.mark.parametrize("name,k,n,epi", [DECODE_SHAPES[0], DECODE_SHAPES[1]])
def test_gpu_magic_tiles_with_the_norm_prologue(name, k, n, epi):
    glu, act = epi.get("glu", False), epi.get("act", "none")
    for m in (1, 16):
        x, kwargs, _, _ = cuda_magic_case(m, k, n, epi, 128, False, torch.bfloat16)
        nw = (1 + 0.2 * torch.randn(k, generator=torch.Generator().manual_seed(1))).to("cuda", torch.bfloat16)
        want = S.reference(x.float(), **dict(kwargs, scales=kwargs["scales"].float()), act=act, glu=glu,
                           norm_weight=nw.float(), norm_eps=1e-5)
        for c in [c for c in configs(m, n, k, 4, glu, norm=True, group=128) if c.get("MAGIC")]:
            ws, counters = cuda_scratch(m, n, k, 4, glu, c)
            got = skinny_gemm(x, act=act, glu=glu, norm_weight=nw, norm_eps=1e-5, workspace=ws, counters=counters,
                              config=c, **kwargs)
            err = rel_err(got, want)
            assert err <= TOL[torch.bfloat16], f"{name} m={m} {c}: rel err {err:.2e}"
