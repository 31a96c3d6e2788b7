"""kiln.codegen.kernels.quantize_rows and .aqgemm: the per-token quantizer against ir/quant.py's reference (codes bit
for bit; fp8 subnormals on the GPU only), the int8 / fp8 GEMM template and the scaled
epilogue after torch._int_mm against the float64 formula (CPU: the Triton interpreter, irregular shapes; GPU:
bfloat16 at DiT / Llama shapes, and torch._scaled_mm), and the kernels backend on a w8a8 / fp8 Llama."""
import pytest
import torch

import kiln
from kiln.codegen.kernels import aqgemm as A
from kiln.codegen.kernels import quantize_rows as QR
from kiln.codegen.kernels.quantize_rows import quantize_rows
from kiln.codegen.tuning import Tuner
from kiln.ir import quant
from kiln.ir.interpret import interpret
from kiln.runtime.executor import Executor
from kiln.runtime.target import Target
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter  # CPU cases run under TRITON_INTERPRET=1; gpu-marked ones need it off

gen = torch.Generator().manual_seed(0)
ACTS = ["none", "silu", "gelu_tanh"]


def r(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


@pytest.fixture(params=["two-walks", "one-walk"])
def walks(request, monkeypatch):
    # the quantizer's two forms: 16-wide steps (rows walked twice), or one 64-wide tile holding the rows whole
    if request.param == "one-walk":
        monkeypatch.setitem(QR.INTERPRET_CONFIG, "BLOCK_K", 64)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("smooth", [False, True])
def test_int8_rows_are_the_references_codes(dtype, smooth, walks):
    x = r(9, 53, dtype=dtype, scale=3.0)
    x[2] = 0  # a zero row: the tiny scale, codes 0
    x[3, :6] = torch.tensor([127.0, 0.5, 1.5, -2.5, 2.5, -0.5]).to(dtype)  # ties: half to even
    c = (torch.rand(53, generator=gen) + 0.5) if smooth else None
    q, s = quantize_rows(x[:, :53], "int8", c)
    want_q, want_s = quant.quantize_rows(x.float() * c if smooth else x, "int8")
    assert q.dtype == torch.int8 and torch.equal(s, want_s) and torch.equal(q, want_q)


def test_fp8_rows_are_the_references_codes_but_subnormals(walks):
    x = r(7, 40, scale=2.0)
    x[1, :5] = torch.tensor([448.0, 1.0625, 272.0, 1e-4, -1e-5])  # scale 1: two ties (to 1 and 256: even), subnormals
    q, s = quantize_rows(x.t().contiguous().t(), "fp8")  # (column-major x: strides are honoured)
    want_q, want_s = quant.quantize_rows(x, "fp8")
    assert q.dtype == torch.float8_e4m3fn and torch.equal(s, want_s)
    normal = want_q.float().abs() >= 2 ** -6  # (the interpreter flushes e4m3's subnormals; the GPU test checks them)
    assert torch.equal(q.float()[normal], want_q.float()[normal]) and bool((q.float()[~normal].abs() < 2 ** -6).all())


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_the_division_rounds_as_ieee_at_the_code_boundaries(fmt):
    # x / s by a reciprocal and Markstein's correction (quantize_rows.py) must round as one IEEE division exactly where
    # it matters: quotients a hair either side of the roundings between codes (int8's halves; e4m3's midpoints between
    # neighbours), for scales of every significand (rows' amax at random)
    qmax = 127.0 if fmt == "int8" else 448.0
    m, k = 48, 96
    amax = torch.rand(m, generator=gen, dtype=torch.float64).mul(8).sub(4).exp2().float()  # 2^-4 .. 2^4
    s = (amax / qmax).float()
    if fmt == "int8":
        mids = torch.randint(-127, 127, (m, k), generator=gen).double() + 0.5
    else:
        grid = torch.arange(0, 256, dtype=torch.uint8).view(torch.float8_e4m3fn).double()
        grid = grid[grid.isfinite() & (grid >= 2 ** -6)].unique()  # (normals: the interpreter flushes subnormals)
        pick = torch.randint(0, len(grid) - 1, (m, k), generator=gen)
        sign = torch.randint(0, 2, (m, k), generator=gen).double() * 2 - 1
        mids = sign * (grid[pick] + grid[pick + 1]) / 2
    x = (mids * s.double()[:, None]).float()
    x = torch.where(torch.rand(m, k, generator=gen) < 0.5, x.nextafter(torch.full_like(x, -1e30)),
                    x.nextafter(torch.full_like(x, 1e30)))
    x[:, 0] = amax  # each row's maximum, so its scale is s
    q, sc = quantize_rows(x, fmt)
    want_q, want_s = quant.quantize_rows(x, fmt)
    assert torch.equal(sc, want_s) and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))


def test_wave_fit_offers_the_tile_filling_the_last_wave():
    # DiT-XL/2 at 2048 rows, 1152 output columns, 132 SMs: 128 x 128 tiles are 144 (two waves, the second 12 tiles);
    # 64 x 128 tiles are 288 (three waves, 73% filled). The 1B prefill's 2048 x 2048 fills 128 x 128's waves as well
    # as any other (256 tiles: 97%): nothing offered. GLU never gets a tile past 128 x 128 (two accumulators).
    c = A.wave_fit(2048, 1152, False, 132)
    assert (c["BLOCK_M"], c["BLOCK_N"]) == (64, 128) and c in A.configs(2048)
    assert A.wave_fit(2048, 2048, False, 132) is None
    for m, n in ((512, 4608), (4096, 1152), (300, 5000)):
        c = A.wave_fit(m, n, True, 132)
        assert c is None or (c in A.configs(m, True) and c["BLOCK_M"] * c["BLOCK_N"] <= 128 * 128)


def test_configs_hold_at_most_128_accumulator_registers_a_thread():
    # past that ptxas serializes the products (the GLU's 128 x 128 tile on 4 warps: 256 registers of accumulators)
    for m in (2048, 32):
        for glu in (False, True):
            cs = A.configs(m, glu)
            assert cs and all(c["BLOCK_M"] * c["BLOCK_N"] * (1 + glu) <= 128 * 32 * c["num_warps"] for c in cs)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("k", [2048, 4608, 20000])  # whole rows: 4 a program, 1 (masked to 8192); 20000: walked twice
def test_rows_bit_for_bit_on_the_gpu(fmt, k):
    x = r(300, k, dtype=torch.bfloat16, scale=3.0).cuda()
    c = (torch.rand(k, generator=gen) + 0.5).cuda()
    q, s = quantize_rows(x, fmt, c)
    want_q, want_s = quant.quantize_rows(x.float() * c, fmt)
    assert torch.equal(s, want_s) and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))


def operands(lead, k, n, fmt, dtype, bias=False, gate=None, residual=None):
    """Codes and scales of a random x [*lead, k] and w [n, k]; bias, gate, residual (shapes) in ``dtype``."""
    qx, sx = quant.quantize_rows(r(*lead, k), fmt)
    qw, sw = quant.quantize_rows(r(n, k, scale=k ** -0.5), fmt)
    extra = [r(n, dtype=dtype) if bias else None] + [r(*sh, dtype=dtype) if sh else None for sh in (gate, residual)]
    return (qx, sx, qw, sw, *extra)


def check(ops, act="none", glu=False, dtype=torch.float32, **kw):
    got = A.aqgemm(*ops, act=act, glu=glu, dtype=dtype, **kw)
    want = A.reference(*ops, act=act, glu=glu)
    assert got.dtype == dtype and got.shape == want.shape
    assert rel_err(got, want) <= TOL[dtype], rel_err(got, want)
    return got


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("glu", [False, True])
def test_template_activation_and_glu(fmt, act, glu):
    check(operands((37,), 72, 50, fmt, torch.float32, bias=True), act=act, glu=glu)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_template_broadcast_gate_residual_in_place_and_half_out(fmt):
    ops = operands((2, 19), 40, 24, fmt, torch.float16, bias=True, gate=(2, 1, 24), residual=(2, 19, 24))
    check(ops, act="gelu_tanh", dtype=torch.float16)
    res = ops[-1].clone()
    want = A.reference(*ops, act="silu")
    got = A.aqgemm(*ops[:-1], res, act="silu", out=res)  # out IS the residual: an in-place residual add
    assert got is res and rel_err(got, want) <= TOL[torch.float16]


@pytest.mark.parametrize("glu", [False, True])
def test_scaled_epilogue_after_int_mm(glu):
    qx, sx, qw, sw, b, g, res = operands((3, 11), 48, 40, "int8", torch.float16, bias=True, gate=(3, 11, 20 if glu else 40),
                                         residual=(20 if glu else 40,))
    h = torch._int_mm(qx.reshape(33, 48), qw.t()).view(3, 11, 40)
    got = A.scaled_epilogue(h, sx, sw, b, g, res, act="silu", glu=glu, dtype=torch.float16)
    assert rel_err(got, A.reference(qx, sx, qw, sw, b, g, res, act="silu", glu=glu)) <= TOL[torch.float16]


@pytest.mark.parametrize("bad, message", [
    (lambda o: (o[0].float(),) + o[1:], "qx and qw must be int8 or float8_e4m3fn"),
    (lambda o: (o[0], o[1][:-1]) + o[2:], r"xs must be float32 \[9\]"),
    (lambda o: o[:3] + (o[3].half(),) + o[4:], r"ws must be float32 \[6\]"),
    (lambda o: o[:4] + (torch.zeros(5),) + o[5:], r"bias \(5,\) must be \[6\]"),
])
def test_launcher_refuses(bad, message):
    with pytest.raises(ValueError, match=message):
        A.aqgemm(*bad(operands((9,), 32, 6, "int8", torch.float32, bias=True)), dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("m,k,n,glu", [(256, 1152, 6912, False), (2048, 2048, 16384, True), (2048, 8192, 2048, False), (33, 2048, 3072, False)])
def test_template_bf16_at_model_shapes(fmt, m, k, n, glu):
    ops = [t.cuda() if t is not None else None for t in operands((m,), k, n, fmt, torch.bfloat16, bias=True, residual=(m, n // 2 if glu else n))]
    check(ops, act="silu" if glu else "gelu_tanh", glu=glu, dtype=torch.bfloat16)
    for c in A.configs(m, glu)[:2]:
        check(ops, act="silu" if glu else "gelu_tanh", glu=glu, dtype=torch.bfloat16, config=c)


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_library_candidates_on_the_gpu(fmt):
    from kiln.codegen import lower
    x, w = r(4, 300, 2048, dtype=torch.bfloat16).cuda(), r(3072, 2048, scale=2048 ** -0.5).cuda()
    qw, sw = quant.quantize_rows(w, fmt)
    for glu, act in ((False, "none"), (True, "silu")):
        attrs = dict(format=fmt, smooth=False, bias=False, gate=False, residual=False, act=act, glu=glu)
        out = torch.empty(4, 300, 1536 if glu else 3072, dtype=torch.bfloat16, device="cuda")
        _, candidates = lower.aqgemm([x, qw, sw], attrs, out, None, torch.device("cuda"))
        lib = "int-mm" if fmt == "int8" else "scaled-mm"
        assert lib in candidates
        want = kiln.ir.ops.OPS["AQGEMM"].ref([x.double(), qw, sw], attrs)
        for name, run in candidates.items():
            run()
            assert rel_err(out, want) <= TOL[torch.bfloat16], name


@pytest.fixture(scope="module")
def llamas(pipeline_models):
    hf_llm, ids, dims = pipeline_models["llama"]
    model = hf_llm()
    calib = [(ids(1, 32, seed=10 + s),) for s in range(2)]
    return {mode: kiln.compile(model, (ids(2, 7),), dynamic=dims, config=kiln.CompileConfig(quantize=mode), calibration=calib)
            for mode in ("fp8", "w8a8")}, ids


@pytest.mark.parametrize("mode", ["fp8", "w8a8"])
@pytest.mark.parametrize("force", ["triton-aqgemm", "int-mm", "triton-tma"])
def test_quantized_llama_on_the_kernels_backend(llamas, mode, force):
    if mode == "fp8" and force == "int-mm":
        pytest.skip("int8 only")
    models, ids = llamas
    graph = models[mode].graph
    assert graph.histogram()["AQGEMM"] == 9  # (the LM head too, in both modes)
    ex = Executor(graph, Target.from_config(kiln.CompileConfig(backend="kernels"), tuner=Tuner(force={"gemm": force, "attention": "sdpa"})))
    for b, s in [(1, 3), (2, 12)]:  # 3 rows (int-mm needs more than 16: the template instead), 24 rows
        x = ids(b, s, seed=b * s)
        got, want = ex.run([x])[0], interpret(graph, [x])[0]
        # (the kernels' float32 scaling order and division differ from the reference's by an ulp, which can move a
        # code at a rounding tie: a few 1e-6 of the logits)
        assert got.shape == want.shape and rel_err(got, want) <= 1e-4, (b, s, rel_err(got, want))
    counts = ex.plans[-1].describe()["choices"]
    assert counts.get(f"gemm:{force}", 0) == graph.histogram()["AQGEMM"], counts
