"""kiln.ir.quant's per-row formats (int8, fp8 e4m3) and the AQGEMM op: its reference is the formula (float64), its
type rule refuses what kernels cannot run, and its codes survive the IR's JSON and the artifact's safetensors."""
import pytest
import torch
import torch.nn.functional as F

from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.ops import OPS, ShapeError
from kiln.ir.quant import ACT_FORMATS, dequantize_rows, quantize_rows
from kiln.ir.serialize import graph_from_json, graph_to_json
from kiln.runtime import artifact as art
from kiln.testing import TOL, rel_err

gen = torch.Generator().manual_seed(0)
FORMATS = ["int8", "fp8"]
STEP = {"int8": 0.5 / 127, "fp8": 2 ** -4}  # the largest rounding error relative to the row's amax (int8) / the value (fp8)


def r(*shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


@pytest.mark.parametrize("fmt", FORMATS)
def test_quantize_rows_scales_codes_and_bounds(fmt):
    x = r(5, 37) * torch.tensor([1e-3, 1.0, 30.0, 1e3, 0.0], dtype=torch.float64)[:, None]  # rows of every size; one zero
    q, s = quantize_rows(x, fmt)
    dtype, qmax = ACT_FORMATS[fmt]
    assert q.dtype == dtype and q.shape == x.shape and s.shape == (5,) and s.dtype == torch.float64
    assert torch.equal(s[:4], x[:4].abs().amax(-1) / qmax) and s[4] == torch.finfo(torch.float32).tiny
    assert float(q.double().abs().max()) == qmax  # the row's extreme lands on the last code
    err = (dequantize_rows(q, s, torch.float64) - x).abs()
    bound = STEP[fmt] * (x.abs().amax(-1, keepdim=True) if fmt == "int8" else x.abs()) + 2 ** -9 * s[:, None]  # (fp8 subnormals)
    assert bool((err <= bound * (1 + 1e-9)).all()) and not bool(dequantize_rows(q, s)[4].any())


def test_int8_rounds_half_to_even_and_float32_rows_scale_in_float32():
    x = torch.tensor([[127.0, 0.5, 1.5, -2.5, 2.4999]])
    q, s = quantize_rows(x, "int8")
    assert s.dtype == torch.float32 and q.tolist() == [[127, 0, 2, -2, 2]]


def aq_ref(x, w, fmt, smooth=None, bias=None, gate=None, residual=None, act="none", glu=False):
    """The formula: quantize x's rows and W's rows, multiply the dequantized operands, GEMM's epilogue (float64)."""
    xs = x * smooth if smooth is not None else x
    qw, sw = quantize_rows(w.float(), fmt)  # (stored weight scales are float32)
    qx, sx = quantize_rows(xs, fmt)
    ins = [dequantize_rows(qx, sx, torch.float64), dequantize_rows(qw, sw, torch.float64)]
    ins += [t for t in (bias, gate, residual) if t is not None]
    attrs = dict(bias=bias is not None, gate=gate is not None, residual=residual is not None, act=act, glu=glu)
    return OPS["GEMM"].ref(ins, attrs), (qw, sw)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act,glu,smooth,bias,gate,residual", [
    ("none", False, False, False, False, False), ("silu", True, True, True, False, True), ("gelu_tanh", False, False, True, True, True)])
def test_aqgemm_reference_is_the_formula(fmt, act, glu, smooth, bias, gate, residual):
    x, w = r(2, 3, 40), r(12, 40)
    n = 6 if glu else 12
    m, b, g, res = (r(40).abs() + 0.5).float().double(), r(12), r(2, 1, n), r(2, 3, n)  # (m: a float32 vector)
    want, (qw, sw) = aq_ref(x, w, fmt, m if smooth else None, b if bias else None, g if gate else None, res if residual else None, act, glu)
    ins = [x, qw, sw] + [t for t, on in ((m.float(), smooth), (b, bias), (g, gate), (res, residual)) if on]
    got = OPS["AQGEMM"].ref(ins, dict(format=fmt, smooth=smooth, bias=bias, gate=gate, residual=residual, act=act, glu=glu))
    assert got.dtype == torch.float64 and rel_err(got, want) <= TOL[torch.float64]


def test_aqgemm_rounds_once_to_half_dtypes():
    x, w = r(4, 32, dtype=torch.float16), r(8, 32)
    qw, sw = quantize_rows(w, "int8")
    got = OPS["AQGEMM"].ref([x, qw, sw], dict(format="int8", smooth=False, bias=False, gate=False, residual=False, act="silu", glu=False))
    qx, sx = quantize_rows(x, "int8")
    want = F.silu((qx.float() @ qw.float().T) * sx[:, None] * sw).half()
    assert got.dtype == torch.float16 and torch.equal(got, want)


def _graph(fmt, n=8, k=32, smooth=True):
    g = Graph()
    x = g.add_input("x", (3, k), "float32")
    qw, sw = quantize_rows(r(n, k), fmt)
    ins = [x, g.add_weight("qw", qw), g.add_weight("sw", sw.float())] + ([g.add_weight("m", r(k).float())] if smooth else [])
    g.set_outputs([g.add("AQGEMM", ins, format=fmt, smooth=smooth, act="gelu")])
    return g


@pytest.mark.parametrize("edit, message", [
    (dict(format="int4"), "unknown format 'int4'"),
    (dict(format="fp8"), "fp8 weight codes must be float8_e4m3fn, got int8"),
    (dict(smooth=True), "3 inputs, the attributes .* say 4"),
])
def test_aqgemm_type_rule_refuses(edit, message):
    node = _graph("int8", smooth=False).outputs[0]
    with pytest.raises(ShapeError, match=message):
        Graph().add("AQGEMM", node.inputs, **dict(node.attrs, **edit))


def test_aqgemm_weight_scales_must_be_one_per_row():
    g = Graph()
    x = g.add_input("x", (3, 32), "float32")
    qw, _ = quantize_rows(r(8, 32), "int8")
    with pytest.raises(ShapeError, match=r"ws is float32\[7\], expected float32\[8\]"):
        g.add("AQGEMM", [x, g.add_weight("qw", qw), g.add_weight("sw", torch.ones(7))], format="int8")


@pytest.mark.parametrize("fmt", FORMATS)
def test_codes_survive_json_and_artifacts(fmt, tmp_path):
    g = _graph(fmt)
    x = [r(3, 32).float()]
    want = interpret(g, x)[0]
    g2 = graph_from_json(graph_to_json(g), dict(g.weights))
    assert torch.equal(interpret(g2, x)[0], want)
    art.save(tmp_path / "m.kiln", g, signature={}, config={})
    g3 = art.load(tmp_path / "m.kiln")[0]
    assert g3.weights["qw"].dtype == ACT_FORMATS[fmt][0] and torch.equal(g3.weights["qw"].view(torch.uint8), g.weights["qw"].view(torch.uint8))
    assert torch.equal(interpret(g3, x)[0], want)


def test_float64_interpretation_keeps_the_codes():
    g = _graph("fp8")
    x = [r(3, 32).float()]
    assert rel_err(interpret(g, x, compute_dtype=torch.float64)[0], interpret(g, x)[0].double()) < 1e-5


@pytest.mark.parametrize("fmt", FORMATS)
def test_exports_to_onnx_with_its_codes(fmt, tmp_path):
    import onnx

    from kiln.ir.onnx import save_onnx

    save_onnx(_graph(fmt), tmp_path / "g.onnx")
    model = onnx.load(tmp_path / "g.onnx")
    onnx.checker.check_model(model)
    codes = next(i for i in model.graph.initializer if i.name == "qw")
    assert [n.op_type for n in model.graph.node] == ["AQGEMM"]
    assert codes.data_type == (onnx.TensorProto.INT8 if fmt == "int8" else onnx.TensorProto.FLOAT8E4M3FN)
