"""ONNX -> kiln IR: HF Llama and diffusers DiT exported by both torch.onnx exporters, run by kiln
against onnxruntime on the same file; hand-built models for the op zoo, bad files and unsupported ops."""
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import transformers
from diffusers import DiTTransformer2DModel
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.errors import KilnError, UnsupportedOpsError
from kiln.ir.onnx import from_onnx
from kiln.ir.interpret import interpret
from kiln.ir.types import sym
from kiln.testing import TOL, DiTSample, LlamaLogits, export_onnx, perturbed, rel_err

EXPORTERS = ["dynamo", "torchscript"]


def export(module, args, path, names, dims: dict, dynamo: bool):
    assert list(dims) == list(names)
    return export_onnx(module, args, path, dims, dynamo)


@pytest.fixture(scope="module", params=EXPORTERS)
def llama_onnx(request, tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaLogits(perturbed(transformers.LlamaForCausalLM(cfg))).eval()
    ids = torch.randint(0, 96, (2, 7))
    path = tmp_path_factory.mktemp("llama") / f"llama_{request.param}.onnx"
    if request.param == "dynamo":
        export(model, (ids,), path, ["input_ids"], {"input_ids": {0: "batch", 1: "seq"}}, dynamo=True)
    else:
        # the TorchScript exporter cannot export aten::diff, which transformers' mask code runs when no
        # attention mask is given (packed-sequence detection): export with the mask, as HF exports do
        mask = torch.ones(2, 7, dtype=torch.int64)
        export(model, (ids, mask), path, ["input_ids", "attention_mask"],
               {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "seq"}}, dynamo=False)
    return path


@pytest.fixture(scope="module", params=EXPORTERS)
def dit_onnx(request, tmp_path_factory):
    torch.manual_seed(0)
    model = DiTSample(perturbed(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                      out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                                      num_embeds_ada_norm=10))).eval()
    x = (torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 10]))
    names = ["hidden_states", "timestep", "class_labels"]
    path = tmp_path_factory.mktemp("dit") / f"dit_{request.param}.onnx"
    return export(model, x, path, names, {k: {0: "batch"} for k in names}, dynamo=request.param == "dynamo")


def run_both(path, graph, feeds: dict):
    """(kiln's outputs, onnxruntime's outputs) for the same inputs."""
    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    want = [torch.from_numpy(w) for w in sess.run(None, {k: v.numpy() for k, v in feeds.items()})]
    from kiln.runtime.executor import Executor

    got = Executor(graph).run([feeds[n.attrs["name"]] for n in graph.inputs])
    return got, want


def llama_feeds(graph, batch, seq):
    g = torch.Generator().manual_seed(batch * 100 + seq)
    feeds = {"input_ids": torch.randint(0, 96, (batch, seq), generator=g)}
    if any(n.attrs["name"] == "attention_mask" for n in graph.inputs):
        mask = torch.ones(batch, seq, dtype=torch.int64)
        mask[0, seq - 2:] = 0  # right padding on the first sequence
        feeds["attention_mask"] = mask
    return feeds


@pytest.mark.parametrize("batch, seq", [(1, 5), (3, 12)])
def test_llama_matches_onnxruntime(llama_onnx, batch, seq):
    graph = from_onnx(llama_onnx)
    assert graph.symbols == {"batch": (1, 2**31 - 1), "seq": (1, 2**31 - 1)}
    assert graph.inputs[0].shape == (sym("batch"), sym("seq"))
    got, want = run_both(llama_onnx, graph, llama_feeds(graph, batch, seq))
    assert got[0].shape == (batch, seq, 96)
    assert rel_err(got[0], want[0]) <= TOL[torch.float32]


def test_llama_shape_arithmetic_is_evaluated_at_import(llama_onnx):
    graph = from_onnx(llama_onnx)
    batch, seq = sym("batch"), sym("seq")
    shapes = {n.attrs["shape"] for n in graph.nodes if n.op == "RESHAPE"}
    assert (batch, seq, 4, 16) in shapes and (batch, seq, 2, 16) in shapes  # q and k heads, from Shape -> ... -> Concat
    assert all(n.op != "CONCAT" or n.dtype != "int64" or n.shape[-1] != 1 for n in graph.nodes)  # no shape vectors built at run time


@pytest.mark.parametrize("batch", [1, 3])
def test_dit_matches_onnxruntime(dit_onnx, batch):
    graph = from_onnx(dit_onnx)
    assert graph.symbols == {"batch": (1, 2**31 - 1)}
    g = torch.Generator().manual_seed(batch)
    feeds = {"hidden_states": torch.randn(batch, 4, 8, 8, generator=g), "timestep": torch.randint(0, 1000, (batch,), generator=g),
             "class_labels": torch.randint(0, 11, (batch,), generator=g)}
    got, want = run_both(dit_onnx, graph, feeds)
    assert got[0].shape == (batch, 8, 8, 8)
    assert rel_err(got[0], want[0]) <= TOL[torch.float32]
    assert {"CONV2D", "LAYERNORM", "SOFTMAX"} <= set(graph.histogram())


def test_dynamic_ranges_and_renames(llama_onnx):
    g = from_onnx(llama_onnx, dynamic={"seq": (1, 64)})
    assert g.symbols["seq"] == (1, 64)
    g = from_onnx(llama_onnx, dynamic={"input_ids": {0: ("b", 1, 4)}})
    assert g.inputs[0].shape == (sym("b"), sym("seq")) and g.symbols["b"] == (1, 4)
    with pytest.raises(KilnError, match="no dynamic dim named 'tokens'; its dims are batch, seq"):
        from_onnx(llama_onnx, dynamic={"tokens": (1, 8)})


# ----------------------------------------------------------------------------- hand-built models


def model_of(nodes, inputs, outputs, inits=(), opset=18, name="m"):
    graph = helper.make_graph(nodes, name, inputs, outputs, initializer=list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def i64(name, values):
    return numpy_helper.from_array(np.array(values, dtype=np.int64), name)


def zoo_model():
    """x [S, 6] float: the ops torch exports lean on, with a symbolic S and ONNX's bound conventions."""
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "zero"], ["s"], axis=0),                      # s = S (a scalar)
        helper.make_node("Unsqueeze", ["s", "zero1"], ["s1"]),
        helper.make_node("Concat", ["s1", "three", "two"], ["tgt"], axis=0),             # [S, 3, 2]
        helper.make_node("Reshape", ["x", "tgt"], ["r"]),
        helper.make_node("Reshape", ["r", "zero_m1"], ["flat"]),                          # [S, 6] via 0 / -1
        helper.make_node("Slice", ["flat", "sl_start", "sl_end", "sl_axes", "sl_steps"], ["sl"]),  # [1:INT_MAX:2, -4:]
        helper.make_node("Split", ["flat", "split"], ["a", "b"], axis=1),
        helper.make_node("Mul", ["a", "half"], ["a2"]),
        helper.make_node("Expand", ["b", "exp_shape"], ["bx"]),                           # bidirectional: [2, S, 4]
        helper.make_node("Tile", ["a2", "reps"], ["t"]),
        helper.make_node("Pad", ["t", "pads", "padv"], ["p"]),
        helper.make_node("Gather", ["p", "last"], ["pl"], axis=1),                        # a negative scalar index
        helper.make_node("Range", ["zero_s", "s", "one_s"], ["ar"]),
        helper.make_node("Cast", ["ar"], ["arf"], to=f),
        helper.make_node("Add", ["pl", "arf"], ["plar"]),
        helper.make_node("Trilu", ["flat"], ["tri"], upper=0),
        helper.make_node("CumSum", ["tri", "one_s"], ["cs"]),
        helper.make_node("ReduceMean", ["cs", "axes1"], ["mean"], keepdims=1),
        helper.make_node("Less", ["cs", "mean"], ["lt"]),
        helper.make_node("Where", ["lt", "cs", "neg"], ["w"]),
        helper.make_node("Softmax", ["w"], ["sm"], axis=-1),
        helper.make_node("Unsqueeze", ["sm", "zero1"], ["smu"]),
        helper.make_node("Concat", ["smu", "smu"], ["sm2"], axis=0),
        helper.make_node("Unsqueeze", ["ar", "minus1"], ["arcol"]),
        helper.make_node("Mod", ["arcol", "six"], ["col"]),
        helper.make_node("Concat", ["arcol", "col"], ["nd"], axis=1),
        helper.make_node("GatherND", ["flat", "nd"], ["diag"]),                          # flat[k, k % 6]
    ]
    inits = [i64("zero", 0), i64("zero1", [0]), i64("three", [3]), i64("two", [2]), i64("zero_m1", [0, -1]),
             i64("sl_start", [1, -4]), i64("sl_end", [2**63 - 1, 2**63 - 1]), i64("sl_axes", [0, 1]), i64("sl_steps", [2, 1]),
             i64("split", [2, 4]), numpy_helper.from_array(np.array(0.5, dtype=np.float32), "half"),
             i64("exp_shape", [2, 1, 4]), i64("reps", [1, 3]), i64("pads", [0, 1, 0, 2]),
             numpy_helper.from_array(np.array(-1.5, dtype=np.float32), "padv"), i64("last", -2),
             i64("zero_s", 0), i64("one_s", 1), i64("axes1", [1]),
             numpy_helper.from_array(np.array(-3.0, dtype=np.float32), "neg"), i64("minus1", [-1]), i64("six", [6])]
    outs = [helper.make_tensor_value_info(n, f, [None] * rank) for n, rank in
            (("sl", 2), ("bx", 3), ("plar", 1), ("sm2", 3), ("diag", 1), ("r", 3))]
    return model_of(nodes, [helper.make_tensor_value_info("x", f, ["S", 6])], outs, inits)


@pytest.mark.parametrize("s", [3, 8])
def test_op_zoo_matches_onnxruntime(tmp_path, s):
    path = str(tmp_path / "zoo.onnx")
    onnx.save(zoo_model(), path)
    graph = from_onnx(path)
    assert graph.nodes and all(n.op != "CONST" or isinstance(n.attrs["value"], (int, float, bool)) for n in graph.nodes)
    x = torch.randn(s, 6, generator=torch.Generator().manual_seed(s))
    got, want = run_both(path, graph, {"x": x})
    for name, o, w in zip(graph.output_names, got, want):
        assert o.shape == w.shape, name
        assert rel_err(o, w) <= TOL[torch.float32], name


def test_conv1d_and_global_average_pool_match_onnxruntime(tmp_path):
    """x [N, 4, L]: a 1-d Conv with uneven pads and a strided, dilated, grouped one, then GlobalAveragePool."""
    f, gen = TensorProto.FLOAT, np.random.default_rng(0)
    arr = lambda name, *shape: numpy_helper.from_array(gen.standard_normal(shape).astype(np.float32), name)  # noqa: E731
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 2], kernel_shape=[3]),
             helper.make_node("Conv", ["c1", "w2"], ["c2"], strides=[2], dilations=[2], group=2, pads=[1, 1]),
             helper.make_node("GlobalAveragePool", ["c2"], ["pool"])]
    outs = [helper.make_tensor_value_info(n, f, [None] * 3) for n in ("c2", "pool")]
    model = model_of(nodes, [helper.make_tensor_value_info("x", f, ["N", 4, "L"])], outs,
                     [arr("w1", 6, 4, 3), arr("b1", 6), arr("w2", 4, 3, 3)])
    path = str(tmp_path / "conv1d.onnx")
    onnx.save(model, path)
    graph = from_onnx(path)
    for n, length in [(2, 11), (1, 16)]:
        got, want = run_both(path, graph, {"x": torch.randn(n, 4, length, generator=torch.Generator().manual_seed(length))})
        for o, w in zip(got, want):
            assert o.shape == w.shape and rel_err(o, w) <= TOL[torch.float32]


def test_external_data(tmp_path):
    w = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32), "w")
    m = model_of([helper.make_node("MatMul", ["x", "w"], ["y"])], [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 16])], [w])
    path = tmp_path / "ext.onnx"
    onnx.save_model(m, path, save_as_external_data=True, all_tensors_to_one_file=True, location="ext.weights", size_threshold=0)
    assert os.path.getsize(tmp_path / "ext.weights") == 8 * 16 * 4
    graph = from_onnx(path)
    x = torch.randn(5, 8)
    assert rel_err(interpret(graph, [x])[0], x @ torch.tensor(numpy_helper.to_array(w))) <= TOL[torch.float32]
    assert graph.weights["w"].shape == (8, 16)

    with open(tmp_path / "ext.weights", "r+b") as f:
        f.truncate(100)
    with pytest.raises(KilnError, match=r"ext.onnx: external data file 'ext.weights' is truncated: initializer 'w' needs bytes up to 512"):
        from_onnx(path)
    os.remove(tmp_path / "ext.weights")
    with pytest.raises(KilnError, match=r"ext.onnx: external data file 'ext.weights' of initializer 'w' is missing") as e:
        from_onnx(path)
    assert "\n" not in e.value.message


@pytest.mark.parametrize("how", ["truncated", "garbage", "empty"])
def test_corrupt_files(tmp_path, how):
    good = model_of([helper.make_node("Relu", ["x"], ["y"])], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                    [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])]).SerializeToString()
    data = {"truncated": good[: len(good) // 2], "garbage": bytes(range(256)) * 8, "empty": b""}[how]
    path = tmp_path / f"{how}.onnx"
    path.write_bytes(data)
    with pytest.raises(KilnError) as e:
        from_onnx(path)
    msg = e.value.message
    assert msg.startswith(f"{path}: not a") and "truncated or corrupt" in msg and "\n" not in msg


def test_missing_file(tmp_path):
    with pytest.raises(KilnError, match="nope.onnx: no such file"):
        from_onnx(tmp_path / "nope.onnx")


def test_old_opset_is_converted(tmp_path):
    """opset 11's Softmax(axis=1) normalises over all dims from 1 on (opset 13 changed it to one axis): the converted
    model must keep the old meaning, and the compile report says it was converted."""
    m = model_of([helper.make_node("Softmax", ["x"], ["y"], axis=1)], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])], opset=11)
    m.ir_version = 6
    path = str(tmp_path / "old.onnx")
    onnx.save(m, path)
    compiled = kiln.compile(path)
    assert "old.onnx: converted from opset 11 to 17 with onnx.version_converter" in compiled.report().notes
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(0))
    got, want = compiled(x), torch.from_numpy(ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0])
    assert rel_err(got, want) <= TOL[torch.float32]
    assert rel_err(got, x.reshape(2, 12).softmax(-1).reshape(2, 3, 4)) <= TOL[torch.float32]
    notes = []
    from_onnx(m, notes=notes)
    assert notes == ["ONNX model: converted from opset 11 to 17 with onnx.version_converter"]


def test_old_opset_the_converter_cannot_upgrade(tmp_path):
    f = TensorProto.FLOAT
    m = model_of([helper.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], spatial=0)],
                 [helper.make_tensor_value_info(n, f, shape) for n, shape in (("x", [1, 2, 3]), ("s", [2]), ("b", [2]), ("m", [2]), ("v", [2]))],
                 [helper.make_tensor_value_info("y", f, [1, 2, 3])], opset=7)
    m.ir_version = 3
    path = tmp_path / "bn.onnx"
    onnx.save(m, path)
    with pytest.raises(KilnError, match=r"bn.onnx: opset 7 is older than the 17 kiln reads, and onnx.version_converter cannot "
                                        r"upgrade it: .*Attribute spatial must have value 1") as e:
        kiln.compile(str(path))
    assert "\n" not in e.value.message and "opset_version=17" in e.value.hint


def test_unsupported_ops_are_listed_together():
    f = TensorProto.FLOAT
    nodes = [
        helper.make_node("TopK", ["x", "k"], ["v1", "i1"], name="topk_a", axis=-1),
        helper.make_node("Relu", ["v1"], ["r"], name="relu_after_topk"),  # reads an unsupported value: not listed
        helper.make_node("TopK", ["x", "k"], ["v2", "i2"], name="topk_b", axis=-1),
        helper.make_node("NonZero", ["x"], ["nz"], name="nonzero"),
        helper.make_node("FusedMatMul", ["x", "x"], ["fm"], name="fused", domain="com.microsoft"),
        helper.make_node("Mod", ["x", "x"], ["md"], name="cmod", fmod=1),  # a handler that declines, with its reason
        helper.make_node("Add", ["x", "x"], ["ok"], name="fine"),
    ]
    outs = [helper.make_tensor_value_info(n, f, [None, None]) for n in ("r", "v2", "fm", "md", "ok")] + \
        [helper.make_tensor_value_info("nz", TensorProto.INT64, [None, None])]
    m = helper.make_model(helper.make_graph(nodes, "u", [helper.make_tensor_value_info("x", f, [4, 4])], outs, [i64("k", [2])]),
                          opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)], ir_version=8)
    with pytest.raises(UnsupportedOpsError) as e:
        from_onnx(m)
    ops = e.value.ops
    assert ops["TopK"] == ["topk_a", "topk_b"]
    assert ops["NonZero"] == ["nonzero"] and ops["com.microsoft.FusedMatMul"] == ["fused"]
    assert [k for k in ops if k.startswith("Mod")] == ["Mod (fmod (C-style remainder); kiln's MOD is the Python / torch.remainder one)"]
    assert len(ops) == 4
    assert e.value.message.startswith("ONNX model uses 4 unsupported ops:")
