"""kiln IR -> ONNX: unfused graphs of HF Llama and diffusers DiT run in onnxruntime and match kiln's
executor; fused ops become ``kiln``-domain nodes with their attributes; symbolic dims stay symbolic."""
import onnx
import onnxruntime as ort
import pytest
import sympy
import torch
import transformers
from diffusers import DiTTransformer2DModel

import kiln
from kiln.ir import ops
from kiln.ir.onnx import from_onnx
from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.onnx import KILN_DOMAIN, save_onnx, to_onnx
from kiln.ir.types import TType, sym
from kiln.passes.pipeline import PASS_NAMES
from kiln.testing import TOL, rel_err

UNFUSED = kiln.CompileConfig(disable=PASS_NAMES)


def perturbed(model):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = perturbed(transformers.LlamaForCausalLM(cfg))
    ids = torch.randint(0, 96, (2, 7))
    return kiln.compile(model, (ids,), dynamic={"input_ids": {0: "batch", 1: "seq"}}, config=UNFUSED)


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    model = perturbed(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                            num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10))
    x = dict(hidden_states=torch.randn(2, 4, 8, 8), timestep=torch.tensor([3, 5]), class_labels=torch.tensor([1, 2]))
    return kiln.compile(model, (), x, dynamic={k: {0: "batch"} for k in x}, config=UNFUSED)


def ort_run(model: onnx.ModelProto, feeds: dict) -> list[torch.Tensor]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in sess.run(None, {k: v.numpy() for k, v in feeds.items()})]


def check_round_trip(compiled, feeds_list):
    model = to_onnx(compiled.graph)
    onnx.checker.check_model(model, full_check=True)
    assert all(n.domain == "" for n in model.graph.node)  # an unfused graph is standard ONNX only
    for feeds in feeds_list:
        want = compiled.executor.run([feeds[n.attrs["name"]] for n in compiled.graph.inputs])
        got = ort_run(model, feeds)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            assert rel_err(g, w) <= TOL[torch.float32]
    return model


def test_llama_round_trip(llama):
    assert "ATTENTION" in llama.graph.histogram() and "INDEX" in llama.graph.histogram()
    feeds = [{"input_ids": torch.randint(0, 96, (b, s), generator=torch.Generator().manual_seed(s))} for b, s in ((1, 5), (3, 12))]
    model = check_round_trip(llama, feeds)
    (inp,) = model.graph.input
    assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "seq"]
    assert [o.name for o in model.graph.output] == ["logits"]
    dims = model.graph.output[0].type.tensor_type.shape.dim
    assert (dims[0].dim_param, dims[1].dim_param, dims[2].dim_value) == ("batch", "seq", 96)
    names = {t.name for t in model.graph.initializer}
    assert "model.layers.0.self_attn.q_proj.weight" in names  # weights keep their names


def test_dit_round_trip(dit):
    assert "CONV2D" in dit.graph.histogram() and "LAYERNORM" in dit.graph.histogram()
    g = torch.Generator().manual_seed(0)
    feeds = [{"hidden_states": torch.randn(b, 4, 8, 8, generator=g), "timestep": torch.randint(0, 1000, (b,), generator=g),
              "class_labels": torch.randint(0, 11, (b,), generator=g)} for b in (1, 3)]
    check_round_trip(dit, feeds)


def test_reimport_gives_the_same_graph_outputs(llama, tmp_path):
    path = save_onnx(llama.graph, tmp_path / "llama.onnx")
    back = from_onnx(path)
    assert back.symbols == {"batch": (1, 2**31 - 1), "seq": (1, 2**31 - 1)}
    ids = torch.randint(0, 96, (2, 9))
    want = llama.executor.run([ids])[0]
    from kiln.runtime.executor import Executor

    assert rel_err(Executor(back).run([ids])[0], want) <= TOL[torch.float32]


def _tiny_graph(extra_op=None) -> Graph:
    g = Graph()
    g.symbols["n"] = (1, 64)
    x = g.add_input("x", (sym("n"), 8), "float32")
    w = g.add_weight("w", torch.randn(12, 8))
    b = g.add_weight("b", torch.randn(12))
    h = g.add("GEMM", [x, w, b], bias=True, act="silu", glu=True)  # [n, 6]
    s = g.add("SLICE", [h], axis=0, start=1, end=sym("n"))  # [n - 1, 6]
    y = g.add("LAYERNORM_MODULATE", [s, g.add_weight("scale", torch.randn(6)), g.add_weight("shift", torch.randn(6))], eps=1e-6)
    if extra_op is not None:
        y = g.add(extra_op, [y], window=(sym("n") - 1, 2), scale=0.5, label="x", flag=True, nothing=None)
    g.set_outputs([y], ["y"])
    g.verify()
    return g


def test_fused_ops_become_kiln_domain_nodes():
    model = to_onnx(_tiny_graph())
    onnx.checker.check_model(model)
    assert {(o.domain, o.version) for o in model.opset_import} == {("", 18), (KILN_DOMAIN, 1)}
    custom = {n.op_type: n for n in model.graph.node if n.domain == KILN_DOMAIN}
    assert set(custom) == {"GEMM", "LAYERNORM_MODULATE"}
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in custom["GEMM"].attribute}
    assert attrs == {"bias": 1, "act": b"silu", "glu": 1, "gate": 0, "residual": 0}
    assert list(custom["GEMM"].input) == ["x", "w", "b"]
    assert list(custom["LAYERNORM_MODULATE"].output) == ["y"]
    info = {v.name: v for v in model.graph.value_info}
    gemm_out = info[custom["GEMM"].output[0]].type.tensor_type.shape.dim  # Netron shows the fused op's shape
    assert (gemm_out[0].dim_param, gemm_out[1].dim_value) == ("n", 6)
    out = model.graph.output[0].type.tensor_type.shape.dim
    assert out[0].dim_param == "n - 1"


def test_a_new_op_needs_no_exporter_code(monkeypatch):
    """An op the exporter has never heard of is written generically, its attributes as ONNX attributes."""
    monkeypatch.setitem(ops.OPS, "FUTURE_OP", ops.OpDef("FUTURE_OP", 1, 1, {"window": ops.REQUIRED, "scale": 1.0, "label": "",
                                                                            "flag": False, "nothing": None},
                                                        lambda ins, a: TType(ins[0].shape, ins[0].dtype), lambda x, a: x[0], "compute"))
    model = to_onnx(_tiny_graph("FUTURE_OP"))
    (node,) = [n for n in model.graph.node if n.op_type == "FUTURE_OP"]
    assert node.domain == KILN_DOMAIN
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert attrs == {"window": b"(n - 1, 2)", "scale": 0.5, "label": b"x", "flag": 1}


def test_symbolic_sizes_are_computed_from_input_shapes():
    """A RESHAPE to (n, 12), a SLICE ending at n - 1 and an ARANGE to floor(n / 3) + 1 run in onnxruntime at any n."""
    g = Graph()
    g.symbols["n"] = (1, 64)
    n = sym("n")
    x = g.add_input("x", (n, 4), "float32")
    y = g.add("CONCAT", [x, x], axis=0)  # [2n, 4]
    y = g.add("SLICE", [y], axis=1, start=0, end=3)  # [2n, 3]
    y = g.add("CONCAT", [y, g.add("FULL", [], shape=(2 * n, 3), value=1.5, dtype="float32")], axis=1)  # [2n, 6]
    y = g.add("MUL", [y, g.add("CAST", [g.const(n)], dtype="float32")])
    z = g.add("SLICE", [x], axis=0, start=0, end=n - 1)
    k = sympy.floor(n / 3)
    r = g.add("ARANGE", [], start=0, end=k + 1, dtype="int64")
    w = g.add("RESHAPE", [y], shape=(n, 12))
    g.set_outputs([w, z, r], ["w", "z", "r"])
    g.verify()
    model = to_onnx(g)
    onnx.checker.check_model(model, full_check=True)
    for size in (1, 5, 9):
        x_val = torch.randn(size, 4)
        want = interpret(g, [x_val])
        got = ort_run(model, {"x": x_val})
        for a, b in zip(got, want):
            assert torch.equal(a, b)


def _exporter_zoo() -> Graph:
    """The standard-op emitters the two model graphs do not reach, on a symbolic n."""
    g = Graph()
    g.symbols["n"] = (1, 64)
    n = sym("n")
    x = g.add_input("x", (2, n, 8), "float32")  # [B, S, D]
    k = g.add_input("k", (2, 1, n, 8), "float32")
    ids = g.add_input("ids", (3,), "int64")
    q4 = g.add("RESHAPE", [x], shape=(2, 2, n, 4))
    kv = g.add("SLICE", [k], axis=3, start=0, end=4)  # [2, 1, n, 4]: one kv head for two query heads
    bias = g.add("MUL", [g.add("CAST", [g.add("TRIU", [g.add("FULL", [], shape=(n, n), value=1.0, dtype="float32")],
                                                   diagonal=1)], dtype="float32"), g.const(-0.5)])
    outs = {
        "causal_gqa": g.add("ATTENTION", [q4, kv, kv], causal=True, gqa=True),
        "masked": g.add("ATTENTION", [q4, q4, q4, g.add("LE", [g.add("ARANGE", [], end=n), g.add("RESHAPE", [g.add("ARANGE", [], end=n)],
                                                                                                          shape=(n, 1))])], scale=0.3),
        "float_mask": g.add("ATTENTION", [q4, q4, q4, bias], causal=True),
        "softcap": g.add("ATTENTION", [q4, kv, kv], causal=True, gqa=True, softcap=0.8),
        "rmsnorm": g.add("RMSNORM", [x, g.add_weight("w", torch.randn(8)), x], eps=1e-5, residual=True),
        "layernorm": g.add("LAYERNORM", [x], eps=1e-5),
        "gelu_tanh": g.add("GELU", [x], approximate="tanh"),
        "div_floor": g.add("DIV", [x, g.const(0.7)], rounding="floor"),
        "div_trunc": g.add("DIV", [x, g.const(0.7)], rounding="trunc"),
        "int_floor": g.add("DIV", [g.add("SUB", [ids, g.const(4)]), g.const(3)], rounding="floor"),
        "mod": g.add("MOD", [x, g.const(0.6)]),
        "int_mod": g.add("MOD", [g.add("SUB", [ids, g.const(4)]), g.const(3)]),
        "clamp": g.add("CLAMP", [x], min=-0.5, max=0.25),
        "any": g.add("ANY", [g.add("GT", [x, g.const(1.0)])], axes=(2,)),
        "argmax": g.add("ARGMAX", [x], axes=(1,), keepdim=True),
        "pad": g.add("PAD", [x], pads=((1, 2), (0, 1)), value=-2.0),
        "log_softmax": g.add("LOG_SOFTMAX", [x], axis=2),
        "cumsum": g.add("CUMSUM", [g.add("NE", [ids, g.const(1)])], axis=0),
        "index_mid": g.add("INDEX", [k, g.add("RESHAPE", [ids], shape=(3, 1)), ids], axes=(2, 3)),  # [2, 1, 3, 3]
        "index_apart": g.add("INDEX", [k, g.add("FULL", [], shape=(3,), value=1, dtype="int64"), ids], axes=(0, 3)),
        "gather": g.add("GATHER", [x, g.add("FULL", [], shape=(2, n, 2), value=3, dtype="int64")], axis=2),
        "max": g.add("MAXIMUM", [x, g.add("NEG", [x])]),
        "int_mul_half": g.add("MUL", [ids, g.const(0.5)]),  # int64 * weak float scalar: float64, like torch
    }
    g.set_outputs(list(outs.values()), list(outs))
    g.verify()
    return g


@pytest.mark.parametrize("size", [1, 6])
def test_exporter_op_zoo_matches_the_reference(size):
    g = _exporter_zoo()
    model = to_onnx(g)
    onnx.checker.check_model(model, full_check=True)
    gen = torch.Generator().manual_seed(size)
    feeds = {"x": torch.randn(2, size, 8, generator=gen), "k": torch.randn(2, 1, size, 8, generator=gen),
             "ids": torch.tensor([0, size - 1, 2 % size])}
    want = interpret(g, [feeds[n.attrs["name"]] for n in g.inputs])
    got = ort_run(model, feeds)
    for name, a, b in zip(g.output_names, got, want):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        if b.is_floating_point():
            assert rel_err(a, b) <= TOL[torch.float32], name
        else:
            assert torch.equal(a, b), name
