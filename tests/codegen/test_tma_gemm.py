"""kiln.codegen.kernels.tma_gemm: the persistent TMA template against the float64 formulas of the AQGEMM (codes and
scales) and the GEMM (16-bit) ops. CPU: the Triton interpreter at irregular shapes, three programs walking many tiles
(rows, columns and K cut by the descriptors' zero fill); GPU: bfloat16 at DiT-XL/2 and Llama prefill shapes, every
configuration."""
import pytest
import torch

from kiln.codegen.kernels import aqgemm as A
from kiln.codegen.kernels import gemm as G
from kiln.codegen.kernels import tma_gemm as T
from kiln.ir import quant
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter  # CPU cases run under TRITON_INTERPRET=1; gpu-marked ones need it off

gen = torch.Generator().manual_seed(0)


def r(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def coded(lead, k, n, fmt, dtype, bias=False, gate=None, residual=None):
    """Codes and scales of a random x [*lead, k] and w [n, k]; bias, gate, residual (shapes) in ``dtype``."""
    qx, sx = quant.quantize_rows(r(*lead, k), fmt)
    qw, sw = quant.quantize_rows(r(n, k, scale=k ** -0.5), fmt)
    extra = [r(n, dtype=dtype) if bias else None] + [r(*sh, dtype=dtype) if sh else None for sh in (gate, residual)]
    return (qx, sx, qw, sw, *extra)


def run_coded(ops, *more, **kw):
    """tma_gemm on ``coded``'s operands (aqgemm's order: qx, sx, qw, sw, bias, gate, residual)."""
    qx, sx, qw, sw, *rest = ops + more
    return T.tma_gemm(qx, qw, sx, sw, *rest, **kw)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("act, glu", [("none", False), ("gelu_tanh", False), ("silu", True)])
def test_codes_against_the_aqgemm_formula(fmt, act, glu):
    ops = coded((45,), 80, 50, fmt, torch.float32, bias=True)  # 3 x 4 (glu: 3 x 2) tiles of 16 on 3 programs, K 80 = 2.5 steps
    got = run_coded(ops, act=act, glu=glu, dtype=torch.float32)
    want = A.reference(*ops, act=act, glu=glu)
    assert got.shape == want.shape and rel_err(got, want) <= TOL[torch.float32]


def test_codes_broadcast_gate_and_the_residual_written_over():
    ops = coded((2, 19), 48, 24, "fp8", torch.float16, bias=True, gate=(2, 1, 24), residual=(2, 19, 24))
    want = A.reference(*ops, act="gelu_tanh")
    res = ops[-1].clone()
    got = run_coded(ops[:-1], res, act="gelu_tanh", out=res)  # out IS the residual: an in-place residual add
    assert got is res and got.dtype == torch.float16 and rel_err(got, want) <= TOL[torch.float16]


@pytest.mark.parametrize("glu", [False, True])
def test_sixteen_bit_against_the_gemm_formula(glu):
    x, w = r(3, 13, 40, dtype=torch.float16), r(36, 40, dtype=torch.float16, scale=40 ** -0.5)
    b, res = r(36, dtype=torch.float16), r(18 if glu else 36, dtype=torch.float16)
    got = T.tma_gemm(x, w, bias=b, residual=res, act="silu", glu=glu)
    want = G.reference(x.double(), w.double(), b.double(), None, res.double(), act="silu", glu=glu)
    assert got.dtype == torch.float16 and got.shape == want.shape and rel_err(got, want) <= TOL[torch.float16]


def test_supported_names_what_tma_reads():
    x, w = torch.zeros(8, 64, dtype=torch.float16), torch.zeros(16, 64, dtype=torch.float16)
    assert T.supported(x, w)
    assert not T.supported(x[:, 1:33], w[:, :32])  # a base 2 bytes past an aligned one
    assert not T.supported(torch.zeros(8, 60, dtype=torch.float16), torch.zeros(16, 60, dtype=torch.float16))  # 120-byte rows
    assert not T.supported(x.t().contiguous().t(), w)  # a column-major x
    assert not T.supported(x.float(), w.float())  # float32: not a tensor-core operand dtype here
    assert T.supported(None, w) and not T.supported(None, w[:, :60])  # any aligned contiguous x: w alone decides


@pytest.mark.parametrize("call, message", [
    (lambda x, w: T.tma_gemm(x, w, torch.ones(8), torch.ones(16)), "float16 operands take no scales"),
    (lambda x, w: T.tma_gemm(x[:, 1:33], w[:, :32]), "TMA cannot read x"),
    (lambda x, w: T.tma_gemm(x, w, bias=torch.zeros(5, dtype=torch.float16)), r"bias"),
    (lambda x, w: T.tma_gemm(x.to(torch.int8), w.to(torch.int8)), "int8 operands take both scales"),
])
def test_the_launcher_refuses(call, message):
    with pytest.raises(ValueError, match=message):
        call(torch.zeros(8, 64, dtype=torch.float16), torch.zeros(16, 64, dtype=torch.float16))


def test_configs_fit_the_rows_and_glu():
    assert T.configs(64, torch.float8_e4m3fn) == []  # decode rows: the skinny kernels
    assert all(c["BLOCK_K"] == 128 for c in T.configs(2048, torch.float8_e4m3fn))  # 128 bytes a step
    assert all(c["BLOCK_K"] == 64 for c in T.configs(2048, torch.bfloat16))
    for glu in (False, True):  # at most 128 float32 accumulator registers a thread
        assert all(c["BLOCK_M"] * c["BLOCK_N"] * (1 + glu) <= 128 * 32 * c["num_warps"] for c in T.configs(2048, torch.int8, glu=glu))
    assert len(T.configs(2048, torch.int8, glu=True)) < len(T.configs(2048, torch.int8))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8", "bf16"])
@pytest.mark.parametrize("m,k,n,glu", [(256, 1152, 3456, False), (2048, 1152, 4608, False), (2048, 2048, 16384, True),
                                       (2048, 8192, 2048, False), (300, 2048, 3072, False)])
def test_every_config_at_model_shapes(fmt, m, k, n, glu):
    act = "silu" if glu else "gelu_tanh"
    res = r(m, n // 2 if glu else n, dtype=torch.bfloat16).cuda()
    if fmt == "bf16":
        x, w, b = r(m, k, dtype=torch.bfloat16).cuda(), r(n, k, dtype=torch.bfloat16, scale=k ** -0.5).cuda(), r(n, dtype=torch.bfloat16).cuda()
        want = G.reference(x.double(), w.double(), b.double(), None, res.double(), act=act, glu=glu)

        def run(**kw):
            return T.tma_gemm(x, w, bias=b, residual=res, **kw)
    else:
        ops = tuple(t.cuda() for t in coded((m,), k, n, fmt, torch.bfloat16, bias=True)[:5])
        want = A.reference(*ops, None, res, act=act, glu=glu)

        def run(**kw):
            return run_coded(ops, None, res, dtype=torch.bfloat16, **kw)
    cs = T.configs(m, torch.bfloat16 if fmt == "bf16" else A.CODE_DTYPES[fmt], glu)
    for c in cs + [dict(cs[0], PERSISTENT=False)]:  # (and a program a tile)
        assert rel_err(run(act=act, glu=glu, config=c), want) <= TOL[torch.bfloat16], c
