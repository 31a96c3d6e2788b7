"""kiln.passes.pattern: patterns match like the math (commutative operands, optional casts, captures),
guards decline with a reason, shared intermediates block a rewrite, statistics per rule."""

import torch

from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.passes.pattern import A, C, O, Rule, V, first_match, maybe_cast, rewrite

f32 = "float32"


def rms_graph(swap=False, cast=False, eps=1e-6, axes=(2,), extra_user=False):
    g = Graph()
    x = g.add_input("x", (2, 3, 8), f32)
    w = g.add_weight("w", torch.randn(8, dtype=torch.float32))
    sq = g.add("POW", [x, g.const(2)])
    mean = g.add("MEAN", [sq], axes=axes, keepdim=True)
    r = g.add("RSQRT", [g.add("ADD", [g.const(eps), mean] if swap else [mean, g.const(eps)])])
    y = g.add("MUL", [r, x] if swap else [x, r])
    if cast:
        y = g.add("CAST", [g.add("CAST", [y], dtype="float64")], dtype=f32)
    out = g.add("MUL", [w, y] if not swap else [y, w])
    g.set_outputs([out, mean] if extra_user else [out])
    return g


x = V("x")
RMS = V("w") * maybe_cast(x * O.RSQRT(O.MEAN(x ** 2, axes=A("axes"), keepdim=True) + C("eps")), "dtype")


def rule(guard=lambda m: None):
    return Rule("rms", RMS, lambda g, m: g.add("RMSNORM", [m["x"], m["w"]], eps=m["eps"]), guard)


def test_captures_nodes_attrs_and_constants_in_either_operand_order():
    for swap in (False, True):
        g = rms_graph(swap=swap)
        m = first_match(RMS, g.outputs[0])
        assert m is not None and m["x"] is g.inputs[0] and m["eps"] == 1e-6 and m["axes"] == (2,) and m["dtype"] is None
        assert len(m.interior) == 6 and m.root is g.outputs[0]


def test_a_name_used_twice_must_be_the_same_node():
    g = Graph()
    a, b = g.add_input("a", (4,), f32), g.add_input("b", (4,), f32)
    assert first_match(V("x") * V("x"), g.add("MUL", [a, b])) is None
    assert first_match(V("x") * V("x"), g.add("MUL", [a, a])) is not None


def test_optional_cast_is_captured():
    g = rms_graph(cast=True)
    assert first_match(RMS, g.outputs[0]) is None  # two casts: the pattern allows one
    g = Graph()
    x_ = g.add_input("x", (3, 8), f32)
    c = g.add("CAST", [g.add("EXP", [x_])], dtype="float16")
    m = first_match(maybe_cast(O.EXP(V("x")), "dtype"), c)
    assert m["dtype"] == "float16" and m["x"] is x_


def test_rewrite_fires_keeps_numbers_and_counts_per_rule():
    g = rms_graph()
    x_ = torch.randn(2, 3, 8)
    want = interpret(g, [x_], compute_dtype=torch.float64)[0]
    stats = rewrite(g, [rule()])
    assert stats.rewritten == 1 and stats.rules == {"rms": 1} and not stats.declined
    assert g.histogram() == {"RMSNORM": 1}
    got = interpret(g, [x_], compute_dtype=torch.float64)[0]
    assert torch.allclose(got, want, rtol=1e-12, atol=1e-12)


def test_guard_declines_with_its_reason_once():
    g = rms_graph(axes=(1,))
    stats = rewrite(g, [rule(lambda m: None if m["axes"] == (2,) else f"normalises axes {m['axes']}, not the last")])
    assert stats.rewritten == 0
    assert [d["reason"] for d in stats.declined] == ["normalises axes (1,), not the last"]
    assert stats.declined[0]["rule"] == "rms" and "RMSNORM" not in g.histogram()


def test_an_intermediate_with_another_user_blocks_the_rewrite():
    g = rms_graph(extra_user=True)
    stats = rewrite(g, [rule()])
    assert stats.rewritten == 0 and "has other users" in stats.declined[0]["reason"]
    assert Rule("rms", RMS, rule().build, shared_ok=True) and rewrite(g, [Rule("rms", RMS, rule().build, shared_ok=True)]).rewritten == 1


def test_consumers_first_so_the_larger_pattern_wins():
    g = rms_graph()
    small = Rule("unweighted", x * O.RSQRT(O.MEAN(x ** 2, axes=A("axes"), keepdim=True) + C("eps")),
                 lambda g, m: g.add("RMSNORM", [m["x"]], eps=m["eps"]))
    stats = rewrite(g, [small, rule()])
    assert stats.rules == {"rms": 1}


def _scaled():
    """y = x * w: the rule wants w to be the weight; matched as written, the pattern's first operand order binds
    w to the input x."""
    g = Graph()
    x_ = g.add_input("x", (3, 8), f32)
    w = g.add_weight("w", torch.randn(8, dtype=torch.float32))
    g.set_outputs([g.add("MUL", [x_, w])])
    return g, x_, w


SCALE = V("w") * V("x")


def test_a_declined_match_lets_the_other_operand_order_fire():
    g, x_, w = _scaled()
    assert first_match(SCALE, g.outputs[0])["w"] is x_  # the first match: its guard declines below
    r = Rule("scale", SCALE, lambda g, m: g.add("DIV", [m["x"], g.add("RECIPROCAL", [m["w"]])]),
             lambda m: None if m["w"].op == "WEIGHT" else f"{m['w'].name} is not a weight")
    stats = rewrite(g, [r])
    assert stats.rules == {"scale": 1} and not stats.declined
    assert g.histogram() == {"RECIPROCAL": 1, "DIV": 1} and g.outputs[0].inputs[1].inputs[0] is w


def test_when_every_match_declines_the_near_misses_are_kept():
    g, x_, w = _scaled()
    r = Rule("scale", SCALE, lambda g, m: g.add("DIV", [m["x"], m["w"]]), lambda m: f"no: w is {m['w'].name}")
    stats = rewrite(g, [r])
    assert stats.rewritten == 0 and len(stats.declined) == 1
    assert stats.declined[0]["reason"] == "no: w is x" and stats.declined[0]["also"] == ["no: w is w"]


def test_rules_are_indexed_by_their_root_op():
    from kiln.passes.pattern import RuleIndex

    mul, anything, cast = Rule("m", SCALE, None), Rule("v", V("x"), None), Rule("c", maybe_cast(O.EXP(V("x"))), None)
    index = RuleIndex([mul, anything, cast])
    assert index("MUL") == [mul, anything] and index("ADD") == [anything]
    assert index("CAST") == [anything, cast] and index("EXP") == [anything, cast]
