"""kiln.codegen.kernels.rope_cols: RoPE on a GEMM output's q and k columns, against ROPE's reference on each head. CPU
(the Triton interpreter): the in-place kernel (a library GEMM's follow-up) and the TMA template's epilogue rotating its
tiles, at irregular rows, cos / sin shared by the batch or per sample, strided; GPU: bfloat16 at the Llama-3.2-1B
prefill's QKV shape, every TMA configuration that holds whole heads."""
import pytest
import torch

from kiln.codegen.kernels import aqgemm as A
from kiln.codegen.kernels import rope_cols as R
from kiln.codegen.kernels import tma_gemm as T
from kiln.ir import quant
from kiln.ir.ops import OPS
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter

gen = torch.Generator().manual_seed(0)


def r(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def tables(b, s, d, dtype, per_sample=False):
    """HF's cos / sin [1 or B, S, D] (the two halves equal) at positions 0..S-1 (per sample: shifted by b)."""
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    pos = torch.arange(s, dtype=torch.float64)[None, :] + (torch.arange(b)[:, None] if per_sample else 0)
    f = pos[..., None] * inv
    e = torch.cat((f, f), -1)
    return e.cos().to(dtype), e.sin().to(dtype)


def rope_ref(h, cos, sin, d, end):
    """ROPE's reference (the op's) on each head of the columns [0, end), in float64."""
    heads = h[..., :end].double().unflatten(-1, (end // d, d)).transpose(-2, -3)  # [B, heads, S, D]
    c, s = cos.double()[:, None], sin.double()[:, None]
    roped = OPS["ROPE"].ref([heads, c, s], {}).transpose(-2, -3).flatten(-2)
    return torch.cat((roped, h[..., end:].double()), -1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("per_sample", [False, True])
def test_in_place_columns(dtype, per_sample):
    b, s, d = 2, 37, 16
    x = r(b, s, 7 * d + 8, dtype=dtype)  # q 4 heads, k 2 (rotated: [0, 96)), v 1 head + 8 more columns
    cos, sin = tables(b, s, d, dtype, per_sample)
    want = rope_ref(x, cos, sin, d, 6 * d)
    got = R.rope_columns(x, cos, sin, d, 6 * d)
    assert got is x and rel_err(got, want) <= TOL[dtype]
    assert torch.equal(R.reference(x, cos, sin, d, 6 * d)[..., 6 * d:], x[..., 6 * d:])


def test_in_place_columns_two_dims_and_odd_halves():
    # [M, N] with one row of positions; head dim 24 (halves of 12: the kernel masks its 16 lanes), a strided cos
    m, d = 11, 24
    x = r(m, 3 * d, dtype=torch.float32)
    big_cos, big_sin = tables(1, m, 2 * d, torch.float32)
    cos, sin = big_cos[0, :, ::2], big_sin[0, :, ::2]  # [M, 24], stride 2 along D
    want = rope_ref(x[None], cos[None], sin[None], d, 2 * d)[0]
    assert rel_err(R.rope_columns(x, cos, sin, d, 2 * d), want) <= TOL[torch.float32]


def test_in_place_columns_bad_operands():
    x = r(2, 5, 48)
    cos, sin = tables(2, 5, 16, torch.float32)
    with pytest.raises(ValueError, match="broadcast"):
        R.rope_columns(x, cos[:, :4], sin[:, :4], 16, 32)
    with pytest.raises(ValueError, match="head dim 16 / end 40"):
        R.rope_columns(x, cos, sin, 16, 40)
    with pytest.raises(ValueError, match="unit column stride"):
        R.rope_columns(x[..., ::2], cos[..., :8], sin[..., :8], 8, 16)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("one", [False, True])
def test_tma_epilogue_rotates_q_and_k(fmt, per_sample, one):
    b, s, d, k = 2, 23, 16, 48
    n = 7 * d  # q 4 heads + k 2 (rotated [0, 96)) + v 1: tiles of 32 columns (two heads, the last tile half past N) on 3
    # programs, each head summed as its two halves (two accumulators of 16 columns; one: one product of 32 columns
    # ordered (half, head, dim), split after the K loop)
    qx, sx = quant.quantize_rows(r(b, s, k), fmt)
    qw, sw = quant.quantize_rows(r(n, k, scale=k ** -0.5), fmt)
    bias = r(n)
    cos, sin = tables(b, s, d, torch.float32, per_sample)
    config = {**T.INTERPRET_CONFIG, "BLOCK_N": 2 * d, "ROPE_ONE": one}
    got = T.tma_gemm(qx, qw, sx, sw, bias, dtype=torch.float32, config=config, rope=(cos, sin, d, 6 * d))
    want = rope_ref(A.reference(qx, sx, qw, sw, bias), cos, sin, d, 6 * d)
    assert rel_err(got, want) <= TOL[torch.float32]
    with pytest.raises(ValueError, match="dividing the 16 columns of a tile"):
        T.tma_gemm(qx, qw, sx, sw, bias, dtype=torch.float32, config=T.INTERPRET_CONFIG,
                   rope=(cos.repeat(1, 1, 2), sin.repeat(1, 1, 2), 2 * d, 6 * d))
    with pytest.raises(ValueError, match="112 output columns as heads of 32"):
        T.tma_gemm(qx, qw, sx, sw, bias, dtype=torch.float32, config={**config, "BLOCK_N": 64},
                   rope=(cos.repeat(1, 1, 2), sin.repeat(1, 1, 2), 2 * d, 6 * d))
    with pytest.raises(ValueError, match="no glu"):
        T.tma_gemm(qx, qw, sx, sw, bias, residual=r(b, s, n), dtype=torch.float32, config=config, rope=(cos, sin, d, 6 * d))


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_pointer_template_epilogue_rotates_q_and_k(fmt):
    b, s, d, k, n = 3, 9, 16, 40, 96  # q 2 heads + k 2 (rotated [0, 64)) + v 2: tiles of 16 columns, one head each
    qx, sx = quant.quantize_rows(r(b, s, k), fmt)
    qw, sw = quant.quantize_rows(r(n, k, scale=k ** -0.5), fmt)
    cos, sin = tables(b, s, d, torch.float16, per_sample=True)
    got = A.aqgemm(qx, sx, qw, sw, act="gelu_tanh", dtype=torch.float16, config=A.INTERPRET_CONFIG, rope=(cos, sin, d, 4 * d))
    want = rope_ref(A.reference(qx, sx, qw, sw, act="gelu_tanh"), cos, sin, d, 4 * d)
    assert got.dtype == torch.float16 and rel_err(got, want) <= TOL[torch.float16]
    with pytest.raises(ValueError, match="dividing the 16 columns"):
        A.aqgemm(qx, sx, qw, sw, dtype=torch.float16, config=A.INTERPRET_CONFIG, rope=(cos.repeat(1, 1, 2), sin.repeat(1, 1, 2), 32, 64))


@pytest.mark.gpu
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_tma_epilogue_at_the_1b_qkv_shape(fmt):
    """Llama-3.2-1B's QKV at 2048 tokens (head dim 64, q 2048 + k 512 columns rotated of 3072): every config whose
    tiles hold whole heads, bfloat16 out, against the unfused GEMM then ROPE within a bfloat16 rounding."""
    b, s, d, k, n = 1, 2048, 64, 2048, 3072
    dev = torch.device("cuda")
    qx, sx = (t.to(dev) for t in quant.quantize_rows(r(b, s, k), fmt))
    qw, sw = (t.to(dev) for t in quant.quantize_rows(r(n, k, scale=k ** -0.5), fmt))
    cos, sin = (t.to(dev) for t in tables(b, s, d, torch.bfloat16))
    want = rope_ref(A.reference(qx.cpu(), sx.cpu(), qw.cpu(), sw.cpu()), cos.cpu(), sin.cpu(), d, 40 * d)
    configs = [{**c, "ROPE_ONE": one} for c in T.configs(s, qx.dtype) if R.tile_fits(d, c["BLOCK_N"]) for one in (False, True)]
    assert configs
    for c in configs:
        got = T.tma_gemm(qx, qw, sx, sw, config=c, rope=(cos, sin, d, 40 * d))
        assert rel_err(got.cpu(), want) <= TOL[torch.bfloat16], c
