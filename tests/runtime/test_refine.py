"""runtime/refine.py (KILN_REFINE; on the CPU with "1"): a plan's cold GEMM decisions made again in the plan, each near-tie alternative
swapped into its calls and the step timed whole. CPU: the selection rules on given times; a tiny Llama generator under
the interpreter with the timing replaced by given figures, so that which alternative wins is known: the calls swapped,
the same tokens, the refinement kept in the cache and the artifact for the next compile (and unread with KILN_REFINE=0)."""
import shutil
from types import SimpleNamespace

import pytest
import torch
import transformers

import kiln
from kiln.codegen.tuning import EXTRA_LAUNCH_MS
from kiln.errors import KilnError
from kiln.runtime import refine
from kiln.runtime.kernel_calls import KernelCall, OutputSet

pytestmark = pytest.mark.interpreter


def test_alternatives_within_the_margin_charges_included(monkeypatch):
    monkeypatch.setattr(refine, "MARGIN", 0.25)
    monkeypatch.setattr(refine, "MAX_ALTS", 2)
    d = {"ms": {"a": 0.010, "b": 0.012, "c": 0.0123, "d": 0.020, "e": 0.0104}, "extra_launches": {"e": 1}}
    # e: 10.4 us alone + one launch charged (2 us) = 12.4, after c's 12.3; d past a's 12.5
    assert EXTRA_LAUNCH_MS == 0.002 and refine.alternatives(d, "a") == ["b", "c"]
    monkeypatch.setattr(refine, "MAX_ALTS", 5)
    assert refine.alternatives(d, "a") == ["b", "c", "e"] and refine.alternatives(d, "zz") == [] and refine.alternatives({}, "a") == []


def test_alternatives_take_the_choices_norm_post_twin_whatever_its_time(monkeypatch):
    monkeypatch.setattr(refine, "MAX_ALTS", 1)
    pro, post = "skinny:1024,2048,1,last,False,8,1", "skinny:1024,2048,1,last,False,8,1,True"
    d = {"ms": {pro: 0.010, post: 0.016, "skinny:other": 0.011, "cublas": 0.0105}}
    assert refine.twin(pro) == post and refine.twin(post) == pro
    assert refine.alternatives(d, pro) == ["cublas", post]  # (post is 60% slower alone: past MARGIN, taken as the twin)
    assert refine.alternatives(d, post) == [pro]  # (the twin is also the fastest)
    assert refine.alternatives(d, "cublas") == [pro]  # (no twin measured)
    monkeypatch.setattr(refine, "TWINS", False)
    assert refine.alternatives(d, pro) == ["cublas"]


def test_winners_gain_past_noise_and_min_gain(monkeypatch):
    monkeypatch.setattr(refine, "MIN_GAIN", 0.01)
    names = {"k1 x": ("k1", "x"), "k1 y": ("k1", "y"), "k2 z": ("k2", "z"), "k3 w": ("k3", "w")}
    ms = {"plan": 1.0, "again": 1.002, "k1 x": 0.98, "k1 y": 0.97, "k2 z": 0.995, "k3 w": 1.2}
    assert refine.winners(ms, names) == {"k1": "y"}  # k2 gains 0.5%: under MIN_GAIN
    assert refine.winners(dict(ms, again=1.01), names) == {"k1": "y"}  # noise 1%: 2% needed, x's 2% is not more
    assert refine.winners(dict(ms, again=0.98), names) == {}  # noise 2%: nothing gains 4%


def test_replays_a_round_follow_the_steps_length(monkeypatch):
    for ms, want in ((0.5, 30), (2.1, 7), (100.0, 5), (0.01, 30)):  # (REP_MS 15 of replays, 5..30)
        monkeypatch.setattr(refine, "_once_ms", lambda v, d, ms=ms: ms)
        assert refine.reps_for(((), None), torch.device("cpu")) == want


def test_no_refinement_with_collectives_or_without_the_variable(monkeypatch):
    # a tensor-parallel plan's ranks would each time their own variants, and their collectives would stop pairing up
    calls = [KernelCall(None, "gemm", lambda: None, "a", options={"a": None, "b": None}, key="k"),
             KernelCall(None, "collective", lambda: None, "all_reduce")]
    plan = SimpleNamespace(device=torch.device("cpu"), target=None)  # (refine_set must return before it reads more)
    s = OutputSet({}, calls, None, [])
    monkeypatch.setenv("KILN_REFINE", "1")
    assert refine.refine_set(plan, s) is None and s.calls[0].choice == "a"
    monkeypatch.delenv("KILN_REFINE")  # (the default: plans on a GPU)
    assert refine.refine_set(plan, OutputSet({}, calls[:1], None, [])) is None
    assert refine.enabled(torch.device("cuda")) and not refine.enabled(torch.device("cpu"))
    for value, cpu, gpu in (("0", False, False), ("1", True, True), ("cuda", False, True)):
        monkeypatch.setenv("KILN_REFINE", value)
        assert (refine.enabled(torch.device("cpu")), refine.enabled(torch.device("cuda"))) == (cpu, gpu)
    monkeypatch.setenv("KILN_REFINE", "yes")
    with pytest.raises(KilnError, match="KILN_REFINE='yes': use cuda"):
        refine.enabled(torch.device("cpu"))


def test_warm_decisions_only_with_all_and_only_their_close_alternatives(monkeypatch):
    # KILN_REFINE=all: a GEMM the tuner measured warm (more than a decode's rows) is refined too, among the choice and
    # its alternatives within WARM_MARGIN (at most WARM_MAX_ALTS); a cold one within MARGIN (at most MAX_ALTS), as before
    monkeypatch.setattr(refine, "MARGIN", 0.25)
    monkeypatch.setattr(refine, "MAX_ALTS", 3)
    monkeypatch.setattr(refine, "WARM_MARGIN", 0.08)
    monkeypatch.setattr(refine, "WARM_MAX_ALTS", 2)
    ms = {"a": 0.010, "b": 0.0105, "c": 0.0107, "d": 0.0108, "e": 0.012}
    refined = {}
    tuner = SimpleNamespace(force={}, is_surveying=False, key_of=lambda kind, what, dev: f"key-{what['rows']}",
                            decisions={"key-512": {"ms": ms, "choice": "a"}, "key-4": {"ms": ms, "choice": "a"}},
                            refinement=lambda k: refined.get(k))
    cands = {n: (lambda: None) for n in ms}
    gpu, warm_what, cold_what = torch.device("cuda"), {"rows": 512}, {"rows": 4, "weights": "cold"}
    monkeypatch.setenv("KILN_REFINE", "cuda")
    assert refine.choice(tuner, "gemm", warm_what, cands, gpu, "a") == ("a", {})
    assert list(refine.choice(tuner, "gemm", cold_what, cands, gpu, "a")[1]["options"]) == ["a", "b", "c", "d"]
    monkeypatch.setenv("KILN_REFINE", "all")
    assert refine.warm(gpu) and not refine.warm(torch.device("cpu"))
    chosen, fields = refine.choice(tuner, "gemm", warm_what, cands, gpu, "a")
    assert chosen == "a" and list(fields["options"]) == ["a", "b", "c"] and fields["key"] == "key-512"
    assert list(refine.choice(tuner, "gemm", cold_what, cands, gpu, "a")[1]["options"]) == ["a", "b", "c", "d"]
    assert refine.choice(tuner, "gemm", warm_what, cands, torch.device("cpu"), "a") == ("a", {})  # (all: GPU plans)
    assert refine.choice(tuner, "attention", warm_what, cands, gpu, "a") == ("a", {})
    refined["key-512"] = {"choice": "e"}  # a refinement already made (the cache's): taken, its option kept
    chosen, fields = refine.choice(tuner, "gemm", warm_what, cands, gpu, "a")
    assert chosen == "e" and list(fields["options"]) == ["a", "b", "c", "e"]
    refined.clear()
    monkeypatch.setattr(refine, "WARM_MARGIN", 0.01)  # nothing close: not refined at all
    assert refine.choice(tuner, "gemm", warm_what, cands, gpu, "a") == ("a", {})


def test_warm_refinement_of_a_plan_tries_only_the_close_alternatives(tmp_path, monkeypatch):
    """A 32-row MLP (warm GEMMs) compiled with warm refinement on (``refine.warm`` stands for KILN_REFINE=all on a GPU):
    its calls carry the close options only, what is timed is among them, the winner taken and the outputs unchanged."""
    monkeypatch.setenv("KILN_REFINE", "1")
    monkeypatch.setattr(refine, "warm", lambda device: True)
    monkeypatch.setattr(refine, "WARM_MARGIN", float("inf"))
    monkeypatch.setattr(refine, "WARM_MAX_ALTS", 1)
    timed_names = []

    def timed(variants, device, **kw):
        timed_names.extend(n for n in variants if n not in ("plan", "again"))
        return {name: 0.9 if name == timed_names[0] else 1.0 for name in variants}  # the first alternative gains 10%
    monkeypatch.setattr(refine, "timed", timed)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.GELU(), torch.nn.Linear(24, 16)).eval()
    x = torch.randn(32, 16)
    m = kiln.compile(mlp, (x,), config=kiln.CompileConfig(backend="kernels", cache_dir=str(tmp_path)))
    torch.testing.assert_close(m(x), mlp(x), rtol=2e-3, atol=2e-3)
    plan = m.executor.plans[0]
    refinable = [c for c in plan.calls if c.options]
    assert refinable and all(len(c.options) <= 2 for c in refinable)  # (the choice and one alternative)
    assert timed_names and all(n.split(" ", 1)[1] in c.options for n in timed_names for c in refinable
                               if n.startswith(c.key[:12]))
    k, alt = timed_names[0].split(" ", 1)
    assert {c.choice for c in refinable if c.key.startswith(k)} == {alt}
    assert m.executor.tuner.refined


def tiny_generator(cache_dir):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    torch.manual_seed(0)
    m = transformers.LlamaForCausalLM(cfg).float().eval()
    m.generation_config.eos_token_id = None
    return kiln.from_hf(m, max_seq=24, batch_buckets=(1,), eos_token_id=[],
                        config=kiln.CompileConfig(backend="kernels", cache_dir=str(cache_dir),  # (the GEMMs measured:
                                                  kernels={"attention": "sdpa", "rope_kv": "separate"}))  # what refine makes again)


PROMPT = [[1, 2, 3, 4]]


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """A kernel cache holding the tiny generator's decisions measured alone, and its tokens (tuning under the interpreter
    is most of a compile: each test starts from a copy)."""
    root = tmp_path_factory.mktemp("tuned")
    return root, tiny_generator(root).generate(PROMPT, max_new_tokens=3).tokens


def copied(tuned, tmp_path):
    shutil.copytree(tuned[0], tmp_path / "cache")
    return tmp_path / "cache"


def test_a_refined_plan_swaps_its_calls_and_keeps_the_choice(tuned, tmp_path, monkeypatch):
    prompt, want, cache = PROMPT, tuned[1], copied(tuned, tmp_path)
    monkeypatch.setenv("KILN_REFINE", "1")
    monkeypatch.setattr(refine, "MAX_ALTS", 1)
    monkeypatch.setattr(refine, "MARGIN", float("inf"))
    seen = []

    def timed(variants, device, **kw):  # the first alternative of every plan's first decision gains 10%; the rest lose
        for name in variants:
            if name not in ("plan", "again") and not seen:
                seen.append(name)
        return {name: 0.9 if name in seen else 1.0 if name in ("plan", "again") else 1.2 for name in variants}
    monkeypatch.setattr(refine, "timed", timed)
    g = tiny_generator(cache)
    assert g.generate(prompt, max_new_tokens=3).tokens == want
    tuner = g.compiled.executor.tuner
    taken = {k: d for k, d in tuner.refined.items() if d["choice"] != d["alone"]}
    assert len(taken) == 1 and seen and seen[0].startswith(next(iter(taken))[:12])
    (k, d), = taken.items()
    assert d["choice"] == seen[0].split(" ", 1)[1] and d["step_delta_us"][d["choice"]] == pytest.approx(-100.0)
    assert all(k2 in tuner.decisions and d2["alone"] == tuner.decisions[k2]["choice"] for k2, d2 in tuner.refined.items())
    calls = [c for p in g.compiled.executor.plans for c in p.calls if c.key == k]
    assert calls and all(c.choice == d["choice"] and c.run is c.options[d["choice"]] for c in calls)
    # an artifact carries the refinements; the next compile with KILN_REFINE takes them from the cache without timing;
    # with KILN_REFINE=0, the alone choice
    g.save(tmp_path / "gen.kiln")
    assert kiln.Generator.load(tmp_path / "gen.kiln", backend="kernels").compiled.executor.tuner.refined == tuner.refined
    monkeypatch.setattr(refine, "timed", lambda *a, **kw: pytest.fail("timed again"))
    g2 = tiny_generator(cache)
    assert g2.generate(prompt, max_new_tokens=3).tokens == want
    assert {c.choice for p in g2.compiled.executor.plans for c in p.calls if c.key == k} == {d["choice"]}
    assert all("refine" not in p.stats.phases for p in g2.compiled.executor.plans)
    monkeypatch.setenv("KILN_REFINE", "0")
    g3 = tiny_generator(cache)
    assert g3.generate(prompt, max_new_tokens=3).tokens == want
    plans = g3.compiled.executor.plans
    assert not any(c.options for p in plans for c in p.calls) and not g3.compiled.executor.tuner.refined
    assert d["alone"] in {c.choice for p in plans for c in p.calls}


def test_refinement_takes_one_winner_a_pass_and_times_the_rest_again_around_it(tuned, tmp_path, monkeypatch):
    """Two decisions' alternatives each gain alone (10% and 8% of the step) but together lose (97%, worse than the first
    alone): the first is taken, the second timed again around it and left; the plan's calls and report say so."""
    monkeypatch.setenv("KILN_REFINE", "1")
    monkeypatch.setattr(refine, "MAX_ALTS", 1)
    monkeypatch.setattr(refine, "MARGIN", float("inf"))
    base, fav, passes = {}, [], []

    def timed(variants, device, **kw):
        chose = {name: {c.key: c.choice for c in calls if c.options} for name, (calls, _) in variants.items()}
        if not base:  # (the first plan's first pass: its own choices, and the first two decisions' alternatives favoured)
            base.update(chose["plan"])
            for name, ch in chose.items():
                kv = next(((k, a) for k, a in ch.items() if a != base[k]), None)
                if kv and kv[0] not in {k for k, _ in fav} and len(fav) < 2:
                    fav.append(kv)
        passes.append(sorted(variants))

        def cost(ch):
            swapped = {(k, a) for k, a in ch.items() if a != base.get(k, a)}
            return 1.0 + sum(-0.1 if kv == fav[0] else -0.08 if kv == fav[1] else 0.2 for kv in swapped) \
                + (0.15 if set(fav) <= swapped else 0.0)
        return {name: cost(ch) for name, ch in chose.items()}
    monkeypatch.setattr(refine, "timed", timed)
    g = tiny_generator(copied(tuned, tmp_path))
    assert g.generate(PROMPT, max_new_tokens=3).tokens == tuned[1]
    tuner = g.compiled.executor.tuner
    (k1, a1), (k2, a2) = fav
    assert tuner.refined[k1]["choice"] == a1 and tuner.refined[k2]["choice"] == tuner.decisions[k2]["choice"] != a2
    assert tuner.refined[k2]["step_delta_us"][a2] == pytest.approx(-80.0)  # (as timed in the first pass)
    plan = next(p for p in g.compiled.executor.plans if p.stats.refine)
    assert [(s["key"], s["choice"], s["gain_us"]) for s in plan.stats.refine["steps"]] == [(k1[:12], a1, pytest.approx(100.0))]
    # the second pass timed the second's alternative around the first, and the first's own choice again (nothing else
    # came within KEEP of the step); no third (the passes after it are another plan's)
    assert set(passes[1]) == {"plan", "again", f"{k2[:12]} {a2}", f"{k1[:12]} {base[k1]}"}
    assert not {n.split(" ")[0] for p in passes[2:] for n in p} & {k[:12] for k in base}
    assert {c.choice for c in plan.calls if c.key == k1} == {a1} and {c.choice for c in plan.calls if c.key == k2} == {base[k2]}


def test_a_failing_refinement_warns_and_leaves_the_plan(tuned, tmp_path, monkeypatch):
    monkeypatch.setenv("KILN_REFINE", "1")
    monkeypatch.setattr(refine, "MAX_ALTS", 1)
    monkeypatch.setattr(refine, "MARGIN", float("inf"))

    def broken(variants, device, **kw):
        raise RuntimeError("no timer")
    monkeypatch.setattr(refine, "timed", broken)
    g = tiny_generator(copied(tuned, tmp_path))
    with pytest.warns(UserWarning, match="KILN_REFINE left the plan .* as it was .RuntimeError: no timer"):
        assert g.generate(PROMPT, max_new_tokens=3).tokens == tuned[1]
    tuner = g.compiled.executor.tuner
    assert not tuner.refined and all(c.choice == tuner.decisions[c.key]["choice"] for p in g.compiled.executor.plans
                                     for c in p.calls if c.options)


@pytest.mark.gpu
def test_gpu_refined_plans_capture_and_give_the_same_tokens(cuda_llama_generator, monkeypatch):
    # on CUDA each variant is a captured graph, timed for real; whatever wins, the tokens are the plain plans' (float32)
    gen = cuda_llama_generator
    prompt = [[1, 2, 3, 4, 5]]
    monkeypatch.setenv("KILN_REFINE", "0")
    want = gen().generate(prompt, max_new_tokens=6).tokens
    monkeypatch.setenv("KILN_REFINE", "cuda")  # (the default)
    monkeypatch.setattr(refine, "MARGIN", float("inf"))
    monkeypatch.setattr(refine, "ROUNDS", 3)
    g = gen()
    assert g.generate(prompt, max_new_tokens=6).tokens == want
    tuner, plans = g.compiled.executor.tuner, g.compiled.executor.plans
    assert tuner.refined and all(d["choice"] in tuner.decisions[k]["ms"] for k, d in tuner.refined.items())
    assert all(p.stats.cuda_graph for p in plans) and any("refine" in p.stats.phases for p in plans)
    assert all(c.choice == tuner.refined[c.key]["choice"] for p in plans for c in p.calls if c.options)


@pytest.mark.gpu
def test_gpu_warm_refinement_of_a_dit_plan(pipeline_models, monkeypatch, tmp_path):
    # KILN_REFINE=all on a tiny DiT (bf16, its projections warm GEMMs): every variant captured and timed for real; whatever
    # wins, the output is the unrefined plan's within bf16 noise and each refined call runs one of its close options
    dit, dit_inputs, dims = pipeline_models["dit"]
    model = dit(tie=True).cuda().to(torch.bfloat16)
    inputs = {k: v.cuda().bfloat16() if v.is_floating_point() else v.cuda() for k, v in dit_inputs(2).items()}
    cfg = kiln.CompileConfig(cache_dir=str(tmp_path))
    monkeypatch.setenv("KILN_REFINE", "0")
    want = kiln.compile(model, (), inputs, dynamic=dims, config=cfg)(**inputs).sample.float()
    monkeypatch.setenv("KILN_REFINE", "all")
    monkeypatch.setattr(refine, "WARM_MARGIN", float("inf"))
    monkeypatch.setattr(refine, "MAX_ALTS", 0)  # (its few-row GEMMs, decided cold: not refined here)
    monkeypatch.setattr(refine, "TWINS", False)
    monkeypatch.setattr(refine, "ROUNDS", 3)
    m = kiln.compile(model, (), inputs, dynamic=dims, config=cfg)
    got = m(**inputs).sample.float()
    assert (got - want).abs().max() <= 2e-2 * want.abs().max()
    plan, tuner = m.executor.plans[0], m.executor.tuner
    refinable = [c for c in plan.calls if c.options]
    assert refinable and "refine" in plan.stats.phases and plan.stats.cuda_graph
    assert all(c.choice in c.options and len(c.options) <= 1 + refine.WARM_MAX_ALTS for c in refinable)
    assert {c.key for c in refinable} <= set(tuner.refined)
