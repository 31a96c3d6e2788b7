"""kiln.ir.ops: every op's type rule agrees with what its reference implementation returns; torch's
dtype promotion and broadcasting; symbolic shapes evaluated at two sizes; the ShapeErrors of each
op family; ATTENTION against torch SDPA and INDEX against torch advanced indexing."""

import pytest
import sympy
import torch
import torch.nn.functional as F

from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.ops import OPS, ShapeError
from kiln.ir.types import FLOAT_DTYPES, dims_equal, eval_dim, sym, torch_dtype
from kiln.testing import TOL, rel_err

BATCH, SEQ, H, W = sym("batch"), sym("seq"), sym("h"), sym("w")
RANGES = {"batch": (1, 8), "seq": (1, 64), "h": (3, 64), "w": (3, 64)}
INF = float("inf")
f32, f16, bf16, f64 = "float32", "float16", "bfloat16", "float64"
i64, i32, i8, u8, b = "int64", "int32", "int8", "uint8", "bool"


def tensor(shape, dtype, gen):
    """Random values of a dtype; integers lie in [1, 3) so they index any dim >= 3 and never divide by 0."""
    if dtype == "bool":
        return torch.rand(shape, generator=gen) > 0.5
    if dtype in FLOAT_DTYPES:
        return torch.randn(shape, generator=gen, dtype=torch.float64).to(torch_dtype(dtype))
    return torch.randint(1, 3, shape, generator=gen).to(torch_dtype(dtype))


def build(op, specs, attrs, anchor=False):
    """A graph computing ``op`` on inputs given as (shape, dtype) pairs or python scalars (CONST nodes).
    ``anchor`` adds a last input of shape [batch, seq, h, w]: symbols get their values from input shapes."""
    g = Graph()
    g.symbols = dict(RANGES)
    ins = []
    for k, s in enumerate(specs):
        ins.append(g.const(s) if not isinstance(s, tuple) else g.add_input(f"in{k}", *s))
    if anchor:
        g.add_input("anchor", (BATCH, SEQ, H, W), b)
    node = g.add(op, ins, **attrs)
    g.set_outputs([node])
    return g, node


def feeds(g, sizes, gen):
    return [tensor(tuple(eval_dim(d, sizes) for d in i.shape), i.dtype, gen) for i in g.inputs]


# ----------------------------------------------------------------------------- every op: inferred type == reference


def case(op, *specs, **attrs):
    args = [f"{s[1]}{list(s[0])}".replace(" ", "") if isinstance(s, tuple) else repr(s) for s in specs]
    return pytest.param(op, specs, attrs, id=f"{op}({','.join(args + [f'{k}={v}' for k, v in attrs.items()])})")


CASES: list = []
UNARY = ["NEG", "ABS", "EXP", "LOG", "SQRT", "RSQRT", "RECIPROCAL", "SIN", "COS", "TANH", "SIGMOID", "ERF",
         "RELU", "SILU", "FLOOR", "CEIL", "ISNAN", "GELU"]
BINARY = ["ADD", "SUB", "MUL", "DIV", "POW", "MAXIMUM", "MINIMUM", "MOD", "EQ", "NE", "LT", "LE", "GT", "GE"]
for _op in UNARY:
    CASES.append(case(_op, ((3, 1, 5), f32)))
for _op in BINARY:
    CASES.append(case(_op, ((3, 1, 5), f32), ((4, 1), f32)))
for _op in ("AND", "OR", "XOR"):
    CASES.append(case(_op, ((3, 1, 5), b), ((4, 1), b)))
CASES += [
    case("NOT", ((3, 5), b)),
    case("SQRT", ((3, 5), i64)),  # int -> float32
    case("ABS", ((3, 5), i32)),
    case("ISNAN", ((3, 5), bf16)),
    case("SIGMOID", ((2, 7), f16)),
    case("GELU", ((3, 5), bf16), approximate="tanh"),
    case("CAST", ((3, 5), f32), dtype=bf16),
    case("CAST", ((3, 5), i64), dtype=b),
    case("CLAMP", ((3, 5), f32), min=-0.5, max=0.5),
    case("CLAMP", ((3, 5), i64), min=2),
    case("CLAMP", ((3, 5), i32), max=1.5),  # a float bound lifts ints to float
    case("DIV", ((3, 5), i64), ((5,), i64)),  # true division -> float32
    case("DIV", ((3, 5), i64), ((5,), i64), rounding="floor"),
    case("DIV", ((3, 5), i32), 2, rounding="trunc"),
    case("MOD", ((3, 5), i32), ((3, 5), i8)),
    case("ADD", ((3, 5), bf16), ((3, 5), f16)),  # -> float32
    case("ADD", ((3, 5), u8), ((3, 5), i8)),  # -> int16
    case("ADD", ((3, 5), b), ((3, 5), b)),
    case("MUL", ((3, 5), bf16), 0.5),  # weak scalar keeps bf16
    case("MUL", ((3, 5), i64), 0.5),  # rank-0 float lifts int to its own dtype (float64)
    case("ADD", ((3, 5), f16), ((), f32)),  # a rank-0 tensor is weak too
    case("EQ", ((3, 5), i64), 2),
    case("LT", ((3, 5), i64), 1.5),
    case("POW", ((3, 5), i32), 2),
    case("AND", ((3, 5), i32), ((5,), i64)),
    case("WHERE", ((4, 1), b), ((3, 4, 5), bf16), 0.0),
    case("WHERE", ((5,), b), 1, ((3, 5), i32)),
    # reductions
    case("SUM", ((3, 4, 5), f32), axes=(0, 2)),
    case("SUM", ((3, 4, 5), f32), axes=(1,), keepdim=True),
    case("SUM", ((3, 4, 5), b), axes=(2,)),  # -> int64
    case("SUM", ((3, 4, 5), i32), axes=(0, 1, 2)),
    case("SUM", ((), f16), axes=()),
    case("ALL", ((), f32), axes=()),
    case("MEAN", ((3, 4, 5), f16), axes=(2,)),
    case("MAX", ((3, 4, 5), i32), axes=(0, 1), keepdim=True),
    case("MIN", ((3, 4, 5), bf16), axes=(1,)),
    case("PROD", ((3, 4, 5), f32), axes=(0, 2), keepdim=True),
    case("PROD", ((3, 4, 5), i32), axes=(1,)),
    case("ANY", ((3, 4, 5), b), axes=(0, 2)),
    case("ALL", ((3, 4, 5), f32), axes=(1,), keepdim=True),
    case("ARGMAX", ((3, 4, 5), f32), axes=(1,)),
    case("ARGMIN", ((3, 4, 5), i32), axes=(2,), keepdim=True),
    case("CUMSUM", ((3, 4, 5), i32), axis=1),  # -> int64
    case("CUMSUM", ((3, 4, 5), bf16), axis=2),
    case("SOFTMAX", ((3, 4, 5), f32), axis=2),
    case("SOFTMAX", ((3, 4, 5), f16), axis=0),
    case("LOG_SOFTMAX", ((3, 4, 5), bf16), axis=1),
    # norms
    case("LAYERNORM", ((3, 5, 7), f32), ((7,), f32), ((7,), f32), eps=1e-5),
    case("LAYERNORM", ((3, 5, 7), bf16), ((5, 7), bf16), eps=1e-6, dims=2),
    case("LAYERNORM", ((3, 7), bf16), ((7,), f32), ((7,), f32), eps=1e-5),  # keeps bf16
    case("RMSNORM", ((3, 5, 7), bf16), ((7,), bf16), eps=1e-6),
    case("RMSNORM", ((3, 7), bf16), ((7,), f32), eps=1e-6),  # y * w promotes, like HF
    case("RMSNORM", ((3, 5, 7), f16), eps=1e-6, dims=2),
    case("RMSNORM", ((3, 5, 7), bf16), ((7,), bf16), ((3, 1, 7), bf16), eps=1e-6, residual=True),
    case("LAYERNORM", ((3, 7), f16), ((7,), f16), ((7,), f16), ((3, 7), f16), eps=1e-5, residual=True),
    case("LAYERNORM_MODULATE", ((2, 5, 7), f32), ((2, 1, 7), f32), ((2, 1, 7), f32), eps=1e-6),
    case("LAYERNORM_MODULATE", ((2, 5, 7), bf16), ((2, 1, 7), bf16), ((7,), bf16), ((7,), bf16), ((7,), bf16), eps=1e-5),
    # fused linear algebra
    case("GEMM", ((2, 3, 5), f32), ((7, 5), f32)),
    case("GEMM", ((2, 3, 5), f16), ((8, 5), f16), ((8,), f16), ((2, 3, 4), f16), bias=True, act="silu", glu=True, residual=True),
    case("GEMM", ((3, 5), bf16), ((7, 5), bf16), ((7,), bf16), ((3, 1), bf16), ((3, 7), bf16), bias=True, act="gelu_tanh",
         gate=True, residual=True),
    case("ROPE", ((2, 4, 5, 8), f32), ((2, 1, 5, 8), f32), ((2, 1, 5, 8), f32)),
    case("QGEMM", ((2, 3, 64), f32), ((8, 32), u8), ((8, 2), f16), ((8, 2), u8), bits=4, group=32, zeros=True, act="silu", glu=True),
    case("QGEMM", ((3, 64), bf16), ((7, 64), u8), ((7, 1), f32), ((7,), bf16), ((3, 7), bf16), bits=8, group=64, bias=True, residual=True),
    case("AQGEMM", ((2, 3, 40), f32), ((12, 40), i8), ((12,), f32), ((40,), f32), format="int8", smooth=True, act="silu", glu=True),
    case("AQGEMM", ((3, 40), bf16), ((7, 40), "float8_e4m3fn"), ((7,), f32), ((7,), bf16), ((3, 7), bf16), format="fp8", bias=True,
         residual=True),
    # linear algebra
    case("LINEAR", ((2, 3, 5), f32), ((7, 5), f32), ((7,), f32)),
    case("LINEAR", ((5,), bf16), ((7, 5), bf16)),
    case("MATMUL", ((2, 1, 3, 5), f32), ((4, 5, 7), f32)),
    case("MATMUL", ((5,), f32), ((3, 5, 7), f32)),
    case("MATMUL", ((3, 5, 7), f32), ((7,), f32)),
    case("MATMUL", ((7,), f16), ((7,), f16)),
    case("CONV2D", ((2, 4, 9, 11), f32), ((6, 2, 3, 3), f32), ((6,), f32),
         stride=(2, 1), padding=(1, 0), dilation=(1, 2), groups=2),
    case("CONV2D", ((1, 3, 8, 8), f32), ((5, 3, 2, 2), f32), stride=(2, 2)),
    case("CONV", ((2, 4, 9, 11), f32), ((6, 2, 3, 3), f32), ((6,), f32), ((2, 6, 9, 11), f32), padding=(1, 1),
         groups=2, bias=True, residual=True, divisor=2.0),
    case("CONV", ((1, 3, 8, 8), f16), ((5, 3, 1, 1), f16), ((5, 1, 1), f16), residual=True),
    case("CONV", ((1, 3, 8, 8), bf16), ((5, 3, 2, 2), bf16), stride=(2, 2), divisor=0.5),
    case("GROUP_NORM", ((2, 6, 5, 7), f32), ((6,), f32), ((6,), f32), groups=3, eps=1e-6),
    case("GROUP_NORM", ((2, 4, 9), bf16), groups=2, act="silu"),
    case("GROUP_NORM", ((3, 6), f16), ((6,), f16), groups=6, act="silu"),
    # collectives at one rank (identity); two ranks: tests/distributed
    case("ALL_REDUCE", ((3, 5), f32), world=1),
    case("ALL_GATHER", ((3, 5), bf16), axis=1, world=1),
    case("ATTENTION", ((2, 4, 5, 8), f32), ((2, 2, 7, 8), f32), ((2, 2, 7, 6), f32), ((5, 7), b), gqa=True),
    case("ATTENTION", ((3, 5, 8), f32), ((1, 7, 8), f32), ((1, 7, 8), f32), ((3, 5, 7), f32), scale=0.2),
    case("ATTENTION", ((5, 8), bf16), ((5, 8), bf16), ((5, 8), bf16), causal=True),
    case("ATTENTION", ((2, 4, 5, 8), f32), ((2, 2, 7, 8), f32), ((2, 2, 7, 6), f32), ((5, 7), b), gqa=True, softcap=0.5),
    # gathers
    case("EMBEDDING", ((11, 6), f32), ((3, 4), i64)),
    case("EMBEDDING", ((11, 6), bf16), ((5,), i32)),
    case("INDEX", ((3, 5, 7), f32), ((2, 4), i64), axes=(1,)),
    case("INDEX", ((3, 5, 7, 4), f32), ((2, 1), i64), ((6,), i32), axes=(0, 2)),
    case("GATHER", ((3, 5), f32), ((3, 2), i64), axis=1),
    case("GATHER", ((3, 5, 4), i32), ((2, 5, 4), i64), axis=0),
    case("INDEX_COPY", ((2, 3, 8, 4), f32), ((1,), i64), ((2, 3, 1, 4), f32), axis=2),
    # layout
    case("RESHAPE", ((3, 4, 5), f32), shape=(4, 15)),
    case("RESHAPE", ((3, 4, 5), b), shape=(60,)),
    case("PERMUTE", ((3, 4, 5), bf16), perm=(2, 0, 1)),
    case("EXPAND", ((3, 1), f32), shape=(2, 3, 4)),
    case("SLICE", ((3, 7, 5), f32), axis=1, start=1, end=6, step=2),
    case("SLICE", ((3, 7, 5), i64), axis=2, start=5, end=5),
    case("SLICE", ((3, 7, 5), f32), axis=0, start=0, end=3, step=5),
    case("CONCAT", ((3, 2, 5), f32), ((3, 4, 5), f32), ((3, 1, 5), f32), axis=1),
    case("CONCAT", ((3, 5), i64), axis=0),
    case("PAD", ((3, 4, 5), f32), pads=((1, 2), (0, 3)), value=-1.0),
    case("PAD", ((3, 4, 5), f32), pads=((-1, 2),)),
    case("TRIU", ((2, 5, 7), f32), diagonal=1),
    case("TRIL", ((5, 3), b), diagonal=-1),
    # creation
    case("ARANGE", end=7),
    case("ARANGE", start=2, end=11, step=3),
    case("ARANGE", start=0.0, end=2.5, step=0.5, dtype=f32),
    case("FULL", shape=(2, 3), value=1.5, dtype=bf16),
    case("FULL", shape=(4,), value=True, dtype=b),
]


def test_the_table_covers_every_op():
    typed = {name for name, d in OPS.items() if d.infer is not None}
    assert typed == set(OPS) - {"INPUT", "WEIGHT", "CONST"}
    assert typed <= {p.values[0] for p in CASES}


@pytest.mark.parametrize("op,specs,attrs", CASES)
def test_inferred_type_is_what_the_reference_returns(op, specs, attrs):
    g, node = build(op, specs, attrs)
    g.verify()
    (out,) = interpret(g, feeds(g, {}, torch.Generator().manual_seed(0)))
    assert tuple(out.shape) == node.shape
    assert out.dtype == torch_dtype(node.dtype)


# ----------------------------------------------------------------------------- promotion and broadcasting

TORCH = {"ADD": torch.add, "MUL": torch.mul, "SUB": torch.sub, "DIV": torch.div, "EQ": torch.eq, "LT": torch.lt,
         "AND": torch.bitwise_and, "OR": torch.bitwise_or, "MAXIMUM": torch.maximum, "POW": torch.pow}


@pytest.mark.parametrize("op,dtype,scalar", [
    ("MUL", bf16, 0.5), ("ADD", f16, 2), ("DIV", bf16, 3), ("MUL", f32, True),
    ("EQ", i64, 3), ("LT", i64, 2.5), ("ADD", i32, 7), ("MUL", i8, 2), ("ADD", u8, 1), ("POW", i32, 2),
    ("AND", b, True), ("OR", b, False), ("ADD", b, 1),
])
def test_a_const_promotes_like_a_python_scalar(op, dtype, scalar):
    """bf16 * 0.5 stays bf16, int64 < 2.5 is bool, int32 + 7 stays int32: as torch does with python numbers."""
    x = tensor((3, 5), dtype, torch.Generator().manual_seed(1))
    want = TORCH[op](x, scalar)
    g, node = build(op, [((3, 5), dtype), scalar], {})
    assert node.dtype == str(want.dtype).removeprefix("torch.")
    (got,) = interpret(g, [x])
    assert torch.equal(got, want)


@pytest.mark.parametrize("dtype,scalar", [(i64, 0.5), (b, 1.5), (i32, 2.0)])
def test_a_float_const_lifts_an_int_tensor_like_a_0d_float64_tensor(dtype, scalar):
    """Across kinds a CONST acts as torch's 0-d float64 tensor (python's 0.5 would give float32)."""
    _, node = build("MUL", [((3,), dtype), scalar], {})
    want = torch.result_type(torch.ones(3, dtype=torch_dtype(dtype)), torch.tensor(scalar, dtype=torch.float64))
    assert node.dtype == str(want).removeprefix("torch.") == "float64"


@pytest.mark.parametrize("x,y", [(bf16, f16), (f16, f32), (i32, i64), (b, i8), (u8, i8), (i64, bf16), (b, f16),
                                 (i8, f64), (u8, b)])
@pytest.mark.parametrize("op", ["ADD", "MUL", "MAXIMUM", "EQ"])
def test_tensor_tensor_promotion_matches_torch(op, x, y):
    gen = torch.Generator().manual_seed(2)
    a, c = tensor((4, 3), x, gen), tensor((3,), y, gen)
    want = TORCH[op](a, c)
    g, node = build(op, [((4, 3), x), ((3,), y)], {})
    assert node.dtype == str(want.dtype).removeprefix("torch.")
    (got,) = interpret(g, [a, c])
    assert torch.equal(got, want)


@pytest.mark.parametrize("sa,sb", [((5, 1, 7), (3, 1)), ((), (2, 3)), ((1,), (4,)), ((2, 1), (1, 3)),
                                   ((6, 1, 4, 1), (5, 1, 3)), ((3,), ())])
def test_broadcasting_matches_torch(sa, sb):
    gen = torch.Generator().manual_seed(3)
    a, c = tensor(sa, f64, gen), tensor(sb, f64, gen)
    g, node = build("SUB", [(sa, f64), (sb, f64)], {})
    assert node.shape == tuple(torch.broadcast_shapes(sa, sb))
    (got,) = interpret(g, [a, c])
    assert torch.equal(got, a - c)


def test_where_broadcasts_three_ways():
    gen = torch.Generator().manual_seed(4)
    cond, x, y = tensor((4, 1, 1), b, gen), tensor((1, 3, 1), f32, gen), tensor((5,), f32, gen)
    g, node = build("WHERE", [((4, 1, 1), b), ((1, 3, 1), f32), ((5,), f32)], {})
    assert node.shape == (4, 3, 5)
    assert torch.equal(interpret(g, [cond, x, y])[0], torch.where(cond, x, y))


def test_symbolic_broadcast():
    _, node = build("ADD", [((BATCH, 1, SEQ), f32), ((SEQ,), f32)], {})
    assert node.shape == (BATCH, 1, SEQ)
    _, node = build("MUL", [((BATCH, SEQ, 1), f32), ((1, 1, 6), f32)], {})
    assert node.shape == (BATCH, SEQ, 6)


# ----------------------------------------------------------------------------- symbolic shapes


def sym_case(name, op, specs, attrs, want_shape, fn):
    """``fn(sizes, *inputs)`` is the torch reference, given the symbol values of the run."""
    return pytest.param(op, specs, attrs, want_shape, fn, id=name)


SYMBOLIC = [
    sym_case("reshape-flatten", "RESHAPE", [((BATCH, SEQ, 4), f32)], dict(shape=(BATCH, SEQ * 4)), (BATCH, 4 * SEQ),
             lambda s, x: x.reshape(s["batch"], -1)),
    sym_case("reshape-split-heads", "RESHAPE", [((BATCH, 2 * SEQ, 6), f32)], dict(shape=(BATCH, SEQ, 2, 6)),
             (BATCH, SEQ, 2, 6), lambda s, x: x.reshape(s["batch"], -1, 2, 6)),
    sym_case("slice-seq-minus-1", "SLICE", [((BATCH, SEQ, 3), f32)], dict(axis=1, start=0, end=SEQ - 1),
             (BATCH, SEQ - 1, 3), lambda s, x: x[:, :-1]),
    sym_case("slice-step-2", "SLICE", [((SEQ, 3), f32)], dict(axis=0, start=1, end=SEQ, step=2),
             (sympy.floor(SEQ / 2), 3), lambda s, x: x[1::2]),
    sym_case("concat-seq", "CONCAT", [((BATCH, SEQ, 3), f32), ((BATCH, 2, 3), f32)], dict(axis=1),
             (BATCH, SEQ + 2, 3), lambda s, x, y: torch.cat([x, y], 1)),
    sym_case("concat-twice", "CONCAT", [((SEQ, 3), f32), ((SEQ, 3), f32)], dict(axis=0), (2 * SEQ, 3),
             lambda s, x, y: torch.cat([x, y])),
    sym_case("arange-seq", "ARANGE", [], dict(end=SEQ), (SEQ,), lambda s: torch.arange(s["seq"])),
    sym_case("arange-step", "ARANGE", [], dict(start=1, end=SEQ + 4, step=3), (sympy.ceiling((SEQ + 3) / 3),),
             lambda s: torch.arange(1, s["seq"] + 4, 3)),
    sym_case("full", "FULL", [], dict(shape=(SEQ, SEQ + 1), value=-INF, dtype=f32), (SEQ, SEQ + 1),
             lambda s: torch.full((s["seq"], s["seq"] + 1), -INF)),
    sym_case("conv2d", "CONV2D", [((BATCH, 3, H, W), f32), ((5, 3, 3, 2), f32)],
             dict(stride=(2, 3), padding=(1, 0), dilation=(1, 2)),
             (BATCH, 5, sympy.floor((H - 1) / 2) + 1, sympy.floor((W - 3) / 3) + 1),
             lambda s, x, w: F.conv2d(x, w, stride=(2, 3), padding=(1, 0), dilation=(1, 2))),
    sym_case("group_norm", "GROUP_NORM", [((BATCH, 6, H, W), f32), ((6,), f32)], dict(groups=2, act="silu"),
             (BATCH, 6, H, W), lambda s, x, w: F.silu(F.group_norm(x, 2, w))),
    sym_case("conv-residual", "CONV", [((BATCH, 3, H, W), f32), ((5, 3, 3, 3), f32), ((BATCH, 5, H, W), f32)],
             dict(padding=(1, 1), residual=True, divisor=2.0), (BATCH, 5, H, W),
             lambda s, x, w, r: (r + F.conv2d(x, w, padding=1)) / 2.0),
    sym_case("matmul", "MATMUL", [((BATCH, SEQ, 8), f32), ((8, 5), f32)], {}, (BATCH, SEQ, 5),
             lambda s, x, y: x @ y),
    sym_case("expand", "EXPAND", [((1, SEQ), f32)], dict(shape=(BATCH, SEQ)), (BATCH, SEQ),
             lambda s, x: x.expand(s["batch"], -1)),
    sym_case("pad", "PAD", [((BATCH, SEQ), f32)], dict(pads=((1, 2),)), (BATCH, SEQ + 3),
             lambda s, x: F.pad(x, (1, 2))),
    sym_case("permute", "PERMUTE", [((BATCH, SEQ, 3), f32)], dict(perm=(1, 2, 0)), (SEQ, 3, BATCH),
             lambda s, x: x.permute(1, 2, 0)),
    sym_case("sum-keepdim", "SUM", [((BATCH, SEQ, 3), f32)], dict(axes=(1,), keepdim=True), (BATCH, 1, 3),
             lambda s, x: x.sum(1, keepdim=True)),
    sym_case("index", "INDEX", [((7, 3), f32), ((BATCH, SEQ), i64)], dict(axes=(0,)), (BATCH, SEQ, 3),
             lambda s, x, i: x[i]),
    sym_case("embedding", "EMBEDDING", [((7, 3), f32), ((BATCH, SEQ), i64)], {}, (BATCH, SEQ, 3),
             lambda s, t, i: F.embedding(i, t)),
    sym_case("attention", "ATTENTION", [((BATCH, 2, SEQ, 8), f32)] * 3, dict(causal=True), (BATCH, 2, SEQ, 8),
             lambda s, q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)),
    sym_case("mul-by-seq", "MUL", [((BATCH, 3), f32), SEQ], {}, (BATCH, 3), lambda s, x: x * s["seq"]),
]
SIZES = [{"batch": 2, "seq": 5, "h": 9, "w": 13}, {"batch": 3, "seq": 8, "h": 12, "w": 7}]


@pytest.mark.parametrize("op,specs,attrs,want_shape,fn", SYMBOLIC)
def test_symbolic_shapes_infer_and_evaluate(op, specs, attrs, want_shape, fn):
    g, node = build(op, specs, attrs, anchor=True)
    g.verify()
    assert len(node.shape) == len(want_shape)
    assert all(dims_equal(d, e) for d, e in zip(node.shape, want_shape)), node.shape
    gen = torch.Generator().manual_seed(5)
    for sizes in SIZES:
        xs = feeds(g, sizes, gen)
        (got,) = interpret(g, xs)
        want = fn(sizes, *xs[:-1])
        assert tuple(got.shape) == tuple(eval_dim(d, sizes) for d in node.shape) == tuple(want.shape)
        assert got.dtype == want.dtype
        assert torch.equal(got, want) if not got.is_floating_point() else rel_err(got, want) <= TOL[got.dtype]


def test_a_dim_that_is_not_an_integer_at_run_time_is_an_error():
    """RESHAPE [seq] -> [seq/2, 2] infers, but at an odd seq it must fail clearly, not truncate to 3."""
    g, node = build("RESHAPE", [((SEQ,), f32)], dict(shape=(SEQ / 2, 2)), anchor=True)
    (got,) = interpret(g, [torch.arange(8.0), torch.zeros(1, 8, 3, 3, dtype=torch.bool)])
    assert torch.equal(got, torch.arange(8.0).reshape(4, 2))
    with pytest.raises(ValueError, match="seq/2 is 7/2"):
        interpret(g, [torch.arange(7.0), torch.zeros(1, 7, 3, 3, dtype=torch.bool)])


def test_symbolic_reshape_of_a_symbolic_numel():
    _, node = build("RESHAPE", [((BATCH, SEQ, 4), f32)], dict(shape=(4 * BATCH * SEQ,)))
    assert dims_equal(node.shape[0], 4 * BATCH * SEQ)


# ----------------------------------------------------------------------------- ShapeErrors, per op family


def bad(op, specs, attrs, match):
    return pytest.param(op, specs, attrs, match, id=f"{op}-{match[:24]}")


BAD = [
    bad("ADD", [((3, 4), f32), ((5,), f32)], {}, "cannot broadcast"),
    bad("ADD", [((SEQ,), f32), ((BATCH,), f32)], {}, "cannot broadcast"),
    bad("ADD", [((3,), f32), ((3,), f32), ((3,), f32)], {}, "takes 2 inputs, got 3"),
    bad("AND", [((3,), f32), ((3,), f32)], {}, "AND: inputs of dtype float32"),
    bad("WHERE", [((3,), f32), ((3,), f32), ((3,), f32)], {}, "WHERE"),
    bad("NEG", [], {}, "takes 1 inputs, got 0"),
    bad("SUM", [((3, 4), f32)], dict(axes=(2,)), "reduction axis 2 out of range"),
    bad("MEAN", [((3, 4), i64)], dict(axes=(1,)), "MEAN: inputs of dtype int64"),
    bad("ARGMAX", [((3, 4), f32)], dict(axes=(0, 1)), "exactly one axis"),
    bad("SUM", [((3, 4), f32)], dict(axes=()), "SUM: no reduction axes"),
    bad("PROD", [((3, 4), f32)], dict(axes=()), "PROD: no reduction axes"),
    bad("SOFTMAX", [((3, 4), f32)], dict(axis=2), "SOFTMAX: axis 2 out of range"),
    bad("SOFTMAX", [((3, 4), i64)], dict(axis=1), "SOFTMAX: inputs of dtype int64"),
    bad("CUMSUM", [((3, 4), f32)], dict(axis=3), "CUMSUM: axis 3"),
    bad("LAYERNORM", [((3, 4), f32), ((3,), f32)], dict(eps=1e-5), "does not match the last 1 dims"),
    bad("LAYERNORM", [((3, 4), f32), ((4,), f32), ((4, 1), f32)], dict(eps=1e-5), "norm parameter shape [4, 1]"),
    bad("RMSNORM", [((4,), f32)], dict(eps=1e-5, dims=2), "cannot normalise the last 2 dims"),
    bad("RMSNORM", [((3, 4), f32)], dict(eps=1e-5, residual=True), "RMSNORM: 1 inputs with residual=True"),
    bad("RMSNORM", [((3, 4), f32), ((4,), f32), ((2, 3, 4), f32)], dict(eps=1e-5, residual=True), "residual [2, 3, 4]"),
    bad("LAYERNORM_MODULATE", [((2, 5, 7), f32), ((3, 1, 7), f32), ((2, 1, 7), f32)], dict(eps=1e-5), "scale [3, 1, 7]"),
    bad("GEMM", [((3, 5), f32), ((7, 5), f32)], dict(bias=True), "the attributes (bias=True"),
    bad("GEMM", [((3, 5), f32), ((7, 5), f32)], dict(glu=True, act="silu"), "glu needs an even output width"),
    bad("GEMM", [((3, 5), f32), ((7, 5), f32)], dict(act="relu6"), "unknown activation 'relu6'"),
    bad("GEMM", [((3, 5), f32), ((8, 5), f32), ((3, 8), f32)], dict(glu=True, act="silu", residual=True), "residual [3, 8]"),
    bad("ROPE", [((2, 5, 7), f32), ((5, 7), f32), ((5, 7), f32)], {}, "must be even"),
    bad("ROPE", [((2, 5, 8), f32), ((3, 5, 8), f32), ((5, 8), f32)], {}, "cos [3, 5, 8]"),
    bad("LINEAR", [((3, 5), f32), ((7, 4), f32)], {}, "weight is [out, in]"),
    bad("LINEAR", [((3, 5), f32), ((7, 5), f32), ((5,), f32)], {}, "LINEAR: bias [5]"),
    bad("LINEAR", [((3, 5), bf16), ((7, 5), f32)], {}, "share one dtype"),
    bad("MATMUL", [((3, 5), f32), ((5, 2), f16)], {}, "MATMUL: inputs must share one dtype, got float32, float16"),
    bad("MATMUL", [((3, 5), f32), ((4, 2), f32)], {}, "inner dims differ"),
    bad("MATMUL", [((2, 3, 5), f32), ((4, 5, 2), f32)], {}, "cannot broadcast"),
    bad("MATMUL", [((), f32), ((3,), f32)], {}, "rank >= 1"),
    bad("CONV2D", [((4, 9, 9), f32), ((4, 4, 3, 3), f32)], {}, "must be rank 4"),
    bad("CONV2D", [((1, 4, 9, 9), f32), ((4, 3, 3, 3), f32)], {}, "4 input channels"),
    bad("CONV2D", [((1, 4, 9, 9), f32), ((3, 2, 3, 3), f32)], dict(groups=2), "2 groups"),
    bad("CONV2D", [((1, 4, 9, 9), f32), ((6, 4, 3, 3), f32), ((4,), f32)], {}, "CONV2D: bias [4]"),
    bad("CONV2D", [((1, 4, 2, 9), f32), ((6, 4, 3, 3), f32)], {}, "does not fit input"),
    bad("CONV", [((1, 4, 9, 9), f32), ((6, 4, 3, 3), f32)], dict(bias=True), "the attributes (bias=True"),
    bad("CONV", [((1, 4, 9, 9), f32), ((6, 4, 3, 3), f32), ((1, 6, 9, 9), f32)], dict(residual=True), "residual float32[1, 6, 9, 9]"),
    bad("CONV", [((1, 4, 9, 9), f16), ((6, 4, 3, 3), f16), ((1, 6, 7, 7), f32)], dict(residual=True), "residual float32"),
    bad("CONV", [((1, 4, 9, 9), f32), ((6, 4, 3, 3), f32)], dict(divisor=0.0), "divisor 0.0"),
    bad("GROUP_NORM", [((2, 6, 5), f32)], dict(groups=4), "6 channels do not split into 4 groups"),
    bad("GROUP_NORM", [((6,), f32)], dict(groups=2), "must be a float tensor [N, C, *]"),
    bad("GROUP_NORM", [((2, 6, 5), i64)], dict(groups=2), "must be a float tensor"),
    bad("GROUP_NORM", [((2, 6, 5), f32), ((5,), f32)], dict(groups=2), "parameter [5] for 6 channels"),
    bad("GROUP_NORM", [((2, 6, 5), bf16), ((6,), f32)], dict(groups=2), "share one dtype"),
    bad("GROUP_NORM", [((2, 6, 5), f32)], dict(groups=2, act="gelu"), "unknown activation 'gelu'"),
    bad("ALL_REDUCE", [((2, 6), i64)], dict(world=2), "op 'sum' on int64"),
    bad("ALL_GATHER", [((2, 6), f32)], dict(axis=1, world=4, stride=3), "stride 3 over 4 ranks"),
    bad("ATTENTION", [((2, 5, 8), f32), ((2, 7, 6), f32), ((2, 7, 8), f32)], {}, "ATTENTION: q [2, 5, 8]"),
    bad("ATTENTION", [((2, 5, 8), f32), ((2, 7, 8), f32), ((2, 6, 8), f32)], {}, "ATTENTION: q [2, 5, 8]"),
    bad("ATTENTION", [((2, 5, 8), f32), ((7, 8), f32), ((7, 8), f32)], {}, "share a rank"),
    bad("ATTENTION", [((2, 5, 8), f32), ((2, 7, 8), f32), ((2, 7, 8), f32)], dict(softcap=-1.0), "softcap -1.0 must be a positive"),
    bad("ATTENTION", [((1, 4, 5, 8), f32), ((1, 2, 7, 8), f32), ((1, 2, 7, 8), f32)], {}, "leading dims"),
    bad("ATTENTION", [((1, 4, 5, 8), f32), ((1, 3, 7, 8), f32), ((1, 3, 7, 8), f32)], dict(gqa=True),
        "4 query heads do not group over 3"),
    bad("ATTENTION", [((1, 2, 5, 8), f32)] * 3 + [((5, 5), i64)], {}, "mask dtype int64"),
    bad("ATTENTION", [((1, 2, 5, 8), f32)] * 3 + [((3, 1, 5, 5), b)], {}, "does not broadcast to the scores"),
    bad("ATTENTION", [((1, 2, 5, 8), bf16)] * 3 + [((5, 5), f32)], {}, "must be bool or bfloat16"),
    bad("EMBEDDING", [((11, 6), f32), ((3,), f32)], {}, "ids integer"),
    bad("EMBEDDING", [((11, 6, 2), f32), ((3,), i64)], {}, "must be 2-d"),
    bad("INDEX", [((3, 5, 7), f32), ((2,), i64)], dict(axes=(0, 1)), "do not fit 1 index tensors"),
    bad("INDEX", [((3, 5, 7), f32), ((2,), i64), ((2,), i64)], dict(axes=(2, 1)), "axes (2, 1)"),
    bad("INDEX", [((3, 5, 7), f32), ((2,), i64), ((2,), i64)], dict(axes=(1, 1)), "axes (1, 1)"),
    bad("INDEX", [((3, 5), f32), ((2,), i64)], dict(axes=(2,)), "on shape [3, 5]"),
    bad("INDEX", [((3, 5), f32), ((2,), f32)], dict(axes=(1,)), "must be integer"),
    bad("INDEX_COPY", [((2, 3, 8, 4), f32), ((2, 1), i64), ((2, 3, 2, 4), f32)], dict(axis=2), "1-d integer"),
    bad("INDEX_COPY", [((2, 3, 8, 4), f32), ((2,), i64), ((2, 3, 3, 4), f32)], dict(axis=2), "must be float32"),
    bad("INDEX", [((3, 5, 7), f32), ((2,), i64), ((3,), i64)], dict(axes=(0, 2)), "cannot broadcast"),
    bad("GATHER", [((3, 5), f32), ((3,), i64)], dict(axis=0), "GATHER"),
    bad("GATHER", [((3, 5), f32), ((3, 5), i64)], dict(axis=2), "axis 2"),
    bad("GATHER", [((3, 5), f32), ((3, 5), f32)], dict(axis=1), "index float32"),
    bad("RESHAPE", [((3, 4), f32)], dict(shape=(5, 2)), "cannot view [3, 4] as [5, 2]"),
    bad("RESHAPE", [((SEQ, 4), f32)], dict(shape=(SEQ, 5)), "cannot view [seq, 4]"),
    bad("RESHAPE", [((3, 2), f32)], dict(shape=(-1, -6)), "RESHAPE: [-1, -6] has a negative dim"),
    bad("PERMUTE", [((3, 4), f32)], dict(perm=(0, 0)), "not a permutation"),
    bad("EXPAND", [((1, 3), f32)], dict(shape=(-1, 3)), "EXPAND: [-1, 3] has a negative dim"),
    bad("EXPAND", [((3, 2), f32)], dict(shape=(3, 4)), "cannot expand"),
    bad("EXPAND", [((1, 3, 2), f32)], dict(shape=(3, 2)), "fewer dims"),
    bad("SLICE", [((3, 4), f32)], dict(axis=2, start=0, end=1), "axis 2"),
    bad("SLICE", [((3, 4), f32)], dict(axis=1, start=0, end=2, step=0), "step 0"),
    bad("SLICE", [((3, 4), f32)], dict(axis=1, start=0, end=9), "[0:9] out of range"),
    bad("SLICE", [((3, 4), f32)], dict(axis=1, start=-2, end=4), "[-2:4] out of range"),
    bad("CONCAT", [((3, 4), f32), ((3, 4), f16)], dict(axis=0), "CONCAT: inputs"),
    bad("CONCAT", [((3, 4), f32), ((2, 5), f32)], dict(axis=0), "CONCAT on axis 0"),
    bad("CONCAT", [((3, 4), f32), ((3, 4), f32)], dict(axis=2), "axis 2 out of range"),
    bad("CONCAT", [((SEQ, 4), f32), ((BATCH, 4), f32)], dict(axis=1), "CONCAT on axis 1"),
    bad("PAD", [((3, 4), f32)], dict(pads=((1, 1), (1, 1), (1, 1))), "do not fit shape [3, 4]"),
    bad("TRIU", [((4,), f32)], {}, "rank >= 2"),
]


@pytest.mark.parametrize("op,specs,attrs,match", BAD)
def test_shape_errors(op, specs, attrs, match):
    with pytest.raises(ShapeError) as e:
        build(op, specs, attrs)
    assert match in str(e.value)


def test_every_op_family_has_a_shape_error_case():
    families = {OPS[p.values[0]].kind for p in BAD}
    assert families == {d.kind for d in OPS.values()} - {"source"}


# ----------------------------------------------------------------------------- ATTENTION against torch SDPA


def attention_case(name, hq=4, hk=4, lq=5, lk=7, mask=None, **attrs):
    return pytest.param(hq, hk, lq, lk, mask, attrs, id=name)


@pytest.mark.parametrize("hq,hk,lq,lk,mask,attrs", [
    attention_case("plain"),
    attention_case("causal-square", lq=6, lk=6, causal=True),
    attention_case("causal-upper-left", causal=True),
    attention_case("bool-mask", mask="bool"),
    attention_case("float-mask", mask="float"),
    attention_case("scale", scale=0.3),
    attention_case("gqa", hk=2, gqa=True),
    attention_case("gqa-causal-scale", hk=2, lq=6, lk=6, gqa=True, causal=True, scale=0.05),
    attention_case("gqa-mask", hk=2, mask="bool", gqa=True),
    attention_case("softcap-gqa-causal", hk=2, lq=6, lk=6, gqa=True, causal=True, softcap=0.4),
    attention_case("softcap-float-mask", mask="float", scale=0.3, softcap=0.7),
])
def test_attention_matches_sdpa(hq, hk, lq, lk, mask, attrs):
    gen = torch.Generator().manual_seed(6)
    d = 72
    q, k, v = (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((2, hq, lq, d), (2, hk, lk, d), (2, hk, lk, d)))
    specs = [((2, hq, lq, d), f32), ((2, hk, lk, d), f32), ((2, hk, lk, d), f32)]
    m = None
    if mask == "bool":
        m = torch.rand(lq, lk, generator=gen) > 0.4
        m[:, 0] = True  # no fully masked row
        specs.append(((lq, lk), b))
    elif mask == "float":
        m = torch.randn(2, 1, lq, lk, generator=gen, dtype=torch.float64)
        m[..., 1::3] = -INF
        specs.append(((2, 1, lq, lk), f32))
    if attrs.get("softcap"):  # (Gemma 2) written out: c * tanh(s / c) on the scaled scores, then the masks
        kr, vr = (t.repeat_interleave(hq // hk, 1) for t in (k, v))
        s = (q @ kr.transpose(-1, -2)) * attrs.get("scale", d ** -0.5)
        s = torch.tanh(s / attrs["softcap"]) * attrs["softcap"] + (m if m is not None else 0)
        if attrs.get("causal"):
            s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool).tril(), -INF)
        want = torch.softmax(s, -1) @ vr
    else:
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=attrs.get("causal", False),
                                              scale=attrs.get("scale"), enable_gqa=attrs.get("gqa", False))
    g, node = build("ATTENTION", specs, attrs)
    assert node.shape == tuple(want.shape)
    xs = [t.float() if t.is_floating_point() else t for t in (q, k, v, m) if t is not None]
    (got,) = interpret(g, xs)
    assert got.dtype == torch.float32
    assert rel_err(got, want) <= TOL[torch.float32]
    (got64,) = interpret(g, xs, compute_dtype=torch.float64)
    assert rel_err(got64, want) <= 1e-6  # inputs were rounded to float32


# ----------------------------------------------------------------------------- INDEX against advanced indexing


@pytest.mark.parametrize("axes,index_shapes,key", [
    ((0,), [(2, 3)], lambda x, i: x[i]),
    ((1,), [(2, 3)], lambda x, i: x[:, i]),
    ((3,), [(4,)], lambda x, i: x[:, :, :, i]),
    ((1, 2), [(2, 3), (3,)], lambda x, i, j: x[:, i, j]),  # adjacent: result dims in place
    ((2, 3), [(4, 1), (1, 2)], lambda x, i, j: x[:, :, i, j]),
    ((0, 2), [(2, 3), (3,)], lambda x, i, j: x[i, :, j]),  # not adjacent: result dims first
    ((1, 3), [(6,), (6,)], lambda x, i, j: x[:, i, :, j]),
    ((0, 1, 3), [(2, 1), (1, 4), (4,)], lambda x, i, j, k: x[i, j, :, k]),
    ((0, 1, 2, 3), [(5,)] * 4, lambda x, i, j, k, m: x[i, j, k, m]),
])
@pytest.mark.parametrize("idx_dtype", [i64, i32])
def test_index_matches_advanced_indexing(axes, index_shapes, key, idx_dtype):
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(3, 5, 7, 4, generator=gen)
    idx = [torch.randint(0, x.shape[a], s, generator=gen).to(torch_dtype(idx_dtype)) for a, s in zip(axes, index_shapes)]
    want = key(x, *idx)
    g, node = build("INDEX", [((3, 5, 7, 4), f32)] + [(s, idx_dtype) for s in index_shapes], dict(axes=axes))
    assert node.shape == tuple(want.shape)
    assert torch.equal(interpret(g, [x, *idx])[0], want)


# ----------------------------------------------------------------------------- GROUP_NORM and CONV against their formulas


@pytest.mark.parametrize("act", ["none", "silu"])
def test_group_norm_is_its_formula(act):
    """Each sample's C/G x H x W values of a group share one mean and (biased) variance; then w, b per channel."""
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(2, 6, 5, 7, generator=gen, dtype=torch.float64) * 3 + 4
    w, bias = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    g = x.reshape(2, 3, -1)  # 3 groups of 2 channels
    y = ((g - g.mean(-1, keepdim=True)) / torch.sqrt(g.var(-1, unbiased=False, keepdim=True) + 1e-6)).reshape(x.shape)
    want = y * w[:, None, None] + bias[:, None, None]
    graph, _ = build("GROUP_NORM", [((2, 6, 5, 7), f64), ((6,), f64), ((6,), f64)], dict(groups=3, eps=1e-6, act=act))
    (got,) = interpret(graph, [x, w, bias])
    assert rel_err(got, want * torch.sigmoid(want) if act == "silu" else want) <= 1e-12


def test_conv_is_residual_plus_conv2d_over_divisor():
    gen = torch.Generator().manual_seed(9)
    x, w = torch.randn(2, 4, 9, 11, generator=gen, dtype=torch.float64), torch.randn(6, 2, 3, 3, generator=gen, dtype=torch.float64)
    bias, r = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(2, 6, 1, 11, generator=gen, dtype=torch.float64)
    attrs = dict(padding=(1, 1), groups=2, bias=True, residual=True, divisor=3.0)
    graph, _ = build("CONV", [((2, 4, 9, 11), f64), ((6, 2, 3, 3), f64), ((6,), f64), ((2, 6, 1, 11), f64)], attrs)
    (got,) = interpret(graph, [x, w, bias, r])
    assert torch.equal(got, (r + F.conv2d(x, w, bias, padding=1, groups=2)) / 3.0)
