"""The same model compiled from PyTorch and from its ONNX export gets the same fusions: both reports side by
side (HF Llama with GQA through both torch.onnx exporters; diffusers DiT through the dynamo exporter), and
kiln on the ONNX file computes what onnxruntime computes on it."""

import onnxruntime as ort
import pytest
import torch
import transformers
from diffusers import DiTTransformer2DModel

import kiln
from kiln.testing import TOL, DiTSample, LlamaLogits, perturbed, rel_err
from kiln.testing import export_onnx as export

MATMULS = ("LINEAR", "GEMM", "MATMUL")
PASS_THROUGH = ("ROPE", "PERMUTE", "RESHAPE", "SLICE", "CAST")  # from an ATTENTION operand back to its projection


# ----------------------------------------------------------------------------- what fused, and the two reports


def _projection(n):
    while n.op in PASS_THROUGH:
        n = n.inputs[0]
    return n if n.op in MATMULS else None


def fusions(m: kiln.CompiledModel) -> dict:
    """The fusions the issue asks for, counted on the compiled graph."""
    ops = m.report().to_dict()["ops_after"]
    attn = [n for n in m.graph.nodes if n.op == "ATTENTION"]
    gemms = [n for n in m.graph.nodes if n.op == "GEMM"]
    merged_qkv = sum(1 for a in attn if len({_projection(i) for i in a.inputs[:3]} - {None}) == 1 and _projection(a.inputs[0]))
    return {op: ops.get(op, 0) for op in ("RMSNORM", "ROPE", "LAYERNORM_MODULATE", "ATTENTION")} | {
        "ATTENTION gqa": sum(a.attrs["gqa"] for a in attn), "ATTENTION with merged QKV": merged_qkv,
        "GEMM glu": sum(g.attrs["glu"] for g in gemms), "GEMM residual": sum(g.attrs["residual"] for g in gemms)}


def side_by_side(torch_m: kiln.CompiledModel, onnx_m: kiln.CompiledModel, title: str) -> str:
    """Both reports in two columns: the fusions, each pass's rewrites per rule, the ops after."""
    a, b = torch_m.report().to_dict(), onnx_m.report().to_dict()
    rows = [("", "torch", title), ("-- fusions", "", "")]
    fa, fb = fusions(torch_m), fusions(onnx_m)
    rows += [(k, fa[k], fb[k]) for k in fa]
    rows.append(("-- rules fired", "", ""))
    for name in a["passes"]:
        ra, rb = a["passes"][name].get("rules") or {}, b["passes"][name].get("rules") or {}
        rows += [(f"{name}.{r}", ra.get(r, 0), rb.get(r, 0)) for r in sorted(set(ra) | set(rb))]
        if not ra and not rb:
            rows.append((name, a["passes"][name]["rewritten"], b["passes"][name]["rewritten"]))
    rows.append(("-- ops after", "", ""))
    oa, ob = a["ops_after"], b["ops_after"]
    rows += [(op, oa.get(op, 0), ob.get(op, 0)) for op in sorted(set(oa) | set(ob), key=lambda o: -max(oa.get(o, 0), ob.get(o, 0)))]
    w = max(len(str(r[0])) for r in rows)
    return "\n".join(f"{r[0]:<{w}}  {r[1]!s:>8}  {r[2]!s:>8}" + ("   <--" if r[1] != r[2] and r[1] != "torch" else "")
                     for r in rows)


def assert_same_fusions(torch_m, onnx_m, title: str, keys):
    fa, fb = fusions(torch_m), fusions(onnx_m)
    table = side_by_side(torch_m, onnx_m, title)
    print(table)  # shown by pytest with the failure
    assert {k: fa[k] for k in keys} == {k: fb[k] for k in keys}, "the torch and ONNX paths fuse differently:\n" + table


def onnxruntime_agrees(path: str, m: kiln.CompiledModel, feeds: dict):
    want = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {k: v.numpy() for k, v in feeds.items()})
    got = m.executor.run([feeds[n.attrs["name"]] for n in m.graph.inputs])
    assert rel_err(got[0], torch.from_numpy(want[0])) <= TOL[torch.float32]


# ----------------------------------------------------------------------------- HF Llama, GQA


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaLogits(perturbed(transformers.LlamaForCausalLM(cfg))).eval()
    ids = torch.randint(0, 96, (2, 7))
    return model, ids, kiln.compile(model.m, (ids,), dynamic={"input_ids": {0: "batch", 1: "seq"}})


LLAMA_FUSIONS = ("RMSNORM", "ROPE", "ATTENTION", "ATTENTION gqa", "ATTENTION with merged QKV", "GEMM glu", "GEMM residual")


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_llama_through_onnx_gets_the_torch_fusions(llama, exporter, tmp_path):
    model, ids, torch_m = llama
    dims = {"input_ids": {0: "batch", 1: "seq"}}
    if exporter == "dynamo":
        path = export(model, (ids,), tmp_path / "llama.onnx", dims, dynamo=True)
    else:  # the TorchScript exporter cannot export transformers' mask code without a mask (aten::diff)
        dims["attention_mask"] = {0: "batch", 1: "seq"}
        path = export(model, (ids, torch.ones_like(ids)), tmp_path / "llama.onnx", dims, dynamo=False)
    onnx_m = kiln.compile(path)
    assert_same_fusions(torch_m, onnx_m, f"onnx/{exporter}", LLAMA_FUSIONS)
    want = {"RMSNORM": 5, "ROPE": 4, "ATTENTION": 2, "ATTENTION gqa": 2, "ATTENTION with merged QKV": 2, "GEMM glu": 2, "GEMM residual": 4}
    assert {k: fusions(onnx_m)[k] for k in want} == want
    assert "SOFTMAX" not in onnx_m.report().ops_after and "ISNAN" not in onnx_m.report().ops_after

    g = torch.Generator().manual_seed(1)
    feeds = {"input_ids": torch.randint(0, 96, (3, 11), generator=g)}  # another shape than the export's
    if exporter == "torchscript":
        feeds["attention_mask"] = torch.ones(3, 11, dtype=torch.int64)
        feeds["attention_mask"][0, 9:] = 0  # right padding
    onnxruntime_agrees(path, onnx_m, feeds)


# ----------------------------------------------------------------------------- diffusers DiT


def test_dit_through_onnx_gets_the_torch_modulated_norms(tmp_path):
    torch.manual_seed(0)
    model = DiTSample(perturbed(DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                                      out_channels=8, num_layers=2, sample_size=8, patch_size=2,
                                                      num_embeds_ada_norm=10))).eval()
    x = (torch.randn(2, 4, 8, 8), torch.tensor([3, 500]), torch.tensor([1, 10]))
    dims = {k: {0: "batch"} for k in ("hidden_states", "timestep", "class_labels")}
    torch_m = kiln.compile(model, x, dynamic=dims)
    onnx_m = kiln.compile(export(model, x, tmp_path / "dit.onnx", dims, dynamo=True))
    assert_same_fusions(torch_m, onnx_m, "onnx/dynamo", ("LAYERNORM_MODULATE", "ATTENTION"))
    assert fusions(onnx_m)["LAYERNORM_MODULATE"] == 2 * 2 + 1

    g = torch.Generator().manual_seed(3)
    feeds = {"hidden_states": torch.randn(3, 4, 8, 8, generator=g), "timestep": torch.randint(0, 1000, (3,), generator=g),
             "class_labels": torch.randint(0, 11, (3,), generator=g)}
    onnxruntime_agrees(str(tmp_path / "dit.onnx"), onnx_m, feeds)
