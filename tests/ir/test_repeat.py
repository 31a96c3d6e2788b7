"""kiln.ir.repeat: a graph of two captured layers repeated to n equals the graph built with n layers (node for node,
names, weights bound to the same tensors; the reference interpreter agrees in float64), and the repeat declines, with
its reason, where the layers are not one program: a layer that differs, a tail reading inside the last layer, a layer
reading inside the one before, weights not numbered by layer, a new layer's weight of another shape."""
import pytest
import torch

from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.ir.repeat import NewLayer, RepeatError, repeat_layers
from kiln.ir.serialize import graph_to_json
from kiln.ir.types import sym
from kiln.testing import TOL, rel_err

SEQ = sym("seq")
D = 6


def rnd(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


EMB, OUT = rnd(D, D), rnd(5, D, seed=1)
LIN = [rnd(D, D, seed=10 + i) for i in range(6)]
SCALE = [rnd(D, seed=20 + i) for i in range(6)]


def layer(g, x, cache, lin, scale, half, act="SILU", lin_in=None):
    """x + act(u) * (scale * 0.5) + t with t = silu(x), u = cache + linear(t, lin) the cache's new value (``lin_in``: the
    LINEAR reads that instead of t)."""
    t = g.add("SILU", [x])  # reads only the residual stream, as a norm's statistics do
    u = g.add("ADD", [cache, g.add("LINEAR", [lin_in or t, lin])])
    y = g.add("MUL", [g.add(act, [u]), g.add("MUL", [scale, half])])
    return g.add("ADD", [g.add("ADD", [x, y]), t]), u, t


def model(n, odd=None, tail_inside=False, read_first=False, names="w_{}"):
    """n layers between an input projection and an output projection, weights numbered in first-use order as torch.export
    numbers the tensors it lifts. ``odd``: that layer takes SIN for its act; ``tail_inside``: the output also reads the last
    layer's t; ``read_first``: every layer's LINEAR reads layer 0's t."""
    g = Graph()
    g.symbols = {"seq": (1, 16)}
    x = g.add_input("x", (SEQ, D), "float64")
    caches = [g.add_input(f"cache_{i}", (SEQ, D), "float64") for i in range(n)]
    emb = g.add_weight(names.format(0), EMB)
    ws = [(g.add_weight(names.format(1 + 2 * i), LIN[i]), g.add_weight(names.format(2 + 2 * i), SCALE[i])) for i in range(n)]
    out = g.add_weight(names.format(1 + 2 * n), OUT)
    half = g.const(0.5)
    h, updates, first = g.add("LINEAR", [x, emb]), [], None
    for i in range(n):
        h, u, t = layer(g, h, caches[i], *ws[i], half, "SIN" if i == odd else "SILU", first if read_first else None)
        first = first or t
        updates.append(u)
    y = g.add("LINEAR", [g.add("ADD", [h, t]) if tail_inside else h, out])
    g.set_outputs(updates + [y], [f"cache_{i}:updated" for i in range(n)] + ["output"])
    g.updates = {f"cache_{i}:updated": f"cache_{i}" for i in range(n)}
    g.verify()
    return g


def owners(n=2, names="w_{}"):
    return {**{names.format(1 + 2 * i): (i, "lin") for i in range(n)}, **{names.format(2 + 2 * i): (i, "scale") for i in range(n)},
            **{f"cache_{i}": (i, "cache") for i in range(n)}}


def new_layers(first, end):
    return [NewLayer({"lin": LIN[i], "scale": SCALE[i]}, {"cache": f"cache_{i}"}) for i in range(first, end)]


def assert_same_graph(got: Graph, want: Graph):
    """Node for node (names, ops, attrs, types, inputs, locations), the same interface, weights in the same order bound to
    the very same tensors."""
    assert graph_to_json(got) == graph_to_json(want)
    assert list(got.weights) == list(want.weights)
    assert all(got.weights[k] is want.weights[k] for k in want.weights)


@pytest.mark.parametrize("depth", [3, 5])
def test_two_layers_repeated_equal_the_graph_built_whole(depth):
    captured = model(2)
    before = graph_to_json(captured)
    got = repeat_layers(captured, owners(), new_layers(2, depth))
    assert graph_to_json(captured) == before  # (the captured graph is left as it was)
    want = model(depth)
    assert_same_graph(got, want)
    assert got.histogram() == {"SILU": 2 * depth, "LINEAR": depth + 2, "ADD": 3 * depth, "MUL": 2 * depth}
    inputs = [rnd(7, D, seed=100 + k) for k in range(depth + 1)]
    for a, b in zip(interpret(got, inputs, compute_dtype=torch.float64), interpret(want, inputs, compute_dtype=torch.float64)):
        assert rel_err(a, b) <= TOL[torch.float64]


def test_no_new_layer_gives_the_same_graph():
    assert_same_graph(repeat_layers(model(2), owners(), []), model(2))


@pytest.mark.parametrize("captured,own,new,reason", [
    (model(2, odd=1), owners(), new_layers(2, 4), "the layers differ: %sin"),
    (model(2, tail_inside=True), owners(), new_layers(2, 4), "inside the last captured layer, is read after it"),
    (model(2, read_first=True), owners(), new_layers(2, 4), "reads a value computed inside layer a"),
    (model(2, names="layer{}.w"), owners(names="layer{}.w"), new_layers(2, 4), "is not <prefix><number>"),
    (model(2), owners(), [NewLayer({"lin": LIN[2][:3], "scale": SCALE[2]}, {"cache": "cache_2"})], "new layer 0's lin is"),
    (model(2), {k: v for k, v in owners().items() if k != "cache_1"}, new_layers(2, 4), "different weights or inputs"),
], ids=["layer-differs", "tail-reads-inside", "reads-inside-layer-a", "weights-not-numbered", "new-weight-shape", "inputs-differ"])
def test_declines_with_the_reason(captured, own, new, reason):
    with pytest.raises(RepeatError, match=reason.replace("(", r"\(")):
        repeat_layers(captured, own, new)
