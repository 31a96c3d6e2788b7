"""LLM generation (llm/generator.py): greedy tokens equal transformers' generate token for token on tiny Llama,
Qwen2, Qwen3, Phi-3, Granite, OLMo 2, SmolLM3, Gemma, Gemma 3 and Mistral (sliding window) models in float32 on CPU,
for a batch of prompts of different lengths; streaming, stop conditions, sampling, and bad requests that leave the
generator usable."""
import numpy as np
import pytest
import torch
import transformers

import kiln
from kiln import InputError, SamplingParams
from kiln.codegen.tuning import Tuner

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]]


def hf_model(kind="Llama", **kw):
    torch.manual_seed(0)
    cfg = getattr(transformers, "Gemma3TextConfig" if kind == "Gemma3" else f"{kind}Config")(**{**TINY, **kw})
    m = getattr(transformers, f"{kind}ForCausalLM")(cfg).eval()
    with torch.no_grad():  # larger weights: logits far apart, so greedy choices are not near-ties
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    m.generation_config.eos_token_id = None  # generate every token (kiln's generators here have no EOS either)
    return m


def hf_greedy(hf, prompt, n):
    dev = next(hf.parameters()).device
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt], device=dev), attention_mask=torch.ones(1, len(prompt), dtype=torch.long, device=dev),
                          max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def llama():
    hf = hf_model()
    return hf, kiln.from_hf(hf, max_seq=128, batch_buckets=(1, 4), eos_token_id=[])


@pytest.mark.parametrize("kind,kw", [("Qwen2", {}), ("Mistral", dict(sliding_window=6)), ("Qwen3", dict(head_dim=16)),
                                     ("Phi3", dict(sliding_window=6, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
                                     ("Qwen3", dict(head_dim=16, rope_parameters=dict(rope_type="yarn", rope_theta=1e6, factor=4.0,
                                                                                      original_max_position_embeddings=16))),
                                     ("Granite", dict(embedding_multiplier=12.0, attention_multiplier=0.05, residual_multiplier=0.3,
                                                      logits_scaling=4.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)),
                                     ("Olmo2", dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)),
                                     # LongRoPE: the prompts (3 .. 17 tokens) short, each row prefilled again when
                                     # it grows past 24 (at three steps), then long
                                     ("Phi3", dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, original_max_position_embeddings=24,
                                                   rope_parameters=dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0, 1.2, 1.6, 2.4],
                                                                        long_factor=[1.0, 2.0, 4.0, 9.0]))),
                                     # Phi-4-mini's partial rotary: half of each head's dims rotated
                                     ("Phi3", dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, partial_rotary_factor=0.5)),
                                     # SmolLM3: its third layer without RoPE, so not the program of the second (the step is
                                     # captured whole, not repeated from two layers)
                                     ("SmolLM3", dict(num_hidden_layers=3, no_rope_layer_interval=3, pad_token_id=0,
                                                      bos_token_id=1, eos_token_id=2)),
                                     ("Gemma", dict(head_dim=8)),
                                     # Gemma 3: a sliding layer (window 6, its mask the step's window_mask) beside a
                                     # full one, each with its RoPE base; final softcapping
                                     ("Gemma3", dict(head_dim=8, sliding_window=6, final_logit_softcapping=3.0,
                                                     layer_types=["sliding_attention", "full_attention"])),
                                     # Gemma 2: soft-capped attention scores (the ATTENTION's softcap) and logits
                                     ("Gemma2", dict(head_dim=8, sliding_window=6, attn_logit_softcapping=2.0,
                                                     final_logit_softcapping=3.0, attn_implementation="eager"))],
                         ids=["qwen2", "mistral-window6", "qwen3", "phi3-window6", "qwen3-yarn", "granite", "olmo2", "phi3-longrope",
                              "phi3-partial-rotary", "smollm3-nope", "gemma", "gemma3", "gemma2"])
def test_greedy_matches_transformers(kind, kw, monkeypatch):
    # from the second decode step the token and the next inputs (a sliding window's dropped column too) come from one
    # kernel (codegen/kernels/greedy.py), run on the CPU here under the interpreter: 38 of the 40 tokens
    from kiln.llm import generator
    calls, real = [], generator.gk.greedy
    monkeypatch.setattr(generator.gk, "greedy", lambda *a, **kw: calls.append((kw.get("drop"), kw.get("window_drop")))
                        or real(*a, **kw))
    monkeypatch.setattr(generator, "GREEDY_KERNEL_DEVICES", ("cuda", "cpu"))
    hf = hf_model(kind, **kw)
    g = kiln.from_hf(hf, max_seq=128, batch_buckets=(4,), eos_token_id=[])
    r = g.generate(PROMPTS, max_new_tokens=40)
    for p, got in zip(PROMPTS, r.tokens):
        assert got == hf_greedy(hf, p, 40)
    # (LongRoPE: the three steps that prefill again, and the first step after each, sample instead)
    longrope = kw.get("rope_parameters", {}).get("rope_type") == "longrope"
    # (the greedy kernel drops a key from the mask for Mistral's and Phi-3's window; Gemma 2 / 3's sliding layers' own
    # mask advances beside it, in the same launch)
    assert len(calls) == 38 - 6 * longrope
    assert any(d is not None for d, _ in calls) == ("sliding_window" in kw and "Gemma" not in kind)
    assert any(w is not None for _, w in calls) == ("sliding_window" in kw and "Gemma" in kind)


def test_longrope_prefills_again_where_a_row_passes_its_original_length(tmp_path):
    # sampled (not greedy): the rows of 5 and 3 tokens pass 8 after steps 3 and 5, so two prefills follow the first;
    # a prompt already past it (10 tokens) needs none. The tokens are transformers' (top_k 1: its greedy)
    kw = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, original_max_position_embeddings=8,
              rope_parameters=dict(rope_type="longrope", rope_theta=1e4, short_factor=[1.0, 1.2, 1.6, 2.4],
                                   long_factor=[1.0, 2.0, 4.0, 9.0]))
    hf = hf_model("Phi3", **kw)
    g = kiln.from_hf(hf, max_seq=64, batch_buckets=(2,), eos_token_id=[])
    runs, real = [], g.compiled.run
    g.compiled.run = lambda inputs: runs.append(inputs[0].shape) or real(inputs)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13]]
    r = g.generate(prompts, max_new_tokens=12, sampling=SamplingParams(temperature=1.0, top_k=1))
    assert [tuple(t) for t in runs] == [(2, 16), (2, 16 + 4), (2, 16 + 6)]  # (prefill bucket 16: the same slots after)
    assert r.tokens == [hf_greedy(hf, p, 12) for p in prompts]
    runs.clear()
    assert g.generate([list(range(1, 11))], max_new_tokens=6).tokens[0] == hf_greedy(hf, list(range(1, 11)), 6)
    assert [tuple(t) for t in runs] == [(2, 16)]
    back = kiln.Generator.load(g.save(tmp_path / "g.kiln"))  # (the artifact keeps the original length)
    assert back.longrope == 8 and back.generate(prompts, max_new_tokens=12).tokens == r.tokens


def test_greedy_64_tokens_match_transformers_for_a_batch_of_different_lengths(llama):
    hf, g = llama
    r = g.generate(PROMPTS, max_new_tokens=64)
    assert r.finish_reasons == ["length"] * 3 and [len(t) for t in r.tokens] == [64] * 3
    for p, got in zip(PROMPTS, r.tokens):
        assert got == hf_greedy(hf, p, 64)
    assert g.generate(PROMPTS[1], max_new_tokens=64).tokens[0] == r.tokens[1]  # alone (batch bucket 1): the same


def test_stream_eos_and_finish_reasons(llama):
    hf, g = llama
    full = g.generate(PROMPTS[:2], max_new_tokens=12).tokens
    eos = full[0][4]  # the 5th token of prompt 0 becomes its stop token
    g.eos = {eos}
    try:
        steps = list(g.stream(PROMPTS[:2], max_new_tokens=12))
    finally:
        g.eos = set()
    stop0 = full[0].index(eos)
    assert steps[stop0].reasons[0] == "eos" and all(s.tokens[0] is None for s in steps[stop0 + 1:])
    got1 = [s.tokens[1] for s in steps if s.tokens[1] is not None]
    want1 = full[1][: full[1].index(eos) + 1] if eos in full[1] else full[1]
    assert got1 == want1
    assert [s.tokens[0] for s in steps[: stop0 + 1]] == full[0][: stop0 + 1]


def test_sampling_is_seeded_and_differs_from_greedy(llama):
    _, g = llama
    p = SamplingParams(temperature=1.5, top_k=20, top_p=0.95, seed=7)
    a = g.generate(PROMPTS, max_new_tokens=24, sampling=p).tokens
    b = g.generate(PROMPTS, max_new_tokens=24, sampling=p).tokens
    assert a == b and a != g.generate(PROMPTS, max_new_tokens=24).tokens


def test_bad_requests_are_clear_errors_and_leave_the_generator_usable(llama):
    _, g = llama
    want = g.generate(PROMPTS[0], max_new_tokens=8).tokens
    with pytest.raises(InputError, match="prompt 0 is empty"):
        g.generate([[]], max_new_tokens=8)
    with pytest.raises(InputError, match="cache holds 128"):
        g.generate([list(range(1, 90))], max_new_tokens=40)
    with pytest.raises(InputError, match="at most 4"):
        g.generate(PROMPTS * 2, max_new_tokens=8)
    with pytest.raises(InputError, match="outside the vocabulary"):
        g.generate([[5, 1000]], max_new_tokens=8)
    with pytest.raises(InputError, match=r"has 130 tokens; the cache holds 128"):  # (not "padded to 128")
        g.generate([[5] * 130], max_new_tokens=1)
    with pytest.raises(InputError, match=r"token id 1.5 \(float\); token ids are integers"):  # (int() would make it 1)
        g.generate([[5, 1.5]], max_new_tokens=8)
    with pytest.raises(InputError, match="prompt 1 is a float32 tensor"):
        g.generate([[5, 6], torch.tensor([5.0, 6.0])], max_new_tokens=8)
    with pytest.raises(InputError, match="token id True"):
        g.generate([[5, True]], max_new_tokens=8)
    with pytest.raises(InputError, match="prompts are int"):
        g.generate(5, max_new_tokens=8)
    with pytest.raises(InputError, match="need a tokenizer"):
        g.generate(PROMPTS[0], max_new_tokens=8, stop=["x"])
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    assert g.generate(PROMPTS[0], max_new_tokens=8).tokens == want


def test_tensor_prompts_are_rows(llama):
    # a 2-d tensor (HF's input_ids) is one prompt a row; a 1-d tensor or array one prompt (a 2-d one was one prompt of
    # its rows run together before)
    _, g = llama
    want = g.generate(PROMPTS[:2], max_new_tokens=4).tokens
    two = [p[:3] for p in PROMPTS[:2]]
    assert g.generate(torch.tensor(two), max_new_tokens=4).tokens == g.generate(two, max_new_tokens=4).tokens
    assert g.generate(np.array(PROMPTS[0]), max_new_tokens=4).tokens == want[:1]
    assert g.generate(torch.tensor(PROMPTS[1]), max_new_tokens=4).tokens == want[1:]


def word_tokenizer(vocab_size=97):
    """A word-level fast tokenizer over "w0" .. "w96" (built in memory, no files, no network)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab_size)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    from tokenizers import decoders

    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="w1")


def test_text_prompts_stop_strings_and_streamed_text():
    hf = hf_model()
    tok = word_tokenizer()
    g = kiln.from_hf(hf, tokenizer=tok, max_seq=64, batch_buckets=(2,), eos_token_id=[])
    ids = g.generate("w5 w6 w7", max_new_tokens=10).tokens[0]
    assert ids == hf_greedy(hf, [5, 6, 7], 10)
    third = tok.decode(ids[2:3])
    r = g.generate("w5 w6 w7", max_new_tokens=10, stop=[third])
    assert r.finish_reasons == ["stop"] and r.tokens[0] == ids[: ids.index(ids[2]) + 1]
    deltas = [s.texts[0] for s in g.stream("w5 w6 w7", max_new_tokens=10, text=True)]
    assert "".join(deltas).split() == tok.decode(ids).split()


@pytest.mark.interpreter
@pytest.mark.parametrize("attention", ["sdpa", "kiln-decode", "kiln-decode-last", "kiln-decode-whole"])
def test_kernels_backend_writes_the_cache_in_place_and_matches(attention):
    """The kernels backend (Triton interpreter on CPU): one prefill and one decode plan, the cache adopted;
    attention by SDPA or kiln's split-KV decode kernel (partials reduced by a second launch, by the last program of
    each kv head with the plan's counters, or one split)."""
    hf = hf_model()
    cfg = kiln.CompileConfig(backend="kernels", kernels={"gemm": "cublas", "attention": attention})
    g = kiln.from_hf(hf, max_seq=48, batch_buckets=(2,), eos_token_id=[], config=cfg)
    g.compiled.executor.target.tuner = Tuner(force=cfg.kernels)
    r = g.generate(PROMPTS[:2], max_new_tokens=6)
    for p, got in zip(PROMPTS[:2], r.tokens):
        assert got == hf_greedy(hf, p, 6)
    plans = g.compiled.executor.plans
    assert sorted(p.bindings["seq"] for p in plans if p.adopted) == [1, 16]
    # each layer's two cache writes: 'update' launches, or inside the layer's rope_kv call (RoPE + KV write)
    assert all(p.describe()["launches"].get("update", 0) + 2 * p.describe()["launches"].get("rope_kv", 0) == 4 for p in plans if p.adopted)
    assert all({c: n for c, n in p.describe()["choices"].items() if not c.startswith("rope_kv:")} ==
               {"gemm:cublas": p.describe()["choices"]["gemm:cublas"], f"attention:{attention}": 2} for p in plans if p.adopted)


@pytest.mark.interpreter
@pytest.mark.parametrize("kind, kw", [("Gemma3", dict(layer_types=["sliding_attention", "full_attention"])),
                                      ("Gemma2", dict(attn_logit_softcapping=2.0, attn_implementation="eager"))])
def test_kernels_backend_runs_gemma(kind, kw):
    """Gemma 2 / 3 on the kernels backend (Triton interpreter): float32 (1 + w) norms around attention and MLP, the GELU
    (tanh) GLU in the GEMM epilogue, the sliding layers' window_mask, the final softcapping; Gemma 3's per-head q / k
    norms and two RoPE tables; Gemma 2's soft-capped scores in kiln's decode attention kernel."""
    hf = hf_model(kind, head_dim=8, sliding_window=8, final_logit_softcapping=3.0, **kw)
    cfg = kiln.CompileConfig(backend="kernels", kernels={"attention": "kiln-decode"})
    g = kiln.from_hf(hf, max_seq=48, batch_buckets=(2,), eos_token_id=[], config=cfg)
    g.compiled.executor.target.tuner = Tuner(force=cfg.kernels)
    r = g.generate(PROMPTS[:2], max_new_tokens=4)
    assert r.tokens == [hf_greedy(hf, p, 4) for p in PROMPTS[:2]]
    assert all(p.describe()["choices"]["attention:kiln-decode"] == 2 for p in g.compiled.executor.plans if p.adopted)


@pytest.mark.interpreter
def test_gemma3_half_precision_q_k_norms_run_in_the_rope_kv_call():
    # in 16 bits Gemma 3's q / k norm is CAST(RMSNORM(CAST(q, float32), float32 weight), float16): the rope_kv group
    # (or the decode attention taking it over) applies it, not a kernel of its own before RoPE
    hf = hf_model("Gemma3", head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"]).half()
    cfg = kiln.CompileConfig(backend="kernels", kernels={"attention": "kiln-rope-decode", "rope_kv": "triton-rope-kv",
                                                          "gemm": "cublas"})
    g = kiln.from_hf(hf, max_seq=32, batch_buckets=(1,), eos_token_id=[], config=cfg)
    g.compiled.executor.target.tuner = Tuner(force=cfg.kernels)  # (one candidate each: no timing under the interpreter)
    assert g.generate(PROMPTS[:1], max_new_tokens=3).tokens == [hf_greedy(hf, PROMPTS[0], 3)]
    plans = [p for p in g.compiled.executor.plans if p.adopted]
    assert plans and all([n.op for n in grp.nodes] == ["CAST", "RMSNORM", "CAST"] * 2 + ["ROPE", "ROPE", "INDEX_COPY", "INDEX_COPY"]
                         for p in plans for grp in p.groups if grp.kind == "rope_kv")
    assert not any(grp.kind == "pointwise" and any(u.op == "ROPE" for n in grp.outputs for u in n.users)
                   for p in plans for grp in p.groups)


def test_gemma3_sliding_layers_keep_their_window_through_save_and_load(tmp_path):
    hf = hf_model("Gemma3", head_dim=8, sliding_window=5, layer_types=["sliding_attention", "full_attention"])
    g = kiln.from_hf(hf, max_seq=48, batch_buckets=(2,), eos_token_id=[])
    assert g.spec["layer_window"] == 5 and [n.attrs["name"] for n in g.compiled.graph.inputs][3:5] == ["mask", "window_mask"]
    want = [hf_greedy(hf, p, 12) for p in PROMPTS[:2]]
    assert g.generate(PROMPTS[:2], max_new_tokens=12).tokens == want
    back = kiln.Generator.load(g.save(tmp_path / "g.kiln"))
    assert back.layer_window == 5 and back.generate(PROMPTS[:2], max_new_tokens=12).tokens == want


def test_gemma2_checkpoint_directory(tmp_path):
    # transformers' save_pretrained of a Gemma 2 (model_type gemma2): read by the checkpoint loader, the softcaps kept
    hf = hf_model("Gemma2", head_dim=8, sliding_window=5, attn_logit_softcapping=2.0, attn_implementation="eager")
    hf.save_pretrained(tmp_path / "ckpt")
    g = kiln.Generator.from_pretrained(tmp_path / "ckpt", dtype=torch.float32, max_seq=48, batch_buckets=(4,), eos_token_id=[])
    assert all(n.attrs["softcap"] == 2.0 for n in g.compiled.graph.nodes if n.op == "ATTENTION")
    assert g.generate(PROMPTS, max_new_tokens=10).tokens == [hf_greedy(hf, p, 10) for p in PROMPTS]


def test_gemma3_multimodal_model_generates_text(tmp_path):
    # Gemma 3's multimodal models (4B and up): the text decoder read (text_config; weights under model.language_model in
    # memory, language_model.model in the checkpoint), the vision tower not; text prompts give transformers' tokens
    text = dict(TINY, head_dim=8, sliding_window=6, layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14)
    torch.manual_seed(0)
    hf = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(text_config=text, vision_config=vision,
                                                                               mm_tokens_per_image=4)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    hf.generation_config.eos_token_id = None
    want = [hf_greedy(hf, p, 10) for p in PROMPTS]
    assert kiln.from_hf(hf, max_seq=48, batch_buckets=(4,), eos_token_id=[]).generate(PROMPTS, max_new_tokens=10).tokens == want
    hf.save_pretrained(tmp_path / "ckpt")
    g = kiln.Generator.from_pretrained(tmp_path / "ckpt", dtype=torch.float32, max_seq=48, batch_buckets=(4,), eos_token_id=[])
    assert g.generate(PROMPTS, max_new_tokens=10).tokens == want


def test_save_and_load_keep_settings_and_tokenizer(tmp_path):
    hf = hf_model()
    g = kiln.from_hf(hf, tokenizer=word_tokenizer(), max_seq=64, batch_buckets=(1, 2), eos_token_id=[3])
    want = g.generate(["w5 w6 w7", "w9"], max_new_tokens=12)
    path = g.save(tmp_path / "g.kiln")
    back = kiln.Generator.load(path)
    assert back.spec == g.spec and back.eos == {3} and back.tokenizer is not None
    got = back.generate(["w5 w6 w7", "w9"], max_new_tokens=12)
    assert got.tokens == want.tokens and got.texts == want.texts and got.finish_reasons == want.finish_reasons
    plain = kiln.compile(torch.nn.Linear(3, 3), (torch.randn(2, 3),)).save(tmp_path / "plain.kiln")
    with pytest.raises(kiln.ArtifactError, match="not a generator"):
        kiln.Generator.load(plain)


def test_cli_compile_generate_and_generate(tmp_path, capsys):
    from kiln.cli import main

    path = tmp_path / "lt.kiln"
    assert main(["compile", "--model", "llama-tiny", "--generate", "--max-seq", "48", "--batch-buckets", "1,2", "-o", str(path), "-q"]) == 0
    assert main(["generate", str(path), "--ids", "1,2,3", "--ids", "5 6", "--max-new-tokens", "5", "-q"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    g = kiln.Generator.load(path)
    want = g.generate([[1, 2, 3], [5, 6]], max_new_tokens=5).tokens
    assert lines[-2:] == [f"[0] {' '.join(map(str, want[0]))}", f"[1] {' '.join(map(str, want[1]))}"]
    assert main(["generate", str(path), "--prompt", "hello"]) == 1
    assert "no tokenizer" in capsys.readouterr().err
    assert main(["generate", str(path), "--ids", "1,2", "--max-new-tokens", "60"]) == 1  # 16 + 60 > 48 slots
    assert "cache holds 48" in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("kind,attention", [("Llama", a) for a in (None, "sdpa", "kiln-decode", "kiln-decode-last", "kiln-decode-whole")]
                         + [("Qwen3", None), ("Qwen3", "kiln-decode"), ("Phi3", None), ("SmolLM3", None), ("Gemma", None),
                            ("Gemma3", None), ("Gemma2", None)])
def test_gpu_bf16_generation_with_cuda_graphs(kind, attention):
    """bf16 on CUDA, kernels backend, CUDA graphs: greedy tokens equal transformers' where its own top-2 logits
    are apart; a divergence is allowed only where they are within bf16 noise. (Qwen3: its q / k norms in the rope_kv
    call. Phi3: Phi-4-mini's partial rotary with LongRoPE, its rows prefilled again past 24 tokens. SmolLM3: a NoPE layer.
    Gemma: (1 + w) norms in float32, GELU (tanh) MLP, head dim 256. Gemma 3: norms around attention and MLP, q / k norms,
    two RoPE bases, final softcapping.)"""
    kw = {"Qwen3": dict(head_dim=16), "Phi3": dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, partial_rotary_factor=0.5,
                                                   original_max_position_embeddings=24, rope_parameters=dict(
                                                       rope_type="longrope", rope_theta=1e4, short_factor=[1.0, 1.2],
                                                       long_factor=[1.5, 3.0])),
          "SmolLM3": dict(num_hidden_layers=3, no_rope_layer_interval=3, pad_token_id=0, bos_token_id=1, eos_token_id=2),
          "Gemma": dict(head_dim=256), "Gemma3": dict(head_dim=16, sliding_window=12, final_logit_softcapping=10.0,
                                                      layer_types=["sliding_attention", "full_attention"]),
          "Gemma2": dict(head_dim=16, sliding_window=12, attn_logit_softcapping=5.0, final_logit_softcapping=10.0,
                         attn_implementation="eager")}.get(kind, {})
    hf = hf_model(kind, **kw).to("cuda", torch.bfloat16)
    cfg = kiln.CompileConfig(kernels={"attention": attention} if attention else {})
    g = kiln.from_hf(hf, max_seq=96, batch_buckets=(1, 4), eos_token_id=[], config=cfg)
    r = g.generate(PROMPTS, max_new_tokens=32)
    for p, got in zip(PROMPTS, r.tokens):
        want = hf_greedy(hf, p, 32)
        k = next((i for i, (x, y) in enumerate(zip(got, want)) if x != y), None)
        if k is not None:  # transformers' own forward over the whole sequence: kiln's token its argmax, or a near tie
            with torch.no_grad():  # (not generate's token: at Phi-3's LongRoPE switch its cache handling varies by version)
                top = hf(torch.tensor([p + got[:k]], device="cuda")).logits[0, -1].float().topk(2)
            gap = float(top.values[0] - top.values[1])
            assert got[k] == int(top.indices[0]) or gap <= 0.02 * float(top.values[0].abs()) + 0.05, \
                (k, got[k], want[k], top.indices.tolist(), top.values.tolist())
    plans = [p for p in g.compiled.executor.plans if p.adopted]
    assert plans and all(p.describe()["cuda_graph"] for p in plans)
    assert g.generate(PROMPTS, max_new_tokens=32).tokens == r.tokens  # replays give the same tokens


@pytest.mark.gpu
def test_gpu_tokens_copied_aside_are_the_same(monkeypatch):
    """llm.generator.COPY_ASIDE: each step's tokens copied to the host on a side stream give the same tokens, greedy
    (the greedy kernel's steps) and sampled (a seed), batch 1 and 3, as the copy on the step's stream."""
    from kiln.llm import generator as G
    hf = hf_model().to("cuda", torch.bfloat16)
    g = kiln.from_hf(hf, max_seq=64, batch_buckets=(1, 4), eos_token_id=[])
    sampled = SamplingParams(temperature=1.0, top_k=20, seed=3)
    runs = {}
    for aside in (False, True):
        monkeypatch.setattr(G, "COPY_ASIDE", aside)
        runs[aside] = [g.generate(p, max_new_tokens=24, sampling=s).tokens for p in (PROMPTS[:1], PROMPTS)
                       for s in (None, sampled)]
    assert runs[True] == runs[False] and all(len(t) == 24 for r in runs[True] for t in r)


def test_one_request_at_a_time(llama):
    _, g = llama
    first = g.stream(PROMPTS[0], max_new_tokens=8)
    next(first)
    with pytest.raises(InputError, match="already serving"):
        g.generate(PROMPTS[1], max_new_tokens=4)
    first.close()  # dropping the stream frees the generator
    assert len(g.generate(PROMPTS[1], max_new_tokens=4).tokens[0]) == 4


def test_from_pretrained_checkpoint_directory_with_its_tokenizer(tmp_path, capsys):
    """A local HF checkpoint (config.json + safetensors + tokenizer files): the Python API and the CLI."""
    from kiln.cli import main

    hf = hf_model()
    tok = word_tokenizer()
    hf.save_pretrained(tmp_path / "ckpt")
    tok.save_pretrained(tmp_path / "ckpt")
    g = kiln.Generator.from_pretrained(tmp_path / "ckpt", dtype=torch.float32, max_seq=64, batch_buckets=(1,),
                                       eos_token_id=[])
    assert g.tokenizer is not None
    r = g.generate("w5 w6 w7", max_new_tokens=8)
    assert r.tokens[0] == hf_greedy(hf, [5, 6, 7], 8)
    out = tmp_path / "g.kiln"
    assert main(["compile", "--model", "llama-tiny", "--weights", str(tmp_path / "ckpt"), "--generate", "--max-seq", "64",
                 "--batch-buckets", "1", "-o", str(out), "-q"]) == 0
    assert "with its tokenizer" in capsys.readouterr().out
    assert kiln.Generator.load(out).generate("w5 w6 w7", max_new_tokens=8).texts == r.texts


def test_a_decoder_kiln_does_not_generate_for_is_refused_by_name():
    cfg = transformers.GPTNeoXConfig(**{**TINY, "num_hidden_layers": 1})
    with pytest.raises(kiln.KilnError, match="model_type 'gpt_neox' is not supported") as info:
        kiln.from_hf(transformers.GPTNeoXForCausalLM(cfg))
    assert "qwen3" in info.value.hint and "kiln.compile" in info.value.hint





def test_cli_compiles_an_llm_checkpoint_without_a_model_name(tmp_path, capsys):
    # --weights DIR alone: the checkpoint's model_type says what it is (a Qwen3 here), its directory names it, and its
    # config (not a built-in model's) gives the generator's shape; a checkpoint kiln builds only by name is refused
    from kiln.cli import main

    hf = hf_model("Qwen3", head_dim=16)
    hf.save_pretrained(tmp_path / "qwen3-tiny")
    assert main(["compile", "--weights", str(tmp_path / "qwen3-tiny"), "--generate", "--max-seq", "48", "--batch-buckets", "1",
                 "-o", str(tmp_path / "q.kiln"), "-q"]) == 0
    assert "a generator for qwen3-tiny" in capsys.readouterr().out
    g = kiln.Generator.load(tmp_path / "q.kiln")
    assert g.generate([PROMPTS[1]], max_new_tokens=8).tokens[0] == hf_greedy(hf, PROMPTS[1], 8)
    assert main(["compile", "--weights", str(tmp_path / "qwen3-tiny"), "-q", "-o", str(tmp_path / "plain.kiln")]) == 0
    assert kiln.load(tmp_path / "plain.kiln").graph.symbols["seq"] == (1, hf.config.max_position_embeddings)  # (its own)
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text('{"model_type": "gpt2"}')
    assert main(["compile", "--weights", str(tmp_path / "gpt2"), "-q"]) == 1
    err = capsys.readouterr().err
    assert "a gpt2 checkpoint, which kiln builds only as a named model" in err and "qwen3" in err
    (tmp_path / "pipe" / "transformer").mkdir(parents=True)
    (tmp_path / "pipe" / "transformer" / "config.json").write_text("{}")
    assert main(["compile", "--weights", str(tmp_path / "pipe"), "-q"]) == 1
    assert "no config.json of its own: a diffusers pipeline directory?" in capsys.readouterr().err
