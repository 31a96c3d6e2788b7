"""kiln.jit never answers from stale weights: every way a module's parameters or buffers change (load_state_dict,
an in-place update of one tensor that CSE merged with others, .to() / .half(), a replaced tensor) makes the next
call match eager with the new weights — re-folded without recapture when names, shapes and dtypes stay; a jitted
function follows the tensors and modules it names."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kiln
from kiln.testing import TOL, rel_err


def hf_llama(seed: int) -> LlamaForCausalLM:
    """A tiny HF Llama; its norm weights stay at their init (all ones), so CSE merges them into one weight."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def count_exports(monkeypatch) -> list:
    calls = []
    real = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.fixture
def jitted():
    model = hf_llama(0)
    j = kiln.jit(model, dynamic={"input_ids": {1: ("seq", 1, 64)}})
    ids = torch.randint(0, 96, (2, 7))
    assert rel_err(j(ids).logits, model(ids).logits) <= TOL[torch.float32]
    assert "merged" in " ".join(sum((p.get("notes", []) for p in j.report().passes.values()), []))  # CSE merged the norms
    return model, j, ids


def check(model, j, ids, dtype=torch.float32):
    with torch.no_grad():
        want = model(ids).logits
    got = j(ids).logits
    assert got.dtype == want.dtype and rel_err(got, want) <= TOL[dtype], rel_err(got, want)


def test_load_state_dict_refolds_without_recapture(jitted, monkeypatch):
    model, j, ids = jitted
    calls = count_exports(monkeypatch)
    model.load_state_dict(hf_llama(1).state_dict())
    check(model, j, ids)
    assert j.rebuilds == {"refold": 1, "recompile": 0} and calls == []
    check(model, j, ids)  # nothing changed since: no rebuild
    assert j.rebuilds == {"refold": 1, "recompile": 0}


def test_in_place_update_of_a_merged_norm_weight(jitted):
    model, j, ids = jitted
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.mul_(3.0)  # CSE had merged it with every other norm weight
    check(model, j, ids)
    assert j.rebuilds["refold"] == 1


def test_to_dtype_returns_the_jitted_module_and_recompiles(jitted):
    model, j, ids = jitted
    j2 = j.to(torch.bfloat16)
    assert j2 is j and next(model.parameters()).dtype == torch.bfloat16
    check(model, j, ids, torch.bfloat16)
    assert j.rebuilds == {"refold": 0, "recompile": 1}
    assert j.half() is j
    check(model, j, ids, torch.float16)
    assert j.rebuilds["recompile"] == 2


def test_inputs_that_follow_the_new_dtype_recompile():
    # the old graph refuses a float16 input; the module's change, not the input, is what it must answer to
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
    j, x = kiln.jit(mlp), torch.randn(3, 8)
    assert rel_err(j(x), mlp(x).detach()) <= TOL[torch.float32]
    compiled = j.compiled
    j.half()
    with torch.no_grad():
        want = mlp(x.half())
    got = j(x.half())
    assert got.dtype == torch.float16 and rel_err(got, want) <= TOL[torch.float16] and j.rebuilds["recompile"] == 1
    with pytest.raises(kiln.SourceChangedError, match="has changed its parameters"):  # (not: "expected float32")
        compiled(x.half())


def test_a_call_of_another_form_names_the_first_call(jitted):
    model, j, ids = jitted
    with pytest.raises(kiln.InputError, match="'attention_mask' was not given when the model was compiled") as e:
        j(ids, attention_mask=torch.ones_like(ids))
    assert e.value.hint.startswith("kiln.jit compiled for its first call's arguments: pass 'attention_mask'")
    assert sum(j.rebuilds.values()) == 0


def test_a_replaced_tensor(jitted):
    model, j, ids = jitted
    model.lm_head.weight = torch.nn.Parameter(torch.randn_like(model.lm_head.weight))  # unties it from the embedding
    check(model, j, ids)
    assert sum(j.rebuilds.values()) == 1
    j.model.norm.weight = torch.nn.Parameter(torch.full((32,), 0.5))  # through the jitted module: set on the module
    assert model.model.norm.weight[0] == 0.5
    check(model, j, ids)
    assert sum(j.rebuilds.values()) == 2


def test_a_replaced_tensor_of_another_shape_recaptures(monkeypatch):
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    j = kiln.jit(lin)
    x = torch.randn(3, 8)
    assert rel_err(j(x), lin(x)) <= TOL[torch.float32]
    lin.weight = torch.nn.Parameter(torch.randn(6, 8))
    lin.bias = torch.nn.Parameter(torch.randn(6))
    calls = count_exports(monkeypatch)
    out = j(x)
    assert out.shape == (3, 6) and rel_err(out, lin(x)) <= TOL[torch.float32]
    assert j.rebuilds == {"refold": 0, "recompile": 1} and calls == [1]


def test_an_optimizer_step_is_seen():
    torch.manual_seed(0)
    lin = torch.nn.Linear(8, 4)
    j = kiln.jit(lin)
    x = torch.randn(3, 8)
    j(x)
    opt = torch.optim.SGD(lin.parameters(), lr=0.5)
    lin(x).square().sum().backward()
    opt.step()
    assert rel_err(j(x), lin(x).detach()) <= TOL[torch.float32] and j.rebuilds["refold"] == 1


def test_a_compiled_model_refuses_once_its_source_changed():
    model = hf_llama(0)
    ids = torch.randint(0, 96, (2, 7))
    m = kiln.compile(model, (ids,))
    assert rel_err(m(ids).logits, model(ids).logits) <= TOL[torch.float32]
    model.load_state_dict(hf_llama(1).state_dict())
    with pytest.raises(kiln.KilnError, match="compiled from has changed its parameters"):
        m(ids)


def test_a_compiled_exported_program_refuses_once_its_weights_changed():
    model = hf_llama(0)
    model.config.use_cache = False
    ids = torch.randint(0, 96, (2, 7))
    m = kiln.compile(torch.export.export(model, (ids,)), (ids,))
    assert rel_err(m(ids).logits, model(ids).logits) <= TOL[torch.float32]
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight.mul_(2.0)  # the program's own tensor; the graph merged it into QKV
    with pytest.raises(kiln.SourceChangedError, match="the exported program's weights .* have been written since"):
        m(ids)


def test_a_jitted_function_sees_the_tensors_and_modules_it_names_change():
    torch.manual_seed(0)
    w, lin = torch.randn(8, 4), torch.nn.Linear(4, 4)

    def helper(h):  # lin reached through a function f calls
        return lin(h)

    def f(x):
        return helper(torch.relu(x @ w))

    j, x = kiln.jit(f), torch.randn(3, 8)

    def follows(rebuilds):
        assert rel_err(j(x), f(x).detach()) <= TOL[torch.float32] and j.rebuilds["recompile"] == rebuilds

    follows(0)
    w.mul_(2)  # (the graph holds w's transpose, folded when compiled)
    follows(1)
    with torch.no_grad():
        lin.weight.mul_(3)
    follows(2)
    w = torch.randn(8, 4)  # the closure variable rebound
    follows(3)
    lin.weight = torch.nn.Parameter(torch.randn(4, 4))
    follows(4)
    follows(4)  # nothing changed since


def test_a_compiled_function_refuses_once_what_it_names_changed():
    w = torch.randn(8, 4)
    compiled, x = kiln.compile(lambda x: x @ w, (torch.randn(3, 8),)), torch.randn(3, 8)
    assert compiled.report().notes == []
    w.add_(1)
    with pytest.raises(kiln.SourceChangedError, match="a tensor or module the compiled function names has been written"):
        compiled(x)

    class Holder:
        pass

    h = Holder()
    h.v = torch.randn(8, 8)  # read through an attribute: out of the watch's sight, and the report says so
    compiled = kiln.compile(lambda x: x @ h.v, (x,))
    assert compiled.report().notes[0].startswith("1 of the 1 tensors the function reads are not ones it names")

    class ReadsAnAttribute(torch.nn.Module):
        def forward(self, x):
            return x @ h.v

    compiled = kiln.compile(ReadsAnAttribute(), (x,))
    assert compiled.report().notes[0].startswith("1 of the 1 tensors the module reads are not its parameters or buffers")
    assert kiln.compile(torch.nn.Linear(8, 4), (x,)).report().notes == []  # (its own tensors: watched)


def test_a_generator_refuses_once_its_hf_model_changed():
    model = hf_llama(0)
    g = kiln.from_hf(model, max_seq=32, batch_buckets=(1,))
    assert len(g.generate([[1, 2, 3]], max_new_tokens=3).tokens[0]) == 3
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)
    with pytest.raises(kiln.KilnError, match="compiled from has changed"):
        g.generate([[1, 2, 3]], max_new_tokens=3)
