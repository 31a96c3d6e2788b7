"""The start-up survey (runtime/kernel_plan.py ``_survey``, codegen/tuning.py): a plan that first builds its calls with
the tuner surveying, compiles ahead, then builds them for real, has the calls, the choices and the outputs of a plan
built without it, and its survey saw every decision the real build met. On CPU under TRITON_INTERPRET=1 the survey is
forced on (there is nothing to compile there); the tuner's measurement is replaced by a deterministic choice (the last
candidate, which the survey's provisional first is not) so the two builds can be compared call by call. On a GPU the
survey compiles every kernel ahead: the build and its first run then compile nothing in the parent."""
import pytest
import torch

from kiln.codegen.tuning import Tuner
from kiln.config import CompileConfig
from kiln.llm.generator import Generator, step_inputs
from kiln.models.llama import LlamaConfig, LlamaForCausalLM
from kiln.runtime import kernel_plan
from kiln.runtime.executor import Executor
from kiln.runtime.target import Target

CFG = dict(vocab_size=97, hidden_size=72, intermediate_size=104, num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
MAX_SEQ = 40


def _step_graph(device: str):
    """A 1-layer Llama step (KV caches updated in place: adopted inputs, rope_kv) and its prefill / decode inputs."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, **CFG)).eval().to(device)
    config = CompileConfig(backend="kernels", kernels={"gemm": "cublas", "attention": "sdpa", "rope_kv": "separate"})
    g = Generator.compile(model, max_seq=MAX_SEQ, batch_buckets=(2,), config=config, eos_token_id=[])
    ids = torch.randint(0, CFG["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1)).to(device)
    steps = [step_inputs(ids[:, :n], torch.tensor([0, 3]), slot0, g.caches(2), MAX_SEQ, None) for slot0, n in ((0, 16), (16, 1))]
    return g.compiled.graph, [list(s.values()) for s in steps]


@pytest.fixture(scope="module")
def step_graph():
    return _step_graph("cpu")


def _build(graph, steps, survey: bool, monkeypatch) -> dict:
    """Plans of ``steps`` (prefill, decode) built with the survey on or off; what each call chose, what the survey saw,
    which decisions were measured, the outputs and caches after each step."""
    measured, surveyed = [], []
    real = kernel_plan.compile_ahead

    def last(kind, what, candidates, device, check=None):
        measured.append((kind, list(candidates)[-1]))
        return {"kind": kind, "what": what, "choice": list(candidates)[-1], "ms": {}}

    def spy(found, calls, device):
        surveyed.extend(found)
        return real(found, calls, device)
    monkeypatch.setattr(Tuner, "measure", staticmethod(last))
    monkeypatch.setattr(kernel_plan, "compile_ahead", spy)
    tuner = Tuner(survey=survey)
    ex = Executor(graph, Target.from_config(CompileConfig(backend="kernels"), tuner=tuner))
    plans, outputs = [], []
    for step in steps:
        step = [t.clone() for t in step]
        plans.append(ex.plan_for(step))
        outputs.append(list(ex.run(step)) + step)
    monkeypatch.undo()
    return dict(calls=[[(c.kind, c.choice, str(c.group)) for c in p.calls] for p in plans], outputs=outputs, measured=measured,
                surveyed=surveyed, decisions=set(tuner.decisions), counts=dict(tuner.counts),
                phases=[set(p.stats.phases) for p in plans])


@pytest.mark.interpreter
def test_a_surveyed_plan_is_the_plan_without_a_survey(step_graph, monkeypatch):
    graph, steps = step_graph
    plain = _build(graph, steps, False, monkeypatch)
    surveyed = _build(graph, steps, True, monkeypatch)
    assert plain["surveyed"] == [] and all("compile" not in p for p in plain["phases"])
    assert all("compile" in p for p in surveyed["phases"])
    assert set(surveyed["surveyed"]) == surveyed["decisions"] and len(surveyed["surveyed"]) == len(surveyed["decisions"])
    kinds = {kind for kind, _ in surveyed["measured"]}
    assert {"gemm", "attention", "rope_kv"} <= kinds, kinds  # decisions of every kind, each measured once, by the real build
    assert surveyed["measured"] == plain["measured"] and surveyed["counts"] == plain["counts"]
    assert surveyed["calls"] == plain["calls"]
    choices = [choice for calls in plain["calls"] for kind, choice, _ in calls if kind in kinds]
    assert choices and all(choice for choice in choices)
    for a, b in zip(surveyed["outputs"], plain["outputs"]):
        assert all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.gpu
def test_the_survey_compiles_every_kernel_ahead(tmp_path, monkeypatch):
    """A cold Triton cache: the survey's workers compile everything the plans launch; the parent's compiles during the
    measurements, the capture's warm-up and the first runs are all cache hits; a build without the survey that makes
    the same choices computes the same outputs."""
    from triton import knobs

    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    graph, steps = _step_graph("cuda")
    compiles = []
    monkeypatch.setattr(knobs.compilation, "listener", lambda **kw: compiles.append(kw["cache_hit"]))
    tuner = Tuner(survey=True)
    ex = Executor(graph, Target.from_config(CompileConfig(backend="kernels", device="cuda"), tuner=tuner))
    got = []
    for step in steps:
        step = [t.clone() for t in step]
        plan = ex.plan_for(step)
        got.append(list(ex.run(step)) + step)
        stats = plan.describe()["compiled_ahead"]
        assert stats["compiled"] > 0 and stats["failed"] == 0, stats
    assert compiles and all(compiles), f"{compiles.count(False)} of {len(compiles)} compiles in the parent"
    assert tuner.counts["measured"] > 0
    monkeypatch.setattr(knobs.compilation, "listener", None)
    same = Tuner(decisions=tuner.decisions, survey=False)
    plain = Executor(graph, Target.from_config(CompileConfig(backend="kernels", device="cuda"), tuner=same))
    for step, want in zip(steps, got):
        step = [t.clone() for t in step]
        out = list(plain.run(step)) + step
        assert all(torch.equal(x, y) for x, y in zip(out, want))
