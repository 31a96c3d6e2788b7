"""kiln.compile / kiln.jit / kiln.load as users call them."""
import pytest
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

import kiln
from kiln.models.registry import get
from kiln.testing import TOL, rel_err


def _count_exports(monkeypatch):
    calls = []
    real = torch.export.export

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(torch.export, "export", counting)
    return calls


@pytest.fixture(scope="module")
def hf_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def hf_llama_compiled(hf_llama):
    ids = torch.randint(0, 96, (2, 9))
    return kiln.compile(hf_llama, (ids,), dynamic={"input_ids": {0: ("batch", 1, 4), 1: ("seq", 1, 64)}})


def test_hf_llama_matches_eager_and_keeps_output_type(hf_llama, hf_llama_compiled):
    ids = torch.randint(0, 96, (2, 9))
    out = hf_llama_compiled(ids)
    assert isinstance(out, CausalLMOutputWithPast)
    assert rel_err(out.logits, hf_llama(ids).logits) <= TOL[torch.float32]


def test_symbolic_dims_run_at_other_sizes_without_recapture(hf_llama, hf_llama_compiled, monkeypatch):
    calls = _count_exports(monkeypatch)
    for shape in [(1, 1), (3, 20), (4, 64)]:
        ids = torch.randint(0, 96, shape)
        assert rel_err(hf_llama_compiled(input_ids=ids).logits, hf_llama(ids).logits) <= TOL[torch.float32]
    assert calls == []
    with pytest.raises(kiln.InputError, match=r"input 'input_ids': dim 1 \(seq\) is 65, outside the allowed range \[1, 64\]"):
        hf_llama_compiled(torch.randint(0, 96, (1, 65)))
    with pytest.raises(kiln.InputError, match=r"dim 0 \(batch\) is 5, outside the allowed range \[1, 4\]"):
        hf_llama_compiled(torch.randint(0, 96, (5, 3)))


def test_call_errors_name_what_is_wrong(hf_llama_compiled):
    m = hf_llama_compiled
    with pytest.raises(kiln.InputError, match=r"has dtype float32, expected int64"):
        m(torch.zeros(1, 3))
    with pytest.raises(kiln.InputError, match=r"has rank 1 .* expected rank 2"):
        m(torch.zeros(3, dtype=torch.long))
    with pytest.raises(kiln.InputError, match=r"use_cache was fixed to False"):
        m(torch.zeros(1, 3, dtype=torch.long), use_cache=True)
    with pytest.raises(kiln.InputError, match=r"argument 'attention_mask' was not given when the model was compiled"):
        m(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(kiln.InputError, match=r"unexpected argument 'nope'"):
        m(torch.zeros(1, 3, dtype=torch.long), nope=1)
    with pytest.raises(kiln.InputError, match=r"missing argument 'input_ids'"):
        m()


def test_static_dims_are_checked():
    lin = torch.nn.Linear(8, 4)
    m = kiln.compile(lin, (torch.randn(3, 8),))
    with pytest.raises(kiln.InputError, match=r"dim 0 is 5, but this graph was compiled for 3") as e:
        m(torch.randn(5, 8))
    assert "dynamic" in e.value.hint


@pytest.mark.parametrize("name", ["llama-tiny", "dit-tiny"])
def test_kiln_models_match_eager(name):
    spec = get(name)
    model = spec.build()
    m = kiln.compile(model, (), spec.example_inputs(batch=2), dynamic=spec.dynamic())
    for batch in (1, 3):
        x = spec.example_inputs(batch=batch, seed=batch)
        assert rel_err(m(**x), model(**x)) <= TOL[torch.float32]


def test_diffusers_dit_with_batch_one_example():
    # a dynamic dim whose example size is 1 must still come out dynamic
    torch.manual_seed(0)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2,
                                sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_type="ada_norm_zero").eval()
    with torch.no_grad():
        for p in dit.parameters():
            p.add_(torch.randn_like(p) * 0.05)

    def inputs(b):
        return dict(hidden_states=torch.randn(b, 4, 8, 8), timestep=torch.randint(0, 1000, (b,)),
                    class_labels=torch.randint(0, 10, (b,)))

    batch = ("batch", 1, 8)
    m = kiln.compile(dit, (), inputs(1), dynamic={"hidden_states": {0: batch}, "timestep": {0: batch}, "class_labels": {0: batch}})
    for b in (1, 5):
        x = inputs(b)
        out = m(**x)
        assert type(out).__name__ == "Transformer2DModelOutput"
        assert rel_err(out.sample, dit(**x).sample) <= TOL[torch.float32]
    with pytest.raises(kiln.InputError, match=r"'timestep': dim 0 \(batch\) is 3, but input 'hidden_states' dim 0 gave batch = 2"):
        x = inputs(2)
        x["timestep"] = torch.randint(0, 1000, (3,))
        m(**x)


def test_jit_module_is_a_drop_in(hf_llama, monkeypatch):
    hf_llama.train()  # capture uses inference semantics and gives the module back as it was
    jm = kiln.jit(hf_llama, dynamic={"input_ids": {1: "seq"}})
    ids = torch.randint(0, 96, (2, 5))
    out = jm(ids)
    assert hf_llama.training
    hf_llama.eval()
    assert rel_err(out.logits, hf_llama(ids).logits) <= TOL[torch.float32]
    assert jm.config.vocab_size == 96  # attributes come from the module
    calls = _count_exports(monkeypatch)
    longer = torch.randint(0, 96, (2, 12))
    assert rel_err(jm(input_ids=longer).logits, hf_llama(longer).logits) <= TOL[torch.float32]
    assert calls == []
    assert jm.graph is jm.compiled.graph


def test_jit_decorator_on_functions():
    @kiln.jit
    def f(x, y):
        return {"act": F.gelu(x @ y, approximate="tanh"), "total": x.sum()}

    @kiln.jit(dynamic={"x": {0: ("n", 1, 32)}})
    def g(x, scale: float = 2.0):
        return x * scale, torch.softmax(x, -1)

    x, y = torch.randn(5, 7), torch.randn(7, 3)
    got = f(x, y)
    assert set(got) == {"act", "total"}
    assert rel_err(got["act"], F.gelu(x @ y, approximate="tanh")) <= TOL[torch.float32]
    assert f.__name__ == "f"
    a, b = g(torch.randn(4, 6))
    assert isinstance(a, torch.Tensor) and b.shape == (4, 6)
    z = torch.randn(9, 6)
    assert rel_err(g(z)[0], z * 2.0) <= TOL[torch.float32]
    with pytest.raises(kiln.InputError, match=r"'scale' was fixed to its default 2.0"):
        g(z, scale=3.0)
    with pytest.raises(kiln.KilnError, match="needs named parameters"):
        kiln.jit(lambda *xs: xs[0] + 1)(torch.randn(2))


def test_compile_from_pt2_file(tmp_path):
    lin = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.SiLU())
    x = torch.randn(4, 6)
    ep = torch.export.export(lin, (x,), dynamic_shapes=({0: torch.export.Dim("rows", min=1, max=64)},))
    torch.export.save(ep, tmp_path / "m.pt2")
    m = kiln.compile(str(tmp_path / "m.pt2"))
    assert rel_err(m(torch.randn(7, 6).clamp(-1, 1) * 0 + x[:1].repeat(7, 1)), lin(x[:1].repeat(7, 1))) <= TOL[torch.float32]
    with pytest.raises(kiln.InputError, match=r"outside the allowed range \[1, 64\]"):
        m(torch.randn(65, 6))


def test_report_and_config(hf_llama):
    ids = torch.randint(0, 96, (1, 4))
    m = kiln.compile(hf_llama, (ids,), config=kiln.CompileConfig(verify=True))
    d = m.report().to_dict()
    assert d["passes"]["dce"]["enabled"] and isinstance(d["passes"]["dce"]["rewritten"], int)
    assert d["ops_before"]["LINEAR"] == 15 and d["ops_after"]["LINEAR"] + d["ops_after"]["GEMM"] == 4 * 2 + 1  # merged + epilogues
    assert d["verify"]["rel_err"]["logits"] <= TOL[torch.float32]
    assert d["memory"]["planned_peak_bytes"] < d["memory"]["sum_of_intermediates_bytes"]
    text = str(m.report())
    assert "dce" in text and "fuse_epilogue" in text and "LINEAR" in text and "memory plan" in text
    off = kiln.compile(hf_llama, (ids,), config=kiln.CompileConfig(disable=["dce"]))
    assert off.report().to_dict()["passes"]["dce"]["enabled"] is False
    with pytest.raises(kiln.KilnError, match="unknown pass name"):
        kiln.CompileConfig(disable=["no_such_pass"])


def test_bad_dynamic_specs_are_explained():
    lin = torch.nn.Linear(4, 4)
    with pytest.raises(kiln.KilnError, match=r"names 'y', which is not an argument"):
        kiln.compile(lin, (torch.randn(2, 4),), dynamic={"y": {0: "b"}})
    with pytest.raises(kiln.KilnError, match=r"dim 5 does not exist"):
        kiln.compile(lin, (torch.randn(2, 4),), dynamic={"input": {5: "b"}})
    with pytest.raises(kiln.KilnError, match=r"outside the declared range"):
        kiln.compile(lin, (torch.randn(9, 4),), dynamic={"input": {0: ("b", 1, 8)}})
    with pytest.raises(kiln.KilnError, match=r"dynamic= for 'input' takes a dict"):
        kiln.compile(lin, (torch.randn(2, 4),), dynamic={"input": ("b", 1, 8)})


def _masked(x, mask):
    return x * mask


@pytest.mark.parametrize("dynamic", [
    {"x": {1: kiln.Dim("seq", 1, 64)}, "mask": {1: "seq"}},  # README's kiln.compile example, in small
    {"mask": {1: "seq"}, "x": {1: ("seq", 1, 64)}},  # the plain name first
    {"x": {1: ("seq",)}, "mask": {1: kiln.Dim("seq", 1, 64)}},  # a tuple without a range
    {"x": {1: ("seq", 1, 64)}, "mask": {1: kiln.Dim("seq", 1, 64)}},  # the same range twice
], ids=["dim-then-name", "name-then-tuple", "1-tuple-then-dim", "same-range-twice"])
def test_a_plain_dim_name_means_the_ranged_dim_of_that_name(dynamic):
    x, mask = torch.randn(2, 8), torch.ones(2, 8)
    m = kiln.compile(_masked, (x, mask), dynamic=dynamic)
    assert m.graph.symbols == {"seq": (1, 64)}
    x, mask = torch.randn(2, 64), torch.rand(2, 64)
    assert torch.equal(m(x, mask), x * mask)
    with pytest.raises(kiln.InputError, match=r"dim 1 \(seq\) is 65, outside the allowed range \[1, 64\]"):
        m(torch.randn(2, 65), torch.ones(2, 65))


def test_two_different_ranges_of_one_dim_are_an_error():
    x, mask = torch.randn(2, 8), torch.ones(2, 8)
    with pytest.raises(kiln.KilnError, match=r"dim 'seq' is declared twice with different ranges \(1, 64\) and \(1, 32\)"):
        kiln.compile(_masked, (x, mask), dynamic={"x": {1: kiln.Dim("seq", 1, 64)}, "mask": {1: ("seq", 1, 32)}})
