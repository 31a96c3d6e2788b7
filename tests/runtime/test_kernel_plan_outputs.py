"""Graph outputs that are views (runtime/kernel_plan.py): a view holding most of a kernel's output is handed out as
that view of a buffer of its own, strides kept, without a copy (a padded GEMM's [..., :N], ``passes/pad_gemm.py``);
a small view or a broadcast is copied out; a held view keeps its buffer set from being written again."""
import pytest
import torch

import kiln
from kiln.codegen.tuning import Tuner
from kiln.ir.graph import Graph
from kiln.ir.interpret import interpret
from kiln.passes.pad_gemm import pad_gemm
from kiln.runtime.executor import Executor
from kiln.runtime.target import Target
from kiln.testing import TOL, rel_err


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "kiln-cache"))


def executor(g: Graph, gemm: str = "cublas") -> Executor:
    return Executor(g, Target.from_config(kiln.CompileConfig(backend="kernels"), tuner=Tuner(force={"gemm": gemm})))


def run(g: Graph, x: torch.Tensor, gemm: str = "cublas"):
    """(executor, outputs, plan.describe()["outputs"]), each output checked against the reference interpreter."""
    ex = executor(g, gemm)
    got = ex.run([x])
    for a, b in zip(got, interpret(g, [x])):
        assert a.shape == b.shape and rel_err(a, b) <= TOL[torch.float32]
    return ex, got, ex.plans[0].describe()["outputs"]


def test_views_of_most_of_a_value_go_out_as_views_small_ones_and_broadcasts_as_copies():
    g = Graph()
    x = g.add_input("x", (3, 40), "float32")
    y = g.add("TANH", [x])  # [3, 40]
    z = g.add("EXP", [x])
    col = g.add("SIGMOID", [g.add("SLICE", [x], axis=1, start=0, end=1)])  # [3, 1]
    g.set_outputs([y, g.add("SLICE", [y], axis=1, start=0, end=37),  # y itself and 37 of its 40 columns: one buffer
                   g.add("SLICE", [z], axis=0, start=2, end=3),  # one row of three: copied
                   g.add("EXPAND", [col], shape=(3, 5))])  # a broadcast, larger than what it views: copied
    _, (whole, part, row, wide), outputs = run(g, torch.randn(3, 40))
    assert outputs == {"input": 0, "buffer": 1, "view": 1, "copy": 2}
    assert part.stride() == (40, 1) and part.data_ptr() == whole.data_ptr()  # the view, into the same buffer
    assert row.is_contiguous() and wide.is_contiguous()


@pytest.mark.interpreter
@pytest.mark.parametrize("gemm", ["cublas", "triton"])
def test_a_padded_gemm_hands_out_its_slice_and_holding_it_keeps_the_set(gemm):
    """LINEAR of width 1001 after pad_gemm: the output is the [..., :1001] view of rows of 1024, no copy; while the caller
    holds it, the next call writes the second set, and once dropped the first set is written again."""
    g = Graph()
    x = g.add_input("x", (2, 3, 16), "float32")
    w = g.add_weight("head.weight", torch.randn(1001, 16, generator=torch.Generator().manual_seed(0)))
    g.set_outputs([g.add("LINEAR", [x, w])])
    assert pad_gemm(g).rewritten == 1
    xs = [torch.randn(2, 3, 16) for _ in range(3)]
    ex, (first,), outputs = run(g, xs[0], gemm)
    plan = ex.plans[0]
    assert outputs == {"input": 0, "buffer": 0, "view": 1, "copy": 0}
    assert first.stride() == (3 * 1024, 1024, 1) and "copy" not in plan.describe()["launches"]
    second = ex.run([xs[1]])[0]
    assert len(plan.sets) == 2 and second.data_ptr() != first.data_ptr()
    assert rel_err(first, interpret(g, [xs[0]])[0]) <= TOL[torch.float32]  # not overwritten while held
    del first, second
    again = ex.run([xs[2]])[0]
    assert again.data_ptr() == plan.sets[0].buffers[g.outputs[0].inputs[0]].data_ptr() and len(plan.sets) == 2
    assert rel_err(again, interpret(g, [xs[2]])[0]) <= TOL[torch.float32]
