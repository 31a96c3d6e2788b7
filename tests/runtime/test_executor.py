"""The static-plan executor against the reference interpreter."""
import pytest
import torch

import kiln
from kiln.ir.interpret import interpret
from kiln.models.registry import get
from kiln.runtime.executor import Executor
from kiln.runtime.memory import check_plan
from kiln.runtime.target import Target


@pytest.fixture(scope="module")
def llama_graph():
    spec = get("llama-tiny")
    model = spec.build()
    m = kiln.compile(model, (), spec.example_inputs(batch=2, seq=8), dynamic=spec.dynamic())
    return m.graph, model


@pytest.mark.parametrize("batch,seq", [(1, 1), (2, 8), (3, 17)])
def test_executor_matches_interpreter(llama_graph, batch, seq):
    graph, model = llama_graph
    ids = torch.randint(0, 256, (batch, seq))
    want = interpret(graph, [ids])[0]
    got = Executor(graph).run([ids])[0]
    assert torch.equal(got, want)
    assert torch.allclose(got, model(ids), rtol=1e-5, atol=1e-5)


def test_plans_are_sound_and_reuse_memory(llama_graph):
    graph, _ = llama_graph
    ex = Executor(graph)
    ex.run([torch.randint(0, 256, (2, 16))])
    plan = ex.plans[0]
    check_plan(plan.memory, plan.intervals)
    s = plan.memory.summary()
    assert 0 < s["planned_peak_bytes"] < s["sum_of_intermediates_bytes"]
    assert any(step.mode == "alias" for step in plan.steps)  # RESHAPE of a planned buffer is a view


def test_every_buffer_is_written_before_it_is_read(llama_graph):
    # poison the whole arena: a read of a buffer nothing wrote would make the output NaN / wrong
    graph, _ = llama_graph
    ex = Executor(graph)
    ids = torch.randint(0, 256, (2, 5))
    want = ex.run([ids])[0].clone()
    ex.plans[0].arena.fill_(0xFF)  # NaN pattern in every float dtype
    assert torch.equal(ex.run([ids])[0], want)


def test_outputs_are_not_overwritten_by_later_calls(llama_graph):
    graph, _ = llama_graph
    ex = Executor(graph)
    a, b = torch.randint(0, 256, (1, 4)), torch.randint(0, 256, (1, 4))
    out_a = ex.run([a])[0]
    keep = out_a.clone()
    ex.run([b])
    assert torch.equal(out_a, keep)


def test_plan_cache_is_bounded(llama_graph):
    graph, _ = llama_graph
    ex = Executor(graph, Target.from_config(kiln.CompileConfig(max_plans=2)))
    for seq in (3, 4, 5):
        ex.run([torch.randint(0, 256, (1, seq))])
    assert [p.bindings["seq"] for p in ex.plans] == [4, 5]
    ex.run([torch.randint(0, 256, (1, 4))])  # a hit moves the plan to the back
    assert [p.bindings["seq"] for p in ex.plans] == [5, 4]


def test_executor_checks_inputs(llama_graph):
    graph, _ = llama_graph
    with pytest.raises(kiln.InputError, match=r"input 'input_ids': dim 1 \(seq\) is 999, outside the allowed range \[1, 256\]"):
        Executor(graph).run([torch.zeros(1, 999, dtype=torch.long)])
