"""The Llama step graph's kernel plan on CPU under TRITON_INTERPRET=1: how many kernels a decode step launches
(pinned per layer as an upper bound, so that no change adds launches unnoticed) and that the decode and prefill
plans, fusions included, compute the reference interpreter's logits and cache updates.

A decode step of a Llama layer launches (kernels backend, the skinny GEMMs chosen, each splitting K in two as a
decode GEMM of few output tiles does on an H200, the partials added by the last program of each tile):
    QKV GEMM with the input norm folded into its loads      1   (was: RMSNORM kernel + GEMM)
    RoPE of q and k with the KV-cache writes of k and v     1   (was: 2 RoPE kernels + 2 index_copy_)
    attention                                               1
    o-proj GEMM + residual (epilogue)                       1
    gate/up GEMM (SiLU GLU epilogue) with the post-attention norm folded in   1   (was: RMSNORM kernel + GEMM)
    down-proj GEMM + residual (epilogue)                    1
and once per step: the embedding, the RoPE angles (positions * inv_freq, cos, sin: one kernel, the frequencies doubled
before the product; was 4 with the product's concatenation) and the LM head with the final norm folded in: 3 (was 7).
Kernels, not calls, are pinned: split-K reduced by a second launch (REDUCE "separate", the only form before issue 13)
made each of the 4 GEMMs of a layer and the LM head two kernels, 10 a layer and 7 a step; one launch brought that back
to 6 and 6 (Llama-3.2-1B at batch 1 on the H200: 169 -> ~105)."""
import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from kiln.config import CompileConfig
from kiln.ir.bind import bind_inputs
from kiln.ir.interpret import interpret
from kiln.llm.generator import Generator, step_inputs
from kiln.models.llama import LlamaConfig, LlamaForCausalLM
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter

DECODE_LAUNCHES_PER_LAYER = 6
DECODE_LAUNCHES_PER_STEP = 3  # outside the layers
CFG = dict(vocab_size=97, hidden_size=72, intermediate_size=104, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
MAX_SEQ = 40


def tiny_llama(layers: int, **kw) -> LlamaForCausalLM:
    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, **CFG, **kw)).eval()
    with torch.no_grad():  # norm weights away from 1: a norm prologue that skips its weight shows
        for name, p in m.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "norm" in name else 0.05))
    return m


def compile_tiny(layers: int, rope_kv: str, attention: str = "sdpa", **kw) -> Generator:
    config = CompileConfig(backend="kernels", kernels={"gemm": "triton-skinny", "attention": attention, "rope_kv": rope_kv})
    return Generator.compile(tiny_llama(layers, **kw), max_seq=MAX_SEQ, batch_buckets=(1, 3), config=config, eos_token_id=[])


@pytest.fixture(scope="module")
def generator():
    # (the interpreter runs the fused RoPE + KV-write kernel's few programs slower than the separate kernels: forced)
    return 2, compile_tiny(2, "triton-rope-kv")


@pytest.fixture(scope="module")
def separate_generator():
    # the rope_kv group's other candidate: the RoPE kernels, then the cache writes from the planned scratch
    return 1, compile_tiny(1, "separate")


@pytest.fixture(scope="module")
def fused_generator():
    # the decode attention doing the rope_kv group's work in its own launch (kiln's split-KV kernel with ``rope=``)
    return 1, compile_tiny(1, "triton-rope-kv", "kiln-rope-decode-last")


def inputs(g: Generator, batch: int, slot0: int, tokens: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, CFG["vocab_size"], (batch, tokens), generator=gen)
    pad = torch.tensor([0, 5, 2][:batch])
    return step_inputs(ids, pad, slot0, g.caches(batch), MAX_SEQ, None)


def kernels_per_call(calls: list, monkeypatch) -> list[int]:
    """The kernels each call launches: its Triton launches (the interpreter's, counted), or 1 for a call that launches
    none and runs one torch op (attention's SDPA, the embedding's reference)."""
    launched, real = [], InterpretedFunction.run

    def counting(self, *args, **kwargs):
        launched[-1] += 1
        return real(self, *args, **kwargs)
    monkeypatch.setattr(InterpretedFunction, "run", counting)
    for c in calls:
        launched.append(0)
        c.run()
    monkeypatch.undo()
    return [max(1, n) for n in launched]


def test_decode_launches_per_layer_are_pinned(generator, monkeypatch):
    layers, g = generator
    plan = g.compiled.executor.plan_for(list(inputs(g, 1, 16, 1, 0).values()))
    calls = plan.calls
    kernels = kernels_per_call(calls, monkeypatch)
    assert sum(kernels) <= DECODE_LAUNCHES_PER_LAYER * layers + DECODE_LAUNCHES_PER_STEP, [(str(c.group), n) for c, n in zip(calls, kernels)]
    # every GEMM splits K (2 splits of the interpreter's tiles) and is still one kernel: its last program reduces
    gemms = [(c, n) for c, n in zip(calls, kernels) if c.kind == "gemm"]
    assert len(gemms) == 4 * layers + 1 and all(c.choice.endswith(":16,32,2,last") and n == 1 for c, n in gemms), gemms
    # their counters: planned in the arena for the whole plan (no other buffer shares the bytes), zero after the calls
    spans = {iv.key: (iv.start, iv.end) for iv in plan.intervals}
    # (and each decode attention's, for its one-launch split-KV candidates, whichever the tuner takes)
    attentions = [c for c in calls if c.kind == "attention"]
    assert len(attentions) == layers and len(plan.counters) == len(gemms) + len(attentions)
    assert all(spans[key] == (0, len(plan.groups)) for key, _ in plan.counters.values())
    assert not any(plan.arena[plan.memory.offsets[key]:][:size].any() for key, size in plan.counters.values())
    # the RoPE angles: one pointwise kernel writes cos and sin (no concatenation, no kernel each)
    angles = [c for c in calls if any(n.op in ("COS", "SIN") for n in c.group.nodes)]
    assert len(angles) == 1 and {"COS", "SIN"} <= {n.op for n in angles[0].group.nodes}, angles
    assert not any(n.op == "CONCAT" for c in calls for n in c.group.nodes if c.kind in ("pointwise", "reference"))
    # the embedding's rows are gathered into its planned buffer: no copy after the gather (one kernel, not two)
    (emb,) = [c for c in calls if c.group.nodes[0].op == "EMBEDDING"]
    copies, copy = [], torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda self, *a, **k: copies.append(self) or copy(self, *a, **k))
    emb.run()
    monkeypatch.undo()
    assert not copies
    # each norm is folded into the skinny GEMM after it: no norm kernel runs, the fused template does
    assert not any(n.op == "RMSNORM" for c in calls if c.kind == "pointwise" for n in c.group.nodes)
    norm_gemms = [c for c in calls if c.kind == "gemm" and c.group.nodes[0].op == "RMSNORM"]
    assert len(norm_gemms) == 2 * layers + 1 and all(c.choice.startswith("triton-skinny-norm:") for c in norm_gemms)
    # RoPE of q and k and both cache writes: one kernel per layer, run by the layer's attention call before its SDPA
    # (the decode attention takes its rope_kv call over); no ROPE / INDEX_COPY runs on its own
    assert not any(c.kind == "rope_kv" for c in calls)
    assert all(c.takes.kind == "rope_kv" and c.takes.choice == "triton-rope-kv" for c in attentions)
    assert not any(c.kind in ("update", "pointwise") and c.group.nodes[0].op in ("ROPE", "INDEX_COPY") for c in calls)


@pytest.mark.parametrize("fixture", ["generator", "separate_generator", "fused_generator"])
@pytest.mark.parametrize("batch", [1, 3])
def test_prefill_then_decode_match_the_reference_interpreter(request, fixture, batch):
    # prefill (16 x batch rows: the norm's kernel, then the GEMM) then two decode steps (the norm folded into the
    # skinny GEMM); logits and every cache against the interpreter on the same inputs
    _, g = request.getfixturevalue(fixture)
    if fixture == "separate_generator":
        plan = g.compiled.executor.plan_for(list(inputs(g, 1, 16, 1, 0).values()))
        assert [c.takes.choice for c in plan.calls if c.kind == "attention"] == ["separate"]
    if fixture == "fused_generator":  # one launch: RoPE, the cache writes, the splits and their reduction
        plan = g.compiled.executor.plan_for(list(inputs(g, batch, 16, 1, 0).values()))
        (att,) = [c for c in plan.calls if c.kind == "attention"]
        assert att.choice.startswith("kiln-rope-decode-last") and att.takes is None
        assert not any(c.kind == "rope_kv" for c in plan.calls) and plan.stats.choices["attention:kiln-rope-decode-last"] == 1
    graph = g.compiled.graph
    for slot0, tokens in ((0, 16), (16, 1), (17, 1)):
        step = inputs(g, batch, slot0, tokens, seed=slot0)
        want = dict(zip(graph.output_names, interpret(graph, [t.clone() for t in step.values()])))  # (the plan writes the caches)
        (logits,) = g.compiled.run(list(step.values()))
        for name, value in want.items():
            got = step[graph.updates[name]] if name in graph.updates else logits
            assert rel_err(got, value) <= TOL[torch.float32], (slot0, name, rel_err(got, value))


def test_caches_not_adopted_run_the_rope_kv_parts(separate_generator):
    # a plan built without the caller's tensors cannot write the caches in place: ROPE and INDEX_COPY run as the
    # groups the rope_kv group merged, and the plan still computes the interpreter's logits and new caches
    _, g = separate_generator
    graph = g.compiled.graph
    step = inputs(g, 1, 16, 1, seed=5)
    plan = g.compiled.executor.plan(bind_inputs(graph, list(step.values())))
    assert not any(c.kind == "rope_kv" for c in plan.calls)
    parts = sorted(n.op for c in plan.calls if c.kind in ("pointwise", "reference") for n in c.group.nodes if n.op in ("ROPE", "INDEX_COPY"))
    assert parts == ["INDEX_COPY"] * 2 + ["ROPE"] * 2
    want = interpret(graph, [t.clone() for t in step.values()])
    got = plan.run(list(step.values()))
    for name, a, b in zip(graph.output_names, got, want):
        assert rel_err(a, b) <= TOL[torch.float32], (name, rel_err(a, b))


def test_weightless_norms_scale_rows_in_the_gemm_template():
    # fold_norm_weight leaves each norm weightless (its weight folded into the GEMM's): the Triton template may then
    # scale its rows by 1 / rms itself (RSTD, one launch, no norm kernel; offered from 2 rows). Forced here at prefill
    # (3 x 16 rows) and decode (3 rows); logits and caches against the interpreter on the same inputs
    config = CompileConfig(backend="kernels", kernels={"gemm": "triton-rstd", "attention": "sdpa", "rope_kv": "triton-rope-kv"})
    g = Generator.compile(tiny_llama(1), max_seq=MAX_SEQ, batch_buckets=(3,), config=config, eos_token_id=[])
    graph = g.compiled.graph
    # the input and post-attention norms feed the merged QKV and gate/up weights; the final norm keeps its weight (the
    # untied LM head's weight is the model's own: folding would copy it)
    assert [len(n.inputs) for n in graph.nodes if n.op == "RMSNORM"] == [1, 1, 2]
    for slot0, tokens in ((0, 16), (16, 1)):
        step = inputs(g, 3, slot0, tokens, seed=slot0)
        plan = g.compiled.executor.plan_for(list(step.values()))
        norm_gemms = [c for c in plan.calls if c.kind == "gemm" and c.group.nodes[0].op == "RMSNORM"]
        choices = [c.choice.split(":")[0] for c in norm_gemms]
        assert choices == ["triton-rstd", "triton-rstd", "cublas"], choices  # (forced: the head has no RSTD candidate)
        assert not any(n.op == "RMSNORM" for c in plan.calls if c.kind == "pointwise" for n in c.group.nodes)
        want = dict(zip(graph.output_names, interpret(graph, [t.clone() for t in step.values()])))
        (logits,) = g.compiled.run(list(step.values()))
        for name, value in want.items():
            got = step[graph.updates[name]] if name in graph.updates else logits
            assert rel_err(got, value) <= TOL[torch.float32], (slot0, name, rel_err(got, value))


@pytest.mark.parametrize("rope_kv,attention", [("triton-rope-kv", "sdpa"), ("separate", "sdpa"),
                                                ("triton-rope-kv", "kiln-rope-decode-last")])
def test_qwen3_norms_run_in_the_rope_kv_call(rope_kv, attention, monkeypatch):
    # q_norm / k_norm (RMSNORM over each head, before RoPE) join the rope_kv group: a decode layer launches what a
    # Llama layer does, the norms run inside the rope_kv call (kernels/rope_kv.py's norms, or the separate candidate's
    # torch reference) or inside the decode attention that does that call's work, and prefill, decode and a plan whose
    # caches are not adopted (the group's parts: two norm kernels more) compute the interpreter's logits and caches
    g = compile_tiny(1, rope_kv, attention, qk_norm=True, head_dim=16)
    graph = g.compiled.graph
    step = inputs(g, 1, 16, 1, 0)
    plan = g.compiled.executor.plan_for(list(step.values()))
    assert sum(kernels_per_call(plan.calls, monkeypatch)) <= DECODE_LAUNCHES_PER_LAYER + DECODE_LAUNCHES_PER_STEP
    assert not any(n.op == "RMSNORM" for c in plan.calls if c.kind == "pointwise" for n in c.group.nodes)
    (att,) = [c for c in plan.calls if c.kind == "attention"]
    if attention == "sdpa":
        assert att.takes.choice == rope_kv and [n.op for n in att.takes.group.nodes][:2] == ["RMSNORM", "RMSNORM"]
    else:
        assert att.choice.startswith("kiln-rope-decode-last") and att.takes is None
    for slot0, tokens in ((0, 16), (16, 1), (17, 1)):
        step = inputs(g, 3, slot0, tokens, seed=slot0)
        want = dict(zip(graph.output_names, interpret(graph, [t.clone() for t in step.values()])))
        (logits,) = g.compiled.run(list(step.values()))
        for name, value in want.items():
            got = step[graph.updates[name]] if name in graph.updates else logits
            assert rel_err(got, value) <= TOL[torch.float32], (slot0, name, rel_err(got, value))
    step = inputs(g, 1, 16, 1, seed=5)
    parts = g.compiled.executor.plan(bind_inputs(graph, list(step.values())))
    assert sum(n.op == "RMSNORM" for c in parts.calls if c.kind == "pointwise" for n in c.group.nodes) == 2
    for name, a, b in zip(graph.output_names, parts.run(list(step.values())), interpret(graph, [t.clone() for t in step.values()])):
        assert rel_err(a, b) <= TOL[torch.float32], (name, rel_err(a, b))
