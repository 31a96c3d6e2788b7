"""passes/calibrate.py: observe_inputs hands a watched node its input; where that input is the last row of a token axis
followed by views and row-wise ops (a step graph's x[:, -1] -> RMSNORM -> LM head), every row, normalised."""
import torch

from kiln.ir.graph import Graph
from kiln.ir.ops import rmsnorm_ref
from kiln.ir.types import sym
from kiln.passes.calibrate import observe_inputs

gen = torch.Generator().manual_seed(0)


def last_row_head(first: bool = False) -> tuple[Graph, torch.Tensor]:
    g = Graph()
    g.symbols["seq"] = (1, 64)
    x = g.add_input("x", (2, sym("seq"), 8), "float32")
    h = g.add("RELU", [x])
    last = g.add("SLICE", [h], axis=1, start=0 if first else sym("seq") - 1, end=1 if first else sym("seq"))
    w = torch.rand(8, generator=gen) + 0.5
    y = g.add("RMSNORM", [g.add("RESHAPE", [last], shape=(2, 8)), g.add_weight("norm.weight", w)], eps=1e-6)
    g.set_outputs([g.add("LINEAR", [y, g.add_weight("head.weight", torch.randn(5, 8, generator=gen))])])
    return g, w


def test_a_last_row_head_sees_every_row_normalised():
    g, w = last_row_head()
    head, seen = g.outputs[0], []
    xs = torch.randn(2, 6, 8, generator=gen)
    observe_inputs(g, {head: seen.append}, [[xs]])
    assert seen[0].shape == (2, 6, 8)
    assert torch.allclose(seen[0], rmsnorm_ref([xs.relu(), w], dict(eps=1e-6, dims=1)))
    # the norm, watched, reads the selected row through a view: it is handed every row as it comes
    norm, rows = next(n for n in g.nodes if n.op == "RMSNORM"), []
    observe_inputs(g, {norm: rows.append}, [[xs]])
    assert torch.equal(rows[0], xs.relu())


def test_a_first_row_is_not_every_row():
    # BERT's pooler / ViT's classifier read the CLS token: its rows differ from the others', so it is handed its own
    g, _ = last_row_head(first=True)
    seen = []
    observe_inputs(g, {g.outputs[0]: seen.append}, [[torch.randn(2, 6, 8, generator=gen)]])
    assert seen[0].shape == (2, 8)


def test_a_row_of_the_batch_axis_is_no_token_row():
    # x [3, 8] with no token axis: the head reads row 0 of the batch, and is handed that row only
    g = Graph()
    x = g.add_input("x", (3, 8), "float32")
    y = g.add("RMSNORM", [g.add("SLICE", [x], axis=0, start=0, end=1)], eps=1e-6)
    g.set_outputs([g.add("LINEAR", [y, g.add_weight("head.weight", torch.randn(5, 8, generator=gen))])])
    seen = []
    observe_inputs(g, {g.outputs[0]: seen.append}, [[torch.randn(3, 8, generator=gen)]])
    assert seen[0].shape == (1, 8)
