"""kiln.passes.fuse_attention: explicit attention, repeat_kv and rotate-half RoPE -> ATTENTION / ROPE.
Sites fired, op counts, float64 parity before vs after, and the near misses it must decline."""

import math

import pytest
import torch
import transformers

import kiln
from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.passes.fuse_attention import fuse_attention
from kiln.passes.pipeline import PASS_NAMES
from kiln.testing import TOL, rel_err

f32 = "float32"
NO_PASSES = kiln.CompileConfig(disable=PASS_NAMES)  # the graph as imported: the test runs the pass itself


def run_pass(g: Graph, inputs: list):
    """Run the pass; return its stats and the float64 outputs before and after."""
    before = interpret(g, inputs, compute_dtype=torch.float64)
    stats = fuse_attention(g)
    g.verify()
    return stats, before, interpret(g, inputs, compute_dtype=torch.float64)


def assert_same(before, after):
    for b, a in zip(before, after):
        assert rel_err(a, b) <= TOL[torch.float64]


# ----------------------------------------------------------------------------- explicit attention


def attention_graph(*, scale="mul", mask="bias", axis=3, dtype=f32, upcast=None, kv_heads=4, k_layout="bhsd", nan_guard=None,
                    softcap=None):
    """softmax(q @ k^T * s + mask) @ v built node by node, with q [2, 4, 5, 8], k / v [2, kv_heads, 6, 8];
    ``nan_guard=c``: where(isnan(p), c, p) @ v, as the ONNX exporters write SDPA; ``softcap=(c, c')``: the scores
    soft-capped as Gemma 2's, tanh(s / c) * c' (c' = c: its form)."""
    g = Graph()
    q = g.add_input("q", (2, 4, 5, 8), dtype)
    k = g.add_input("k", (2, kv_heads, 6, 8) if k_layout == "bhsd" else (2, 6, kv_heads, 8), dtype)
    v = g.add_input("v", (2, kv_heads, 6, 8), dtype)
    ins = [q, k, v]
    if kv_heads != 4:  # HF's repeat_kv
        k, v = repeat_kv(g, k, 4 // kv_heads), repeat_kv(g, v, 4 // kv_heads)
    # k^T; from [B, S, H, D] straight to [B, H, D, S] in the other layout
    kt = g.add("PERMUTE", [k], perm=(0, 1, 3, 2) if k_layout == "bhsd" else (0, 2, 3, 1))
    if scale == "q":
        q = g.add("MUL", [q, g.const(8 ** -0.5)])
    elif scale == "split":  # sqrt(scale) on q and on k^T
        q, kt = g.add("MUL", [q, g.const(8 ** -0.25)]), g.add("MUL", [kt, g.const(8 ** -0.25)])
    s = g.add("MATMUL", [q, kt])
    if scale == "mul":
        s = g.add("MUL", [g.const(8 ** -0.5), s])
    elif scale == "div":
        s = g.add("DIV", [s, g.const(math.sqrt(8))])
    elif scale == "input":
        ins.append(g.add_input("scale", (), dtype))
        s = g.add("MUL", [s, ins[-1]])
    if softcap is not None:
        s = g.add("MUL", [g.add("TANH", [g.add("DIV", [s, g.const(softcap[0])])]), g.const(softcap[1])])
    if mask == "bias":
        ins.append(g.add_input("mask", (1, 1, 5, 6), dtype))
        s = g.add("ADD", [s, ins[-1]])
    elif mask in ("where", "where_min", "where_zero"):
        ins.append(g.add_input("mask", (2, 1, 5, 6), "bool"))
        fill = {"where": -math.inf, "where_min": torch.finfo(torch.float32).min, "where_zero": 0.0}[mask]
        s = g.add("WHERE", [ins[-1], s, g.const(fill)])
    elif mask == "masked_fill":  # s.masked_fill(~keep, -inf)
        ins.append(g.add_input("mask", (2, 1, 5, 6), "bool"))
        s = g.add("WHERE", [g.add("NOT", [ins[-1]]), g.const(-math.inf), s])
    if upcast:
        s = g.add("CAST", [s], dtype=upcast)
    p = g.add("SOFTMAX", [s], axis=axis)
    if upcast:
        p = g.add("CAST", [p], dtype=dtype)
    if nan_guard is not None:
        p = g.add("WHERE", [g.add("ISNAN", [p]), g.const(nan_guard), p])
    g.set_outputs([g.add("MATMUL", [p, v])])
    return g, ins


def repeat_kv(g: Graph, x, n: int, interleave: bool = True):
    """HF's repeat_kv [B, H, S, D] -> [B, H * n, S, D]; interleave=False tiles the heads instead (not the same)."""
    b, h, s, d = x.shape
    if interleave:
        e = g.add("EXPAND", [g.add("RESHAPE", [x], shape=(b, h, 1, s, d))], shape=(b, h, n, s, d))
    else:
        e = g.add("EXPAND", [g.add("RESHAPE", [x], shape=(b, 1, h, s, d))], shape=(b, n, h, s, d))
    return g.add("RESHAPE", [e], shape=(b, h * n, s, d))


def example(ins):
    gen = torch.Generator().manual_seed(0)
    out = []
    for n in ins:
        if n.dtype == "bool":
            t = torch.rand(n.shape, generator=gen) > 0.4
            t[..., 0] = True  # every query keeps a key: no row is all -inf
        else:
            t = torch.randn(n.shape, generator=gen)
        out.append(t)
    return out


@pytest.mark.parametrize("kw", [dict(), dict(scale="div"), dict(scale="q"), dict(scale=None, mask=None), dict(mask="where"),
                                dict(mask="masked_fill"), dict(mask="where_min"), dict(k_layout="bshd"),
                                dict(dtype="float16", upcast=f32), dict(scale="split"), dict(scale="split", nan_guard=0.0),
                                dict(mask="where", nan_guard=0.0)], ids=repr)
def test_explicit_attention_becomes_one_op(kw):
    g, ins = attention_graph(**kw)
    stats, before, after = run_pass(g, example(ins))
    assert stats.rules == {"explicit_attention": 1} and not stats.declined
    hist = g.histogram()
    assert hist.pop("ATTENTION") == 1
    assert set(hist) <= {"PERMUTE", "NOT", "WHERE", "CAST"}  # k's other layout, masked_fill's keep, a finite fill's bias
    assert hist.get("CAST", 0) == (kw.get("mask") == "where_min")
    (att,) = [n for n in g.nodes if n.op == "ATTENTION"]
    assert att.attrs["scale"] == pytest.approx(8 ** -0.5 if kw.get("scale", "mul") else 1.0)
    assert len(att.inputs) == (3 if kw.get("mask", "bias") is None else 4)
    assert_same(before, after)


@pytest.mark.parametrize("mask", ["bias", "where"])
def test_the_nan_guard_is_what_attention_gives_fully_masked_queries(mask):
    # where(isnan(p), 0, p) @ v zeroes the rows whose keys are all masked: SDPA (ATTENTION's reference) does too
    g, ins = attention_graph(mask=mask, nan_guard=0.0)
    xs = example(ins)
    if mask == "bias":
        xs[3][..., 2, :] = -math.inf
    else:
        xs[3][:, :, 2, :] = False
    stats, before, after = run_pass(g, xs)
    assert stats.rules == {"explicit_attention": 1} and g.histogram().get("ISNAN", 0) == 0
    assert torch.all(before[0][:, :, 2] == 0) and torch.all(after[0][:, :, 2] == 0)
    assert_same(before, after)


def test_repeat_kv_becomes_gqa_on_the_unrepeated_kv():
    g, ins = attention_graph(kv_heads=2)
    hist = g.histogram()
    assert hist["EXPAND"] == 2 and hist["SOFTMAX"] == 1
    stats, before, after = run_pass(g, example(ins))
    assert stats.rules == {"explicit_attention": 1, "gqa_attention": 1}
    assert g.histogram() == {"ATTENTION": 1}
    (att,) = [n for n in g.nodes if n.op == "ATTENTION"]
    assert att.attrs["gqa"] and att.inputs[1] is ins[1] and att.inputs[2] is ins[2]
    assert_same(before, after)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_softcapped_scores_become_the_softcap_attribute(kv_heads):
    # Gemma 2: tanh(s / c) * c before the mask; with repeat_kv the GQA rule keeps the attribute
    g, ins = attention_graph(mask="masked_fill", softcap=(0.7, 0.7), kv_heads=kv_heads)
    stats, before, after = run_pass(g, example(ins))
    assert stats.rules == {"explicit_attention": 1, **({"gqa_attention": 1} if kv_heads == 2 else {})}
    (att,) = [n for n in g.nodes if n.op == "ATTENTION"]
    assert att.attrs["softcap"] == 0.7 and att.attrs["gqa"] == (kv_heads == 2) and "TANH" not in g.histogram()
    assert_same(before, after)
    g, ins = attention_graph(mask="masked_fill", softcap=(0.7, 0.5))  # not one cap: the tanh stays a tanh
    stats, before, after = run_pass(g, example(ins))
    assert "ATTENTION" not in g.histogram() and "TANH" in g.histogram()


def test_tiled_heads_are_not_repeat_kv():
    g = Graph()
    q, k, v = (g.add_input(n, (2, h, 6, 8), f32) for n, h in (("q", 4), ("k", 2), ("v", 2)))
    g.set_outputs([g.add("ATTENTION", [q, repeat_kv(g, k, 2, interleave=False), repeat_kv(g, v, 2, interleave=False)])])
    stats, before, after = run_pass(g, example([q, k, v]))
    assert stats.rewritten == 0 and "is not repeat_kv" in stats.declined[0]["reason"]
    assert g.histogram()["EXPAND"] == 2
    assert_same(before, after)


@pytest.mark.parametrize("kw, reason", [
    (dict(axis=2), "softmax over axis 2 of the rank-4 scores, not the last"),
    (dict(scale="input"), "is not a constant"),
    (dict(mask="where_zero"), "masked scores are set to 0.0, neither -inf nor the float32 minimum"),
    (dict(dtype="float16", upcast="bfloat16"), "softmax computed in bfloat16"),
    (dict(nan_guard=1.0), "NaN probabilities are set to 1.0; SDPA gives 0 where every key is masked"),
])
def test_near_misses_are_declined_with_their_reason(kw, reason):
    g, ins = attention_graph(**kw)
    hist = g.histogram()
    stats, before, after = run_pass(g, example(ins))
    assert stats.rewritten == 0 and g.histogram() == hist
    assert [d["rule"] for d in stats.declined] == ["explicit_attention"] and reason in stats.declined[0]["reason"]
    assert_same(before, after)


def test_a_shared_probability_matrix_blocks_the_fusion():
    g, ins = attention_graph()
    softmax = next(n for n in g.nodes if n.op == "SOFTMAX")
    g.set_outputs(g.outputs + [softmax])  # output_attentions=True
    stats, _, _ = run_pass(g, example(ins))
    assert stats.rewritten == 0 and "has other users" in stats.declined[0]["reason"]


def attention_fn(q, k, v, keep):
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(s.masked_fill(~keep, float("-inf")), dim=-1) @ v


def test_captured_torch_function():
    args = example_tensors((2, 4, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8)) + [torch.rand(5, 6) > 0.3]
    args[-1][:, 0] = True
    g = kiln.compile(attention_fn, tuple(args), config=NO_PASSES).graph
    assert g.histogram()["SOFTMAX"] == 1
    stats, before, after = run_pass(g, args)
    assert stats.rules == {"explicit_attention": 1}
    assert g.histogram() == {"ATTENTION": 1}
    assert_same(before, after)
    assert rel_err(after[0], attention_fn(*[a.double() if a.is_floating_point() else a for a in args])) <= TOL[torch.float64]


def example_tensors(*shapes):
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(s, generator=gen) for s in shapes]


# ----------------------------------------------------------------------------- RoPE


def rope_graph(*, neg=(4, 8), pos=(0, 4), neg_first=True, axis=3):
    """x * cos + cat(-x[neg], x[pos]) * sin on x [2, 4, 5, 8] (or cat(x[pos], -x[neg]) when not neg_first)."""
    g = Graph()
    shape = (2, 4, 5, 8) if axis == 3 else (2, 4, 8, 8)
    x = g.add_input("x", shape, f32)
    cos, sin = (g.add_input(n, (1, 1) + shape[2:], f32) for n in ("cos", "sin"))
    a = g.add("NEG", [g.add("SLICE", [x], axis=axis, start=neg[0], end=neg[1])])
    b = g.add("SLICE", [x], axis=axis, start=pos[0], end=pos[1])
    rot = g.add("CONCAT", [a, b] if neg_first else [b, a], axis=axis)
    g.set_outputs([g.add("ADD", [g.add("MUL", [rot, sin]), g.add("MUL", [cos, x])])])
    return g, [x, cos, sin]


def test_rotate_half_rope_becomes_one_op():
    g, ins = rope_graph()
    assert g.histogram() == {"MUL": 2, "SLICE": 2, "NEG": 1, "CONCAT": 1, "ADD": 1}
    stats, before, after = run_pass(g, example(ins))
    assert stats.rules == {"rope": 1} and not stats.declined
    assert g.histogram() == {"ROPE": 1}
    assert_same(before, after)


@pytest.mark.parametrize("kw, reason", [
    (dict(neg=(3, 8), pos=(0, 3)), "slices [3:8] and [0:3] are not the halves of the last dim 8"),
    (dict(neg=(4, 8), pos=(0, 4), neg_first=False), "cat(x1, -x2) is not rotate_half(x) = cat(-x2, x1)"),
    (dict(neg=(0, 4), pos=(4, 8)), "cat(-x1, x2) is not rotate_half(x)"),
    (dict(axis=2), "not on the last axis of x"),
])
def test_rope_near_misses_are_declined(kw, reason):
    g, ins = rope_graph(**kw)
    hist = g.histogram()
    stats, before, after = run_pass(g, example(ins))
    assert stats.rewritten == 0 and g.histogram() == hist
    assert [d["reason"] for d in stats.declined if reason in d["reason"]], stats.declined
    assert_same(before, after)


# ----------------------------------------------------------------------------- models

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)


def hf_model(name: str, attn: str, **kw):
    torch.manual_seed(0)
    cfg = getattr(transformers, name + "Config")(**{**TINY, **kw}, attn_implementation=attn)
    return getattr(transformers, name + "ForCausalLM")(cfg).eval()


@pytest.mark.parametrize("name, attn, kw", [("Llama", "eager", {}), ("Llama", "sdpa", {}), ("Llama", "eager", dict(num_key_value_heads=4)),
                                            ("Qwen2", "eager", {}), ("Mistral", "sdpa", {})])
@torch.no_grad()
def test_hf_decoder_gets_one_attention_and_two_ropes_per_layer(name, attn, kw):
    hf = hf_model(name, attn, **kw)
    ids = torch.randint(0, TINY["vocab_size"], (2, 7), generator=torch.Generator().manual_seed(1))
    g = kiln.compile(hf, (ids,), dynamic={"input_ids": {0: "batch", 1: "seq"}}, config=NO_PASSES).graph
    layers, gqa = TINY["num_hidden_layers"], hf.config.num_key_value_heads < hf.config.num_attention_heads
    assert g.histogram().get("SOFTMAX", 0) == (layers if attn == "eager" else 0)

    ids = torch.randint(0, TINY["vocab_size"], (3, 9), generator=torch.Generator().manual_seed(2))  # another shape
    stats, before, after = run_pass(g, [ids])
    hist = g.histogram()
    assert stats.rules == {k: v for k, v in dict(explicit_attention=layers if attn == "eager" else 0, rope=2 * layers,
                                                 gqa_attention=layers if gqa else 0).items() if v}
    assert hist["ATTENTION"] == layers and hist["ROPE"] == 2 * layers and "SOFTMAX" not in hist and "NEG" not in hist
    assert not any(n.op == "EXPAND" and len(n.shape) == 5 for n in g.nodes)  # no repeat_kv left
    assert all(n.attrs["gqa"] == gqa for n in g.nodes if n.op == "ATTENTION")
    assert_same(before, after)
    assert rel_err(interpret(g, [ids])[0], hf(ids, use_cache=False).logits) <= TOL[torch.float32]
