"""A tiny GPT-2 with an odd vocabulary (1001): its tied LM head runs on the table padded to 1024 rows
(``passes/pad_gemm.py``), and the logits, a graph output, come back as the [..., :1001] view of rows of 1024 without a
copy. Eager parity on both backends, the view's strides, the saved artifact, ``kiln.jit`` after ``load_state_dict``,
and a vocabulary below the threshold left alone."""
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.utils import logging

import kiln
from kiln.testing import TOL, perturbed, rel_err

logging.set_verbosity_error()  # (GPT2Config's bos / eos ids are outside a tiny vocabulary: a warning per model)
VOCAB, PADDED = 1001, 1024
KERNELS = {"gemm": "triton", "attention": "kiln"}  # no measurements under the interpreter


def gpt2(seed: int, vocab: int = VOCAB) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return perturbed(GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=32, n_embd=32, n_layer=2, n_head=2)))


def ids(seed: int, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 5), generator=torch.Generator().manual_seed(seed))


def eager(model, x) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def padded_once(m) -> None:
    """The LM head is padded once, the tied table is one weight, and the logits are the SLICE of the padded GEMM."""
    assert m.report().to_dict()["passes"]["pad_gemm"]["rewritten"] == 1
    assert [tuple(t.shape) for n, t in m.graph.weights.items() if "wte" in n] == [(PADDED, 32)]
    (out,) = m.graph.outputs
    assert out.op == "SLICE" and out.inputs[0].shape[-1] == PADDED


@pytest.fixture(scope="module")
def model():
    return gpt2(0)


@pytest.mark.interpreter
@pytest.mark.parametrize("gemm", ["triton", "cublas"])
def test_kernels_hand_out_the_padded_logits_as_a_view(model, gemm):
    m = kiln.compile(model, (ids(0),), config=kiln.CompileConfig(backend="kernels", kernels={**KERNELS, "gemm": gemm}))
    padded_once(m)
    first = m(ids(0)).logits
    assert rel_err(first, eager(model, ids(0))) <= TOL[torch.float32]
    assert first.shape == (2, 5, VOCAB) and first.stride() == (5 * PADDED, PADDED, 1)
    (plan,) = m.executor.plans
    d = plan.describe()
    assert d["outputs"] == {"input": 0, "buffer": 0, "view": 1, "copy": 0} and "copy" not in d["launches"]
    second = m(ids(1)).logits  # `first` is held: the call writes another output set, `first` stays as it was
    assert rel_err(second, eager(model, ids(1))) <= TOL[torch.float32]
    assert rel_err(first, eager(model, ids(0))) <= TOL[torch.float32] and first.data_ptr() != second.data_ptr()


def test_the_reference_backend_matches_eager(model):
    m = kiln.compile(model, (ids(0),), config=kiln.CompileConfig(backend="reference"))
    padded_once(m)
    assert rel_err(m(ids(2)).logits, eager(model, ids(2))) <= TOL[torch.float32]


def test_the_artifact_stores_the_padded_table_and_loads(model, tmp_path):
    m = kiln.compile(model, (ids(0),), config=kiln.CompileConfig(backend="reference"))
    loaded = kiln.load(m.save(tmp_path / "gpt2.kiln"))
    padded_once(loaded)
    assert rel_err(loaded(ids(3)).logits, eager(model, ids(3))) <= TOL[torch.float32]


def test_jit_after_load_state_dict_gives_the_new_models_logits():
    """The graph holds the padded copy of ``wte``; the jit's checks watch the module's own parameter, so new weights
    re-fold (and are padded again)."""
    model = gpt2(1)
    j = kiln.jit(model)
    assert rel_err(j(ids(0)).logits, eager(model, ids(0))) <= TOL[torch.float32]
    padded_once(j.compiled)
    model.load_state_dict(gpt2(2).state_dict())
    assert rel_err(j(ids(0)).logits, eager(model, ids(0))) <= TOL[torch.float32]
    assert j.rebuilds == {"refold": 1, "recompile": 0}
    padded_once(j.compiled)


def test_an_odd_vocabulary_below_the_threshold_is_left_alone():
    model = gpt2(0, vocab=999)
    m = kiln.compile(model, (ids(0, 999),), config=kiln.CompileConfig(backend="reference"))
    assert m.report().to_dict()["passes"]["pad_gemm"]["rewritten"] == 0
    assert m.graph.outputs[0].op == "LINEAR" and m.graph.outputs[0].inputs[1].shape == (999, 32)
    assert rel_err(m(ids(1, 999)).logits, eager(model, ids(1, 999))) <= TOL[torch.float32]


@pytest.mark.gpu
def test_gpt2_vocabulary_on_the_gpu():
    """GPT-2's real vocabulary (50257 -> 50304 rows) in bf16 on the kernels backend, with the tuner's measurements."""
    model = gpt2(0, vocab=50257).cuda()
    x = ids(0, 50257).cuda()
    want = eager(model, x)
    m = kiln.compile(model.to(torch.bfloat16), (x,))
    logits = m(x).logits
    assert logits.stride() == (5 * 50304, 50304, 1) and m.executor.plans[0].describe()["outputs"]["view"] == 1
    assert rel_err(logits, want) <= TOL[torch.bfloat16]
