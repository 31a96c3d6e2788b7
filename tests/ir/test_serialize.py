"""kiln.ir.serialize: a graph survives graph_to_json -> json text -> graph_from_json with every node,
attribute, symbolic shape, symbol range, output name and location intact, and computes the same
results; broken JSON is a GraphError that names what is wrong."""

import json
import math

import pytest
import sympy
import torch

from kiln.ir.graph import Graph, GraphError
from kiln.ir.interpret import interpret
from kiln.ir.serialize import GRAPH_FORMAT_VERSION, graph_from_json, graph_to_json
from kiln.ir.types import dims_equal, sym

BATCH, SEQ = sym("batch"), sym("seq")
NAN, INF = float("nan"), float("inf")


def rich_graph() -> Graph:
    """Many ops and every kind of attribute: -inf, nan, symbolic dims, nested tuples, bools, strings, None."""
    gen = torch.Generator().manual_seed(0)
    g = Graph()
    g.symbols = {"batch": (1, 4), "seq": (2, 64)}
    x = g.add_input("x", (BATCH, SEQ, 8), "float32")
    ids = g.add_input("ids", (BATCH, SEQ), "int64")
    table = g.add_weight("embed.weight", torch.randn(11, 8, generator=gen))
    wq = g.add_weight("attn.wq", torch.randn(8, 8, generator=gen))
    wb = g.add_weight("attn.bias", torch.randn(8, generator=gen).half())
    h = g.add("ADD", [x, g.add("EMBEDDING", [table, ids], loc="model.py:12 (embed)")], loc="model.py:13")
    q = g.add("LINEAR", [h, wq], name="q_proj")
    q = g.add("PERMUTE", [g.add("RESHAPE", [q], shape=(BATCH, SEQ, 2, 4))], perm=(0, 2, 1, 3))
    mask = g.add("TRIU", [g.add("FULL", [], shape=(SEQ, SEQ), value=-INF, dtype="float32")], diagonal=1)
    att = g.add("ATTENTION", [q, q, q, mask], scale=0.25)
    att_c = g.add("ATTENTION", [q, q, q], causal=True, gqa=True)
    y = g.add("RESHAPE", [g.add("PERMUTE", [g.add("SUB", [att, att_c])], perm=(0, 2, 1, 3))], shape=(BATCH, SEQ, 8))
    y = g.add("GELU", [y], approximate="tanh")
    y = g.add("CLAMP", [y], min=None, max=1e30)
    y = g.add("ADD", [y, g.add("CAST", [wb], dtype="float32")])
    shifted = g.add("SLICE", [y], axis=1, start=1, end=SEQ, step=1)
    head = g.add("SLICE", [y], axis=1, start=0, end=SEQ - 1)
    d = g.add("PAD", [g.add("SUB", [shifted, head])], pads=((0, 1), (2, 0)), value=-1.5)
    pos = g.add("MUL", [g.add("ARANGE", [], end=SEQ, dtype="float32"), g.const(SEQ - 1, name="seq_minus_1")])
    nan = g.add("ISNAN", [g.add("FULL", [], shape=(2, SEQ), value=NAN, dtype="float32")])
    big = g.add("MUL", [pos, g.const(-INF)])
    g.set_outputs([d, pos, nan, big, g.add("SUM", [d], axes=(0, 2), keepdim=True)],
                  ["delta", "positions", "all_nan", "minus_inf", "reduced"])
    g.verify()
    return g


def round_trip(g: Graph, weights=None) -> Graph:
    text = json.dumps(graph_to_json(g), allow_nan=False)  # strict JSON: no NaN / Infinity literals
    return graph_from_json(json.loads(text), weights=g.weights if weights is None else weights)


def attr_equal(a, b) -> bool:
    if isinstance(a, tuple):
        return isinstance(b, tuple) and len(a) == len(b) and all(attr_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, sympy.Expr):
        return isinstance(b, sympy.Expr) and dims_equal(a, b)
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    return type(a) is type(b) and a == b


def test_round_trip_keeps_every_node():
    g = rich_graph()
    g2 = round_trip(g)
    assert len(g2.nodes) == len(g.nodes)
    for n, m in zip(g.nodes, g2.nodes):
        assert (m.name, m.op, m.dtype, m.loc) == (n.name, n.op, n.dtype, n.loc)
        assert [i.name for i in m.inputs] == [i.name for i in n.inputs]
        assert len(m.shape) == len(n.shape) and all(dims_equal(d, e) for d, e in zip(m.shape, n.shape))
        assert m.attrs.keys() == n.attrs.keys()
        for k in n.attrs:
            assert attr_equal(m.attrs[k], n.attrs[k]), (n.name, k, n.attrs[k], m.attrs[k])
    assert g2.symbols == g.symbols
    assert [i.name for i in g2.inputs] == ["x", "ids"]
    assert [o.name for o in g2.outputs] == [o.name for o in g.outputs]
    assert g2.output_names == ["delta", "positions", "all_nan", "minus_inf", "reduced"]
    assert {n.loc for n in g2.nodes} == {None, "model.py:12 (embed)", "model.py:13"}
    assert graph_to_json(g2) == graph_to_json(g)  # a fixed point, not only similar


def test_round_trip_keeps_the_tricky_attributes():
    g2 = round_trip(rich_graph())
    by_name = {n.name: n for n in g2.nodes}
    full = next(n for n in g2.nodes if n.op == "FULL" and n.dtype == "float32" and n.attrs["value"] < 0)
    assert full.attrs["value"] == -INF
    assert any(n.op == "FULL" and math.isnan(n.attrs["value"]) for n in g2.nodes)
    assert dims_equal(by_name["slice_1"].attrs["end"], SEQ - 1)
    assert by_name["seq_minus_1"].attrs["value"] == SEQ - 1 and by_name["seq_minus_1"].dtype == "int64"
    assert by_name["pad"].attrs["pads"] == ((0, 1), (2, 0))
    assert by_name["reshape"].attrs["shape"] == (BATCH, SEQ, 2, 4)
    assert by_name["attention_1"].attrs == {"causal": True, "scale": None, "gqa": True, "k_scale": False, "v_scale": False,
                                            "softcap": None}
    assert by_name["gelu"].attrs == {"approximate": "tanh"}
    assert by_name["sum"].attrs == {"axes": (0, 2), "keepdim": True}


def test_round_trip_computes_the_same_results():
    g = rich_graph()
    g2 = round_trip(g)
    gen = torch.Generator().manual_seed(1)
    for batch, seq in ((2, 5), (3, 9)):
        xs = [torch.randn(batch, seq, 8, generator=gen), torch.randint(0, 11, (batch, seq), generator=gen)]
        for a, c in zip(interpret(g, xs), interpret(g2, xs)):
            assert a.shape == c.shape and a.dtype == c.dtype
            assert torch.equal(a.isnan(), c.isnan()) and torch.equal(a.nan_to_num(), c.nan_to_num())
        got = interpret(g2, xs)
        assert got[1].shape == (seq,) and bool(got[2].all())
        assert got[3][0].isnan() and bool((got[3][1:] == -INF).all())  # 0 * -inf, then k * -inf


def test_graph_from_json_without_weights_has_the_weight_types():
    g = rich_graph()
    g2 = graph_from_json(json.loads(json.dumps(graph_to_json(g))))
    assert not g2.weights
    w = next(n for n in g2.nodes if n.op == "WEIGHT" and n.attrs["name"] == "attn.bias")
    assert (w.shape, w.dtype) == ((8,), "float16")


# ----------------------------------------------------------------------------- errors


def _data():
    return json.loads(json.dumps(graph_to_json(rich_graph())))


def _node(data, name):
    return next(n for n in data["nodes"] if n["name"] == name)


def test_unknown_op():
    data = _data()
    _node(data, "gelu")["op"] = "FANCY_GELU"
    with pytest.raises(GraphError, match="node gelu: unknown op 'FANCY_GELU'"):
        graph_from_json(data)


def test_undefined_input_node():
    data = _data()
    _node(data, "gelu")["inputs"] = ["no_such_node"]
    with pytest.raises(GraphError, match="undefined node 'no_such_node'"):
        graph_from_json(data)


def test_undefined_output_node():
    data = _data()
    data["outputs"][1]["node"] = "vanished"
    with pytest.raises(GraphError, match="undefined node 'vanished'"):
        graph_from_json(data)


def test_newer_format_version():
    data = _data()
    data["version"] = GRAPH_FORMAT_VERSION + 1
    with pytest.raises(GraphError, match=f"version {GRAPH_FORMAT_VERSION + 1} is newer"):
        graph_from_json(data)


def test_not_a_kiln_graph():
    data = _data()
    del data["format"]
    with pytest.raises(GraphError, match="not a kiln graph"):
        graph_from_json(data)


def test_missing_weight():
    g = rich_graph()
    weights = {k: v for k, v in g.weights.items() if k != "attn.wq"}
    with pytest.raises(GraphError, match="weight 'attn.wq' is missing"):
        round_trip(g, weights)


@pytest.mark.parametrize("tensor,match", [
    (torch.zeros(8, 9), r"weight 'attn.wq' is torch.float32\[8, 9\], the graph expects float32\[8, 8\]"),
    (torch.zeros(8, 8, dtype=torch.bfloat16), r"weight 'attn.wq' is torch.bfloat16\[8, 8\], the graph expects float32"),
])
def test_weight_mismatch(tensor, match):
    g = rich_graph()
    with pytest.raises(GraphError, match=match):
        round_trip(g, {**g.weights, "attn.wq": tensor})


def test_a_stored_type_that_is_wrong_is_caught_on_load():
    data = _data()
    _node(data, "gelu")["dtype"] = "float16"
    with pytest.raises(GraphError, match=r"node %gelu \(GELU\): stored type float16"):
        graph_from_json(data, weights=rich_graph().weights)
