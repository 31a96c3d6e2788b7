"""The activation quantizer fused into the kernel producing the activations: which pointwise (and AQGEMM) outputs the
schedule marks (every reader an AQGEMM of one format and smooth vector, whole rows), and the generated kernel storing them as
codes + per-row scales equal bit for bit to kiln's row quantizer on the float value it would have stored (int8 and
fp8 under TRITON_INTERPRET=1; fp8 subnormals and bfloat16 on the GPU), the other outputs unchanged."""
import re

import pytest
import torch

from kiln.codegen import lower
from kiln.codegen.kernels import quantize_rows as tqr
from kiln.codegen.pointwise import MAX_ROW, launch, render
from kiln.codegen.schedule import Codes, schedule
from kiln.ir import quant
from kiln.ir.graph import Graph
from kiln.ir.types import dtype_name

pytestmark = pytest.mark.interpreter  # CPU cases run under TRITON_INTERPRET=1; gpu-marked ones need it off

gen = torch.Generator().manual_seed(0)
LEAD = (2, 5)


def aqgemm(g: Graph, y, fmt="int8", smooth=None, residual=None, n=6, name="w"):
    """AQGEMM(y) on a random [n, K] weight quantized per row to ``fmt``."""
    wq, ws = quant.quantize_rows(torch.randn(n, y.shape[-1], generator=gen), fmt)
    ins = [y, g.add_weight(f"{name}.q", wq), g.add_weight(f"{name}.s", ws)] + [t for t in (smooth, residual) if t is not None]
    return g.add("AQGEMM", ins, format=fmt, smooth=smooth is not None, residual=residual is not None)


def block(op: str, k: int = 37, dt: str = "float32") -> tuple[Graph, object]:
    """h = x + a (a graph output: the residual stream), y = op(h) for op LAYERNORM_MODULATE (DiT's block input),
    RMSNORM (Llama's) or SILU (DiT's adaLN input: no row reduction). Returns the graph without outputs and y."""
    g = Graph()
    x, a = g.add_input("x", (*LEAD, k), dt), g.add_input("a", (*LEAD, k), dt)
    h = g.add("ADD", (x, a))
    if op == "LAYERNORM_MODULATE":
        y = g.add(op, (h, g.add_input("scale", (LEAD[0], 1, k), dt), g.add_input("shift", (LEAD[0], 1, k), dt)), eps=1e-6)
    elif op == "RMSNORM":
        y = g.add(op, (h, g.add_weight("nw", (torch.rand(k, generator=gen) + 0.5).to(getattr(torch, dt)))), eps=1e-6)
    else:
        y = g.add(op, (h,))
    g.set_outputs([h])
    return g, y


def producer(g: Graph):
    """The pointwise group computing the graph's first output (h, and y with it)."""
    return next(grp for grp in schedule(g) if grp.kind == "pointwise" and g.outputs[0] in grp.nodes)


# ----------------------------------------------------------------------------- which outputs the schedule marks


def marked(case: str) -> tuple[dict, object, object]:
    """(the producer's codes, y, the smooth vector) for one way of reading y."""
    k = MAX_ROW + 1 if case == "rows too long" else 37
    g, y = block("SILU" if case == "rows too long" else "LAYERNORM_MODULATE", k, "float64" if case == "float64" else "float32")
    c = g.add_weight("smooth", torch.rand(k, generator=gen) + 0.5)
    outs = [aqgemm(g, y, smooth=c if case in ("smooth", "merged readers") else None)]
    if case in ("merged readers", "formats differ", "smooths differ"):
        second = dict(fmt="fp8" if case == "formats differ" else "int8", smooth=c if case != "formats differ" else None)
        outs.append(aqgemm(g, y, name="w2", **second))
    if case == "computed smooth":
        v = g.add_input("v", (k,), "float32")
        outs = [aqgemm(g, y, smooth=g.add("MUL", (v, v)), name="w3")]
    outs += [g.add("TANH", (y,))] if case == "another reader" else [y] if case == "also an output" else []
    if case == "read as its residual too":
        outs = [aqgemm(g, y, residual=y, n=k, name="w3")]
    g.set_outputs(g.outputs + outs)
    g.verify()
    return producer(g).codes, y, c


@pytest.mark.parametrize("case", ["one reader", "smooth", "merged readers"])
def test_an_output_read_only_by_aqgemms_of_one_kind_is_marked(case):
    codes, y, c = marked(case)
    assert codes == {y: Codes("int8", c if case != "one reader" else None)}


@pytest.mark.parametrize("case", ["also an output", "another reader", "formats differ", "smooths differ", "computed smooth",
                                  "read as its residual too", "rows too long", "float64"])
def test_not_marked(case):
    codes, _, _ = marked(case)
    assert codes == {}


@pytest.mark.parametrize("case", ["one reader", "rows past a tile", "another reader"])
def test_an_aqgemm_output_read_by_aqgemms_is_marked_in_its_gemm_group(case):
    # AQGEMM -> AQGEMM (an MLP's hidden value): the first one's gemm group stores it as the second one's codes, rows of
    # any length (the library epilogue walks them, kernels/epilogue_codes.py); not where anything else reads it
    g = Graph()
    x = g.add_input("x", (*LEAD, 37), "float32")
    h = aqgemm(g, x, n=MAX_ROW + 1 if case == "rows past a tile" else 40, name="w1")
    outs = [aqgemm(g, h, name="w2")] + ([g.add("TANH", (h,))] if case == "another reader" else [])
    g.set_outputs(outs)
    g.verify()
    grp = next(grp for grp in schedule(g) if grp.kind == "gemm" and h in grp.nodes)
    assert grp.codes == ({} if case == "another reader" else {h: Codes("int8", None)})


# ----------------------------------------------------------------------------- the kernel storing the codes


def run_both(op: str, fmt: str, dtype: torch.dtype, smooth: bool, k: int = 37):
    """Launch the producer of y = op(x + a) -> AQGEMM plainly and storing y as codes; returns (plain outputs, fused
    outputs, codes, scales, smooth tensor, the group, y)."""
    g, y = block(op, k, dtype_name(dtype))
    c = g.add_weight("smooth", torch.rand(k, generator=gen) + 0.5) if smooth else None
    g.set_outputs(g.outputs + [aqgemm(g, y, fmt, c)])
    grp = producer(g)
    assert grp.codes == {y: Codes(fmt, c)}
    env = {n: torch.randn(n.shape, generator=gen, dtype=torch.float64).mul(3).to(dtype) for n in g.inputs}
    env[g.inputs[0]][1, 2] = -env[g.inputs[1]][1, 2]  # a zero row of h (SILU: of y): the tiny scale
    env.update({n: g.weights[n.attrs["name"]] for n in g.nodes if n.op == "WEIGHT"})
    args = [env.get(i) for i in grp.inputs]
    plain = launch(grp, args, {})
    q = torch.empty(y.shape, dtype=tqr.FORMATS[fmt][0])
    s = torch.empty(y.shape[:-1])
    fused = launch(grp, args, {}, codes={y: (fmt, q, s, env.get(c))})
    return plain, fused, q, s, env.get(c), grp, y


@pytest.mark.parametrize("op", ["LAYERNORM_MODULATE", "RMSNORM", "SILU"])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("smooth", [False, True])
def test_codes_are_the_row_quantizers_of_the_stored_value(op, fmt, dtype, smooth):
    plain, fused, q, s, c, grp, y = run_both(op, fmt, dtype, smooth)
    j = grp.outputs.index(y)
    assert fused[j] is None and all(torch.equal(a, b) for a, b in zip(plain[:j] + plain[j + 1:], fused[:j] + fused[j + 1:]))
    k = y.shape[-1]
    want_q, want_s = tqr.quantize_rows(plain[j].view(-1, k), fmt, c)  # kiln's row kernel on the stored float y
    assert torch.equal(s.view(-1), want_s) and torch.equal(q.view(-1, k).view(torch.uint8), want_q.view(torch.uint8))
    xs = plain[j].view(-1, k).float() * (c if smooth else 1.0)
    ref_q, ref_s = quant.quantize_rows(xs, fmt)  # ir/quant.py's formula
    normal = (xs / ref_s[:, None]).abs() >= (2 ** -6 if fmt == "fp8" else 0)  # (the interpreter mis-rounds e4m3's subnormals)
    assert torch.equal(want_s, ref_s) and torch.equal(q.view(-1, k).float()[normal], ref_q.float()[normal])
    assert float(s.view(-1)[LEAD[1] + 2]) == tqr.TINY.value or op != "SILU"


def test_rows_past_one_elementwise_tile_are_held_whole():
    # an elementwise group tiles rows by 1024 columns; storing codes needs each row whole in one program
    plain, _, q, s, _, grp, y = run_both("SILU", "int8", torch.float32, False, k=1100)
    want_q, want_s = tqr.quantize_rows(plain[grp.outputs.index(y)].view(-1, 1100), "int8")
    assert torch.equal(s.view(-1), want_s) and torch.equal(q.view(-1, 1100), want_q)


def test_source_stores_codes_instead_of_the_value():
    g, y = block("LAYERNORM_MODULATE")
    g.set_outputs(g.outputs + [aqgemm(g, y, "fp8")])
    grp = producer(g)
    j = grp.outputs.index(y)
    plain, src = render(grp, 3), render(grp, 3, ((j, "fp8", False),))
    assert src.count("@triton.jit") == 1 and "row_codes" in src and "row_codes" not in plain
    stores = [line for line in src.splitlines() if f"tl.store(out{j}_ptr" in line]
    assert len(stores) == 1 and "row_codes" in stores[0] and f"sc_out{j}_ptr" in src and not re.search(r"\bc_out", src)  # (no smooth vector)


@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_lower_offers_fused_and_separate(fmt):
    # both candidates write the same codes; "separate" also the float value and is two calls
    g, y = block("RMSNORM")
    c = g.add_weight("smooth", torch.rand(37, generator=gen) + 0.5)
    g.set_outputs(g.outputs + [aqgemm(g, y, fmt, c)])
    grp = producer(g)
    env = {n: torch.randn(n.shape, generator=gen) for n in g.inputs} | {n: g.weights[n.attrs["name"]] for n in g.nodes if n.op == "WEIGHT"}
    outs = [torch.full(o.shape, float("nan")) for o in grp.outputs]
    q, s = torch.empty(y.shape, dtype=tqr.FORMATS[fmt][0]), torch.empty(y.shape[:-1])
    what, candidates, steps = lower.act_codes(grp, [env.get(i) for i in grp.inputs], outs, {y: (fmt, q, s, env[c])}, {}, None)
    assert list(candidates) == ["fused", "separate"] and what["codes"] == [[grp.outputs.index(y), fmt, True]]
    assert [kind for kind, _ in steps["fused"]] == ["pointwise"] and [kind for kind, _ in steps["separate"]] == ["pointwise", "quantize"]
    got = {}
    for name, run in candidates.items():
        q.zero_(), s.zero_()
        run()
        got[name] = q.view(torch.uint8).clone(), s.clone()
    assert all(torch.equal(a, b) for a, b in zip(got["fused"], got["separate"]))
    assert not outs[grp.outputs.index(y)].isnan().any()  # the separate candidate stored y


@pytest.mark.gpu
@pytest.mark.parametrize("op,k", [("LAYERNORM_MODULATE", 1152), ("RMSNORM", 2048), ("SILU", 1152), ("RMSNORM", 4096)])
@pytest.mark.parametrize("fmt", ["int8", "fp8"])
def test_codes_bit_for_bit_on_the_gpu(op, k, fmt):
    # bfloat16 at DiT-XL/2 / Llama widths, a smooth vector: fp8 subnormals and the GPU's own cast included
    g, y = block(op, k, "bfloat16")
    c = g.add_weight("smooth", (torch.rand(k, generator=gen) + 0.5).cuda())
    g.set_outputs(g.outputs + [aqgemm(g, y, fmt, c)])
    grp = producer(g)
    env = {n: torch.randn(n.shape, generator=gen).mul(3).to(torch.bfloat16).cuda() for n in g.inputs}
    env.update({n: g.weights[n.attrs["name"]].cuda() for n in g.nodes if n.op == "WEIGHT"})
    args = [env.get(i) for i in grp.inputs]
    plain = launch(grp, args, {})
    q, s = torch.empty(y.shape, dtype=tqr.FORMATS[fmt][0], device="cuda"), torch.empty(y.shape[:-1], device="cuda")
    launch(grp, args, {}, codes={y: (fmt, q, s, env[c])})
    want_q, want_s = tqr.quantize_rows(plain[grp.outputs.index(y)].view(-1, k), fmt, env[c])
    assert torch.equal(s.view(-1), want_s) and torch.equal(q.view(-1, k).view(torch.uint8), want_q.view(torch.uint8))
