"""passes.fuse_epilogue: activation, silu(gate) * up, gate and residual folded into GEMM — sites fired,
op counts, float64 parity before vs after, and the cases where it must not fire."""

import pytest
import torch

from kiln.ir.graph import Graph
from kiln.passes.fuse_epilogue import fuse_epilogue
from kiln.testing import check_pass

f64 = "float64"
gen = torch.Generator().manual_seed(0)


def w(*shape, dtype=torch.float64):
    return torch.randn(*shape, generator=gen, dtype=dtype)


def run_both(build, inputs):
    """Build twice, fuse one, compare in float64; returns (stats, fused graph, original)."""
    return check_pass(fuse_epilogue, build, inputs, gen)


def dit_block_tail():
    """residual + gate * gelu_tanh(x @ w1^T + b1) @ w2^T + b2  (DiT's MLP with its gated residual)."""
    g = Graph()
    x = g.add_input("x", (2, 5, 8), f64)
    gate = g.add_input("gate", (2, 1, 8), f64)
    h = g.add("LINEAR", [x, g.add_weight("w1", w(16, 8)), g.add_weight("b1", w(16))])
    h = g.add("GELU", [h], approximate="tanh")
    h = g.add("LINEAR", [h, g.add_weight("w2", w(8, 16)), g.add_weight("b2", w(8))])
    g.set_outputs([g.add("ADD", [x, g.add("MUL", [gate, h])])])
    return g


def test_dit_mlp_with_gated_residual_becomes_two_gemms():
    x, gate = torch.randn(2, 5, 8, dtype=torch.float64), torch.randn(2, 1, 8, dtype=torch.float64)
    stats, g, ref = run_both(dit_block_tail, [x, gate])
    assert ref.histogram() == {"LINEAR": 2, "GELU": 1, "MUL": 1, "ADD": 1}
    assert g.histogram() == {"GEMM": 2}
    assert stats.rules == {"activation": 1, "gate": 1, "residual": 1} and stats.rewritten == 3
    first, second = [n for n in g.nodes if n.op == "GEMM"]
    assert first.attrs["act"] == "gelu_tanh" and first.attrs["bias"]
    assert second.attrs["gate"] and second.attrs["residual"] and second.attrs["act"] == "none"


def llama_mlp(halves=True, extra_reader=False):
    """x + (silu(h[..., :16]) * h[..., 16:]) @ wd^T,  h = x @ [wg; wu]^T  (gate/up after horizontal fusion)."""
    g = Graph()
    x = g.add_input("x", (3, 8), f64)
    h = g.add("LINEAR", [x, g.add_weight("wgu", w(32, 8))])
    a, b = (0, 16), (16, 32) if halves else (0, 16)
    if not halves:
        a, b = (0, 16), (8, 24)
    gate = g.add("SLICE", [h], axis=1, start=a[0], end=a[1])
    up = g.add("SLICE", [h], axis=1, start=b[0], end=b[1])
    act = g.add("MUL", [g.add("SILU", [gate]), up])
    out = g.add("ADD", [g.add("LINEAR", [act, g.add_weight("wd", w(8, 16))]), x])
    g.set_outputs([out, h] if extra_reader else [out])
    return g


def test_silu_gate_times_up_becomes_a_glu_gemm():
    x = torch.randn(3, 8, dtype=torch.float64)
    stats, g, _ = run_both(llama_mlp, [x])
    assert g.histogram() == {"GEMM": 2}
    assert stats.rules == {"glu": 1, "residual": 1}
    glu = next(n for n in g.nodes if n.op == "GEMM" and n.attrs["glu"])
    assert glu.attrs["act"] == "silu" and glu.shape == (3, 16)


@pytest.mark.parametrize("case,reason", [
    ("not_halves", "not the first half"),
    ("extra_reader", "have other readers"),
])
def test_glu_declines(case, reason):
    x = torch.randn(3, 8, dtype=torch.float64)
    stats, g, _ = run_both(lambda: llama_mlp(halves=case != "not_halves", extra_reader=case == "extra_reader"), [x])
    assert not any(n.op == "GEMM" and n.attrs["glu"] for n in g.nodes)
    assert any(reason in d["reason"] for d in stats.declined), stats.declined


def test_a_matmul_with_two_readers_keeps_its_epilogue_apart():
    def build():
        g = Graph()
        x = g.add_input("x", (3, 8), f64)
        h = g.add("LINEAR", [x, g.add_weight("w", w(8, 8))])
        g.set_outputs([g.add("SILU", [h]), g.add("EXP", [h])])
        return g
    stats, g, _ = run_both(build, [torch.randn(3, 8, dtype=torch.float64)])
    assert stats.rewritten == 0 and g.histogram() == {"LINEAR": 1, "SILU": 1, "EXP": 1}
    assert any("has 2 readers" in d["reason"] for d in stats.declined)


def test_an_operand_that_widens_or_promotes_is_not_folded():
    def build():
        g = Graph()
        x = g.add_input("x", (1, 8), f64)
        big = g.add_input("big", (4, 8), f64)
        h = g.add("LINEAR", [x, g.add_weight("w", w(8, 8))])
        h2 = g.add("LINEAR", [x, g.add_weight("w2", w(8, 8))])
        f32 = g.add_input("f32", (1, 8), "float32")
        g.set_outputs([g.add("ADD", [h, big]), g.add("MUL", [h2, f32])])
        return g
    ins = [torch.randn(1, 8, dtype=torch.float64), torch.randn(4, 8, dtype=torch.float64), torch.randn(1, 8)]
    stats, g, _ = run_both(build, ins)
    assert stats.rewritten == 0 and "GEMM" not in g.histogram()
    reasons = " | ".join(d["reason"] for d in stats.declined)
    assert "widens the matmul result" in reasons and "the gate is float32, the matmul float64" in reasons
