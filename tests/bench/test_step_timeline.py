"""bench/step_timeline.py: a CUDA graph's kernels matched to the plan's calls by order, each call's duration, marginal
time (how much later the replay's running end is once it ran) and lead (how long it started before the activity before
it ended), summed by role; the roles of a real decode plan's calls."""
import sys
from pathlib import Path

import pytest
import torch

from kiln.config import CompileConfig
from kiln.llm.generator import Generator
from kiln.models.llama import LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
import step_timeline as st  # noqa: E402


def test_device_events_keep_kernels_copies_and_memsets_in_start_order():
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "b", "ts": 12.0, "dur": 3.0},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaGraphLaunch", "ts": 1.0, "dur": 5.0},
        {"ph": "X", "cat": "gpu_memset", "name": "Memset", "ts": 10.0, "dur": 1.0},
        {"ph": "i", "cat": "kernel", "name": "instant", "ts": 11.0},
        {"ph": "X", "cat": "kernel", "name": "a", "ts": 5.5, "dur": 2.5}]}
    assert st.device_events(trace) == [("a", 5.5, 8.0), ("Memset", 10.0, 11.0), ("b", 12.0, 15.0)]


def test_launch_counts_split_at_the_markers():
    ev = lambda name: (name, 0.0, 0.0)  # noqa: E731
    run = [ev("x"), ev("y"), ev(st.MARKER), ev(st.MARKER), ev("z"), ev(st.MARKER)]
    assert st.launch_counts(run, 3) == [2, 0, 1]
    assert st.launch_counts(run, 2) is None  # (three markers for two calls)
    assert st.launch_counts(run + [ev("w")], 3) is None  # (a launch after the last marker)


def test_timeline_marginal_and_lead_per_call_and_role():
    # calls: A (one kernel), B (two kernels), C (one kernel, started under PDL 1 us before B's second ended)
    one = [("a", 0.0, 4.0), ("b1", 5.0, 7.0), ("b2", 7.5, 10.0), ("c", 9.0, 12.0)]
    later = [(n, s + 100.0, e + 100.0) for n, s, e in one]
    t = st.timeline(one + later, [1, 2, 1], ["qkv", "attention", "qkv"], replays=2)
    assert t["matched"] and t["kernels"] == 4 and t["replay_us"] == 12.0
    # marginals: a 4 (the replay's first start is the origin), b 3 + 3 = 6, c 2: they sum to the span
    assert t["by_role"] == {"qkv": [2, 7.0, 6.0, 1.0], "attention": [1, 4.5, 6.0, -1.0]}
    assert sum(m for _, _, m, _ in t["by_role"].values()) == t["replay_us"]
    assert t["top"][0] == [1, "attention", 4.5, 6.0, -1.0]


def test_timeline_without_matching_counts_gives_the_spans_only():
    one = [("a", 0.0, 4.0), ("b", 5.0, 8.0)]
    t = st.timeline(one + [(n, s + 50, e + 50) for n, s, e in one], [1, 2], ["x", "y"], replays=2)
    assert t == {"replay_us": 8.0, "kernels": 2, "matched": False}
    assert st.summary(t) == "replay 8.0 us, 2 kernels (calls not matched)"
    if not torch.cuda.is_available():
        assert st.step_timeline(object()) == {}  # (no GPU: nothing to profile)


@pytest.mark.interpreter
def test_call_labels_of_a_decode_plan():
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, vocab_size=97, hidden_size=64, intermediate_size=96,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    config = CompileConfig(backend="kernels", kernels={"gemm": "triton-skinny", "attention": "sdpa"})
    g = Generator.compile(model, max_seq=32, batch_buckets=(1,), config=config, eos_token_id=[])
    ids = torch.zeros(1, 1, dtype=torch.long)
    inputs = list(g._inputs(ids, torch.zeros(1, dtype=torch.long), 3, g.caches(1)).values())
    plan = g.compiled.executor.plan_for(inputs)
    labels = [st.call_label(c) for c in plan.calls]
    assert [lb for lb in labels if lb in ("qkv", "o", "gate/up", "down", "head")] == ["qkv", "o", "gate/up", "down", "head"]
    assert "attention" in labels


@pytest.mark.parametrize("name, role", [
    ("transformer_blocks.3.attn1.to_q+to_k+to_v.weight", "qkv"), ("transformer_blocks.3.attn1.to_out.0.weight", "o"),
    ("transformer_blocks.3.ff.net.0.proj.weight", "fc1"), ("transformer_blocks.3.ff.net.2.weight", "fc2"),
    ("transformer.h.0.attn.c_attn.weight", "qkv"), ("transformer.h.0.attn.c_proj.weight", "o"),
    ("transformer.h.0.mlp.c_fc.weight", "fc1"), ("transformer.h.0.mlp.c_proj.weight", "fc2"),
    ("model.layers.0.mlp.down_proj.weight.qweight", "down"), ("pos_embed.proj.weight", "gemm:proj")])
def test_call_labels_of_dit_and_gpt2_weights(name, role):
    from types import SimpleNamespace as NS
    node = NS(inputs=[NS(op="INPUT", attrs={}), NS(op="WEIGHT", attrs={"name": name})])
    assert st.call_label(NS(kind="gemm", group=NS(nodes=[node]))) == role
