"""runtime/layouts.py: which values the kernels plan stores channels-last — the votes of the convs next to a value, the
readers that rule it out, graph outputs — and plans with channels-last values against the reference interpreter (CPU,
the Triton interpreter)."""
import pytest
import torch

import kiln
from kiln.codegen.schedule import schedule
from kiln.codegen.tuning import Tuner
from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.types import eval_dim, sym
from kiln.runtime.executor import Executor
from kiln.runtime.layouts import channels_last_values
from kiln.runtime.memory import check_plan
from kiln.runtime.target import Target
from kiln.testing import TOL, rel_err


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "kiln-cache"))


def weights(g: Graph, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return lambda name, *shape, scale=1.0: g.add_weight(name, torch.randn(*shape, generator=gen) * scale)


def up_block(dtype="float32"):
    """A VAE decoder's up block in small: x [b, 8, 5, 6] -> GROUP_NORM(silu) -> c1 = CONV2D 3x3 -> up = 2x nearest
    upsampling (RESHAPE, EXPAND, RESHAPE: a copy) -> GROUP_NORM(silu) -> c2 = CONV2D 3x3; the 1x1 shortcut of the
    upsampled value with c2 as its residual, sc = CONV(up, w, b, c2), is the graph's output."""
    g = Graph()
    b = sym("b")
    g.symbols["b"] = (1, 4)
    wt = weights(g)
    if dtype != "float32":
        wt = (lambda w: lambda *a, **k: g.add("CAST", (w(*a, **k),), dtype=dtype))(wt)
    x = g.add_input("x", (b, 8, 5, 6), dtype)
    n1 = g.add("GROUP_NORM", (x, wt("n1.w", 8), wt("n1.b", 8)), groups=4, eps=1e-6, act="silu")
    c1 = g.add("CONV2D", (n1, wt("c1.w", 6, 8, 3, 3, scale=0.2)), padding=(1, 1))
    h = g.add("RESHAPE", (c1,), shape=(b, 6, 5, 1, 6, 1))
    up = g.add("RESHAPE", (g.add("EXPAND", (h,), shape=(b, 6, 5, 2, 6, 2)),), shape=(b, 6, 10, 12))
    n2 = g.add("GROUP_NORM", (up, wt("n2.w", 6), wt("n2.b", 6)), groups=3, eps=1e-6, act="silu")
    c2 = g.add("CONV2D", (n2, wt("c2.w", 4, 6, 3, 3, scale=0.2)), padding=(1, 1))
    sc = g.add("CONV", (up, wt("sc.w", 4, 6, 1, 1), wt("sc.b", 4), c2), bias=True, residual=True, divisor=None)
    g.set_outputs([sc])
    return g, dict(n1=n1, c1=c1, up=up, n2=n2, c2=c2, sc=sc)


def chosen(g: Graph, prefers: dict, b=2):
    """The channels-last values under ``prefers`` (conv name -> vote), and the convs asked."""
    asked = []

    def vote(n):
        asked.append(n.name)
        return prefers[n.name]
    shape_of = {n: tuple(eval_dim(d, {"b": b}) for d in n.shape) for n in g.nodes}
    return channels_last_values(g, schedule(g), shape_of, vote), asked


def test_values_between_convs_that_prefer_nhwc():
    g, v = up_block()
    convs = {v[k].name: 1 for k in ("c1", "c2", "sc")}
    got, asked = chosen(g, convs)
    # everything but the graph's output: the norms and the copy feeding convs, the convs' results (c2's read as a residual)
    assert got == {v[k] for k in ("n1", "c1", "up", "n2", "c2")}
    assert sorted(asked) == sorted(convs)  # each conv measured once, though c1 and the shortcut vote twice
    assert chosen(g, dict.fromkeys(convs, -1))[0] == set()
    assert chosen(g, dict.fromkeys(convs, 0))[0] == set()


def test_convs_that_disagree():
    g, v = up_block()
    c1, c2, sc = (v[k].name for k in ("c1", "c2", "sc"))
    # c1 channels-last, the rest NCHW: n2 converts (it reads the copy of c1's NHWC result, writes NCHW for c2)
    assert chosen(g, {c1: 1, c2: -1, sc: -1})[0] == {v["n1"], v["c1"]}
    # only the shortcut channels-last: the copy it reads is NHWC (+1 and no other vote), c1's result is not (-1)
    assert chosen(g, {c1: -1, c2: -1, sc: 1})[0] == {v["up"]}
    # c1 and the shortcut channels-last, c2 not: c1's result +1; the copy +1 (the shortcut); n2 -1 (c2); c2's result -1
    assert chosen(g, {c1: 1, c2: -1, sc: 1})[0] == {v["n1"], v["c1"], v["up"]}


def test_a_gemm_reader_or_a_float64_value_stays_nchw():
    """A patch embedding (conv -> flatten -> permute -> linear, DiT's): the GEMM reads through a view, so the conv's
    result stays NCHW and no conv is even measured; float64 never goes channels-last."""
    g = Graph()
    wt = weights(g)
    x = g.add_input("x", (2, 4, 8, 8), "float32")
    h = g.add("CONV2D", (x, wt("p.w", 16, 4, 2, 2), wt("p.b", 16)), stride=(2, 2))
    h = g.add("PERMUTE", (g.add("RESHAPE", (h,), shape=(2, 16, 16)),), perm=(0, 2, 1))
    g.set_outputs([g.add("LINEAR", (h, wt("l.w", 8, 16)))])
    assert chosen(g, {}) == (set(), [])
    g, v = up_block("float64")
    assert chosen(g, {v[k].name: 1 for k in ("c1", "c2", "sc")})[0] == set()


def run_plan(g: Graph, x: torch.Tensor, force: dict):
    ex = Executor(g, Target.from_config(kiln.CompileConfig(backend="kernels"), tuner=Tuner(force={"group_norm": "kiln", **force})))
    got, want = ex.run([x])[0], interpret(g, [x])[0]
    assert rel_err(got, want) <= TOL[torch.float32], rel_err(got, want)
    plan = ex.plans[0]
    check_plan(plan.memory, plan.intervals)
    return plan


@pytest.mark.interpreter
def test_plan_stores_them_channels_last():
    g, v = up_block()
    plan = run_plan(g, torch.randn(3, 8, 5, 6), {"conv_layout": "nhwc", "conv": "torch"})
    assert plan.channels_last == {v[k] for k in ("n1", "c1", "up", "n2", "c2")}
    for name in ("n1", "c1", "up", "n2", "c2"):
        t = plan.env[v[name]]
        assert t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous(), name
    assert plan.env[v["sc"]].is_contiguous()  # the graph's output
    # one layout change: the shortcut's NCHW result (n1 reads the NCHW input and writes NHWC as it goes)
    assert plan.describe()["layouts"] == {"channels_last": 5, "conv_layout_changes": 1}
    assert plan.describe()["launches"] == {"group_norm": 2, "conv": 3, "copy": 1}


@pytest.mark.interpreter
def test_a_copy_into_channels_last_that_is_no_view_of_it():
    """x [b, 12, 6, 10] -> PERMUTE -> RESHAPE (b, 12, 6, 10), a copy, read by a conv that prefers NHWC: the copy's
    NHWC buffer cannot be seen in the permuted operand's shape (C and H mix), so it copies from the reshaped value."""
    g = Graph()
    wt = weights(g, seed=2)
    x = g.add_input("x", (2, 12, 6, 10), "float32")
    h = g.add("RESHAPE", (g.add("PERMUTE", (x,), perm=(0, 2, 1, 3)),), shape=(2, 12, 6, 10))
    g.set_outputs([g.add("CONV2D", (h, wt("c.w", 5, 12, 3, 3, scale=0.2)), padding=(1, 1))])
    plan = run_plan(g, torch.randn(2, 12, 6, 10), {"conv_layout": "nhwc", "conv": "torch"})
    assert plan.channels_last == {h} and plan.env[h].is_contiguous(memory_format=torch.channels_last)
    assert plan.describe()["launches"] == {"copy": 1, "conv": 1}
