"""kiln.passes.fuse_attention, the dequantized KV-cache rule: ATTENTION(q, CAST(kc) * ks[.., None], ...) ->
ATTENTION(q, kc, .., ks, .., k_scale=True). Sites fired, op counts, float64 parity before vs after, the near misses
it must decline, and the form a quantized LlamaStep captures into."""
import importlib.util
from pathlib import Path

import pytest
import torch

import kiln
from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.kv_quant import dequantize_kv, quantize_kv
from kiln.passes.fuse_attention import fuse_attention
from kiln.passes.pipeline import PASS_NAMES
from kiln.testing import TOL, rel_err

B, HQ, HK, SQ, S, D = 2, 4, 2, 3, 11, 16

# the plain rule tests' input maker (loaded by path: tests/ is no package)
_spec = importlib.util.spec_from_file_location("_test_fuse_attention", Path(__file__).parent / "test_fuse_attention.py")
_plain_tests = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_plain_tests)


def dequantized_graph(dtype="float16", which="kv", codes="int8", wide="float32", scale_shape=(B, HK, S), mask=True):
    """ATTENTION over k / v written as dequantize_kv captures: CAST(codes, wide) * RESHAPE(scale) [.., S, 1], cast to
    q's dtype; the operands not in ``which`` are plain inputs of q's dtype."""
    g = Graph()
    q = g.add_input("q", (B, HQ, SQ, D), dtype)
    ins, kv = [q], []
    for name in "kv":
        if name not in which:
            kv.append(g.add_input(name, (B, HK, S, D), dtype))
            ins.append(kv[-1])
            continue
        c, s = g.add_input(name + "c", (B, HK, S, D), codes), g.add_input(name + "s", scale_shape, "float32")
        x = g.add("MUL", [g.add("CAST", [c], dtype=wide), g.add("RESHAPE", [s], shape=scale_shape[:3] + (1,))])
        kv.append(g.add("CAST", [x], dtype=dtype) if x.dtype != dtype else x)
        ins += [c, s]
    if mask:
        ins.append(g.add_input("mask", (B, 1, SQ, S), "bool"))
    g.set_outputs([g.add("ATTENTION", [q, *kv] + ins[-1:] * mask, gqa=True)])
    return g, ins


def example(ins):
    """The plain fuse_attention tests' inputs (masks keep a key per query) in each input's dtype, with codes in range
    and small positive scales."""
    out = _plain_tests.example(ins)
    gen = torch.Generator().manual_seed(1)
    for k, n in enumerate(ins):
        if n.dtype in ("int8", "float8_e4m3fn"):  # codes in range
            t = (torch.rand(n.shape, generator=gen) * 254 - 127).round()
            out[k] = t.to(torch.int8) if n.dtype == "int8" else (t * 3).to(torch.float8_e4m3fn)
        elif n.dtype != "bool":
            out[k] = torch.rand(n.shape, generator=gen) * 0.05 if n.name.endswith("s") else out[k].to(getattr(torch, n.dtype))
    return out


def run_pass(g: Graph, inputs: list):
    """Run the pass; return its stats and the float64 outputs before and after."""
    before = interpret(g, inputs, compute_dtype=torch.float64)
    stats = fuse_attention(g)
    g.verify()
    return stats, before, interpret(g, inputs, compute_dtype=torch.float64)


@pytest.mark.parametrize("kw", [dict(), dict(codes="float8_e4m3fn"), dict(dtype="float32"), dict(which="k"), dict(which="v"),
                                dict(mask=False), dict(which="k", mask=False)], ids=repr)
def test_dequantized_cache_becomes_scale_inputs(kw):
    g, ins = dequantized_graph(**kw)
    which = kw.get("which", "kv")
    stats, before, after = run_pass(g, example(ins))
    assert stats.rules == {"dequantized_kv": 1} and not stats.declined
    assert g.histogram() == {"ATTENTION": 1}  # no CAST / MUL / RESHAPE left: nothing dequantized reaches memory
    (att,) = g.outputs
    assert (att.attrs["k_scale"], att.attrs["v_scale"]) == ("k" in which, "v" in which)
    scales = [n for n in ins if n.name in ("ks", "vs")]
    assert list(att.inputs[-len(scales):]) == scales and all(n in att.inputs for n in ins)
    for a, b in zip(after, before):
        assert rel_err(a, b) <= TOL[torch.float64]


@pytest.mark.parametrize("kw, reason", [
    (dict(codes="float16"), "k is a cast of float16 kc, not of quantized codes (float8_e4m3fn, int8)"),
    (dict(wide="float16"), "k's codes are dequantized in float16 with a float32 scale, not in float32"),
    (dict(scale_shape=(B, HK, 1)), "the k scale [2, 2, 1, 1] is not one per vector of the codes [2, 2, 11, 16]"),
], ids=["float16 values", "float16 product", "per-head scale"])
def test_near_misses_are_declined_with_their_reason(kw, reason):
    g, ins = dequantized_graph(which="k", **kw)
    hist = g.histogram()
    stats, before, after = run_pass(g, example(ins))
    assert stats.rewritten == 0 and g.histogram() == hist
    assert stats.declined[0]["rule"] == "dequantized_kv" and stats.declined[0]["reason"] == reason
    assert rel_err(after[0], before[0]) == 0


def test_a_dequantized_cache_read_elsewhere_stays():
    g, ins = dequantized_graph(which="k")
    deq = g.outputs[0].inputs[1]
    g.set_outputs(g.outputs + [deq])  # the dequantized cache is a graph output: it is computed anyway
    stats, _, _ = run_pass(g, example(ins))
    assert stats.rewritten == 0 and "has other users" in stats.declined[0]["reason"]


def step_attention(q, kc, ks, vc, vs, mask):
    """A quantized step's attention as LlamaStep writes it."""
    k, v = dequantize_kv(kc, ks, q.dtype), dequantize_kv(vc, vs, q.dtype)
    return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("kv", ["int8", "fp8"])
def test_captured_dequantize_kv_fuses(kv):
    gen = torch.Generator().manual_seed(1)
    (kc, ks), (vc, vs) = (quantize_kv(torch.randn(B, HK, S, D, generator=gen), kv) for _ in range(2))
    mask = torch.rand(B, 1, SQ, S, generator=gen) > 0.3
    mask[..., 0] = True
    args = (torch.randn(B, HQ, SQ, D, generator=gen).half(), kc, ks, vc, vs, mask)
    g = kiln.compile(step_attention, args, config=kiln.CompileConfig(disable=PASS_NAMES)).graph
    assert g.histogram()["CAST"] == 4 and g.histogram()["MUL"] == 2
    stats, before, after = run_pass(g, list(args))
    assert stats.rules == {"dequantized_kv": 1} and g.histogram() == {"ATTENTION": 1}
    assert rel_err(after[0], before[0]) <= TOL[torch.float64]
    assert torch.equal(interpret(g, list(args))[0], step_attention(*args))  # the fused reference is the unfused one
