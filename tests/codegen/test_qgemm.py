"""kiln.codegen.kernels.qgemm: the weight-only quantized GEMM (prefill, M > 16; its split-K, which the decode path
uses, on row tiles too) against a float64 reference (the weight built from its codes in float64, F.linear, the GEMM
op's epilogue). CPU: the Triton interpreter,
float16 / float32, irregular shapes; GPU: bfloat16 at Llama prefill shapes."""

import pytest
import torch

import kiln.codegen.kernels.qgemm as Q
from kiln.codegen.kernels.gemm import reference
from kiln.codegen.kernels.qgemm import dequantize, qgemm
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter  # CPU cases run under TRITON_INTERPRET=1; gpu-marked ones need it off

gen = torch.Generator().manual_seed(0)


def r(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def random_qweight(n, k, bits, group, sym, scale_dtype=torch.float32, generator=gen, device="cpu"):
    """Random codes in kiln's format: ``(qweight, scales, zeros, bits, group, w64)``. w64 [n, k] is the float64
    weight made from the codes BEFORE packing, so a kernel that unpacks wrongly cannot match it. ``group``
    "K": one group per row. Scales keep x @ w^T of O(1)."""
    g = k if group == "K" else group
    codes = torch.randint(0, 2 ** bits, (n, k), generator=generator, dtype=torch.uint8)
    zeros = None if sym else torch.randint(0, 2 ** bits, (n, k // g), generator=generator, dtype=torch.uint8)
    scales = ((torch.rand(n, k // g, generator=generator, dtype=torch.float64) + 0.5) / (2 ** (bits - 1) * k ** 0.5)).to(scale_dtype)
    zero = zeros.double() if zeros is not None else torch.full((n, k // g), 2.0 ** (bits - 1), dtype=torch.float64)
    w64 = (codes.double() - zero.repeat_interleave(g, 1)) * scales.double().repeat_interleave(g, 1)
    # 4 bits: byte j holds k = 2j in its low nibble, k = 2j + 1 in its high nibble
    qweight = codes if bits == 8 else codes[:, 0::2] | (codes[:, 1::2] << 4)
    return tuple(t.to(device) if t is not None else None for t in (qweight, scales, zeros)) + (bits, g, w64.to(device))


def check(x, qw, bias=None, gate=None, residual=None, act="none", glu=False, **kw):
    got = qgemm(x, *qw[:5], bias, gate, residual, act=act, glu=glu, **kw)
    want = reference(*(t.double() if t is not None else None for t in (x, qw[5], bias, gate, residual)), act=act, glu=glu)
    assert got.dtype == x.dtype and got.shape == want.shape
    err = rel_err(got, want)
    assert err <= TOL[x.dtype], f"rel err {err:.2e} > {TOL[x.dtype]:.0e}"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [32, 64, "K"])
@pytest.mark.parametrize("bits", [8, 4])
def test_bits_groups_zero_points(bits, group, sym, dtype):
    # M = 40, N = 37, K = 192 against the 32 x 16 x 32 interpreter tiles: partial tiles in M, N and K
    check(r(40, 192, dtype=dtype), random_qweight(37, 192, bits, group, sym))


@pytest.mark.parametrize("bits,group,block_k", [
    (4, 32, 128),   # four groups a step: the tile reshaped [BLOCK_N, 4, 32] against four scales
    (8, 64, 128),   # two groups a step, the last step half past K = 192
    (4, "K", 256),  # one group a row, narrower than BLOCK_K and no power of two
])
def test_steps_spanning_groups(bits, group, block_k):
    config = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=block_k)
    check(r(17, 192), random_qweight(37, 192, bits, group, sym=False), act="silu", config=config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias,gate,residual,act,glu", [
    (True, None, None, "none", False),
    (False, None, None, "silu", False),
    (True, None, None, "gelu_tanh", False),
    (False, None, None, "silu", True),                   # merged [gate; up] weight: N = 96 -> 48 outputs
    (False, (2, 1, 48), None, "none", False),            # DiT-style gate [B, 1, N]: a row tile spans both batches
    (False, None, (2, 20, 48), "none", False),           # residual
    (True, (2, 1, 48), (2, 20, 48), "gelu_tanh", False),  # everything at once
    (True, (2, 1, 48), (2, 20, 48), "silu", True),
])
def test_epilogues(dtype, bias, gate, residual, act, glu):
    n = 96 if glu else 48
    qw = random_qweight(n, 64, 4, 32, sym=False)
    check(r(2, 20, 64, dtype=dtype), qw, r(n, dtype=dtype) if bias else None, r(*gate, dtype=dtype) if gate else None,
          r(*residual, dtype=dtype) if residual else None, act=act, glu=glu)


def test_strided_operands():
    # x a column slice (stride_xm != K), scales and zeros as transposed views, float16 scales
    qweight, scales, zeros, bits, g, w64 = random_qweight(37, 192, 8, 32, sym=False, scale_dtype=torch.float16)
    scales_t, zeros_t = scales.t().contiguous().t(), zeros.t().contiguous().t()
    assert scales_t.stride() != scales.stride()
    x = r(23, 250)[:, 7:199]
    check(x, (qweight, scales_t, zeros_t, bits, g, w64), act="gelu")


def test_out_given_and_in_place_residual():
    qw = random_qweight(24, 64, 4, 64, sym=True)
    x, b, res = r(33, 64, dtype=torch.float16), r(24, dtype=torch.float16), r(33, 24, dtype=torch.float16)
    want = reference(x.double(), qw[5], b.double(), residual=res.double(), act="silu")
    out = torch.empty(33, 24, dtype=torch.float16)
    assert qgemm(x, *qw[:5], b, residual=res, act="silu", out=out) is out
    assert rel_err(out, want) <= TOL[torch.float16]
    assert qgemm(x, *qw[:5], b, residual=res, act="silu", out=res) is res  # out IS the residual
    assert rel_err(res, want) <= TOL[torch.float16]


def test_empty_input():
    qw = random_qweight(24, 64, 8, 32, sym=True)
    assert qgemm(torch.zeros(0, 64), *qw[:5]).shape == (0, 24)


@pytest.mark.parametrize("bits", [8, 4])
def test_dequantize_is_the_format(bits):
    qweight, scales, zeros, bits, g, w64 = random_qweight(5, 64, bits, 32, sym=False)
    assert torch.equal(dequantize(qweight, scales, zeros, bits, g, dtype=torch.float64), w64)
    qweight, scales, zeros, bits, g, w64 = random_qweight(5, 64, bits, "K", sym=True)
    assert torch.equal(dequantize(qweight, scales, None, bits, g, dtype=torch.float64), w64)


def test_configs_are_plain_dicts():
    for m, glu in ((17, False), (4096, False), (4096, True)):
        cs = Q.configs(m, glu)
        assert cs and all(set(c) == {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "num_warps", "num_stages"} for c in cs)
        assert not glu or all(c["BLOCK_M"] * c["BLOCK_N"] <= 128 * 128 for c in cs)


@pytest.mark.parametrize("glu", [False, True])
def test_split_k_through_the_template(glu):
    # the template's split-K (skinny.py's decode path) on grouped row tiles too: M = 40 in 2 tiles of 32 rows
    # (GROUP_M 2), K = 192 in 3 splits of 64. Without counters the programs only write partials, which sum to
    # x @ W^T; with counters the last program of each tile adds them and runs the epilogue, and resets its counter
    n, splits = (96 if glu else 37), 3
    qweight, scales, zeros, bits, g, w64 = random_qweight(n, 192, 4, 32, sym=False)
    weight = Q.Weight(qweight, scales, zeros, bits, g)
    x, bias = r(40, 192), r(n)
    residual = None if glu else r(40, n)
    act = "silu" if glu else "gelu_tanh"
    x2, out, out2, epi, m, n_out = Q.prepare("test", x, weight, bias, None, residual, act, glu, None)
    config = dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=32, GROUP_M=2)
    ws = torch.full((splits * m * n,), float("nan"))
    out.fill_(float("nan"))
    Q.launch(x2, weight, epi, out2, m, n_out, config, split=Q.SplitK(splits, 64, ws))
    assert rel_err(ws.view(splits, m, n).double().sum(0), x.double() @ w64.t()) <= TOL[torch.float32]
    assert out.isnan().all()  # (the reduction is the caller's)
    want = reference(x.double(), w64, bias.double(), None, residual.double() if residual is not None else None, act=act, glu=glu)
    counters = torch.zeros(2 * -(-n_out // 16), dtype=torch.int32)  # one per output tile: 2 row tiles x column tiles
    for _ in range(2):
        out.fill_(float("nan"))
        Q.launch(x2, weight, epi, out2, m, n_out, config, split=Q.SplitK(splits, 64, ws, counters))
        assert rel_err(out, want) <= TOL[torch.float32] and not counters.any()


def bad(**change):
    """qgemm's operands (x [17, 64], 4-bit, group 32, asymmetric) with some replaced."""
    qweight, scales, zeros, bits, g, _ = random_qweight(24, 64, 4, 32, sym=False)
    ops = dict(x=r(17, 64), qweight=qweight, scales=scales, zeros=zeros, bits=bits, group=g)
    ops.update(change)
    return ops


@pytest.mark.parametrize("change,match", [
    (dict(qweight=torch.zeros(24, 64, dtype=torch.uint8)), "qweight .* does not fit x's K = 64 at 4 bits"),
    (dict(qweight=torch.zeros(24, 32, dtype=torch.int8)), "qweight must be a uint8"),
    (dict(qweight=torch.zeros(24, 32)), "qweight must be a uint8"),
    (dict(x=r(17, 63), qweight=torch.zeros(24, 31, dtype=torch.uint8)), "K = 63 is odd"),
    (dict(group=48), "group 48 must be K = 64 or a power of two"),
    (dict(group=128), "group 128 must be K"),
    (dict(bits=3), "bits must be 4 or 8"),
    (dict(scales=torch.ones(24, 3)), "scales must be float16 / float32 \\[N, K // group\\] = \\[24, 2\\]"),
    (dict(scales=torch.ones(24, 2, dtype=torch.float64)), "scales must be"),
    (dict(zeros=torch.zeros(24, 2)), "zeros must be None"),
    (dict(x=r(17, 64, dtype=torch.float64)), "x has dtype torch.float64"),
])
def test_bad_operands_raise(change, match):
    with pytest.raises(ValueError, match=match):
        qgemm(**bad(**change))


def test_bad_epilogue_operands_raise():
    ops = bad()
    with pytest.raises(ValueError, match="bias"):
        qgemm(**ops, bias=r(23))
    with pytest.raises(ValueError, match="glu needs an even"):
        qgemm(**bad(**dict(zip(("qweight", "scales", "zeros"), random_qweight(23, 64, 4, 32, False)[:3]))), glu=True)
    with pytest.raises(ValueError, match="residual .* does not broadcast"):
        qgemm(**ops, residual=r(2, 17, 24))
    with pytest.raises(ValueError, match="bias has dtype"):
        qgemm(**ops, bias=r(24, dtype=torch.float16))
    with pytest.raises(ValueError, match="config .* needs BLOCK_K"):
        qgemm(**ops, config=dict(BLOCK_M=32, BLOCK_N=16, BLOCK_K=24))


# ----------------------------------------------------------------------------- GPU (bf16, real shapes)


def cuda_case(m, k, n, bits, group, sym=True, act="none", glu=False, residual=False):
    g = torch.Generator().manual_seed(0)
    qweight, scales, zeros, bits, group, w64 = random_qweight(n, k, bits, group, sym, torch.float16, g, "cuda")
    x = torch.randn(m, k, generator=g).to("cuda", torch.bfloat16)
    res = torch.randn(m, n // 2 if glu else n, generator=g).to("cuda", torch.bfloat16) if residual else None
    want = reference(x.float(), w64.float(), None, None, res.float() if res is not None else None, act=act, glu=glu)
    got = qgemm(x, qweight, scales, zeros, bits, group, residual=res, act=act, glu=glu)
    torch.cuda.synchronize()
    err = rel_err(got, want)
    assert err <= TOL[torch.bfloat16], f"rel err {err:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("bits,group,sym", [(4, 128, True), (4, 32, False), (8, "K", True), (8, 64, False)])
def test_gpu_llama_1b_prefill_qkv(bits, group, sym):
    cuda_case(512, 2048, 3072, bits, group, sym)


@pytest.mark.gpu
@pytest.mark.parametrize("bits", [8, 4])
def test_gpu_llama_1b_prefill_mlp(bits):
    cuda_case(512, 2048, 2 * 8192, bits, 128, act="silu", glu=True)
    cuda_case(512, 8192, 2048, bits, 128, residual=True)


@pytest.mark.gpu
def test_gpu_configs_all_correct():
    # every autotuner entry, so the tuner never picks a wrong one: Llama-3.1-8B down projection, 17 and 4096 rows
    g = torch.Generator().manual_seed(0)
    qweight, scales, zeros, bits, group, w64 = random_qweight(4096, 14336, 4, 128, False, torch.float16, g, "cuda")
    for m in (17, 4096):
        x = torch.randn(m, 14336, generator=g).to("cuda", torch.bfloat16)
        want = x.float() @ w64.float().t()
        for c in Q.configs(m):
            err = rel_err(qgemm(x, qweight, scales, zeros, bits, group, config=c), want)
            assert err <= TOL[torch.bfloat16], f"{c}: rel err {err:.2e}"
