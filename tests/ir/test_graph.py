"""kiln.ir.graph: building, names, users bookkeeping, rewrites, dead code, topological order, the
verifier (one broken invariant at a time) and the float64 reference interpreter."""

import pytest
import torch
import torch.nn.functional as F

from kiln.ir.graph import Graph, GraphError
from kiln.ir.interpret import interpret
from kiln.ir.ops import ShapeError
from kiln.ir.types import TType, sym
from kiln.testing import TOL, rel_err

SEQ = sym("seq")


def users_are_consistent(g: Graph) -> bool:
    """Every node's users are exactly the nodes of the graph that read it."""
    for n in g.nodes:
        readers = [u for u in g.nodes if n in u.inputs]
        if list(n.users) != readers and set(n.users) != set(readers):
            return False
    return True


def mlp():
    """x[seq, 6] -> LINEAR(w1) -> SILU -> LINEAR(w2) + x."""
    gen = torch.Generator().manual_seed(0)
    g = Graph()
    g.symbols = {"seq": (1, 32)}
    x = g.add_input("x", (SEQ, 6), "float32")
    w1 = g.add_weight("mlp.w1", torch.randn(10, 6, generator=gen))
    w2 = g.add_weight("mlp.w2", torch.randn(6, 10, generator=gen))
    h = g.add("SILU", [g.add("LINEAR", [x, w1])])
    y = g.add("ADD", [g.add("LINEAR", [h, w2]), x])
    g.set_outputs([y], ["y"])
    return g, x, y


def mlp_reference(g, x):
    w1, w2 = g.weights["mlp.w1"], g.weights["mlp.w2"]
    return F.linear(F.silu(F.linear(x, w1)), w2) + x


# ----------------------------------------------------------------------------- building


def test_names_are_unique():
    g = Graph()
    x = g.add_input("x", (3,), "float32")
    a, c = g.add("NEG", [x]), g.add("NEG", [x])
    d = g.add("EXP", [a], name="x")
    w = g.add_weight("layers.0.w", torch.zeros(3))
    assert (a.name, c.name, d.name, w.name) == ("neg", "neg_1", "x_1", "layers_0_w")
    assert len({n.name for n in g.nodes}) == len(g.nodes)
    with pytest.raises(GraphError, match="duplicate input name 'x'"):
        g.add_input("x", (3,), "float32")


def test_add_fills_defaults_and_rejects_bad_attrs_and_inputs():
    g = Graph()
    x = g.add_input("x", (3, 4), "float32")
    s = g.add("SLICE", [x], axis=1, start=0, end=2)
    assert s.attrs == {"axis": 1, "start": 0, "end": 2, "step": 1}
    assert g.add("RESHAPE", [x], shape=[4, 3]).attrs["shape"] == (4, 3)  # lists become tuples
    with pytest.raises(GraphError, match="unknown op 'FROB'"):
        g.add("FROB", [x])
    with pytest.raises(GraphError, match="unknown attribute"):
        g.add("NEG", [x], axis=0)
    with pytest.raises(GraphError, match="missing attribute 'axes'"):
        g.add("SUM", [x])
    with pytest.raises(GraphError, match="is not a Node"):
        g.add("NEG", [torch.zeros(3)])
    with pytest.raises(GraphError, match="add_input / add_weight / const"):
        g.add("CONST", [], value=1)
    with pytest.raises(ShapeError):
        g.add("MATMUL", [x, x])


def test_add_weight_is_one_node_per_name():
    g = Graph()
    w = g.add_weight("w", torch.ones(2, 3, dtype=torch.bfloat16))
    assert g.add_weight("w", torch.zeros(9)) is w
    assert w.type == TType((2, 3), "bfloat16")
    t = g.add_weight("typed", ttype=TType((4,), "float16"))
    assert t.type == TType((4,), "float16") and "typed" not in g.weights
    with pytest.raises(GraphError, match="needs a tensor or a type"):
        g.add_weight("none")


def test_users_bookkeeping():
    g = Graph()
    x = g.add_input("x", (3,), "float32")
    sq = g.add("MUL", [x, x])  # reads x twice: one user entry
    n = g.add("NEG", [x])
    s = g.add("ADD", [sq, n])
    assert list(x.users) == [sq, n]
    assert list(sq.users) == [s] and list(n.users) == [s] and not s.users
    assert users_are_consistent(g)


def test_set_input_keeps_users_right():
    g = Graph()
    x, y = g.add_input("x", (3,), "float32"), g.add_input("y", (3,), "float32")
    sq = g.add("MUL", [x, x])
    g.set_outputs([sq])
    g.set_input(sq, 0, y)  # x is still read through the second input
    assert sq.inputs == (y, x) and sq in x.users and sq in y.users
    g.set_input(sq, 1, y)
    assert sq.inputs == (y, y) and sq not in x.users
    assert users_are_consistent(g)
    g.verify()
    a, c = torch.randn(3), torch.randn(3)
    assert torch.equal(interpret(g, [a, c])[0], c * c)


# ----------------------------------------------------------------------------- replace_all_uses


def test_replace_all_uses_moves_users_and_outputs():
    g = Graph()
    x = g.add_input("x", (2, 3), "float32")
    old = g.add("EXP", [x])
    u1, u2 = g.add("NEG", [old]), g.add("MUL", [old, old])
    new = g.add("SIGMOID", [x])
    g.set_outputs([u1, old, u2, old])
    assert g.replace_all_uses(old, new) == 4  # two users, two outputs
    assert not old.users and list(new.users) == [u1, u2]
    assert u2.inputs == (new, new) and g.outputs == [u1, new, u2, new]
    assert users_are_consistent(g)
    g.toposort()
    g.verify()
    assert g.remove_dead() == 1 and old not in g.nodes
    t = torch.randn(2, 3)
    got = interpret(g, [t])
    s = torch.sigmoid(t)
    for a, want in zip(got, [-s, s, s * s, s]):
        assert torch.equal(a, want)
    assert g.replace_all_uses(new, new) == 0


def test_replace_all_uses_with_a_node_that_reads_the_old_one():
    """Putting new = f(old) in old's place: new keeps reading old (no node reads itself)."""
    g = Graph()
    x = g.add_input("x", (4,), "float32")
    old = g.add("EXP", [x])
    user = g.add("NEG", [old])
    g.set_outputs([user, old])
    new = g.add("CLAMP", [old], max=2.0)
    assert g.replace_all_uses(old, new) == 2
    assert new.inputs == (old,) and list(old.users) == [new] and user.inputs == (new,)
    g.toposort()  # new was appended after old's users
    g.verify()
    t = torch.tensor([-1.0, 0.0, 0.5, 2.0])
    got = interpret(g, [t])
    assert torch.equal(got[0], -t.exp().clamp(max=2.0)) and torch.equal(got[1], t.exp().clamp(max=2.0))


@pytest.mark.parametrize("shape,dtype", [((2, 4), "float32"), ((2, 3), "float16"), ((6,), "float32")])
def test_replace_all_uses_rejects_another_type(shape, dtype):
    g = Graph()
    old = g.add("NEG", [g.add_input("x", (2, 3), "float32")])
    new = g.add("NEG", [g.add_input("y", shape, dtype)])
    g.add("EXP", [old])
    with pytest.raises(GraphError, match="types differ"):
        g.replace_all_uses(old, new)


def test_replace_all_uses_accepts_an_equal_symbolic_shape():
    g = Graph()
    g.symbols = {"seq": (1, 9)}
    x, y = g.add_input("x", (2 * SEQ,), "float32"), g.add_input("y", (SEQ, 2), "float32")
    a = g.add("RESHAPE", [y], shape=(SEQ + SEQ,))
    g.set_outputs([g.add("NEG", [x])])
    assert g.replace_all_uses(x, a) == 1  # 2*seq and seq + seq are the same dim
    g.verify()
    t = torch.randn(3, 2)
    assert torch.equal(interpret(g, [torch.zeros(6), t])[0], -t.reshape(6))


# ----------------------------------------------------------------------------- remove_dead


def test_remove_dead_drops_nodes_users_and_weights():
    g, x, y = mlp()
    unused_input = g.add_input("unused", (4,), "float32")
    w3 = g.add_weight("dead.w", torch.randn(6, 6))
    dead = g.add("LINEAR", [x, w3])
    dead2 = g.add("RELU", [dead])
    before = len(g.nodes)
    assert g.remove_dead() == 3  # dead2, dead, w3
    assert len(g.nodes) == before - 3 and dead not in g.nodes and dead2 not in g.nodes
    assert "dead.w" not in g.weights and set(g.weights) == {"mlp.w1", "mlp.w2"}
    assert dead not in x.users and unused_input in g.nodes
    assert users_are_consistent(g)
    g.verify()
    assert g.add_weight("dead.w", torch.zeros(2)).shape == (2,)  # the name is free again
    t = torch.randn(5, 6)
    (got,) = interpret(g, [t, torch.zeros(4)])
    assert rel_err(got, mlp_reference(g, t)) <= TOL[torch.float32]
    assert g.remove_dead() == 1  # the new weight node


# ----------------------------------------------------------------------------- toposort


def test_toposort_after_rewiring_to_a_later_node():
    g = Graph()
    x = g.add_input("x", (3,), "float32")
    a = g.add("NEG", [x])
    c = g.add("EXP", [a])
    out = g.add("MUL", [c, a])
    g.set_outputs([out])
    late = g.add("RELU", [x])  # appended last; c and out are then made to read it
    g.set_input(c, 0, late)
    g.set_input(out, 1, late)
    with pytest.raises(GraphError, match=r"input %relu is not defined before it"):
        g.verify()
    g.toposort()
    g.verify()
    order = [n.name for n in g.nodes]
    assert order.index("relu") < order.index("exp") < order.index("mul")
    assert order.index("x") < order.index("neg")  # a still-valid order is kept
    t = torch.randn(3)
    assert torch.equal(interpret(g, [t])[0], torch.exp(torch.relu(t)) * torch.relu(t))


def test_toposort_detects_a_cycle():
    g = Graph()
    x = g.add_input("x", (3,), "float32")
    a = g.add("NEG", [x])
    c = g.add("EXP", [a])
    d = g.add("ADD", [c, x])
    g.set_outputs([d])
    g.set_input(a, 0, d)  # a -> c -> d -> a
    with pytest.raises(GraphError, match="cycle"):
        g.toposort()


# ----------------------------------------------------------------------------- the verifier


def _wrong_shape(g):
    n = next(n for n in g.nodes if n.op == "SILU")
    n.shape = (n.shape[0], 11)


def _wrong_dtype(g):
    next(n for n in g.nodes if n.op == "ADD").dtype = "float16"


def _set(attr, value, op):
    def breaker(g):
        setattr(next(n for n in g.nodes if n.op == op), attr, value)
    return breaker


def _move_first_use_to_the_end(g):
    n = next(n for n in g.nodes if n.op == "SILU")
    g.nodes.remove(n)
    g.nodes.append(n)


def _drop_user(g):
    x = g.inputs[0]
    x.users.pop(next(iter(x.users)))


def _bad_attrs(g):
    next(n for n in g.nodes if n.op == "SILU").attrs = {"axis": 1}


BREAKERS = [
    pytest.param(_move_first_use_to_the_end, "input %silu is not defined before it", id="defined-after-use"),
    pytest.param(_wrong_shape, "stored type float32[seq, 11], inferred float32[seq, 10]", id="stored-shape"),
    pytest.param(_wrong_dtype, "stored type float16[seq, 6], inferred float32[seq, 6]", id="stored-dtype"),
    pytest.param(_set("op", "FROB", "SILU"), "(FROB): unknown op", id="unknown-op"),
    pytest.param(lambda g: g.symbols.pop("seq"), "undeclared symbol(s) seq", id="undeclared-symbol"),
    pytest.param(lambda g: next(n for n in g.nodes if n.op == "CONST").attrs.update(value=sym("n") + 1),
                 "node %c (CONST): undeclared symbol(s) n", id="undeclared-symbol-in-attr"),
    pytest.param(lambda g: g.inputs.clear(), "node %x (INPUT): not one of the graph inputs", id="input-not-listed"),
    pytest.param(lambda g: g.weights.pop("mlp.w2"), "no weight named 'mlp.w2'", id="missing-weight"),
    pytest.param(lambda g: g.weights.update({"mlp.w1": torch.zeros(10, 7)}),
                 "weight is float32[10, 7], node says float32[10, 6]", id="weight-shape"),
    pytest.param(lambda g: g.weights.update({"mlp.w1": torch.zeros(10, 6, dtype=torch.float16)}),
                 "weight is float16[10, 6], node says float32[10, 6]", id="weight-dtype"),
    pytest.param(lambda g: g.symbols.update({"seq": (8, 2)}), "symbol seq: bad range [8, 2]", id="range-reversed"),
    pytest.param(lambda g: g.symbols.update({"seq": (-1, 2)}), "symbol seq: bad range [-1, 2]", id="range-negative"),
    pytest.param(_set("name", "x", "SILU"), "duplicate name", id="duplicate-name"),
    pytest.param(_drop_user, "missing from the users of %x", id="users-missing"),
    pytest.param(lambda g: g.inputs[0].users.update({g.outputs[0]: None}), "which does not read it", id="users-extra"),
    pytest.param(_bad_attrs, "unknown attribute(s) axis", id="attrs-unknown"),
    pytest.param(lambda g: next(n for n in g.nodes if n.op == "CONST").attrs.update(value=2.5),
                 "type does not match its value", id="const-type"),
    pytest.param(lambda g: g.outputs.append(Graph().add_input("z", (1,), "float32")), "is not a node of the graph",
                 id="foreign-output"),
    pytest.param(lambda g: g.output_names.append("extra"), "output_names and outputs differ", id="output-names"),
    pytest.param(lambda g: g.inputs.append(next(n for n in g.nodes if n.op == "SILU")), "is not an INPUT node",
                 id="input-not-input"),
]


@pytest.mark.parametrize("breaker,match", BREAKERS)
def test_verify_catches(breaker, match):
    g, x, y = mlp()
    g.set_outputs([g.add("MUL", [y, g.const(3)])], ["y"])
    g.verify()
    breaker(g)
    with pytest.raises(GraphError) as e:
        g.verify()
    assert match in str(e.value)


# ----------------------------------------------------------------------------- interpret


def test_interpret_float64_matches_a_float64_reference():
    """A bf16 graph run with compute_dtype=float64: every float value, weights and casts included, is float64."""
    gen = torch.Generator().manual_seed(1)
    g = Graph()
    g.symbols = {"seq": (2, 16)}
    x = g.add_input("x", (SEQ, 12), "bfloat16")
    w = g.add_weight("w", torch.randn(9, 12, generator=gen).bfloat16())
    nw = g.add_weight("norm", torch.rand(9, generator=gen).bfloat16() + 0.5)
    h = g.add("RMSNORM", [g.add("LINEAR", [x, w]), nw], eps=1e-6)
    mask = g.add("TRIU", [g.add("FULL", [], shape=(SEQ, 9), value=float("-inf"), dtype="bfloat16")], diagonal=1)
    p = g.add("SOFTMAX", [g.add("ADD", [g.add("MUL", [h, g.const(0.5)]), mask])], axis=1)
    y = g.add("CAST", [g.add("CAST", [p, ], dtype="float32")], dtype="bfloat16")
    g.set_outputs([y])
    g.verify()

    t = torch.randn(7, 12, generator=gen).bfloat16()
    w64, nw64, t64 = g.weights["w"].double(), g.weights["norm"].double(), t.double()
    z = F.linear(t64, w64)
    z = z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-6) * nw64
    want = torch.softmax(z * 0.5 + torch.full((7, 9), float("-inf"), dtype=torch.float64).triu(1), dim=1)

    (got64,) = interpret(g, [t], compute_dtype=torch.float64)
    assert got64.dtype == torch.float64
    assert rel_err(got64, want) <= TOL[torch.float64]
    (got,) = interpret(g, [t])
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) <= TOL[torch.bfloat16]


def test_interpret_with_other_weights():
    g, x, y = mlp()
    other = {k: torch.randn_like(v) for k, v in g.weights.items()}
    t = torch.randn(3, 6)
    (got,) = interpret(g, [t], weights=other)
    want = F.linear(F.silu(F.linear(t, other["mlp.w1"])), other["mlp.w2"]) + t
    assert rel_err(got, want) <= TOL[torch.float32]


def test_rename_weights():
    g = Graph()
    x = g.add_input("x", (2, 4), "float32")
    a, b = g.add_weight("lifted_tensor_0", torch.ones(3, 4)), g.add_weight("lifted_tensor_1", torch.zeros(3, 4))
    g.set_outputs([g.add("LINEAR", (x, a)), g.add("LINEAR", (x, b))])
    g.weight_parts["lifted_tensor_0"] = (("lifted_tensor_1", 0, 3),)
    g.rename_weights({"lifted_tensor_0": "q.weight", "lifted_tensor_1": "k.weight"})
    assert list(g.weights) == ["q.weight", "k.weight"] and a.attrs["name"] == "q.weight" and b.attrs["name"] == "k.weight"
    assert g.add_weight("q.weight") is a and g.weight_parts == {"q.weight": (("k.weight", 0, 3),)}
    g.verify()
    g.rename_weights({"q.weight": "k.weight", "k.weight": "q.weight"})  # a swap names no weight twice
    assert g.weights["k.weight"].sum() == 12 and a.attrs["name"] == "k.weight"
    with pytest.raises(GraphError, match=r"\['q.weight'\] would name two weights"):
        g.rename_weights({"k.weight": "q.weight"})
