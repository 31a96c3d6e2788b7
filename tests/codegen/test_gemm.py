"""kiln.codegen.kernels.gemm: the GEMM template against the GEMM op's reference in float64 (CPU: the Triton
interpreter, float16/float32, irregular shapes; GPU: bfloat16 at DiT / Llama shapes)."""

import pytest
import torch

import kiln.codegen.kernels.gemm as G
from kiln.codegen.kernels.gemm import gemm, reference
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter  # CPU cases run under TRITON_INTERPRET=1; gpu-marked ones need it off

gen = torch.Generator().manual_seed(0)
ACTS = ["none", "silu", "gelu", "gelu_tanh"]


def r(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def operands(lead, k, n, dtype, bias=False, gate=None, residual=None, glu=False):
    """x [*lead, k], w [n, k] scaled to keep h O(1); gate / residual given as shapes (None: absent)."""
    x, w = r(*lead, k, dtype=dtype), r(n, k, dtype=dtype, scale=k ** -0.5)
    b = r(n, dtype=dtype) if bias else None
    return x, w, b, r(*gate, dtype=dtype) if gate else None, r(*residual, dtype=dtype) if residual else None


def check(x, w, bias=None, gate=None, residual=None, act="none", glu=False, **kw):
    got = gemm(x, w, bias, gate, residual, act=act, glu=glu, **kw)
    want = reference(*(t.double() if t is not None else None for t in (x, w, bias, gate, residual)), act=act, glu=glu)
    assert got.dtype == x.dtype and got.shape == want.shape
    err = rel_err(got, want)
    assert err <= TOL[x.dtype], f"rel err {err:.2e} > {TOL[x.dtype]:.0e}"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("glu", [False, True])
def test_activation_and_glu(dtype, act, glu):
    # M=37, K=40, N=24 (12 with glu): partial tiles in M, N and K with the 32x16x16 interpreter config
    x, w, b, _, _ = operands((37,), 40, 24, dtype, bias=True)
    check(x, w, b, act=act, glu=glu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias,gate,residual,act,glu", [
    (False, None, None, "none", False),
    (False, (3, 1, 24), None, "none", False),           # DiT gate [B, 1, N]: a row tile spans two batches
    (False, (3, 13, 24), None, "none", False),          # full gate
    (False, (24,), (3, 13, 24), "none", False),         # gate broadcast over all rows
    (False, None, (3, 1, 24), "none", False),           # residual broadcast [B, 1, N]
    (False, None, (13, 1), "silu", False),              # broadcast along columns (stride_n = 0)
    (True, (3, 1, 24), (3, 13, 24), "gelu_tanh", False),  # everything at once: the DiT attention / MLP out proj
    (True, (3, 1, 12), (3, 13, 12), "silu", True),      # glu with gate and residual
])
def test_epilogue_3d(dtype, bias, gate, residual, act, glu):
    x, w, b, g, res = operands((3, 13), 40, 24, dtype, bias, gate, residual)
    check(x, w, b, g, res, act=act, glu=glu)


def test_small_3d_input():
    x, w, b, g, res = operands((2, 5), 24, 40, torch.float32, True, (2, 1, 40), (2, 5, 40))
    check(x, w, b, g, res, act="gelu")


def test_gate_needing_three_row_groups_is_materialised():
    # [B, 1, H, N] against [B, S, H, N]: rows (b, s, h) cannot be two index groups; the launcher copies the gate
    x, w, _, g, res = operands((2, 3, 5), 24, 20, torch.float32, gate=(2, 1, 5, 20), residual=(3, 1, 20))
    assert G._row_groups(g, (2, 3, 5), 20)[0].is_contiguous()
    check(x, w, None, g, res)


def test_row_groups_of_a_dit_gate():
    g = torch.zeros(4, 1, 24)
    e, rows, stride_b, stride_m, stride_n = G._row_groups(g, (4, 7), 24)
    assert e.data_ptr() == g.data_ptr() and (rows, stride_b, stride_m, stride_n) == (7, 24, 0, 1)
    # a plain 2-D operand is one group: row m at m * stride_m
    assert G._row_groups(torch.zeros(5, 7, 24), (5, 7), 24)[1:] == (35, 0, 24, 1)
    assert G._row_groups(torch.zeros(24), (5, 7), 24)[1:] == (35, 0, 0, 1)  # every row at offset 0


def test_strided_operands():
    # x a column slice (stride_xm != K), w stored transposed (stride_wk != 1)
    x = r(37, 50)[:, 5:45]
    w = r(40, 24, scale=40 ** -0.5).t()
    res = r(24, 37).t()  # residual [37, 24] with column-major strides
    check(x, w, residual=res, act="silu")


def test_out_given_and_in_place_residual():
    x, w, b, _, res = operands((37,), 40, 24, torch.float16, bias=True, residual=(37, 24))
    want = reference(x.double(), w.double(), b.double(), residual=res.double(), act="gelu")
    out = torch.empty(37, 24, dtype=torch.float16)
    assert gemm(x, w, b, residual=res, act="gelu", out=out) is out
    assert rel_err(out, want) <= TOL[torch.float16]
    got = gemm(x, w, b, residual=res, act="gelu", out=res)  # out IS the residual
    assert got is res and rel_err(res, want) <= TOL[torch.float16]


def test_grouped_order_with_a_partial_group(monkeypatch):
    # BLOCK_M=16, GROUP_M=2, M=37: three row tiles, the last group holds one
    monkeypatch.setitem(G.INTERPRET_CONFIG, "BLOCK_M", 16)
    x, w, b, g, _ = operands((37,), 40, 40, torch.float32, bias=True, gate=(37, 1))
    check(x, w, b, g, act="gelu_tanh")


def test_vector_and_empty_inputs():
    x, w, b, _, _ = operands((), 40, 24, torch.float32, bias=True)
    assert check(x, w, b, act="silu").shape == (24,)
    out = gemm(torch.zeros(0, 40), w, b)
    assert out.shape == (0, 24)


@pytest.mark.parametrize("kwargs,match", [
    (dict(w=(24, 41)), "do not fit"),
    (dict(bias=(23,)), "bias"),
    (dict(w=(23, 40), glu=True), "glu needs an even"),
    (dict(gate=(2, 24)), "gate .* does not broadcast"),
    (dict(residual=(1, 37, 24)), "residual .* does not broadcast"),  # would widen the output
    (dict(act="relu"), "unknown activation"),
    (dict(bias=(24,), bias_dtype=torch.float16), "bias has dtype"),
    (dict(out=(37, 12)), "out"),
])
def test_bad_operands_raise(kwargs, match):
    w = r(*kwargs.get("w", (24, 40)))
    bias = r(*kwargs["bias"], dtype=kwargs.get("bias_dtype", torch.float32)) if "bias" in kwargs else None
    gate = r(*kwargs["gate"]) if "gate" in kwargs else None
    res = r(*kwargs["residual"]) if "residual" in kwargs else None
    out = torch.empty(kwargs["out"]) if "out" in kwargs else None
    with pytest.raises(ValueError, match=match):
        gemm(r(37, 40), w, bias, gate, res, act=kwargs.get("act", "none"), glu=kwargs.get("glu", False), out=out)


def test_bfloat16_refused_by_the_interpreter():
    if not G.INTERPRET:
        pytest.skip("interpreter only")
    with pytest.raises(ValueError, match="bfloat16"):
        gemm(r(4, 16, dtype=torch.bfloat16), r(16, 16, dtype=torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lead,glu,epi", [((37,), True, "bias"), ((3, 13), False, "residual"), ((1,), True, "none")])
def test_rstd_rows_scaled_by_a_weightless_norm(dtype, lead, glu, epi):
    # RMSNORM(x) @ w^T with the norm's 1 / rms from the tensor cores (x x^T's diagonal): partial tiles in M, N and K, an
    # epilogue after the scaling; x's rows of very different sizes (the scale is per row)
    x, w, b, _, res = operands(lead, 40, 24, dtype, bias=epi == "bias", residual=lead[:-1] + (lead[-1], 12 if glu else 24)
                               if epi == "residual" else None)
    x = x * torch.logspace(-2, 2, x.shape[-2], dtype=dtype)[:, None]
    got = gemm(x, w, b, None, res, act="silu", glu=glu, rstd_eps=1e-5)
    want = reference(*(t.double() if t is not None else None for t in (x, w, b, None, res)), act="silu", glu=glu, rstd_eps=1e-5)
    assert rel_err(got, want) <= TOL[dtype]
    with pytest.raises(ValueError, match="rstd_eps must be a number >= 0"):
        gemm(x, w, rstd_eps=-1.0)


# ----------------------------------------------------------------------------- GPU (bf16, real shapes)


def cuda_operands(lead, k, n, dtype=torch.bfloat16, bias=True, gate=None, residual=None):
    g = torch.Generator(device="cuda").manual_seed(0)

    def t(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda", dtype=torch.float32) * scale).to(dtype)
    return (t(*lead, k), t(n, k, scale=k ** -0.5), t(n) if bias else None,
            t(*gate) if gate else None, t(*residual) if residual else None)


def check_against_fp32(x, w, bias=None, gate=None, residual=None, act="none", glu=False, out=None):
    # the reference runs first (out may be the residual), in float32 (float64 for a float32 kernel)
    wide = torch.float64 if x.dtype == torch.float32 else torch.float32
    want = reference(*(t.to(wide) if t is not None else None for t in (x, w, bias, gate, residual)), act=act, glu=glu)
    got = gemm(x, w, bias, gate, residual, act=act, glu=glu, out=out)
    torch.cuda.synchronize()
    err = rel_err(got, want)
    assert err <= TOL[x.dtype], f"rel err {err:.2e} > {TOL[x.dtype]:.0e}"
    return got


@pytest.mark.gpu
def test_gpu_dit_mlp_fc1_gelu_tanh():
    # DiT-XL/2 at batch 8: [8, 256, 1152] @ [4608, 1152]^T + b, gelu_tanh
    x, w, b, _, _ = cuda_operands((8, 256), 1152, 4608)
    check_against_fp32(x, w, b, act="gelu_tanh")


@pytest.mark.gpu
def test_gpu_dit_gated_residual_out_proj():
    # DiT's attention / MLP output projection: residual + gate[B, 1, N] * (h @ w^T + b)
    x, w, b, g, res = cuda_operands((8, 256), 1152, 1152, gate=(8, 1, 1152), residual=(8, 256, 1152))
    check_against_fp32(x, w, b, g, res)


@pytest.mark.gpu
def test_gpu_glu_llama_mlp():
    # merged [gate; up] weight of a Llama-3.2-1B MLP: 2048 tokens, hidden 2048, intermediate 8192
    x, w, _, _, _ = cuda_operands((2048,), 2048, 2 * 8192, bias=False)
    assert check_against_fp32(x, w, act="silu", glu=True).shape == (2048, 8192)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 33])
def test_gpu_small_m_decode(m):
    x, w, b, _, res = cuda_operands((m,), 2048, 2048 + 64, residual=(m, 2048 + 64))
    check_against_fp32(x, w, b, residual=res, act="silu")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_other_dtypes_irregular(dtype):
    # float32 must use IEEE dots (tf32 would miss the 1e-5 tolerance)
    x, w, b, g, res = cuda_operands((3, 111), 1000, 2 * 300, dtype=dtype, gate=(3, 1, 300), residual=(3, 111, 300))
    check_against_fp32(x, w, b, g, res, act="gelu", glu=True)


@pytest.mark.gpu
def test_gpu_in_place_residual_survives_autotuning():
    # a shape no other test uses, so this call autotunes: the benchmark runs must not re-add the residual
    x, w, b, _, res = cuda_operands((517,), 384, 320, residual=(517, 320))
    assert check_against_fp32(x, w, b, residual=res, out=res) is res


@pytest.mark.gpu
@pytest.mark.parametrize("m", [2, 16])
@pytest.mark.parametrize("shape", ["1b gate/up", "8b qkv"])
def test_gpu_rstd_at_decode_shapes(m, shape):
    # the template with a weightless norm's 1 / rms (RSTD) at Llama decode shapes, the first two small-M configs (the
    # tuner is offered the first), bf16 against float32
    k, n, glu = {"1b gate/up": (2048, 2 * 8192, True), "8b qkv": (4096, 6144, False)}[shape]
    x, w, _, _, _ = cuda_operands((m,), k, n, bias=False)
    x = x * 3  # a residual stream's scale: the norm divides it out
    want = reference(x.float(), w.float(), act="silu" if glu else "none", glu=glu, rstd_eps=1e-5)
    for c in G.configs(m, glu)[:2]:
        got = gemm(x, w, act="silu" if glu else "none", glu=glu, config=c, rstd_eps=1e-5)
        torch.cuda.synchronize()
        assert rel_err(got, want) <= TOL[torch.bfloat16], c
