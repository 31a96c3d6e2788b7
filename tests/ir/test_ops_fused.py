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


# ----------------------------------------------------------------------------- QGEMM


def qweight(n, k, bits, group, zeros):
    from kiln.ir.quant import quantize_rtn

    return quantize_rtn(torch.randn(n, k, generator=gen) / k ** 0.5, bits, group, symmetric=not zeros)


@pytest.mark.parametrize("bits,group,zeros", [(8, 64, False), (4, 32, True), (4, 64, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_qgemm_is_the_gemm_on_the_dequantized_weight(bits, group, zeros, dtype):
    # dequantized in float32 (float64 for float64 x), rounded to x's dtype, then GEMM's reference: bit for bit
    from kiln.ir.quant import dequantize

    qw = qweight(12, 64, bits, group, zeros)
    x, b, res = r(2, 3, 64).to(dtype), r(12).to(dtype), r(2, 3, 6).to(dtype)
    attrs = dict(bits=bits, group=group, zeros=zeros, bias=True, act="silu", glu=True, gate=False, residual=True)
    ins = [x, qw.qweight, qw.scales] + ([qw.zeros] if zeros else []) + [b, res]
    got = OPS["QGEMM"].ref(ins, attrs)
    w = dequantize(qw, dtype)
    want = OPS["GEMM"].ref([x, w, b, res], dict(bias=True, act="silu", glu=True, gate=False, residual=True))
    assert got.dtype == dtype and torch.equal(got, want)


def _qgraph(bits=4, group=32, zeros=True, k=64):
    from kiln.ir.graph import Graph

    qw = qweight(12, k, bits, group, zeros)
    g = Graph()
    x = g.add_input("x", (3, k), "float32")
    ws = [g.add_weight("w.qweight", qw.qweight), g.add_weight("w.scales", qw.scales)]
    ws += [g.add_weight("w.zeros", qw.zeros)] if zeros else []
    return g, x, ws


def test_qgemm_type_rule():
    from kiln.ir.ops import ShapeError

    g, x, ws = _qgraph()
    out = g.add("QGEMM", [x, *ws], bits=4, group=32, zeros=True, act="silu", glu=True)
    assert out.shape == (3, 6) and out.dtype == "float32"
    bad = [
        (dict(bits=4, group=32, zeros=False), [x, *ws], "4 inputs, the attributes"),  # zeros given, attribute says none
        (dict(bits=8, group=32, zeros=True), [x, *ws], r"qweight is uint8\[12, 32\], .* needs uint8\[12, 64\]"),
        (dict(bits=4, group=48, zeros=True), [x, *ws], "group must be K"),
        (dict(bits=4, group=16, zeros=True), [x, *ws], "group must be K"),
        (dict(bits=4, group=64, zeros=True), [x, *ws], r"scales is float16\[12, 2\], expected float16 or float32\[12, 1\]"),
        (dict(bits=4, group=32, zeros=True, bias=True), [x, *ws, x], "bias"),
    ]
    for attrs, ins, match in bad:
        with pytest.raises(ShapeError, match=match):
            g.add("QGEMM", ins, **attrs)


def test_qgemm_serializes_and_exports_as_a_kiln_node():
    import onnx

    from kiln.ir.interpret import interpret
    from kiln.ir.onnx import KILN_DOMAIN, to_onnx
    from kiln.ir.serialize import graph_from_json, graph_to_json

    g, x, ws = _qgraph()
    g.set_outputs([g.add("QGEMM", [x, *ws], bits=4, group=32, zeros=True, act="gelu")])
    back = graph_from_json(graph_to_json(g), dict(g.weights))
    back.verify()
    inp = [r(3, 64).float()]
    assert torch.equal(interpret(back, inp)[0], interpret(g, inp)[0])
    model = to_onnx(g)
    node = next(n for n in model.graph.node if n.op_type == "QGEMM")
    assert node.domain == KILN_DOMAIN
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["bits"] == 4 and attrs["group"] == 32 and attrs["zeros"] == 1 and attrs["act"] == b"gelu"
    inits = {i.name: i.data_type for i in model.graph.initializer}
    assert inits["w.qweight"] == onnx.TensorProto.UINT8 and inits["w.scales"] == onnx.TensorProto.FLOAT16
