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


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("act, glu", [("gelu_tanh", False), ("silu", True)])
def test_tma_store_against_the_aqgemm_formula(fmt, act, glu):
    # the output stored through shared memory by the TMA unit: 48 (glu: 24) float32 columns, rows and columns past the
    # output clipped (45 rows, tiles of 16 x 8 stored), a broadcast gate and the residual too
    n = 48
    out_n = n // 2 if glu else n
    ops = coded((45,), 80, n, fmt, torch.float32, bias=True, gate=(1, out_n), residual=(45, out_n))
    got = run_coded(ops, act=act, glu=glu, dtype=torch.float32, config=dict(T.INTERPRET_CONFIG, TMA_STORE=True))
    want = A.reference(*ops, act=act, glu=glu)
    assert got.shape == want.shape and rel_err(got, want) <= TOL[torch.float32]
    with pytest.raises(ValueError, match="TMA-writable output"):  # rows of 50 float32: 200 bytes apart
        run_coded(coded((45,), 80, 50, fmt, torch.float32), act=act, dtype=torch.float32,
                  config=dict(T.INTERPRET_CONFIG, TMA_STORE=True))
    with pytest.raises(ValueError, match="TMA_STORE takes no codes"):
        run_coded(ops[:4], act=act, glu=glu, codes=(fmt, 8), config=dict(T.INTERPRET_CONFIG, TMA_STORE=True))


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
    for dt in (torch.int8, torch.float8_e4m3fn):  # 1-byte codes last try the tile of two programs an SM
        assert [c.get("PER_SM", 1) for c in T.configs(2048, dt)][-1] == 2
    assert all("PER_SM" not in c for c in T.configs(2048, torch.bfloat16))


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
    for c in cs + [dict(cs[0], PERSISTENT=False), dict(cs[0], TMA_STORE=True)]:  # (and a program a tile, a TMA store)
        assert rel_err(run(act=act, glu=glu, config=c), want) <= TOL[torch.bfloat16], c


# Block scales: x's codes with a scale per row and G columns (the consumer), the output stored as codes with a scale per
# row and G columns (the producer): a GLU gate / up GEMM handing the down projection its codes with no pass of its own.
# Both templates: this persistent TMA one and aqgemm.py's pointer one (same arguments, in tma_gemm's order)
KERNELS = {"tma": T.tma_gemm,
           "pointer": lambda x, w, xs, ws, *rest, **kw: A.aqgemm(x, xs, w, ws, *rest, **kw)}


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("k, group", [(96, 32), (128, 64)])  # K steps of 32: one a group, two a group
def test_x_with_group_scales_against_the_dequantized_formula(kernel, fmt, k, group):
    gemm = KERNELS[kernel]
    x = r(45, k) * torch.linspace(0.01, 30, k, dtype=torch.float64).float()  # groups of very different ranges
    qx, sx = quant.quantize_rows(x, fmt, group=group)
    qw, sw = quant.quantize_rows(r(50, k, scale=k ** -0.5), fmt)
    b, res = r(50), r(45, 25)
    got = gemm(qx, qw, sx, sw, b, None, res, act="silu", glu=True, dtype=torch.float32, xs_group=group)
    xd, wd = quant.dequantize_rows(qx, sx, torch.float64), quant.dequantize_rows(qw, sw, torch.float64)
    assert sx.shape == (45, k // group) and xd.shape == x.shape
    want = G.reference(xd, wd, b.double(), None, res.double(), act="silu", glu=True)
    assert got.shape == want.shape and rel_err(got, want) <= TOL[torch.float32]
    if fmt == "fp8":  # (e4m3's relative step is the same at any size: one scale a row loses little above its subnormals)
        return
    # int8: one scale a row loses the small groups' digits
    qr, sr = quant.quantize_rows(x, fmt)
    row = gemm(qr, qw, sr, sw, b, None, res, act="silu", glu=True, dtype=torch.float32)
    assert rel_err(got, G.reference(x.double(), wd, b.double(), None, res.double(), act="silu", glu=True)) < \
        rel_err(row, G.reference(x.double(), wd, b.double(), None, res.double(), act="silu", glu=True))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("glu", [False, True])
def test_codes_out_equal_the_output_then_the_quantizer_by_groups(kernel, fmt, glu):
    # 45 rows (3 row tiles of 16, a partial one), N = 48 (3 column tiles of 16), groups of 8 and 16
    from kiln.codegen.kernels.quantize_rows import quantize_rows as quantize_kernel
    ops = coded((45,), 80, 96 if glu else 48, fmt, torch.float16, bias=True)[:5]
    n = 48
    res = r(45, n, dtype=torch.float16)
    for group in (8, 16):
        qx, sx, qw, sw, b = ops
        kw = dict(act="silu" if glu else "gelu_tanh", glu=glu, dtype=torch.float16)
        y = KERNELS[kernel](qx, qw, sx, sw, b, None, res, **kw)
        c = r(n).abs() + 0.5 if group == 8 else None  # (the consumer's SmoothQuant vector, multiplied in first)
        q, s = KERNELS[kernel](qx, qw, sx, sw, b, None, res, codes=(fmt, group), smooth=c, **kw)
        y = y.float() * c if c is not None else y
        nn = y.shape[-1]
        q_want, s_want = quantize_kernel(y.reshape(-1, group), fmt)  # each group a row of the row quantizer
        assert q.shape == y.shape and s.shape == (45, nn // group)
        assert torch.equal(s.reshape(-1), s_want), group
        assert torch.equal(q.reshape(-1, group).view(torch.uint8), q_want.view(torch.uint8)), group
        q_ref, s_ref = quant.quantize_rows(y.float(), fmt, group=group)  # the torch formula (fp8 subnormals aside)
        assert torch.equal(s, s_ref) and rel_err(quant.dequantize_rows(q, s), quant.dequantize_rows(q_ref, s_ref)) < 1e-2


@pytest.mark.parametrize("call, message", [
    (lambda q, s, w, sw: T.tma_gemm(q, w, s, sw, xs_group=48), "xs_group=48 must divide K = 64"),
    (lambda q, s, w, sw: T.tma_gemm(q, w, s, sw, xs_group=32), r"xs must be float32 \[8, 2\]"),
    (lambda q, s, w, sw: T.tma_gemm(q, w, s, sw, codes=("fp8", 12)), "a group dividing N = 16 and the config's BLOCK_N"),
    (lambda q, s, w, sw: T.tma_gemm(q, w, s, sw, codes=("int4", 16)), "fmt one of int8, fp8"),
    (lambda q, s, w, sw: T.tma_gemm(q, w, s, sw, codes=("fp8", 16), out=torch.zeros(8, 16)), "out must be .codes"),
    (lambda q, s, w, sw: T.tma_gemm(q, w, s, sw, smooth=torch.ones(16)), "smooth .* codes= only"),
])
def test_block_scale_arguments_are_checked(call, message):
    q, s = quant.quantize_rows(torch.randn(8, 64, generator=gen), "fp8")
    w, sw = quant.quantize_rows(torch.randn(16, 64, generator=gen), "fp8")
    with pytest.raises(ValueError, match=message):
        call(q, s, w, sw)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("m,k,n,glu", [(2048, 2048, 16384, True), (2048, 1152, 4608, False), (300, 2048, 1024, False)])
def test_block_scales_every_config_at_model_shapes(fmt, m, k, n, glu):
    # the producer: codes of its output by groups of 128 against its plain output quantized group by group; the consumer
    # (x = those codes, K = the producer's N): its product with block scales against the dequantized float64 formula
    from kiln.codegen.kernels.quantize_rows import quantize_rows as quantize_kernel
    act = "silu" if glu else "gelu_tanh"
    ops = tuple(t if t is None else t.cuda() for t in coded((m,), k, n, fmt, torch.bfloat16, bias=not glu)[:5])  # (GLU: no bias)
    runs = [(T.tma_gemm, c) for c in T.configs(m, A.CODE_DTYPES[fmt], glu)] + [(KERNELS["pointer"], c) for c in A.configs(m, glu)]
    qx, sx, qw1, sw1, b = ops
    for gemm, c in [(gemm, c) for gemm, c in runs if c["BLOCK_N"] % 128 == 0]:
        y = gemm(qx, qw1, sx, sw1, b, act=act, glu=glu, config=c)
        q, s = gemm(qx, qw1, sx, sw1, b, act=act, glu=glu, config=c, codes=(fmt, 128))
        q_want, s_want = quantize_kernel(y.reshape(-1, 128), fmt)
        # two kernels (with and without codes) may round a group's largest value to neighbouring bf16 numbers (their
        # float32 epilogues are compiled apart): each scale within one bf16 step (2^-7) of the plain output's
        step = ((s.reshape(-1) - s_want).abs() / s_want.clamp_min(1e-30)).max().item()
        assert step <= 2 ** -7, (c, "scales", step)
        err = rel_err(quant.dequantize_rows(q.reshape(-1, 128), s.reshape(-1)), quant.dequantize_rows(q_want, s_want))
        assert err <= 1e-3, (c, "codes", err)
    nk = y.shape[-1]
    qw, sw = (t.cuda() for t in quant.quantize_rows(r(512, nk, scale=nk ** -0.5), fmt))
    want = G.reference(quant.dequantize_rows(q, s, torch.float64), quant.dequantize_rows(qw, sw, torch.float64))
    runs = [(T.tma_gemm, c) for c in T.configs(m, A.CODE_DTYPES[fmt])] + [(KERNELS["pointer"], c) for c in A.configs(m)]
    for gemm, c in runs:
        err = rel_err(gemm(q, qw, s, sw, xs_group=128, config=c), want)
        assert err <= TOL[torch.bfloat16], (c, "consumer", err)
