"""kiln.ir.bind.bind_inputs: symbol values from the call's tensors, and an InputError naming
the input, the dim, the symbol, the value and the allowed range for every tensor that does not fit."""

import pytest
import torch

from kiln.errors import InputError, KilnError
from kiln.ir.graph import Graph
from kiln.ir.types import sym
from kiln.ir.bind import bind_inputs

BATCH, SEQ = sym("batch"), sym("seq")


@pytest.fixture
def graph() -> Graph:
    """x[batch, seq, 8] f32, pos[seq] i64, pair[batch, 2*seq] bool."""
    g = Graph()
    g.symbols = {"batch": (1, 4), "seq": (2, 16)}
    g.add_input("x", (BATCH, SEQ, 8), "float32")
    g.add_input("pos", (SEQ,), "int64")
    g.add_input("pair", (BATCH, 2 * SEQ), "bool")
    return g


def call(batch=3, seq=5, x_shape=None, pos_len=None, pair_len=None, x_dtype=torch.float32):
    return [torch.zeros(x_shape or (batch, seq, 8), dtype=x_dtype),
            torch.zeros(pos_len if pos_len is not None else seq, dtype=torch.int64),
            torch.zeros(batch, pair_len if pair_len is not None else 2 * seq, dtype=torch.bool)]


def error(graph, tensors, **kw) -> str:
    with pytest.raises(InputError) as e:
        bind_inputs(graph, tensors, **kw)
    assert isinstance(e.value, KilnError) and isinstance(e.value, ValueError)
    return str(e.value)


def test_binds_every_symbol(graph):
    assert bind_inputs(graph, call(3, 5)) == {"batch": 3, "seq": 5}
    assert bind_inputs(graph, call(1, 16)) == {"batch": 1, "seq": 16}  # both ends of the ranges
    assert bind_inputs(graph, call(4, 2)) == {"batch": 4, "seq": 2}


def test_wrong_count(graph):
    msg = error(graph, call()[:2])
    assert "expected 3 input tensors (x, pos, pair), got 2" in msg


def test_not_a_tensor(graph):
    tensors = call()
    tensors[1] = [0, 1, 2, 3, 4]
    assert "input 'pos' must be a tensor, got list" in error(graph, tensors)


def test_wrong_rank(graph):
    msg = error(graph, call(x_shape=(3, 40)))
    assert "input 'x' has rank 2 (shape [3, 40]), expected rank 3 (shape [batch, seq, 8])" in msg


def test_wrong_dtype(graph):
    with pytest.raises(InputError) as e:
        bind_inputs(graph, call(x_dtype=torch.float16))
    assert e.value.message == "input 'x' has dtype float16, expected float32"
    assert e.value.hint == "convert it with .to(torch.float32)"
    assert bind_inputs(graph, call(x_dtype=torch.float16), check_dtype=False) == {"batch": 3, "seq": 5}


def test_static_dim_mismatch(graph):
    msg = error(graph, call(x_shape=(3, 5, 9)))
    assert "input 'x': dim 2 is 9, but this graph was compiled for 8" in msg


@pytest.mark.parametrize("batch,seq,where", [
    (3, 17, "input 'x': dim 1 (seq) is 17, outside the allowed range [2, 16]"),
    (3, 1, "input 'x': dim 1 (seq) is 1, outside the allowed range [2, 16]"),
    (5, 4, "input 'x': dim 0 (batch) is 5, outside the allowed range [1, 4]"),
])
def test_symbolic_dim_outside_its_range(graph, batch, seq, where):
    assert where in error(graph, call(batch, seq))


def test_one_symbol_two_values(graph):
    msg = error(graph, call(3, 5, pos_len=6))
    assert "input 'pos': dim 0 (seq) is 6, but input 'x' dim 1 gave seq = 5; they must be equal" in msg


def test_one_symbol_two_values_within_one_input():
    g = Graph()
    g.symbols = {"seq": (1, 10)}
    g.add_input("scores", (SEQ, SEQ), "float32")
    assert bind_inputs(g, [torch.zeros(4, 4)]) == {"seq": 4}
    assert "dim 1 (seq) is 5, but input 'scores' dim 0 gave seq = 4" in error(g, [torch.zeros(4, 5)])


def test_derived_dims(graph):
    msg = error(graph, call(3, 5, pair_len=11))
    assert "input 'pair': dim 1 is 11, expected 2*seq = 10" in msg


def test_a_derived_dim_needs_an_input_that_binds_its_symbol():
    g = Graph()
    g.symbols = {"seq": (1, 10)}
    g.add_input("pair", (2 * SEQ,), "float32")
    assert "input 'pair': dim 0 is 2*seq, which no other input determines" in error(g, [torch.zeros(6)])
    g.add_input("x", (SEQ + 1, 3), "float32")  # seq + 1 does not bind seq either
    assert "which no other input determines" in error(g, [torch.zeros(6), torch.zeros(4, 3)])
    g.add_input("pos", (SEQ,), "int64")
    assert bind_inputs(g, [torch.zeros(6), torch.zeros(4, 3), torch.zeros(3, dtype=torch.int64)]) == {"seq": 3}
