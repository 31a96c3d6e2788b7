"""kiln.ir.kv_quant (the quantized KV-cache formats) and what the IR does with them: quantize / dequantize round trips
and their bounds against float64, zero vectors, ATTENTION's scale inputs (type rule, reference), float8 through
INDEX_COPY, graph JSON and a .kiln artifact, and the ONNX export of an ATTENTION on int8 codes."""
import numpy as np
import onnxruntime as ort
import pytest
import torch

from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.kv_quant import KV_DTYPES, QMAX, dequantize_kv, quantize_kv
from kiln.ir.ops import OPS, ShapeError, index_copy
from kiln.ir.onnx.export import to_onnx
from kiln.ir.serialize import graph_from_json, graph_to_json
from kiln.runtime import artifact as art
from kiln.testing import TOL, rel_err

gen = torch.Generator().manual_seed(0)
FP8_MIN_NORMAL = 2.0 ** -6  # e4m3: codes below this are subnormal, spaced 2^-9


def vectors(*shape, dtype=torch.float32):
    """Rows of very different magnitudes (1e-3 .. 1e3) and one outlier channel, as real keys have."""
    x = torch.randn(*shape, generator=gen, dtype=torch.float64) * torch.logspace(-3, 3, shape[-2], dtype=torch.float64)[:, None]
    x[..., 5] *= 20
    return x.to(dtype)


@pytest.mark.parametrize("kv", list(KV_DTYPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_bounds(kv, dtype):
    x = vectors(3, 2, 37, 72, dtype=dtype).clamp(-6e4, 6e4)  # [B, Hk, S, D], within float16's range
    codes, scale = quantize_kv(x, kv)
    assert codes.dtype == KV_DTYPES[kv] and codes.shape == x.shape
    assert scale.dtype == torch.float32 and scale.shape == x.shape[:-1]
    x64 = x.double()
    amax = x64.abs().amax(-1)
    assert torch.allclose(scale.double(), amax / QMAX[kv], rtol=1e-6, atol=0)  # the largest element maps to +-QMAX
    c = codes.double()
    assert c.abs().max() <= QMAX[kv] and torch.all(c.abs().amax(-1) >= QMAX[kv] * (1 - 2 ** -4))
    err = (c * scale.double()[..., None] - x64).abs()  # the float64 dequantization's error
    if kv == "int8":
        assert torch.equal(c, c.round())
        bound = scale.double()[..., None] * (0.5 + 1e-5)  # half a step (+ float32 rounding of x / scale)
    else:
        bound = torch.maximum(x64.abs() * 2 ** -4, scale.double()[..., None] * 2 ** -10) * (1 + 1e-5)
    assert torch.all(err <= bound)
    assert torch.all(c[x64 == 0] == 0)
    deq = dequantize_kv(codes, scale, dtype)  # what ATTENTION reads: the float32 product, rounded once to dtype
    assert deq.dtype == dtype and torch.equal(deq, (c * scale.double()[..., None]).float().to(dtype))


def test_int8_rounds_to_nearest_and_fp8_is_the_cast():
    x = torch.tensor([[127.0, 0.5, -0.5, 1.49, -1.51, 63.5, 0.0]])  # amax 127: scale 1, codes are the values rounded
    codes, scale = quantize_kv(x, "int8")
    assert scale.tolist() == [1.0] and codes.tolist() == [[127, 1, 0, 1, -2, 64, 0]]  # ties up (floor(y + 1/2))
    x = torch.tensor([[448.0, 1.0, 0.3, -17.0, 2.0 ** -8]])  # amax 448: scale 1, codes are the cast
    codes, scale = quantize_kv(x, "fp8")
    assert scale.tolist() == [1.0] and torch.equal(codes, x.to(torch.float8_e4m3fn))


@pytest.mark.parametrize("kv", list(KV_DTYPES))
def test_zero_vectors_have_scale_zero_and_dequantize_to_zeros(kv):
    x = vectors(2, 5, 16)
    x[1, 3] = 0
    codes, scale = quantize_kv(x, kv)
    assert scale[1, 3] == 0 and torch.all(codes[1, 3].float() == 0)
    deq = dequantize_kv(codes, scale, torch.float32)
    assert torch.isfinite(deq).all() and torch.all(deq[1, 3] == 0)
    tiny = torch.full((1, 8), 1e-38)  # a float32 subnormal scale: still finite and within the codes' range
    codes, scale = quantize_kv(tiny, kv)
    assert torch.isfinite(codes.float()).all() and codes.float().abs().max() <= QMAX[kv]


# ----------------------------------------------------------------------------- ATTENTION's scale inputs


def attention_inputs(kv, b=2, hq=4, hk=2, sq=3, s=11, d=16):
    q = torch.randn(b, hq, sq, d, generator=gen)
    k, v = (vectors(b, hk, s, d) for _ in range(2))
    (kc, ks), (vc, vs) = quantize_kv(k, kv), quantize_kv(v, kv)
    mask = torch.rand(b, 1, sq, s, generator=gen) < 0.7
    mask[..., 0] = True
    return q, kc, vc, mask, ks, vs


@pytest.mark.parametrize("kv", list(KV_DTYPES))
def test_attention_reference_dequantizes(kv):
    q, kc, vc, mask, ks, vs = attention_inputs(kv)
    a = dict(causal=False, scale=None, gqa=True)
    got = OPS["ATTENTION"].ref([q, kc, vc, mask, ks, vs], dict(a, k_scale=True, v_scale=True))
    want = OPS["ATTENTION"].ref([q, dequantize_kv(kc, ks, q.dtype), dequantize_kv(vc, vs, q.dtype), mask], dict(a, k_scale=False, v_scale=False))
    assert torch.equal(got, want)
    v = dequantize_kv(vc, vs, q.dtype)  # only k quantized, no mask: the scale is the 4th input
    assert torch.equal(OPS["ATTENTION"].ref([q, kc, v, ks], dict(a, k_scale=True, v_scale=False)),
                       OPS["ATTENTION"].ref([q, dequantize_kv(kc, ks, q.dtype), v], dict(a, k_scale=False, v_scale=False)))


def scaled_graph(kv_dtype="int8", scale_shape=(2, 2, 11), scale_dtype="float32", k_scale=True, v_scale=True, mask=True):
    g = Graph()
    ins = [g.add_input("q", (2, 4, 3, 16), "float32"), g.add_input("k", (2, 2, 11, 16), kv_dtype),
           g.add_input("v", (2, 2, 11, 16), "int8" if v_scale else "float32")]
    if mask:
        ins.append(g.add_input("mask", (2, 1, 3, 11), "bool"))
    for on, name in ((k_scale, "ks"), (v_scale, "vs")):
        if on:
            ins.append(g.add_input(name, scale_shape, scale_dtype))
    return g, g.add("ATTENTION", ins, gqa=True, k_scale=k_scale, v_scale=v_scale)


def test_attention_type_rule():
    for kv in ("int8", "float8_e4m3fn"):
        _, n = scaled_graph(kv)
        assert n.dtype == "float32" and n.shape == (2, 4, 3, 16)
    _, n = scaled_graph(v_scale=False, mask=False)  # q, k codes, v, k scale
    assert len(n.inputs) == 4 and n.shape == (2, 4, 3, 16)
    for kw, match in ((dict(kv_dtype="float16"), "must hold codes"), (dict(scale_shape=(2, 2, 11, 1)), "scale .* must be float32"),
                      (dict(scale_dtype="float16"), "scale .* must be float32")):
        with pytest.raises(ShapeError, match=match):
            scaled_graph(**kw)
    g = Graph()
    q, k = g.add_input("q", (2, 4, 3, 16), "float32"), g.add_input("k", (2, 2, 11, 16), "int8")
    with pytest.raises(ShapeError, match="k is int8, q is float32"):  # codes without their scale
        g.add("ATTENTION", [q, k, g.add_input("v", (2, 2, 11, 16), "float32")], gqa=True)
    with pytest.raises(ShapeError, match="the attributes .* say 5 or 6"):
        g.add("ATTENTION", [q, k, k], gqa=True, k_scale=True, v_scale=True)


# ----------------------------------------------------------------------------- float8 through the IR and the artifact


def test_index_copy_of_float8_copies_the_bytes():
    x = torch.randn(2, 3, 8, 4, generator=gen).to(torch.float8_e4m3fn)
    src = torch.randn(2, 3, 2, 4, generator=gen).to(torch.float8_e4m3fn)
    idx = torch.tensor([5, 1])
    want = x.view(torch.uint8).index_copy(2, idx, src.view(torch.uint8)).view(torch.float8_e4m3fn)
    got = index_copy(x, 2, idx, src)
    assert got.dtype == torch.float8_e4m3fn and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
    assert index_copy(x, 2, idx, src, inplace=True) is not None and torch.equal(x.view(torch.uint8), want.view(torch.uint8))


def fp8_graph() -> tuple[Graph, list]:
    """ATTENTION on float8 k codes held as weights (a prefilled cache), plus an fp8 INDEX_COPY of an input."""
    g = Graph()
    q = g.add_input("q", (1, 2, 3, 16), "float32")
    v = g.add_input("v", (1, 2, 9, 16), "float32")
    kc, ks = quantize_kv(vectors(1, 2, 9, 16), "fp8")
    codes = g.add_weight("k_codes", kc)
    out = g.add("ATTENTION", [q, codes, v, g.add_weight("k_scale", ks)], k_scale=True)
    cache = g.add_input("cache", (1, 2, 9, 16), "float8_e4m3fn")
    slots = g.add_input("slots", (2,), "int64")
    written = g.add("INDEX_COPY", [cache, slots, g.add("SLICE", [codes], axis=2, start=0, end=2)], axis=2)
    g.set_outputs([out, written])
    inputs = [torch.randn(1, 2, 3, 16, generator=gen), torch.randn(1, 2, 9, 16, generator=gen),
              torch.zeros(1, 2, 9, 16).to(torch.float8_e4m3fn), torch.tensor([4, 7])]
    return g, inputs


def test_float8_survives_json_and_an_artifact(tmp_path):
    g, inputs = fp8_graph()
    want = interpret(g, inputs)
    assert want[1].dtype == torch.float8_e4m3fn
    back = graph_from_json(graph_to_json(g), dict(g.weights))
    assert back.weights["k_codes"].dtype == torch.float8_e4m3fn
    path = art.save(tmp_path / "fp8.kiln", g, signature={}, config={})
    loaded = art.load(path)[0]
    w = loaded.weights["k_codes"]
    assert w.dtype == torch.float8_e4m3fn and torch.equal(w.view(torch.uint8), g.weights["k_codes"].view(torch.uint8))
    assert [n.dtype for n in loaded.inputs] == ["float32", "float32", "float8_e4m3fn", "int64"]
    for a, b in zip(interpret(loaded, inputs), want):
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.float8_e4m3fn else a,
                           b.view(torch.uint8) if b.dtype == torch.float8_e4m3fn else b)


def test_float64_interpretation_keeps_the_codes():
    # compute_dtype=float64 widens float values, not codes: the fp8 cache input and the CAST to fp8 stay fp8
    g, inputs = fp8_graph()
    a, written = interpret(g, inputs, compute_dtype=torch.float64)
    assert a.dtype == torch.float64 and written.dtype == torch.float8_e4m3fn
    assert rel_err(a, interpret(g, inputs)[0].double()) <= TOL[torch.float32]


def test_onnx_export_dequantizes_int8_codes():
    g, n = scaled_graph(v_scale=False)
    g.set_outputs([n])
    q, kc, _, mask, ks, _ = attention_inputs("int8", s=11)
    inputs = [q, kc, torch.randn(2, 2, 11, 16, generator=gen), mask, ks]
    sess = ort.InferenceSession(to_onnx(g).SerializeToString())
    got = sess.run(None, {name: t.numpy() for name, t in zip(["q", "k", "v", "mask", "ks"], inputs)})[0]
    assert rel_err(torch.from_numpy(np.asarray(got)), interpret(g, inputs)[0]) <= TOL[torch.float32]
