"""passes.fuse_conv: SiLU into GROUP_NORM, residual adds and constant divisions into CONV — sites fired, op counts,
float64 parity before vs after, and the cases where it must not fire."""

import torch

from kiln.ir.graph import Graph
from kiln.passes.fuse_conv import fuse_conv
from kiln.testing import check_pass

f64 = "float64"
gen = torch.Generator().manual_seed(0)


def w(*shape):
    return torch.randn(*shape, generator=gen, dtype=torch.float64)


def resnet_block(shortcut: bool = False, extra_readers: bool = False, divisor=1.0):
    """diffusers' ResnetBlock2D without time embedding: (x + conv2(silu(gn2(conv1(silu(gn1(x))))))) / divisor, with a
    1x1 conv on x when the channels change. ``extra_readers``: the first norm and the second conv are also outputs."""
    g = Graph()
    x = g.add_input("x", (2, 8, 5, 6), f64)
    cout = 4 if shortcut else 8
    h = g.add("GROUP_NORM", [x, g.add_weight("n1.w", w(8)), g.add_weight("n1.b", w(8))], groups=2, eps=1e-6)
    n1 = h
    h = g.add("SILU", [h])
    h = g.add("CONV2D", [h, g.add_weight("c1.w", w(cout, 8, 3, 3)), g.add_weight("c1.b", w(cout))], padding=(1, 1))
    h = g.add("SILU", [g.add("GROUP_NORM", [h, g.add_weight("n2.w", w(cout)), g.add_weight("n2.b", w(cout))], groups=2, eps=1e-6)])
    h = g.add("CONV2D", [h, g.add_weight("c2.w", w(cout, cout, 3, 3)), g.add_weight("c2.b", w(cout))], padding=(1, 1))
    c2 = h
    r = g.add("CONV2D", [x, g.add_weight("sc.w", w(cout, 8, 1, 1)), g.add_weight("sc.b", w(cout))]) if shortcut else x
    out = g.add("DIV", [g.add("ADD", [r, h]), g.const(divisor)], rounding=None)
    g.set_outputs([out, n1, c2] if extra_readers else [out])
    return g


def run_both(build):
    return check_pass(fuse_conv, build, [torch.randn(2, 8, 5, 6, generator=gen, dtype=torch.float64) * 2 + 1], gen)


def test_a_resnet_block_becomes_two_norms_and_two_convs():
    stats, g, ref = run_both(resnet_block)
    assert ref.histogram() == {"GROUP_NORM": 2, "SILU": 2, "CONV2D": 2, "ADD": 1, "DIV": 1}
    assert g.histogram() == {"GROUP_NORM": 2, "CONV2D": 1, "CONV": 1}
    assert stats.rules == {"group_norm_silu": 2, "residual": 1, "divisor": 1} and stats.rewritten == 4
    assert all(n.attrs["act"] == "silu" for n in g.nodes if n.op == "GROUP_NORM")
    (conv,) = [n for n in g.nodes if n.op == "CONV"]
    assert conv.attrs["bias"] and conv.attrs["residual"] and conv.attrs["divisor"] == 1.0 and conv.attrs["padding"] == (1, 1)


def test_a_shortcut_conv_and_a_real_divisor():
    """(conv_shortcut(x) + h) / 2: one of the two convs takes the other as its residual, then the division."""
    stats, g, _ = run_both(lambda: resnet_block(shortcut=True, divisor=2))
    assert g.histogram() == {"GROUP_NORM": 2, "CONV2D": 2, "CONV": 1}
    (conv,) = [n for n in g.nodes if n.op == "CONV"]
    assert conv.inputs[-1].op == "CONV2D" and conv.attrs["divisor"] == 2.0
    assert stats.rules == {"group_norm_silu": 2, "residual": 1, "divisor": 1}


def test_values_with_other_readers_are_not_fused():
    stats, g, _ = run_both(lambda: resnet_block(extra_readers=True))
    # the first norm's SiLU stays, and the second conv's residual add and division (its result is an output too)
    assert g.histogram() == {"GROUP_NORM": 2, "SILU": 1, "CONV2D": 2, "ADD": 1, "DIV": 1}
    assert stats.rules == {"group_norm_silu": 1}
    assert any("has 2 readers" in d["reason"] for d in stats.declined), stats.declined


def test_a_residual_that_widens_a_divisor_that_varies_an_add_after_a_division():
    def build():
        g = Graph()
        x = g.add_input("x", (2, 8, 5, 6), f64)
        c = [g.add("CONV2D", [x, g.add_weight(f"w{k}", w(8, 8, 1, 1))]) for k in range(3)]
        wide = g.add("ADD", [c[0], g.add_weight("big", w(3, 2, 8, 5, 6))])  # [3, 2, 8, 5, 6]: widens
        by_input = g.add("DIV", [c[1], g.add_input("d", (), f64)], rounding=None)  # not a constant
        after = g.add("ADD", [g.add("DIV", [c[2], g.const(2.0)], rounding=None), x])  # (conv / 2) + x: not (x + conv) / 2
        g.set_outputs([wide, by_input, after])
        return g

    ins = [torch.randn(2, 8, 5, 6, generator=gen, dtype=torch.float64), torch.tensor(3.0, dtype=torch.float64)]
    stats, g, _ = check_pass(fuse_conv, build, ins, gen)
    assert stats.rules == {"divisor": 1}  # only c2 / 2
    assert g.histogram() == {"CONV2D": 2, "CONV": 1, "ADD": 2, "DIV": 1}
    reasons = " | ".join(d["reason"] for d in stats.declined)
    assert "widens the conv result" in reasons and "already has a divisor: the add would come after it" in reasons
