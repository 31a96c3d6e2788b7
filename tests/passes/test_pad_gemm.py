"""passes.pad_gemm: a GEMM of odd output width N >= MIN_N runs on its weight padded with zero rows to a multiple of 64,
and its readers read the [..., :N] SLICE.

Four checks per case: sites fired, op counts before/after, float64 parity before vs after (reference interpreter),
and cases where it must not fire. Then the padded graph through ONNX (onnxruntime and back)."""
import onnx
import onnxruntime as ort
import torch

from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.onnx import from_onnx, to_onnx
from kiln.ir.types import sym
from kiln.passes.pad_gemm import MIN_N, pad_gemm
from kiln.testing import TOL, check_pass, rel_err

SEQ = sym("seq")
K = 24


def rand(gen, *shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def new_graph() -> tuple[Graph, object]:
    g = Graph()
    g.symbols = {"seq": (1, 64)}
    return g, g.add_input("x", (2, SEQ, K), "float64")


def inputs(g: Graph, gen) -> list[torch.Tensor]:
    """Every input at seq = 5; integer ids below 100."""
    shapes = [[5 if not isinstance(d, int) else d for d in i.shape] for i in g.inputs]
    return [rand(gen, *s) if i.dtype == "float64" else torch.randint(0, 100, s, generator=gen) for i, s in zip(g.inputs, shapes)]


def run(build, seed=0):
    """(stats, padded graph, histogram before, after), float64 parity of the two graphs checked by ``check_pass``."""
    gen = torch.Generator().manual_seed(seed)
    g = build(gen)
    xs = inputs(g, torch.Generator().manual_seed(seed + 1))
    stats, padded, ref = check_pass(pad_gemm, lambda: build(gen.manual_seed(seed)), xs, gen)
    return stats, padded, ref.histogram(), padded.histogram()


def reasons(stats) -> list[str]:
    return [d["reason"].split(":")[0] for d in stats.declined]


def the(g: Graph, op: str):
    (n,) = [n for n in g.nodes if n.op == op]
    return n


# ----------------------------------------------------------------------------- fires


def test_an_odd_wide_linear_with_bias_runs_on_padded_rows():
    def build(gen):
        g, x = new_graph()
        w, b = g.add_weight("head.weight", rand(gen, 1001, K)), g.add_weight("head.bias", rand(gen, 1001))
        y = g.add("LINEAR", [x, w, b])
        g.set_outputs([y, g.add("TANH", [y])], ["logits", "t"])
        return g

    stats, g, before, after = run(build)
    assert stats.rewritten == 1 and stats.declined == []
    assert before == {"LINEAR": 1, "TANH": 1} and after == {"LINEAR": 1, "SLICE": 1, "TANH": 1}
    lin, cut = the(g, "LINEAR"), the(g, "SLICE")
    assert lin.shape == (2, SEQ, 1024) and cut.inputs == (lin,) and (cut.attrs["axis"], cut.attrs["start"], cut.attrs["end"]) == (2, 0, 1001)
    assert g.outputs[0] is cut and the(g, "TANH").inputs == (cut,)
    w, b = g.weights[lin.inputs[1].attrs["name"]], g.weights[lin.inputs[2].attrs["name"]]
    assert w.shape == (1024, K) and b.shape == (1024,) and not w[1001:].any() and not b[1001:].any()
    assert set(g.weights) == {"head.pad1024", "head.bias.pad1024"}  # the padded weight replaced the original


def test_a_tied_table_stays_one_weight_the_embedding_reads_it_padded():
    """GPT-2's wte: the embedding and the LM head read one [V, K] weight; after padding both read the [Vp, K] one."""
    def build(gen):
        g, x = new_graph()
        ids = g.add_input("ids", (2, SEQ), "int64")
        wte = g.add_weight("wte.weight", rand(gen, 1003, K))
        h = g.add("ADD", [x, g.add("EMBEDDING", [wte, ids])])
        g.set_outputs([g.add("LINEAR", [h, wte])], ["logits"])
        return g

    stats, g, before, after = run(build)
    assert stats.rewritten == 1 and after == {**before, "SLICE": 1}
    assert list(g.weights) == ["wte.pad1024"] and g.weights["wte.pad1024"].shape == (1024, K)
    assert the(g, "EMBEDDING").inputs[0] is the(g, "LINEAR").inputs[1]


def test_a_glu_gemm_pads_each_half_and_an_activation_gemm_its_rows():
    """GEMM(glu): [Wg; Wu] [2N, K] -> [Wg; 0; Wu; 0] [2Np, K], bias alike; GEMM(gelu, bias): act(0) in the padding."""
    def build(gen):
        g, x = new_graph()
        wg, bg = g.add_weight("mlp.gate_up.weight", rand(gen, 2 * 1025, K)), g.add_weight("mlp.gate_up.bias", rand(gen, 2 * 1025))
        glu = g.add("GEMM", [x, wg, bg], bias=True, act="silu", glu=True)
        wa, ba = g.add_weight("fc.weight", rand(gen, 1027, K)), g.add_weight("fc.bias", rand(gen, 1027))
        g.set_outputs([glu, g.add("GEMM", [x, wa, ba], bias=True, act="gelu")], ["glu", "gelu"])
        return g

    stats, g, before, after = run(build)
    assert stats.rewritten == 2 and before == {"GEMM": 2} and after == {"GEMM": 2, "SLICE": 2}
    glu, gelu = (o.inputs[0] for o in g.outputs)
    assert glu.shape == (2, SEQ, 1088) and gelu.shape == (2, SEQ, 1088)
    w = g.weights[glu.inputs[1].attrs["name"]]
    assert w.shape == (2 * 1088, K) and not w[1025:1088].any() and not w[1088 + 1025:].any()
    assert w[1088:1088 + 1025].abs().min() > 0  # the up half starts at row Np


# ----------------------------------------------------------------------------- does not fire


def test_narrow_aligned_and_epilogue_operand_gemms_are_left_alone():
    def build(gen):
        g, x = new_graph()
        outs = []
        for name, n in (("narrow", MIN_N - 1), ("aligned", 1024 + 8)):  # odd but below MIN_N; wide but a multiple of 8
            outs.append(g.add("LINEAR", [x, g.add_weight(f"{name}.weight", rand(gen, n, K))]))
        r = g.add_input("r", (2, SEQ, 1001), "float64")
        outs.append(g.add("GEMM", [x, g.add_weight("res.weight", rand(gen, 1001, K)), r], residual=True))
        w = g.add_weight("shared.weight", rand(gen, 1001, K))  # also read by a MUL: padding it would be a second copy
        outs += [g.add("LINEAR", [x, w]), g.add("MUL", [w, w])]
        wc = g.add("MUL", [g.add_weight("scaled.weight", rand(gen, 1001, K)), g.const(2.0)])  # computed
        outs.append(g.add("LINEAR", [x, g.add("CAST", [wc], dtype="float64")]))
        g.set_outputs(outs)
        return g

    stats, g, before, after = run(build)
    assert stats.rewritten == 0 and before == after
    assert sorted(reasons(stats)) == ["its gate / residual operand is an [.., N] activation", "the weight is also read by MUL %mul",
                                      "weight is computed (CAST), not a stored WEIGHT"]
    assert all(d["n"] == 1001 for d in stats.declined)


# ----------------------------------------------------------------------------- ONNX


def test_the_padded_graph_exports_to_onnx_and_back():
    """The export keeps the padded weight and a standard Slice: onnxruntime runs it, and it imports back."""
    def build(gen):
        g, x = new_graph()
        y = g.add("LINEAR", [x, g.add_weight("head.weight", rand(gen, 1001, K)), g.add_weight("head.bias", rand(gen, 1001))])
        g.set_outputs([g.add("CAST", [y], dtype="float32")], ["logits"])
        return g

    _, g, _, _ = run(build)
    model = to_onnx(g)
    onnx.checker.check_model(model, full_check=True)
    assert [list(t.dims) for t in model.graph.initializer if t.name.startswith("head")] == [[1024, K], [1024]]
    x = torch.randn(2, 7, K, dtype=torch.float64)
    want = interpret(g, [x])[0]
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = sess.run(None, {"x": x.numpy()})
    assert rel_err(torch.from_numpy(got), want) <= TOL[torch.float32]
    back = from_onnx(model)
    assert rel_err(interpret(back, [x])[0], want) <= TOL[torch.float32] and back.outputs[0].shape[-1] == 1001
