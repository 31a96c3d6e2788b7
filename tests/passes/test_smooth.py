"""kiln.passes.smooth: SmoothQuant leaves the float function unchanged (float64, 1e-10), folds 1 / s into a norm's
stored weight and bias when only the smoothed GEMMs read it (else a MUL), gives GEMMs of one input one s, searches
the strength, and stays off for fp8 and smoothing="off"."""
import pytest
import torch

from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.serialize import graph_from_json, graph_to_json
from kiln.passes.calibrate import RowSample
from kiln.passes.quantize_acts import ActQuantSpec, matmul_error
from kiln.passes.smooth import GRID, factors, search, smooth

gen = torch.Generator().manual_seed(2)
K = 48
OUTLIER = torch.tensor([3, 17, 40])  # channels whose norm weight is 50x


def norm_graph(op="LAYERNORM", readers=2, extra_reader=False, params=True, dtype="float32"):
    """x -> NORM(w[, b]) (channels OUTLIER x50) -> ``readers`` LINEARs -> GELU (+ a RELU reading the norm when
    ``extra_reader``). (A LINEAR that is a graph output would be an LM head, which w8a8 leaves alone.)"""
    g = Graph()
    x = g.add_input("x", (2, 7, K), dtype)
    tdt = getattr(torch, dtype)
    w = torch.rand(K, generator=gen).to(tdt) + 0.5
    w[OUTLIER] *= 50
    ps = [g.add_weight("norm.weight", w)] + ([g.add_weight("norm.bias", torch.randn(K, generator=gen).to(tdt))] if op == "LAYERNORM" else [])
    h = g.add(op, [x] + (ps if params else []), eps=1e-5)
    outs = [g.add("LINEAR", [h, g.add_weight(f"l{i}.weight", torch.randn(16 + 8 * i, K, generator=gen).to(tdt) / K ** 0.5)])
            for i in range(readers)]
    g.set_outputs([g.add("GELU", [o]) for o in outs] + ([g.add("RELU", [h])] if extra_reader else []))
    return g


def _copy(g):
    return graph_from_json(graph_to_json(g), dict(g.weights))


def calib(n=3, dtype=torch.float32):
    return [[torch.randn(2, 7, K, generator=gen).to(dtype) * 3 + 1] for _ in range(n)]


def same_function(ref, g, dtype=torch.float64):
    xs = calib(1)[0]
    for a, b in zip(interpret(g, xs, compute_dtype=dtype), interpret(ref, xs, compute_dtype=dtype)):
        assert a.dtype == b.dtype and float((a - b).abs().max()) <= 1e-10 * float(b.abs().max())


@pytest.mark.parametrize("op", ["LAYERNORM", "RMSNORM"])
def test_folds_into_the_norm_and_keeps_the_float_function(op):
    g = norm_graph(op)
    ref = _copy(g)
    stats = smooth(g, ActQuantSpec("w8a8"), calib())
    g.verify()
    assert stats.rewritten == 1 and stats.rules == {"norm weight": 1} and "MUL" not in g.histogram()
    norm = next(n for n in g.nodes if n.op == op)
    assert [p.attrs["name"] for p in norm.inputs[1:]] == ["norm.smoothed"] + (["norm.bias.smoothed"] if op == "LAYERNORM" else [])
    same_function(ref, g)
    s = ref.weights["norm.weight"] / g.weights["norm.smoothed"]  # [K]: powers of two, the outliers divided most
    assert bool((torch.log2(s) == torch.round(torch.log2(s))).all()) and float(s[OUTLIER].min()) > float(s.median())


def test_another_reader_of_the_norm_gets_a_mul_and_bf16_stays_exact():
    g = norm_graph("RMSNORM", readers=3, extra_reader=True, dtype="bfloat16")
    g0 = _copy(g)
    stats = smooth(g, ActQuantSpec("w8a8", 0.5), calib(dtype=torch.bfloat16))
    g.verify()
    assert stats.rules == {"mul": 1} and g.histogram()["MUL"] == 1
    mul = next(n for n in g.nodes if n.op == "MUL")
    assert sorted(u.op for u in mul.users) == ["LINEAR"] * 3 and mul.dtype == "bfloat16"
    same_function(g0, g)  # powers of two: exact in bf16 too
    xs = [t for t in calib(1, torch.bfloat16)[0]]
    for a, b in zip(interpret(g, xs), interpret(g0, xs)):
        assert torch.equal(a, b)


def test_readers_of_one_input_share_one_s():
    g = norm_graph("RMSNORM", readers=3)
    stats = smooth(g, ActQuantSpec("w8a8"), calib())
    lin = [n for n in g.nodes if n.op == "LINEAR"]
    assert stats.rewritten == 1 and len(lin) == 3 and len({n.inputs[0] for n in lin}) == 1
    assert stats.notes[0].startswith("rmsnorm -> linear, linear_1, linear_2: strength ")


def test_search_picks_the_grids_best_strength():
    sample = RowSample(1000)
    x = torch.randn(200, K, generator=gen)
    x[:, OUTLIER] *= 50
    sample.add(x)
    w = torch.randn(24, K, generator=gen)
    strength, s, err, err_off = search(sample, w, "search")
    errs = {}
    for a in GRID:
        f = factors(sample.amax, w.abs().amax(0), a)
        errs[a] = matmul_error(x / f, w * f, "int8")
    assert strength == min(errs, key=errs.get) and err == errs[strength] and err < 0.5 * err_off == 0.5 * matmul_error(x, w, "int8")
    assert torch.equal(s, factors(sample.amax, w.abs().amax(0), strength))
    fixed = search(sample, w, 0.25)
    assert fixed[0] == 0.25 and fixed[2] == errs[0.25]


def test_search_returns_none_when_nothing_helps():
    sample = RowSample(100)
    x = torch.randn(64, K, generator=gen)
    sample.add(x / x.abs().amax(0))  # every channel's max |x_j| is 1, every weight column's too: s = 1 at any strength
    w = torch.ones(8, K)
    strength, s, err, err_off = search(sample, w, "search")
    assert strength is None and s is None and err == err_off


@pytest.mark.parametrize("spec", [ActQuantSpec("fp8"), ActQuantSpec("w8a8", "off"), None])
def test_off_for_fp8_and_smoothing_off(spec):
    g = norm_graph()
    stats = smooth(g, spec, calib())
    assert stats.rewritten == 0 and g.histogram().get("MUL") is None


def test_a_norm_without_weight_takes_a_mul():
    g = norm_graph("LAYERNORM", readers=1, params=False)
    g0 = _copy(g)
    stats = smooth(g, ActQuantSpec("w8a8", 1.0), calib())
    assert stats.rules == {"mul": 1}
    same_function(g0, g)
