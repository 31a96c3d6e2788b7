"""ONNX Attention / RotaryEmbedding -> kiln's ATTENTION / ROPE: the nodes they become, float64 parity with a
torch reference written from ONNX's spec, and the features refused by name. (ONNX's own cases for both ops run
in test_backend_suite.py.)"""
import math

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from kiln.errors import UnsupportedOpsError
from kiln.ir.interpret import interpret
from kiln.ir.onnx import from_onnx

D = TensorProto.DOUBLE


def one_node(op, inputs: dict, outputs: dict, **attrs) -> onnx.ModelProto:
    """A model of one ``op`` node: ``inputs`` / ``outputs`` map names to (elem type, shape); '' skips an input."""
    node = helper.make_node(op, [n if s is not None else "" for n, s in inputs.items()], list(outputs), **attrs)
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info(n, *s) for n, s in inputs.items() if s is not None],
                              [helper.make_tensor_value_info(n, *s) for n, s in outputs.items()])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)], ir_version=10)


def reference_attention(q, k, v, scale=None, causal_offset=None, mask=None):
    """softmax(q k^T * scale + bias) v over [B, H, S, D], kv heads repeated for GQA; the causal frontier is
    bottom-right: query i sees key j <= i + offset; a row that sees no key is 0."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s = q @ k.transpose(-1, -2) * (scale if scale is not None else 1 / math.sqrt(q.shape[-1]))
    allowed = torch.ones(s.shape, dtype=torch.bool)
    if causal_offset is not None:
        i, j = torch.arange(s.shape[-2])[:, None], torch.arange(s.shape[-1])[None, :]
        allowed = allowed & (j <= i + causal_offset)
    if mask is not None and mask.dtype == torch.bool:
        allowed = allowed & mask
    elif mask is not None:
        s = s + mask
    p = s.masked_fill(~allowed, float("-inf")).softmax(-1)
    return (p.nan_to_num(0.0) * allowed.any(-1, keepdim=True)) @ v


def run(model, *xs):
    g = from_onnx(model)
    return g, interpret(g, list(xs))


def test_causal_4d_is_one_attention_with_the_causal_flag():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=gen, dtype=torch.float64) for _ in range(3))
    m = one_node("Attention", {"Q": (D, [2, 3, 5, 8]), "K": (D, [2, 3, 5, 8]), "V": (D, [2, 3, 5, 8])}, {"Y": (D, [2, 3, 5, 8])},
                 is_causal=1, scale=0.3)
    g, (y,) = run(m, q, k, v)
    (att,) = [n for n in g.nodes if n.op == "ATTENTION"]
    scale = float(np.float32(0.3))  # an ONNX float attribute
    assert att.attrs == {"causal": True, "scale": scale, "gqa": False, "k_scale": False, "v_scale": False, "softcap": None}
    assert len(att.inputs) == 3
    assert torch.allclose(y, reference_attention(q, k, v, scale, causal_offset=0), rtol=1e-12, atol=1e-12)


def test_softcap_is_the_attention_attribute():
    # c * tanh(s / c) on the scaled scores, before the causal mask (ONNX's order, Gemma 2's); against onnx's reference
    from onnx.reference import ReferenceEvaluator

    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 4, 8, generator=gen, dtype=torch.float64) * 3 for _ in range(3))
    m = one_node("Attention", {"Q": (D, [1, 2, 4, 8]), "K": (D, [1, 2, 4, 8]), "V": (D, [1, 2, 4, 8])}, {"Y": (D, [1, 2, 4, 8])},
                 is_causal=1, softcap=1.5)
    g, (y,) = run(m, q, k, v)
    (att,) = [n for n in g.nodes if n.op == "ATTENTION"]
    assert att.attrs["softcap"] == 1.5 and att.attrs["causal"]
    (want,) = ReferenceEvaluator(m).run(None, {"Q": q.numpy(), "K": k.numpy(), "V": v.numpy()})
    assert torch.allclose(y, torch.from_numpy(want), rtol=1e-10, atol=1e-10)


def test_3d_gqa_with_past_is_bottom_right_causal():
    """3-d inputs [B, S, H*D], 6 query heads over 2 kv heads, 4 cached keys: query i sees keys j <= i + 4, which is
    NOT torch's top-left causal flag; present_key / present_value are the caches with the new keys appended."""
    gen = torch.Generator().manual_seed(1)
    b, s, past, hq, hkv, d = 2, 3, 4, 6, 2, 4
    q = torch.randn(b, s, hq * d, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(b, s, hkv * d, generator=gen, dtype=torch.float64) for _ in range(2))
    pk, pv = (torch.randn(b, hkv, past, d, generator=gen, dtype=torch.float64) for _ in range(2))
    m = one_node("Attention", {"Q": (D, [b, s, hq * d]), "K": (D, [b, s, hkv * d]), "V": (D, [b, s, hkv * d]), "attn_mask": None,
                               "past_key": (D, [b, hkv, past, d]), "past_value": (D, [b, hkv, past, d])},
                 {"Y": (D, [b, s, hq * d]), "present_key": (D, [b, hkv, past + s, d]), "present_value": (D, [b, hkv, past + s, d])},
                 is_causal=1, q_num_heads=hq, kv_num_heads=hkv)
    g, (y, present_k, present_v) = run(m, q, k, v, pk, pv)
    (att,) = [n for n in g.nodes if n.op == "ATTENTION"]
    assert att.attrs["causal"] is False and att.attrs["gqa"] is True and att.inputs[3].dtype == "bool"
    heads = lambda t, h: t.reshape(b, s, h, d).transpose(1, 2)  # noqa: E731
    full_k, full_v = torch.cat([pk, heads(k, hkv)], 2), torch.cat([pv, heads(v, hkv)], 2)
    want = reference_attention(heads(q, hq), full_k, full_v, causal_offset=past).transpose(1, 2).reshape(b, s, hq * d)
    assert torch.allclose(y, want, rtol=1e-12, atol=1e-12)
    assert torch.equal(present_k, full_k) and torch.equal(present_v, full_v)


def test_window_nonpad_and_a_float_mask_compose():
    """left window 1, per-batch valid key counts (the external cache: offset = nonpad - S_q), a float bias."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 2, 3, 4, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 6, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    bias = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    nonpad = torch.tensor([6, 4])
    m = one_node("Attention", {"Q": (D, [2, 2, 3, 4]), "K": (D, [2, 2, 6, 4]), "V": (D, [2, 2, 6, 4]), "attn_mask": (D, [3, 6]),
                               "past_key": None, "past_value": None, "nonpad_kv_seqlen": (TensorProto.INT64, [2])},
                 {"Y": (D, [2, 2, 3, 4])}, left_window_size=1)
    m.opset_import[0].version = 25
    _, (y,) = run(m, q, k, v, bias, nonpad)
    for bi, n in enumerate(nonpad.tolist()):
        off = n - 3
        i, j = torch.arange(3)[:, None], torch.arange(6)[None, :]
        allowed = (j >= i + off - 1) & (j < n)
        want = reference_attention(q[bi:bi + 1], k[bi:bi + 1], v[bi:bi + 1], mask=bias.masked_fill(~allowed, float("-inf")))
        assert torch.allclose(y[bi:bi + 1], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("attrs, outputs, named", [
    ({"softcap": -2.0}, ["Y"], "softcap=-2.0"),
    ({"qk_matmul_output_mode": 1}, ["Y", "", "", "qk"], "qk_matmul_output output (qk_matmul_output_mode=1"),
    ({"softmax_precision": TensorProto.DOUBLE}, ["Y"], "softmax_precision=float64"),
])
def test_what_attention_cannot_compute_is_refused_by_name(attrs, outputs, named):
    f = TensorProto.FLOAT
    node = helper.make_node("Attention", ["Q", "K", "V"], outputs, **attrs)
    outs = [helper.make_tensor_value_info(n, f, [1, 1, 2, 4] if n == "Y" else [1, 1, 2, 2]) for n in outputs if n]
    graph = helper.make_graph([node], "t", [helper.make_tensor_value_info(n, f, [1, 1, 2, 4]) for n in "QKV"], outs)
    with pytest.raises(UnsupportedOpsError) as e:
        from_onnx(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 24)], ir_version=10))
    (op,) = e.value.ops
    assert op.startswith("Attention (") and named in op


def reference_rope(x, cos, sin, interleaved: bool, r: int):
    """ONNX's RotaryEmbedding on x [B, S, H, D] with cos / sin [B, S, r/2]: (x1, x2) pairs rotate by the angle."""
    rot, rest = x[..., :r], x[..., r:]
    x1, x2 = (rot[..., 0::2], rot[..., 1::2]) if interleaved else rot.chunk(2, -1)
    c, s = cos[:, :, None], sin[:, :, None]
    real, imag = c * x1 - s * x2, s * x1 + c * x2
    out = torch.stack([real, imag], -1).flatten(-2) if interleaved else torch.cat([real, imag], -1)
    return torch.cat([out, rest], -1)


@pytest.mark.parametrize("interleaved", [0, 1])
@pytest.mark.parametrize("three_d", [False, True])
def test_rotary_embedding_is_rope(interleaved, three_d):
    """position_ids gather the [positions, r/2] caches; r = 6 of the 10 dims of each head rotate."""
    gen = torch.Generator().manual_seed(3)
    b, h, s, d, r = 2, 3, 5, 10, 6
    x = torch.randn(b, h, s, d, generator=gen, dtype=torch.float64)
    cos, sin = (torch.randn(16, r // 2, generator=gen, dtype=torch.float64) for _ in range(2))
    pos = torch.randint(0, 16, (b, s), generator=gen)
    xin = x.transpose(1, 2).reshape(b, s, h * d) if three_d else x
    m = one_node("RotaryEmbedding", {"X": (D, list(xin.shape)), "cos": (D, [16, r // 2]), "sin": (D, [16, r // 2]),
                                     "pos": (TensorProto.INT64, [b, s])}, {"Y": (D, list(xin.shape))},
                 interleaved=interleaved, rotary_embedding_dim=r, **({"num_heads": h} if three_d else {}))
    m.opset_import[0].version = 23
    g, (y,) = run(m, xin, cos, sin, pos)
    assert g.histogram().get("ROPE") == 1
    want = reference_rope(x.transpose(1, 2), cos[pos], sin[pos], bool(interleaved), r)  # [B, S, H, D]
    want = want.reshape(b, s, h * d) if three_d else want.transpose(1, 2)
    assert torch.allclose(y, want, rtol=1e-12, atol=1e-12)
