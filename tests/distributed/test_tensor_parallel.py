"""Tensor parallel on the CPU: two processes over gloo (``ranks.py``) run tiny Llama / Qwen2 / Qwen3 / Gemma 2 generators sharded over two
ranks, which give TP=1's logits and transformers' greedy tokens; a shard loaded on the wrong rank or world size is
refused naming the check; offline sharding (no process group) writes one artifact per rank."""
import sys
from pathlib import Path

import pytest
import torch

import kiln
from kiln.testing import rel_err

sys.path.insert(0, str(Path(__file__).parent))
import ranks  # noqa: E402

FP32_LOGITS = 1e-5  # the bound: TP=2 vs TP=1 logits in float32 (the sums of two blocks differ in rounding only)


@pytest.fixture(scope="module")
def equivalence(tmp_path_factory):
    return ranks.launch("equivalence", tmp_path_factory.mktemp("tp"))


@pytest.mark.parametrize("kind", list(ranks.MODELS))
def test_two_ranks_give_the_logits_of_one(equivalence, kind):
    for rank in equivalence:
        got = rank[kind]
        for whole, shard in zip(got["whole"], got["shard"]):
            assert shard.shape == whole.shape == (len(ranks.PROMPTS), ranks.TINY["vocab_size"])
            assert rel_err(shard.double(), whole.double()) <= FP32_LOGITS
    assert all(torch.equal(a, b) for a, b in zip(equivalence[0][kind]["shard"], equivalence[1][kind]["shard"]))


@pytest.mark.parametrize("kind", list(ranks.MODELS))
def test_two_ranks_generate_transformers_greedy_tokens(equivalence, kind):
    want = equivalence[0][kind]["hf"]
    assert [r[kind]["tokens"] for r in equivalence] == [want, want]


def test_each_rank_holds_its_heads_and_reports_its_shard(equivalence):
    # Llama: 2 kv heads, one per rank; Qwen2: 1 kv head, a copy on each rank
    assert [r["Llama"]["kv_heads"] for r in equivalence] == [1, 1] and [r["Qwen2"]["kv_heads"] for r in equivalence] == [1, 1]
    layers = ranks.TINY["num_hidden_layers"]
    for r, got in enumerate(equivalence):
        report = got["Llama"]["report"]
        # per layer: QKV + gate/up column-parallel, o + down row-parallel; the LM head vocab-parallel
        assert report["rules"] == {"column": 2 * layers + 1, "row": 2 * layers, "all_reduce": 2 * layers, "all_gather": 1}
        assert report["notes"][0].startswith(f"rank {r} of 2")
        hidden, vocab = ranks.TINY["hidden_size"], ranks.TINY["vocab_size"]
        assert f"move {4 * (2 * layers * hidden + vocab // 2)} bytes per token" in report["notes"][1]
        assert got["Llama"]["saved"] == f"Llama.rank{r}-of-2.kiln"


def test_a_shard_on_the_wrong_rank_is_refused(tmp_path):
    hf = ranks.hf_model("Llama")
    for r in range(2):  # offline: no process group, the rank given
        g = kiln.from_hf(hf, max_seq=32, batch_buckets=(1,), eos_token_id=[], config=kiln.CompileConfig(tp=2, tp_rank=r))
        assert g.save(tmp_path / "gen.kiln") == str(tmp_path / f"gen.rank{r}-of-2.kiln")
    with pytest.raises(kiln.ArtifactError, match=r"check 'tensor_parallel world size' failed: .* rank 0's shard of a 2-rank "
                                                 r"model, this process is rank 0 of 1"):
        kiln.Generator.load(tmp_path / "gen.rank0-of-2.kiln")
    errors = [r["error"] for r in ranks.launch("wrong_rank", tmp_path)]
    assert "check 'tensor_parallel rank' failed: the artifact is rank 1's shard, this process is rank 0" in errors[0]
    assert "check 'tensor_parallel rank' failed: the artifact is rank 0's shard, this process is rank 1" in errors[1]


def test_tp_without_a_process_group_is_a_clear_error():
    hf = ranks.hf_model("Llama")
    with pytest.raises(kiln.KilnError, match="tp=2 needs an initialised torch.distributed process group of 2 ranks"):
        kiln.from_hf(hf, max_seq=32, batch_buckets=(1,), tp=2)


def test_collectives_sum_and_gather_across_ranks(tmp_path):
    x = [torch.arange(12, dtype=torch.float64).reshape(3, 4) + r + 1 for r in range(2)]
    want = {"ALL_REDUCE{}": x[0] + x[1], "ALL_GATHER{'axis': 1}": torch.cat(x, 1), "ALL_GATHER{'axis': 1, 'stride': 2}": x[0]}
    for got in ranks.launch("collectives", tmp_path):
        for key, (ref, kernels_plan) in got.items():
            assert torch.equal(ref, want[key]) and ref.dtype == torch.float64  # the interpreter's reference, in float64
            assert torch.equal(kernels_plan.double(), want[key])  # the kernels plan's call into its planned buffer
