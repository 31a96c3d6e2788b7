"""kiln.llm.step_capture: the generator's step captured with two layers and repeated in the IR is the graph a capture of
every layer gives, before the passes (node for node, weights the very same tensors) and after them, and its generator
answers with the same greedy tokens and the same logits, bit for bit; for Llama (GQA, untied and tied embeddings),
Qwen2 (attention biases), Qwen3 (q / k norms), Phi-3 (merged projections), Mistral (sliding window), SmolLM3 (NoPE
layers: blocks of layers repeated), int8 / fp8 KV caches and a tensor-parallel shard. Where the layers differ (in the
captured ones, or a later one) the step is captured whole, says so, and answers as the eager step does."""
import pytest
import torch
import transformers

import kiln
import kiln.llm.step_capture as step_capture
from kiln.ir.serialize import graph_to_json
from kiln.llm.generator import Generator, cache_names, new_caches, step_dims, step_inputs
from kiln.llm.step_capture import capture_step, step_function
from kiln.models.llama import MLP, LlamaConfig, LlamaStep, llama_from_tensors
from kiln.passes.report import Report
from kiln.testing import TOL, rel_err

TINY = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, rms_norm_eps=1e-5)
PROMPTS = [[5, 6, 7, 8, 9], [11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27]]
CASES = {
    "llama-gqa": ("Llama", dict(num_hidden_layers=4), None),
    "llama-tied-6-layers": ("Llama", dict(num_hidden_layers=6, tie_word_embeddings=True), None),
    "qwen2-bias": ("Qwen2", dict(num_hidden_layers=5), None),
    "mistral-window": ("Mistral", dict(num_hidden_layers=4, sliding_window=6), None),
    "llama-int8-kv": ("Llama", dict(num_hidden_layers=4, num_key_value_heads=4), "int8"),
    "qwen2-fp8-kv": ("Qwen2", dict(num_hidden_layers=3), "fp8"),
    "qwen3-qk-norms": ("Qwen3", dict(num_hidden_layers=4, head_dim=16), None),
    "olmo2-post-norms": ("Olmo2", dict(num_hidden_layers=3, pad_token_id=0, bos_token_id=1, eos_token_id=2), None),
    "phi3-merged": ("Phi3", dict(num_hidden_layers=3, sliding_window=6, pad_token_id=0, bos_token_id=1, eos_token_id=2), None),
    # every second layer without RoPE: blocks of two layers captured twice, the third and fourth repeated
    "smollm3-nope-blocks": ("SmolLM3", dict(num_hidden_layers=8, no_rope_layer_interval=2, pad_token_id=0, bos_token_id=1,
                                            eos_token_id=2), None),
    # Gemma 3: two sliding layers to each full one (period 3), 11 layers: the first 2 captured as they are, then blocks
    # of 3 (as Gemma-3-1B's 26 = 2 + 4 x 6)
    "gemma3-blocks-after-a-prefix": ("Gemma3", dict(num_hidden_layers=11, head_dim=8, sliding_window=6, sliding_window_pattern=3),
                                     None),
}


def hf_model(kind, **kw):
    torch.manual_seed(0)
    config = getattr(transformers, "Gemma3TextConfig" if kind == "Gemma3" else f"{kind}Config")(**{**TINY, **kw})
    m = getattr(transformers, f"{kind}ForCausalLM")(config).eval()
    with torch.no_grad():  # larger weights: logits far apart
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return m


def kiln_model(hf):
    state = hf.state_dict()
    return llama_from_tensors(LlamaConfig.from_hf(hf.config.to_dict()), state, dict.fromkeys(state, "hf"), "hf").eval()


def example(model, kv, max_seq=64, batch=2):
    """The example inputs and dynamic dims Generator.compile captures with."""
    cfg = model.config
    spec = dict(num_layers=cfg.num_hidden_layers, kv_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim, max_seq=max_seq,
                kv_cache_dtype=kv)
    x = step_inputs(torch.zeros(batch, 2, dtype=torch.long), torch.zeros(batch, dtype=torch.long), 0,
                    new_caches(spec, batch, torch.float32, "cpu"), max_seq, cfg.sliding_window, cfg.layer_window)
    return x, step_dims(cache_names(cfg.num_hidden_layers, kv), batch, max_seq, cfg.layer_window is not None)


def assert_same_graph(got, want, same_tensors=True):
    """Node for node, the same interface, weights in the same order: views of the same memory (``same_tensors``: the
    model's own parameters, as the capture binds them) or equal tensors (what the passes made of them)."""
    assert graph_to_json(got) == graph_to_json(want)
    assert list(got.weights) == list(want.weights)
    for k, w in want.weights.items():
        t = got.weights[k]
        if same_tensors:
            assert (t.data_ptr(), t.stride(), t.shape, t.dtype) == (w.data_ptr(), w.stride(), w.shape, w.dtype)
        else:
            assert torch.equal(t, w)
        assert type(t) is torch.Tensor and not t.requires_grad


def generators(hf, monkeypatch, **kw):
    """The generator of ``hf`` with the step captured whole, then with two layers repeated."""
    out = []
    for layers in (0, 2):
        monkeypatch.setattr(step_capture, "CAPTURE_LAYERS", layers)
        out.append(kiln.from_hf(hf, max_seq=64, batch_buckets=(2,), eos_token_id=[], **kw))
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_repeated_capture_is_the_full_capture(case, monkeypatch):
    kind, kw, kv = CASES[case]
    hf = hf_model(kind, **kw)
    model = kiln_model(hf)
    x, dims = example(model, kv)
    report = Report()
    whole, repeated = capture_step(model, kv, x, dims, Report(), layers=0), capture_step(model, kv, x, dims, report)
    assert_same_graph(repeated.graph, whole.graph)
    assert repeated.signature.to_dict() == whole.signature.to_dict()
    assert [t is u for t, u in zip(repeated.example, whole.example)] == [True] * len(whole.example)
    blocks = {"SmolLM3": " (blocks of 2: layer i is built as layer i mod 2)",
              "Gemma3": " (blocks of 3: layer i is built as layer i mod 3; the blocks after the first 2 layers)"}.get(kind, "")
    captured = {"SmolLM3": 4, "Gemma3": 8}.get(kind, 2)
    assert report.notes == [f"captured {captured} of {kw['num_hidden_layers']} layers, the rest repeated in the IR{blocks}"]
    assert "repeat layers" in report.phases

    full, rep = generators(hf, monkeypatch, kv_cache_dtype=kv)
    assert_same_graph(rep.compiled.graph, full.compiled.graph, same_tensors=False)
    assert rep.generate(PROMPTS, max_new_tokens=12).tokens == full.generate(PROMPTS, max_new_tokens=12).tokens
    inputs = rep._inputs(torch.tensor([p[:5] for p in PROMPTS]), torch.zeros(2, dtype=torch.long), 0, rep.caches(2))
    got = rep.compiled.run(list(inputs.values()))[0]
    inputs = full._inputs(torch.tensor([p[:5] for p in PROMPTS]), torch.zeros(2, dtype=torch.long), 0, full.caches(2))
    assert torch.equal(got, full.compiled.run(list(inputs.values()))[0])


def test_weights_are_named_as_the_models_parameters():
    # the step is captured as a function closing over the model (torch.export would call its tensors lifted_tensor_N):
    # the graph's weights, captured or repeated, take the parameters' names, which the quantization report lists
    hf = hf_model("Qwen3", num_hidden_layers=3, head_dim=16)
    model = kiln_model(hf)
    x, dims = example(model, None)
    params = {**dict(model.named_parameters()), **dict(model.named_buffers())}  # (RoPE's inv_freq)
    for layers in (0, 2):
        graph = capture_step(model, None, x, dims, Report(), layers=layers).graph
        assert set(graph.weights) <= set(params), sorted(set(graph.weights) - set(params))
        assert all(graph.weights[n].data_ptr() == params[n].data_ptr() for n in graph.weights)
        assert "model.layers.2.self_attn.k_norm.weight" in graph.weights
    g = kiln.from_hf(hf, max_seq=64, batch_buckets=(1,), eos_token_id=[], quantize="w8a16")
    notes = g.compiled.report().to_dict()["passes"]["quantize_weights"]["notes"]
    assert any(n.startswith("model.layers.2.self_attn.q_proj+k_proj+v_proj.weight [") for n in notes), notes


def test_a_tensor_parallel_shard_is_the_same(monkeypatch):
    hf = hf_model("Llama", num_hidden_layers=4)
    full, rep = generators(hf, monkeypatch, config=kiln.CompileConfig(tp=2, tp_rank=1))
    assert rep.spec == full.spec and rep.spec["tp"] == [1, 2]
    assert_same_graph(rep.compiled.graph, full.compiled.graph, same_tensors=False)


def test_two_layers_are_captured_whole():
    model = kiln_model(hf_model("Llama", num_hidden_layers=2))
    report = Report()
    src = capture_step(model, None, *example(model, None), report)
    assert report.notes == [] and "repeat layers" not in report.phases
    assert sum(n.op == "ATTENTION" for n in src.graph.nodes) == 2


def eager_logits(model, x: dict) -> torch.Tensor:
    cfg = model.config
    caches = {k: v.clone() for k, v in x.items() if "cache" in k}
    step = step_function(LlamaStep(model), cfg.num_hidden_layers)
    with torch.no_grad():
        return step(**{**x, **caches})


@pytest.mark.parametrize("layers,change,reason", [
    ((1, 2, 3), "mlp", "repeating the last of 2 captured ones declined (the layers differ"),
    ((3,), "eps", "repeating the last of 2 captured ones declined (layer 3 is not built as layer 1 is"),
], ids=["captured-layers-differ", "a-later-layer-differs"])
def test_layers_that_differ_are_captured_whole(layers, change, reason):
    model = kiln_model(hf_model("Llama", num_hidden_layers=4))
    for i in layers:
        if change == "mlp":  # another intermediate size than layer 0's: the captured layers' graphs differ
            torch.manual_seed(i)
            model.model.layers[i].mlp = MLP(LlamaConfig(**{**vars(model.config), "intermediate_size": 48})).eval()
        else:  # another eps: the same weights, another program
            model.model.layers[i].input_layernorm.eps = 1.0
    g = Generator.compile(model, max_seq=64, batch_buckets=(2,), eos_token_id=[])
    x = step_inputs(torch.tensor([p[:5] for p in PROMPTS]), torch.zeros(2, dtype=torch.long), 0, g.caches(2), 64, None)
    want = eager_logits(model, x)
    assert rel_err(g.compiled.run(list(x.values()))[0], want) <= TOL[torch.float32]
    notes = g.compiled.report().notes
    assert any(n.startswith("captured all 4 layers: " + reason) for n in notes), notes
