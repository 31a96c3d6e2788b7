"""kiln.codegen.kernels.epilogue: the standalone GEMM epilogue against its torch reference in float64 (CPU: the
Triton interpreter, float16/float32, irregular shapes; GPU: bfloat16 at DiT / Llama shapes)."""

import pytest
import torch

from kiln.codegen.kernels.epilogue import epilogue, reference
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter  # CPU cases run under TRITON_INTERPRET=1; gpu-marked ones need it off

gen = torch.Generator().manual_seed(0)
ACTS = ["none", "silu", "gelu", "gelu_tanh"]


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def wide(*ts):
    return [t.double() if t is not None else None for t in ts]


def check(h, bias=None, gate=None, residual=None, act="none", glu=False, out=None):
    # the reference runs first: out may be h or the residual
    want = reference(*wide(h, bias, gate, residual), act=act, glu=glu)
    got = epilogue(h, bias, gate, residual, act=act, glu=glu, out=out)
    assert got.dtype == h.dtype and got.shape == want.shape
    err = rel_err(got, want)
    assert err <= TOL[h.dtype], f"rel err {err:.2e} > {TOL[h.dtype]:.0e}"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("glu", [False, True])
def test_activation_and_glu(dtype, act, glu):
    # h [37, 100]: output 37 x 100 (37 x 50 with glu); partial tiles in both directions with 16 x 32 tiles
    check(r(37, 100, dtype=dtype), r(100, dtype=dtype), act=act, glu=glu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias,gate,residual,act,glu", [
    (False, None, None, "none", False),
    (False, (3, 1, 50), None, "silu", False),             # DiT gate [B, 1, N]: a row tile spans two batches
    (False, (3, 13, 50), None, "none", False),            # full gate
    (False, (50,), (3, 13, 50), "none", False),           # gate over all rows, full residual
    (False, None, (3, 1, 50), "gelu", False),             # residual broadcast [B, 1, N]
    (False, None, (13, 1), "silu", False),                # broadcast along columns (stride_n = 0)
    (True, (3, 1, 50), (3, 13, 50), "gelu_tanh", False),  # everything: DiT's out proj + gated residual
    (True, (3, 1, 25), (3, 13, 25), "silu", True),        # glu with gate and residual
])
def test_gate_and_residual_3d(dtype, bias, gate, residual, act, glu):
    h = r(3, 13, 50, dtype=dtype)
    b = r(50, dtype=dtype) if bias else None
    g = r(*gate, dtype=dtype) if gate else None
    res = r(*residual, dtype=dtype) if residual else None
    check(h, b, g, res, act=act, glu=glu)


def test_gate_needing_three_row_groups():
    # [B, 1, H, N] against [B, S, H, N]: _row_groups materialises the gate
    check(r(2, 3, 5, 20), gate=r(2, 1, 5, 20), residual=r(3, 1, 20), act="gelu")


def test_bfloat16_in_the_interpreter():
    # no tl.dot here, so the interpreter's bfloat16 trouble does not arise
    b16 = torch.bfloat16
    check(r(37, 100, dtype=b16), r(100, dtype=b16), r(37, 1, dtype=b16), r(37, 50, dtype=b16), act="silu", glu=True)


def test_in_place_out_is_h_and_out_is_residual():
    h, b, g = r(3, 13, 50, dtype=torch.float16), r(50, dtype=torch.float16), r(3, 1, 50, dtype=torch.float16)
    assert check(h, b, g, act="gelu_tanh", out=h) is h
    res = r(37, 25, dtype=torch.float16)
    assert check(r(37, 50, dtype=torch.float16), gate=r(25, dtype=torch.float16), residual=res, act="silu", glu=True, out=res) is res
    out = torch.empty(37, 50)
    assert check(r(37, 50), r(50), act="gelu", out=out) is out


def test_strided_h_vector_and_empty():
    big = r(37, 64)
    check(big[:, 7:57], r(50), act="silu")  # row stride 64, not Nh
    check(big.t()[:, ::2].t(), act="gelu")  # [19, 64], strides (2, 64): columns not contiguous
    assert check(r(50), r(50), r(25), act="gelu_tanh", glu=True).shape == (25,)
    assert epilogue(torch.zeros(0, 50), glu=True).shape == (0, 25)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bias=r(50, dtype=torch.float16)), "bias has dtype"),
    (dict(residual=r(37, 50, dtype=torch.float64)), "residual has dtype"),
    (dict(gate=r(2, 50)), "gate .* does not broadcast"),
    (dict(residual=r(1, 37, 50)), "residual .* does not broadcast"),  # would widen the output
    (dict(glu=True, h=r(37, 51)), "glu needs an even"),
    (dict(bias=r(25), glu=True), "bias"),  # bias is [Nh], before the split
    (dict(act="relu"), "unknown activation"),
    (dict(out=torch.empty(37, 25)), "out .* must have the output shape"),
    (dict(h=r(4, 37, 50).transpose(0, 1)), "cannot be viewed"),
    (dict(h=r(37, 50, dtype=torch.float64)), "dtype torch.float64"),
])
def test_bad_operands_raise(kwargs, match):
    h = kwargs.pop("h", r(37, 50))
    with pytest.raises(ValueError, match=match):
        epilogue(h, **kwargs)


def test_out_is_h_with_glu_raises():
    h = r(37, 50)
    with pytest.raises(ValueError, match="out cannot be h with glu"):
        epilogue(h, glu=True, out=h)


# ----------------------------------------------------------------------------- GPU (bf16, real shapes)


def cuda_r(*shape, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(sum(shape))
    return torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32).to(dtype)


def check_against_fp32(h, bias=None, gate=None, residual=None, act="none", glu=False, out=None):
    want = reference(*(t.float() if t is not None else None for t in (h, bias, gate, residual)), act=act, glu=glu)
    got = epilogue(h, bias, gate, residual, act=act, glu=glu, out=out)
    torch.cuda.synchronize()
    err = rel_err(got, want)
    assert err <= TOL[h.dtype], f"rel err {err:.2e} > {TOL[h.dtype]:.0e}"
    return got


@pytest.mark.gpu
def test_gpu_dit_mlp_fc1_gelu_tanh():
    # DiT-XL/2 at batch 8: fc1's [8, 256, 4608] result + b, gelu_tanh
    check_against_fp32(cuda_r(8, 256, 4608), cuda_r(4608), act="gelu_tanh")


@pytest.mark.gpu
def test_gpu_dit_gated_residual():
    # DiT's attention / MLP out projection: residual + gate[B, 1, N] * (h + b), in place on the residual
    res = cuda_r(8, 256, 1152)
    got = check_against_fp32(cuda_r(8, 256, 1152), cuda_r(1152), cuda_r(8, 1, 1152), res, out=res)
    assert got is res


@pytest.mark.gpu
def test_gpu_glu_llama_mlp():
    # merged [gate; up] projection of a Llama-3.2-1B MLP: 512 tokens, intermediate 8192
    assert check_against_fp32(cuda_r(512, 16384), act="silu", glu=True).shape == (512, 8192)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_other_dtypes_irregular(dtype):
    h = cuda_r(3, 111, 600, dtype=dtype)
    check_against_fp32(h, cuda_r(600, dtype=dtype), cuda_r(3, 1, 300, dtype=dtype), cuda_r(3, 111, 300, dtype=dtype),
                       act="gelu", glu=True)
