"""kiln.codegen.kernels.epilogue_codes: a library GEMM's epilogue storing its output as activation codes. Against the
two launches it replaces (the epilogue storing y, then the row quantizer reading it) bit for bit under the interpreter,
and against float64 (codes dequantized) on the GPU in bfloat16 at an LLM's gate/up -> down shape."""

import pytest
import torch

from kiln.codegen.kernels.aqgemm import scaled_epilogue
from kiln.codegen.kernels.epilogue import epilogue
from kiln.codegen.kernels import epilogue_codes as EC
from kiln.codegen.kernels.epilogue_codes import epilogue_codes
from kiln.codegen.kernels.quantize_rows import FORMATS, quantize_rows
from kiln.testing import rel_err

gen = torch.Generator().manual_seed(0)
ACTS = ["none", "silu", "gelu_tanh"]


def r(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype).to(device)


def empty(fmt, shape, device="cpu"):
    return torch.empty(shape, dtype=FORMATS[fmt][0], device=device), torch.empty(shape[:-1], dtype=torch.float32, device=device)


@pytest.fixture(params=["two-walks", "one-walk"])
def walks(request, monkeypatch):
    # the kernel's two forms: 16-wide steps (rows walked twice), or one 128-wide tile holding the rows whole
    if request.param == "one-walk":
        monkeypatch.setitem(EC.INTERPRET_CONFIG, "BLOCK_N", 128)
    return request.param


def separate(h, fmt, smooth=None, **epi):
    # the two launches the fused kernel replaces: y stored by the epilogue, then the row quantizer
    y = epilogue(h, **epi)
    return quantize_rows(y.reshape(-1, y.shape[-1]), fmt, smooth)


@pytest.mark.interpreter
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("glu", [False, True])
def test_float_product_as_the_epilogue_then_the_quantizer(fmt, act, glu, walks):
    # h [2, 9, 100] float16 (rows 18: 4-row programs, a partial one; 50 / 100 columns: 16-wide steps, a partial one)
    h, dtype = r(2, 9, 100, dtype=torch.float16) * 3, torch.float16
    n = 50 if glu else 100
    epi = dict(bias=r(100, dtype=dtype), gate=r(2, 1, n, dtype=dtype), residual=r(2, 9, n, dtype=dtype), act=act, glu=glu)
    smooth = r(n).abs() + 0.5
    q, s = epilogue_codes(h, fmt, *empty(fmt, (2, 9, n)), smooth=smooth, **epi)
    q_want, s_want = separate(h, fmt, smooth, **epi)
    assert torch.equal(s.reshape(-1), s_want)
    assert torch.equal(q.reshape(-1, n).view(torch.uint8), q_want.view(torch.uint8))


@pytest.mark.interpreter
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("glu", [False, True])
def test_product_of_codes_as_the_scaled_epilogue_then_the_quantizer(fmt, glu, walks):
    # torch._int_mm's int32 product with its row and column scales (w8a8's library path), no smooth vector
    m, nh = 13, 64
    h = torch.randint(-20000, 20000, (m, nh), generator=gen, dtype=torch.int32)
    xs, ws = r(m).abs() * 1e-3, r(nh).abs() * 1e-2
    n = nh // 2 if glu else nh
    epi = dict(bias=r(nh), residual=r(m, n), act="silu", glu=glu)
    q, s = epilogue_codes(h, fmt, *empty(fmt, (m, n)), xs=xs, ws=ws, dtype=torch.float32, **epi)
    y = scaled_epilogue(h, xs, ws, dtype=torch.float32, **epi)
    q_want, s_want = quantize_rows(y, fmt)
    assert torch.equal(s, s_want) and torch.equal(q.view(torch.uint8), q_want.view(torch.uint8))


@pytest.mark.interpreter
def test_zero_rows_and_bad_operands():
    fmt = "int8"
    q, s = epilogue_codes(torch.empty(0, 8), fmt, *empty(fmt, (0, 8)))
    assert q.shape == (0, 8)
    h = r(4, 8)
    with pytest.raises(ValueError, match="format must be one of"):
        epilogue_codes(h, "int4", *empty(fmt, (4, 8)))
    with pytest.raises(ValueError, match=r"codes and scales must be torch.int8 \[4, 4\]"):
        epilogue_codes(h, fmt, *empty(fmt, (4, 8)), glu=True)
    with pytest.raises(ValueError, match="xs and ws must be float32"):
        epilogue_codes(h, fmt, *empty(fmt, (4, 8)), xs=r(4))
    with pytest.raises(ValueError, match="a product of codes"):
        epilogue_codes(h.half(), fmt, *empty(fmt, (4, 8)), xs=r(4), ws=r(8))
    with pytest.raises(ValueError, match="smooth"):
        epilogue_codes(h, fmt, *empty(fmt, (4, 8)), smooth=r(8).double())
    with pytest.raises(ValueError, match="does not broadcast"):
        epilogue_codes(h, fmt, *empty(fmt, (4, 8)), residual=r(3, 8))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("m, n", [(512, 4096), (40, 20000)])  # whole rows in registers; rows walked twice
def test_gate_up_into_down_codes_on_cuda(fmt, m, n):
    # bf16 [m, 2 x n] gate/up product -> SiLU-GLU -> the down projection's codes; each code dequantized against
    # float64's GLU within y's bfloat16 rounding (2^-8 relative, with the SiLU's float32 error) plus the format's own
    # rounding (int8: half a step, amax / 127 a row; e4m3: 2^-4 relative, half its subnormal step 2^-9 x the scale),
    # and the two-launch form's codes within one step where y's rounding ties differ
    h = r(m, 2 * n, dtype=torch.bfloat16, device="cuda")
    q, s = epilogue_codes(h, fmt, *empty(fmt, (m, n), "cuda"), act="silu", glu=True)
    g, u = h.double().chunk(2, -1)
    want = torch.nn.functional.silu(g) * u
    step = s.double()[:, None]
    got = q.double() * step
    own = want.abs() * 2 ** -4 + step * 2 ** -10 if fmt == "fp8" else step / 2
    assert ((got - want).abs() <= (own + want.abs() * 2 ** -8) * (1 + 1e-3) + 1e-6).all()
    q2, s2 = separate(h, fmt, act="silu", glu=True)
    assert rel_err(s, s2) <= 1e-6
    assert (q.double() - q2.double()).abs().max() <= (32 if fmt == "fp8" else 1)
