"""kiln.ir.ops_fused: each fused op's reference computes exactly its unfused formula (float64)."""

import pytest
import torch
import torch.nn.functional as F

from kiln.ir.ops import OPS
from kiln.testing import TOL, rel_err

gen = torch.Generator().manual_seed(0)


def r(*shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("act", ["none", "silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("bias,gate,residual", [(False, False, False), (True, False, False), (True, True, True), (False, True, False)])
def test_gemm_is_linear_then_epilogue(act, bias, gate, residual):
    x, w, b, g, res = r(2, 3, 5), r(6, 5), r(6), r(2, 1, 6), r(2, 3, 6)
    ins = [x, w] + [t for t, on in ((b, bias), (g, gate), (res, residual)) if on]
    got = OPS["GEMM"].ref(ins, dict(bias=bias, act=act, glu=False, gate=gate, residual=residual))
    h = F.linear(x, w, b if bias else None)
    h = {"none": h, "silu": F.silu(h), "gelu": F.gelu(h), "gelu_tanh": F.gelu(h, approximate="tanh")}[act]
    want = (g * h if gate else h) + (res if residual else 0)
    assert rel_err(got, want) <= TOL[torch.float64]


def test_gemm_glu_is_silu_gate_times_up():
    x, wg, wu = r(4, 5), r(3, 5), r(3, 5)
    got = OPS["GEMM"].ref([x, torch.cat([wg, wu])], dict(bias=False, act="silu", glu=True, gate=False, residual=False))
    assert rel_err(got, F.silu(x @ wg.T) * (x @ wu.T)) <= TOL[torch.float64]


@pytest.mark.parametrize("affine", [False, True])
def test_layernorm_modulate_is_norm_times_one_plus_scale_plus_shift(affine):
    x, scale, shift, w, b = r(2, 5, 8), r(2, 1, 8), r(2, 1, 8), r(8), r(8)
    ins = [x, scale, shift] + ([w, b] if affine else [])
    got = OPS["LAYERNORM_MODULATE"].ref(ins, dict(eps=1e-6, dims=1))
    want = F.layer_norm(x, (8,), w if affine else None, b if affine else None, 1e-6) * (1 + scale) + shift
    assert rel_err(got, want) <= TOL[torch.float64]


def test_rope_is_the_rotate_half_form():
    x, cos, sin = r(2, 3, 5, 8), r(2, 1, 5, 8), r(2, 1, 5, 8)
    got = OPS["ROPE"].ref([x, cos, sin], {})
    rotated = torch.cat([-x[..., 4:], x[..., :4]], -1)
    assert rel_err(got, x * cos + rotated * sin) <= TOL[torch.float64]


@pytest.mark.parametrize("op", ["RMSNORM", "LAYERNORM"])
def test_residual_norm_normalises_the_sum(op):
    x, res, w = r(3, 5, 8), r(3, 5, 8), r(8)
    got = OPS[op].ref([x, w, res], dict(eps=1e-6, dims=1, residual=True))
    want = OPS[op].ref([x + res, w], dict(eps=1e-6, dims=1, residual=False))
    assert torch.equal(got, want)
