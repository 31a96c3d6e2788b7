"""The pointwise renderer: every table entry and the fused chains (norms, modulate, RoPE, softmax) as one
generated Triton kernel under TRITON_INTERPRET=1, against the float64 reference interpreter."""
import pytest
import torch

from kiln.codegen.pointwise import EXPR, expr_key, render
from kiln.codegen.schedule import execute, schedule
from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.types import dtype_name
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter  # CPU cases run under TRITON_INTERPRET=1; gpu-marked ones need it off

DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kiln-cache"))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def check(g: Graph, inputs, dtype, groups=1):
    """Schedule ``g``, assert it is ``groups`` pointwise kernel(s) (None: any number), run them, compare
    with float64."""
    sched = schedule(g)
    pw = [s for s in sched if s.kind == "pointwise"]
    assert len(pw) == (groups or len(pw)) and not [s for s in sched if s.kind not in ("pointwise", "source")], sched
    got = execute(g, sched, inputs)
    want = interpret(g, inputs, compute_dtype=torch.float64)
    for o, a, b in zip(g.outputs, got, want):
        assert dtype_name(a.dtype) == o.dtype and tuple(a.shape) == tuple(b.shape)
        tol = TOL.get(dtype, 0.0) if a.is_floating_point() else 0.0
        assert rel_err(a, b) <= tol, (o, rel_err(a, b))
    return sched


UNARY = {  # op -> (attrs, input transform keeping it in the op's domain)
    "NEG": ({}, None), "ABS": ({}, None), "EXP": ({}, None), "LOG": ({}, torch.abs), "SQRT": ({}, torch.abs),
    "RSQRT": ({}, lambda x: x.abs() + 0.1), "RECIPROCAL": ({}, lambda x: x.abs() + 0.1), "SIN": ({}, None),
    "COS": ({}, None), "TANH": ({}, None), "SIGMOID": ({}, None), "ERF": ({}, None), "RELU": ({}, None),
    "SILU": ({}, None), "GELU": ({"approximate": "none"}, None), "GELU:tanh": ({"approximate": "tanh"}, None),
    "FLOOR": ({}, lambda x: x * 4), "CEIL": ({}, lambda x: x * 4), "CLAMP": ({"min": -0.5, "max": 0.7}, None),
    "CLAMP:min": ({"min": -0.5}, None),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", list(UNARY))
def test_unary(op, dtype):
    attrs, tf = UNARY[op]
    x = torch.randn(3, 37, generator=gen()).to(dtype)
    x = tf(x) if tf else x
    g = Graph()
    g.set_outputs([g.add(op.split(":")[0], (g.add_input("x", (3, 37), dtype_name(dtype)),), **attrs)])
    check(g, [x], dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_tanh_is_within_a_few_ulps_near_zero_and_exact_at_the_ends(dtype):
    """Each element against float64's tanh (no norm-wide error hiding small values): Gemma 2's soft caps
    (cap * tanh(x / cap), cap 30-50) put most values in |x| < 0.1, where 2 sigmoid(2x) - 1 lost 3e-6."""
    mags = torch.logspace(-8, 1.3, 500, dtype=torch.float64)
    x = torch.cat([mags, -mags, torch.tensor([0.0, 0.125, -0.125, 0.1249999, 40.0, -40.0, float("inf"), float("-inf")],
                                              dtype=torch.float64)]).to(dtype)[None]
    g = Graph()
    g.set_outputs([g.add("TANH", (g.add_input("x", tuple(x.shape), dtype_name(dtype)),))])
    got = execute(g, schedule(g), [x])[0].double()
    want = torch.tanh(x.double())
    ulp = torch.finfo(dtype).eps
    err = ((got - want).abs() / want.abs().clamp_min(torch.finfo(dtype).tiny)).max().item()
    assert err <= 8 * ulp, f"max relative error {err:.3g} ({err / ulp:.1f} ulp)"
    g2 = Graph()
    g2.set_outputs([g2.add("TANH", (g2.add_input("n", (1, 1), dtype_name(dtype)),))])
    assert execute(g2, schedule(g2), [torch.full((1, 1), float("nan"), dtype=dtype)])[0].isnan().all()


BINARY = ["ADD", "SUB", "MUL", "DIV", "MAXIMUM", "MINIMUM", "MOD", "EQ", "NE", "LT", "LE", "GT", "GE"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", BINARY)
def test_binary_with_broadcast_gate(op, dtype):
    """[B, S, C] op [B, 1, C]: the gate is read through a stride-0 dim."""
    a = torch.randn(2, 5, 37, generator=gen(1)).to(dtype)
    b = torch.randn(2, 1, 37, generator=gen(2)).to(dtype)
    if op == "MOD":
        b = b.abs() + 0.5
    g = Graph()
    x, y = g.add_input("a", a.shape, dtype_name(dtype)), g.add_input("b", b.shape, dtype_name(dtype))
    g.set_outputs([g.add(op, (x, y))])
    check(g, [a, b], dtype)


def test_row_length_1000_with_row_vector_and_scalar_const():
    a = torch.randn(3, 1000, generator=gen(3))
    w = torch.randn(1000, generator=gen(4))
    g = Graph()
    x = g.add_input("a", (3, 1000), "float32")
    y = g.add("MUL", (g.add("ADD", (x, g.add_weight("w", w))), g.const(0.5)))
    g.set_outputs([g.add("POW", (y, g.const(2)))])
    check(g, [a], torch.float32)


def test_bool_int_where_cast_and_pow():
    a = torch.randn(4, 37, generator=gen(5))
    i = torch.randint(-5, 5, (4, 1), generator=gen(6))
    g = Graph()
    x, k = g.add_input("a", (4, 37), "float32"), g.add_input("i", (4, 1), "int64")
    cond = g.add("AND", (g.add("GT", (x, g.const(0.0))), g.add("NOT", (g.add("EQ", (k, g.const(0))),))))
    kf = g.add("CAST", (k,), dtype="float32")
    w = g.add("WHERE", (cond, g.add("POW", (x, g.const(3))), kf))
    h = g.add("CAST", (g.add("MUL", (w, g.const(1.7))),), dtype="float16")
    trunc = g.add("CAST", (g.add("MUL", (x, g.const(3.0))),), dtype="int64")
    theta = g.add("POW", (g.const(10000.0), g.add("DIV", (kf, g.const(8.0)))))  # RoPE's theta ** (i / d)
    g.set_outputs([h, trunc, theta, g.add("CAST", (x,), dtype="bool")])
    sched = check(g, [a, i], torch.float16, groups=None)
    # the chains meeting in WHERE are one kernel; the independent casts of x are kernels of their own
    assert len([s for s in sched if s.kind == "pointwise"]) == 4
    assert expr_key(h) == "CAST:half" and expr_key(theta) == "POW:base"


def test_pow_with_tensor_exponent_is_not_fusible():
    g = Graph()
    x = g.add_input("a", (2, 3), "float32")
    assert expr_key(g.add("POW", (x, x))) is None and expr_key(g.add("DIV", (x, x), rounding="floor")) is None
    assert "POW:2" in EXPR


# ----------------------------------------------------------------------------- fused chains


def _norm_graph(op, dtype, shape, with_params=True, residual=False):
    g = Graph()
    dt = dtype_name(dtype)
    c = shape[-1]
    x = g.add_input("x", shape, dt)
    ins = [x]
    if with_params:
        ins.append(g.add_weight("w", torch.randn(c, generator=gen(7)).to(dtype)))
        if op == "LAYERNORM":
            ins.append(g.add_weight("b", torch.randn(c, generator=gen(8)).to(dtype)))
    if residual:
        ins.append(g.add_input("r", shape, dt))
    g.set_outputs([g.add(op, ins, eps=1e-5, residual=residual)])
    return g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op,shape,params,residual", [
    ("RMSNORM", (2, 3, 37), True, False), ("RMSNORM", (3, 1000), False, False), ("RMSNORM", (2, 5, 37), True, True),
    ("LAYERNORM", (4, 37), True, False), ("LAYERNORM", (2, 1000), False, False), ("LAYERNORM", (2, 3, 37), True, True),
])
def test_norms(op, shape, params, residual, dtype):
    g = _norm_graph(op, dtype, shape, params, residual)
    ins = [torch.randn(shape, generator=gen(9)).to(dtype) * 3 + 1]
    if residual:
        ins.append(torch.randn(shape, generator=gen(10)).to(dtype))
    check(g, ins, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_residual_add_then_rmsnorm_keeps_the_sum(dtype):
    """h = x + attn; y = RMSNORM(h, w): one kernel writing both h (the next residual) and y."""
    dt = dtype_name(dtype)
    g = Graph()
    x, a = g.add_input("x", (2, 3, 37), dt), g.add_input("a", (2, 3, 37), dt)
    h = g.add("ADD", (x, a))
    y = g.add("RMSNORM", (h, g.add_weight("w", torch.randn(37, generator=gen(11)).to(dtype))), eps=1e-6)
    g.set_outputs([y, h])
    (pw,) = [s for s in check(g, [torch.randn(2, 3, 37, generator=gen(12)).to(dtype),
                                  torch.randn(2, 3, 37, generator=gen(13)).to(dtype)], dtype) if s.kind == "pointwise"]
    assert set(pw.outputs) == {h, y}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("params", [False, True])
def test_layernorm_modulate_with_batch_scale_shift_and_gated_residual(params, dtype):
    """DiT: y = LN(x) * (1 + scale) + shift, scale / shift [B, 1, C]; then out = x + gate * gelu(y)."""
    dt, shape = dtype_name(dtype), (2, 5, 37)
    g = Graph()
    x = g.add_input("x", shape, dt)
    sc, sh, gate = (g.add_input(n, (2, 1, 37), dt) for n in ("scale", "shift", "gate"))
    extra = [g.add_weight(n, torch.randn(37, generator=gen(k)).to(dtype)) for k, n in ((14, "w"), (15, "b"))] if params else []
    y = g.add("LAYERNORM_MODULATE", [x, sc, sh] + extra, eps=1e-6)
    out = g.add("ADD", (x, g.add("MUL", (gate, g.add("GELU", (y,), approximate="tanh")))))
    g.set_outputs([out])
    ins = [torch.randn(s, generator=gen(16 + k)).to(dtype) for k, s in enumerate((shape, (2, 1, 37), (2, 1, 37), (2, 1, 37)))]
    check(g, ins, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_on_a_permuted_view_with_broadcast_cos_sin(dtype):
    """q [B, S, H, D] viewed as [B, H, S, D] (a PERMUTE, read in place), cos / sin [1, 1, S, D]; D = 72."""
    dt, (b, s, h, d) = dtype_name(dtype), (2, 5, 3, 72)
    g = Graph()
    q = g.add_input("q", (b, s, h, d), dt)
    cos, sin = g.add_input("cos", (1, 1, s, d), dt), g.add_input("sin", (1, 1, s, d), dt)
    g.set_outputs([g.add("ROPE", (g.add("PERMUTE", (q,), perm=(0, 2, 1, 3)), cos, sin))])
    ang = torch.randn(1, 1, s, d, generator=gen(20))
    sched = schedule(g)
    assert [x.kind for x in sched if x.kind != "source"] == ["view", "pointwise"]
    got = execute(g, sched, [torch.randn(b, s, h, d, generator=gen(21)).to(dtype), ang.cos().to(dtype), ang.sin().to(dtype)])
    want = interpret(g, [torch.randn(b, s, h, d, generator=gen(21)).to(dtype), ang.cos().to(dtype), ang.sin().to(dtype)],
                     compute_dtype=torch.float64)
    assert rel_err(got[0], want[0]) <= TOL[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op,n", [("SOFTMAX", 37), ("SOFTMAX", 1000), ("LOG_SOFTMAX", 37)])
def test_scaled_masked_softmax(op, n, dtype):
    """softmax(x * scale + bias) over the last axis, bias [1, N] with -inf lanes."""
    dt = dtype_name(dtype)
    g = Graph()
    x, bias = g.add_input("x", (3, n), dt), g.add_input("bias", (1, n), dt)
    g.set_outputs([g.add(op, (g.add("ADD", (g.add("MUL", (x, g.const(0.125))), bias)),), axis=1)])
    bias_t = torch.zeros(1, n, dtype=dtype)
    bias_t[0, 1::7] = float("-inf") if op == "SOFTMAX" else -30.0
    check(g, [torch.randn(3, n, generator=gen(22)).to(dtype) * 4, bias_t], dtype)


def test_source_is_one_kernel_with_strided_loads():
    g = _norm_graph("RMSNORM", torch.float32, (2, 3, 37), residual=True)
    (pw,) = [s for s in schedule(g) if s.kind == "pointwise"]
    src = render(pw, 3)
    assert src.count("@triton.jit") == 1 and "s_in0_2" in src and "tl.rsqrt" in src
    assert render(pw, 3) == src  # deterministic: the content hash is a cache key


@pytest.mark.gpu
@pytest.mark.parametrize("n", [37, 1152, 4096])
def test_gpu_bf16_modulate_and_rmsnorm(n):
    dt, dtype = "bfloat16", torch.bfloat16
    g = Graph()
    x, sc, sh = g.add_input("x", (4, 9, n), dt), g.add_input("scale", (4, 1, n), dt), g.add_input("shift", (4, 1, n), dt)
    y = g.add("LAYERNORM_MODULATE", (x, sc, sh), eps=1e-6)
    g.set_outputs([g.add("RMSNORM", (y, g.add_weight("w", torch.randn(n).to(dtype).cuda())), eps=1e-6)])
    ins = [torch.randn(s, device="cuda").to(dtype) for s in ((4, 9, n), (4, 1, n), (4, 1, n))]
    got = execute(g, schedule(g), ins)
    want = interpret(g, ins, compute_dtype=torch.float64)
    assert rel_err(got[0], want[0]) <= TOL[dtype]
