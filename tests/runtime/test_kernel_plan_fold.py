"""Values that depend on no input, computed when a plan is built (runtime/kernel_plan.py ``_foldable``), and the
causal mask HF transformers builds from the positions run as causal attention without it (``lower.causal_mask``).
CPU under TRITON_INTERPRET=1, against the reference interpreter and eager transformers."""
import pytest
import torch

import kiln
from kiln.codegen import lower_attention as lower
from kiln.codegen.tuning import Tuner
from kiln.ir.interpret import interpret
from kiln.runtime import kernel_plan
from kiln.runtime.executor import Executor
from kiln.runtime.target import Target
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path / "kiln-cache"))


def executor(graph, force):
    return Executor(graph, Target.from_config(kiln.CompileConfig(backend="kernels"), tuner=Tuner(force=force)))


def tril(sq, sk):
    return torch.ones(sq, sk, dtype=torch.bool).tril()


def test_causal_mask_is_the_upper_left_triangle_and_nothing_else():
    assert lower.causal_mask(tril(5, 5), 5, 5)
    assert lower.causal_mask(tril(5, 5).expand(2, 3, 5, 5), 5, 5)  # every row it broadcasts to
    assert lower.causal_mask(tril(3, 6), 3, 6) and lower.causal_mask(tril(6, 3), 6, 3)  # ATTENTION's (and SDPA's) alignment
    assert not lower.causal_mask(torch.ones(3, 6, dtype=torch.bool).tril(3), 3, 6)  # bottom-right aligned (a KV cache)
    flipped = tril(5, 5).clone()
    flipped[4, 0] = False  # one position (a window, a padded key) off the triangle
    assert not lower.causal_mask(flipped, 5, 5)
    rows = tril(5, 5).repeat(2, 1, 1, 1)
    rows[1, 0, 3, 1] = False  # the second sequence's mask differs
    assert not lower.causal_mask(rows, 5, 5)
    assert not lower.causal_mask(tril(5, 5)[None, None], 5, 6) and not lower.causal_mask(tril(5, 5)[-1:], 1, 5)
    for dtype in (torch.float32, torch.bfloat16):  # an additive bias: 0 kept, -inf or the dtype's lowest value dropped
        for low in (float("-inf"), torch.finfo(dtype).min):
            assert lower.causal_mask(torch.zeros(4, 4, dtype=dtype).masked_fill(~tril(4, 4), low), 4, 4)
    assert not lower.causal_mask(torch.zeros(4, 4).masked_fill(~tril(4, 4), -1e4), 4, 4)  # not exactly zero weight
    assert not lower.causal_mask(torch.zeros(4, 4).masked_fill(~tril(4, 4), float("-inf")).add(tril(4, 4)), 4, 4)
    assert not lower.causal_mask(tril(4, 4).long(), 4, 4)


@pytest.mark.parametrize("force", [{"attention": "kiln"}, {"attention": "sdpa"}], ids=["kiln", "sdpa"])
def test_hf_causal_mask_folded_and_run_causal(pipeline_models, force, monkeypatch):
    """The mask and RoPE tables of a Llama forward (from positions, no input) are computed when the plan is built, so a
    call launches 14 kernels fewer; its attentions run causal without the mask, to the same numbers."""
    hf_llm, ids, dims = pipeline_models["llama"]
    model = hf_llm()
    m = kiln.compile(model, (ids(2, 7),), dynamic=dims)
    x = ids(3, 11, seed=2)
    ex = executor(m.graph, force)
    got = ex.run([x])[0]
    assert rel_err(got, interpret(m.graph, [x])[0]) <= TOL[torch.float32]
    with torch.no_grad():
        assert rel_err(got, model(x).logits) <= TOL[torch.float32]
    d = ex.plans[0].describe()
    layers = model.config.num_hidden_layers
    assert d["causal_masks"] == layers and d["choices"] == {**d["choices"], f"attention:{force['attention']}": layers}
    monkeypatch.setattr(kernel_plan.KernelPlan, "_foldable", lambda self, g, folded: False)
    unfolded = executor(m.graph, force)
    plain = unfolded.run([x])[0]
    assert torch.equal(plain, got) or rel_err(plain, got) <= TOL[torch.float32]
    u = unfolded.plans[0].describe()
    assert u["causal_masks"] == 0  # the mask computed by kernels at every call: not known when the plan is built
    launched = lambda d: sum(d["launches"].values())  # noqa: E731
    assert launched(d) < launched(u) - 2 * layers, (d["launches"], u["launches"])


def test_a_mask_from_an_input_runs_as_given(pipeline_models):
    """A padding mask is an input: nothing of the mask is folded, the attentions keep it (left padding, two rows)."""
    hf_llm, ids, dims = pipeline_models["llama"]
    model = hf_llm()
    am = torch.ones(2, 9, dtype=torch.long)
    am[1, :3] = 0
    dyn = {"input_ids": dims["input_ids"], "attention_mask": dims["input_ids"]}
    m = kiln.compile(model, (), {"input_ids": ids(2, 9), "attention_mask": am}, dynamic=dyn)
    ex = executor(m.graph, {"attention": "kiln"})
    got = ex.run([ids(2, 9, seed=3), am])[0]
    with torch.no_grad():
        want = model(ids(2, 9, seed=3), attention_mask=am).logits
    assert rel_err(got[:, 3:], want[:, 3:]) <= TOL[torch.float32]  # (the padded positions' logits are not compared)
    assert ex.plans[0].describe()["causal_masks"] == 0


def test_large_weights_are_left_to_the_kernels(monkeypatch):
    """A pointwise group reading a weight past FOLD_MAX_STATIC elements runs as a kernel at every call (a folded copy
    would be kept per plan); under the limit it is computed once, to the same numbers."""
    from kiln.ir.graph import Graph
    from kiln.ir.types import sym

    g = Graph()
    g.symbols["n"] = (1, 8)
    x = g.add_input("x", (sym("n"), 64), "float32")
    w = g.add_weight("w", torch.randn(64, 64, generator=torch.Generator().manual_seed(0)) / 8)
    y = g.add("EXP", (g.add("MUL", (w, g.const(0.5))),))  # depends on no input: the GEMM's weight
    g.set_outputs([g.add("GEMM", (x, y))])
    xs = torch.randn(3, 64)
    for limit, folded in ((1 << 16, True), (64 * 64 - 1, False)):
        monkeypatch.setattr(kernel_plan, "FOLD_MAX_STATIC", limit)
        ex = executor(g, {"gemm": "cublas"})
        got = ex.run([xs])[0]
        assert rel_err(got, interpret(g, [xs])[0]) <= TOL[torch.float32]
        launches = ex.plans[0].describe()["launches"]
        assert launches.get("pointwise", 0) == (0 if folded else 1) and launches["gemm"] == 1, launches
