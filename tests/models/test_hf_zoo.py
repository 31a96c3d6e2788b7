"""Tiny random transformers models of the families users bring (encoders, vision, audio, decoders beyond Llama)
compiled by ``kiln.compile`` on both backends (the kernels backend under Triton's interpreter on the CPU) against
eager, in float32. Nothing here is special-cased in kiln: these are the importer's and the passes' breadth."""
from __future__ import annotations

import pytest
import torch

import kiln
from kiln.testing import TOL, perturbed, rel_err

transformers = pytest.importorskip("transformers")
T = transformers

_GEN = torch.Generator().manual_seed(0)
IDS = torch.randint(0, 90, (2, 9), generator=_GEN)
MASK = torch.ones(2, 9, dtype=torch.long)
MASK[0, :3] = 0  # left padding on the first row
PIXELS = torch.randn(2, 3, 16, 16, generator=_GEN)
TEXT = dict(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            max_position_embeddings=64)
DECODER = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
VISION = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48, image_size=16,
              patch_size=4)


def _text(model):
    return model, (IDS,), {"attention_mask": MASK}


def _whisper_encoder():
    cfg = T.WhisperConfig(d_model=32, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, num_mel_bins=8,
                          max_source_positions=16, vocab_size=96, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                          decoder_start_token_id=1)
    return T.WhisperModel(cfg).get_encoder(), (torch.randn(2, 8, 32, generator=_GEN),), {}


CASES = {  # name -> () -> (model, args, kwargs)
    "bert": lambda: (T.BertModel(T.BertConfig(**TEXT)), (IDS,), {"attention_mask": MASK, "token_type_ids": IDS % 2}),
    "bert-classifier": lambda: _text(T.BertForSequenceClassification(T.BertConfig(**TEXT, num_labels=3))),
    "roberta": lambda: (T.RobertaModel(T.RobertaConfig(**TEXT)), (IDS + 2,), {"attention_mask": MASK}),
    "distilbert": lambda: _text(T.DistilBertModel(T.DistilBertConfig(vocab_size=96, dim=32, n_layers=2, n_heads=4,
                                                                     hidden_dim=48))),
    "t5-encoder": lambda: _text(T.T5EncoderModel(T.T5Config(vocab_size=96, d_model=32, d_kv=8, d_ff=48, num_layers=2,
                                                            num_heads=4))),
    "clip-text": lambda: _text(T.CLIPTextModel(T.CLIPTextConfig(**TEXT, bos_token_id=1, eos_token_id=2))),
    "gpt2": lambda: _text(T.GPT2LMHeadModel(T.GPT2Config(vocab_size=96, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                                         bos_token_id=1, eos_token_id=2))),
    "vit-classifier": lambda: (T.ViTForImageClassification(T.ViTConfig(**VISION, num_labels=5)), (PIXELS,), {}),
    "deit": lambda: (T.DeiTModel(T.DeiTConfig(**VISION)), (PIXELS,), {}),
    "clip-vision": lambda: (T.CLIPVisionModel(T.CLIPVisionConfig(**VISION)), (PIXELS,), {}),
    "siglip-vision": lambda: (T.SiglipVisionModel(T.SiglipVisionConfig(**VISION)), (PIXELS,), {}),
    "swin": lambda: (T.SwinModel(T.SwinConfig(image_size=16, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 2],
                                              window_size=4)), (PIXELS,), {}),  # its pooler: adaptive_avg_pool1d
    "convnext": lambda: (T.ConvNextModel(T.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)),
                         (PIXELS,), {}),
    "whisper-encoder": _whisper_encoder,  # its stem: two conv1d
    "qwen3": lambda: _text(T.Qwen3ForCausalLM(T.Qwen3Config(**DECODER, head_dim=8))),  # q / k norms
    "gemma": lambda: _text(T.GemmaForCausalLM(T.GemmaConfig(**DECODER, head_dim=8))),
    "gemma2": lambda: _text(T.Gemma2ForCausalLM(T.Gemma2Config(**DECODER, head_dim=8))),  # tanh soft caps
    "phi3": lambda: _text(T.Phi3ForCausalLM(T.Phi3Config(**DECODER))),
    "olmo2": lambda: _text(T.Olmo2ForCausalLM(T.Olmo2Config(**DECODER))),
    "granite": lambda: _text(T.GraniteForCausalLM(T.GraniteConfig(**DECODER))),
}


def _main_output(out):
    """The output a user reads first: logits, else the last hidden state."""
    for name in ("logits", "last_hidden_state"):
        if getattr(out, name, None) is not None:
            return getattr(out, name)
    return out[0]


@pytest.mark.interpreter  # the kernels backend runs under TRITON_INTERPRET=1 here; the reference one anywhere
@pytest.mark.parametrize("backend", ["reference", "kernels"])
@pytest.mark.parametrize("case", list(CASES))
def test_hf_model_matches_eager(case, backend, tmp_path_factory, monkeypatch):
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kiln-cache"))
    torch.manual_seed(0)
    model, args, kwargs = CASES[case]()
    model = perturbed(model)
    with torch.no_grad():
        want = _main_output(model(*args, **kwargs))
    m = kiln.compile(model, args, kwargs, config=kiln.CompileConfig(backend=backend))
    got = _main_output(m(*args, **kwargs))
    assert got.shape == want.shape and got.dtype == want.dtype
    assert rel_err(got, want) <= TOL[torch.float32], f"{case} ({backend}): rel err {rel_err(got, want):.3g}"


@pytest.mark.interpreter
@pytest.mark.parametrize("case", ["t5-encoder", "gpt2", "qwen3"])  # T5 in float16 clamps where torch.isinf says so
def test_float16_error_is_eagers(case, tmp_path_factory, monkeypatch):
    """In float16 (the interpreter's tl.dot is wrong in bfloat16) kiln's error against the float32 model is eager
    float16's, on the positions that are not padding (a query row whose keys are all masked averages them in
    whatever precision the mask's -65504 leaves)."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "kiln-cache"))
    torch.manual_seed(0)
    model, args, kwargs = CASES[case]()
    model = perturbed(model)
    keep = MASK.bool()
    with torch.no_grad():
        want = _main_output(model(*args, **kwargs)).double()[keep]
        model = model.half()
        eager = _main_output(model(*args, **kwargs)).double()[keep]
    m = kiln.compile(model, args, kwargs, config=kiln.CompileConfig(backend="kernels"))
    got = _main_output(m(*args, **kwargs))
    assert got.dtype == torch.float16
    assert rel_err(got.double()[keep], want) <= 1.5 * rel_err(eager, want), (rel_err(got.double()[keep], want), rel_err(eager, want))
