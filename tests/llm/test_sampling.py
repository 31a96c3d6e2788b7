"""kiln.llm.sampling: greedy is argmax, top-k / top-p keep exactly the tokens HF's warpers keep,
draws follow softmax(filtered logits / T) (chi-square), per-row params mix greedy and sampled rows,
seeds reproduce, bad params name their field, and nothing reads a tensor value on the host."""

import math

import pytest
import torch
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from kiln import InputError
from kiln.llm.sampling import SamplingParams, filter_logits, make_generator, sample, sample_rows

# Upper 0.1% points of chi-square by degrees of freedom: a correct sampler fails a given seeded
# check with probability 1e-3, and every check here is deterministic under its seed.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88}

PROBS_4 = torch.tensor([0.5, 0.3, 0.15, 0.05])  # known probabilities for top-p's boundaries


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def hf_filter(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """HF's warpers on one row [V]: temperature, then top-k, then top-p, as generate() orders them."""
    x = row.float().unsqueeze(0) / temperature
    if top_k > 0:
        x = TopKLogitsWarper(top_k)(None, x)
    if top_p < 1.0:
        x = TopPLogitsWarper(top_p)(None, x)
    return x[0]


def draw(row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """n independent draws from one row [V]: the row repeated n times in one batch."""
    return sample(row.expand(n, -1), params, gen(seed))


def support(tokens: torch.Tensor) -> set[int]:
    return set(tokens.unique().tolist())


def chi_square(tokens: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the tokens with p > 0, and its degrees of freedom."""
    counts = torch.bincount(tokens, minlength=probs.numel()).double()
    keep = probs > 0
    expected = probs.double()[keep] * tokens.numel()
    return float(((counts[keep] - expected) ** 2 / expected).sum()), int(keep.sum()) - 1


def test_greedy_is_argmax_lowest_index_on_ties():
    logits = torch.randn(7, 33, generator=gen(1))
    logits[3, [4, 9, 20]] = 10.0  # a three-way tie for the max
    out = sample(logits, SamplingParams())
    assert out.dtype == torch.int64 and out.shape == (7,)
    assert torch.equal(out, logits.argmax(-1)) and out[3] == 4
    zeros = torch.zeros(7)
    rows = sample_rows(logits, zeros, torch.zeros(7, dtype=torch.int64), torch.ones(7), gen())
    assert torch.equal(rows, out)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_top_k_1_is_argmax(temperature):
    logits = torch.randn(64, 50, generator=gen(2)) * 3
    out = sample(logits, SamplingParams(temperature=temperature, top_k=1), gen(3))
    assert torch.equal(out, logits.argmax(-1))


@pytest.mark.parametrize("k", [2, 3, 7])
def test_top_k_restricts_support_and_renormalises(k):
    logits = torch.randn(12, generator=gen(4))
    tokens = draw(logits, SamplingParams(temperature=1.0, top_k=k), 20000, seed=k)
    assert support(tokens) == set(logits.topk(k).indices.tolist())
    expected = hf_filter(logits, 1.0, k, 1.0).softmax(-1)
    stat, dof = chi_square(tokens, expected)
    assert stat < CHI2_999[dof]


@pytest.mark.parametrize("top_p, kept", [(0.5, {0}), (0.6, {0, 1}), (0.8, {0, 1}), (0.81, {0, 1, 2}),
                                         (0.95, {0, 1, 2}), (0.96, {0, 1, 2, 3}), (1.0, {0, 1, 2, 3})])
def test_top_p_keeps_the_token_that_crosses(top_p, kept):
    logits = PROBS_4.log()
    p = torch.tensor([top_p], dtype=torch.float64)  # float32 would round 0.8 up to 0.80000001 and keep {0, 1, 2}
    mask = filter_logits(logits.unsqueeze(0), torch.tensor([0]), p)[0].isfinite()
    assert set(mask.nonzero().flatten().tolist()) == kept
    assert torch.equal(mask, hf_filter(logits, 1.0, 0, top_p).isfinite())
    assert support(draw(logits, SamplingParams(temperature=1.0, top_p=top_p), 4000)) == kept


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=4),
                                    SamplingParams(temperature=1.0, top_p=0.8),
                                    SamplingParams(temperature=0.9, top_k=5, top_p=0.9)])
def test_frequencies_match_softmax(params):
    logits = torch.tensor([1.0, 0.2, -0.5, 2.0, 0.0, 1.4, -1.0])
    tokens = draw(logits, params, 20000, seed=11)
    expected = hf_filter(logits, params.temperature, params.top_k, params.top_p).softmax(-1)
    assert expected.gt(0).sum() >= 3  # the check has something to test
    assert torch.all(expected[tokens] > 0)  # nothing outside the filtered support
    stat, dof = chi_square(tokens, expected)
    assert stat < CHI2_999[dof], f"chi2={stat:.1f} on {dof} dof"


def test_filter_matches_hf_warpers_row_by_row():
    """One vectorised call with a different (k, p) on every row == HF's warpers row by row."""
    B, V = 48, 257
    logits = torch.randn(B, V, generator=gen(5)) * torch.linspace(0.5, 6.0, B).unsqueeze(-1)
    ks = [0, 1, 2, 5, 40, 256, 257, 1000]
    ps = [1.0, 0.99, 0.9, 0.5, 0.1, 1e-4]
    top_k = torch.tensor([ks[i % len(ks)] for i in range(B)], dtype=torch.int32)
    top_p = torch.tensor([ps[i % len(ps)] for i in range(B)], dtype=torch.float64)
    ours = filter_logits(logits, top_k, top_p).isfinite()
    for i in range(B):
        theirs = hf_filter(logits[i], 1.0, int(top_k[i]), float(top_p[i])).isfinite()
        assert torch.equal(ours[i], theirs), f"row {i}: top_k={int(top_k[i])} top_p={float(top_p[i])}"


def test_filter_keeps_ties_with_the_kth_logit_like_hf():
    logits = torch.tensor([[3.0, 1.0, 2.0, 2.0, 0.0]])
    ours = filter_logits(logits, torch.tensor([2]), torch.tensor([1.0]))[0].isfinite()
    assert ours.tolist() == [True, False, True, True, False]
    assert torch.equal(ours, hf_filter(logits[0], 1.0, 2, 1.0).isfinite())


def test_per_row_params_mix_greedy_and_sampled_rows():
    V, reps = 16, 3000
    base = torch.randn(6, V, generator=gen(6)) * 2
    temperature = torch.tensor([0.0, 1.0, 0.8, 0.0, 1.0, 2.0])
    top_k = torch.tensor([0, 1, 0, 5, 0, 2], dtype=torch.int32)  # row 3: greedy ignores its top_k
    top_p = torch.tensor([1.0, 1.0, 0.6, 0.3, 1.0, 1.0])
    out = sample_rows(base.repeat(reps, 1), temperature.repeat(reps), top_k.repeat(reps), top_p.repeat(reps),
                      gen(7)).view(reps, 6)  # [reps, 6]: column j holds row j's draws
    argmax = base.argmax(-1)
    for j in (0, 1, 3):  # greedy, and top_k=1
        assert torch.all(out[:, j] == argmax[j])
    for j in (2, 4, 5):
        allowed = hf_filter(base[j], float(temperature[j]), int(top_k[j]), float(top_p[j])).isfinite()
        assert support(out[:, j]) == set(allowed.nonzero().flatten().tolist())
    assert len(support(out[:, 5])) == 2


def test_bf16_logits_sample_like_their_float32_values():
    logits = (torch.randn(256, 100, generator=gen(8)) * 2).bfloat16()
    params = SamplingParams(temperature=0.8, top_k=20, top_p=0.9)
    out = sample(logits, params, gen(9))
    assert out.dtype == torch.int64
    assert torch.equal(out, sample(logits.float(), params, gen(9)))
    assert torch.equal(sample(logits, SamplingParams()), logits.float().argmax(-1))


def test_same_seed_same_tokens():
    logits = torch.randn(512, 64, generator=gen(10))
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    a = sample(logits, params, make_generator(params))
    assert torch.equal(a, sample(logits, params, make_generator(params)))
    assert torch.equal(a, sample(logits, params))  # no generator: one made from params.seed
    assert not torch.equal(a, sample(logits, params, gen(4321)))
    g = make_generator(params)  # one generator across steps advances: steps differ
    assert not torch.equal(sample(logits, params, g), sample(logits, params, g))
    assert make_generator(SamplingParams()) is None


@pytest.mark.parametrize("field, value", [("temperature", -0.1), ("temperature", math.nan), ("temperature", math.inf),
                                          ("temperature", "1"), ("top_k", -1), ("top_k", 2.0), ("top_k", True),
                                          ("top_p", 0.0), ("top_p", 1.5), ("top_p", -0.2), ("top_p", math.nan),
                                          ("seed", 1.5)])
def test_invalid_params_name_the_field_and_its_range(field, value):
    with pytest.raises(InputError, match=rf"^{field}=") as err:
        SamplingParams(**{field: value})
    assert isinstance(err.value, ValueError)  # existing `except ValueError` keeps working
    allowed = {"temperature": ">= 0", "top_k": ">= 0", "top_p": "(0, 1]", "seed": "int or None"}[field]
    assert repr(value) in err.value.message and allowed in err.value.message and err.value.hint


def test_bad_shapes_are_refused():
    logits = torch.zeros(3, 10)
    with pytest.raises(ValueError, match="top_k"):
        sample_rows(logits, torch.ones(3), torch.zeros(2, dtype=torch.int64), torch.ones(3))
    with pytest.raises(ValueError, match=r"\[B, V\]"):
        sample(torch.zeros(10), SamplingParams(temperature=1.0))


def test_no_host_reads_of_tensor_values():
    """On the meta device a tensor has no values: .item(), bool(t) or a Python branch on one raises,
    so running clean there shows the step is sync-free (and so CUDA-graph capturable)."""
    B, V = 4, 1000
    logits = torch.empty(B, V, device="meta", dtype=torch.bfloat16)
    out = sample_rows(logits, torch.empty(B, device="meta"), torch.empty(B, device="meta", dtype=torch.int64),
                      torch.empty(B, device="meta"))
    assert out.shape == (B,) and out.dtype == torch.int64
    assert sample(logits, SamplingParams(temperature=0.7, top_k=50, top_p=0.9)).shape == (B,)


@pytest.mark.gpu
def test_cuda_no_sync_and_graph_capture():
    B, V = 8, 32000
    dev = torch.device("cuda")
    logits = torch.randn(B, V, device=dev, generator=torch.Generator(dev).manual_seed(0)) * 3
    temperature = torch.tensor([0.0, 1.0] * 4, device=dev)
    top_k = torch.tensor([0, 1, 50, 0] * 2, device=dev, dtype=torch.int64)
    top_p = torch.tensor([1.0, 1.0, 0.9, 0.5] * 2, device=dev)
    torch.cuda.set_sync_debug_mode("error")
    try:
        eager = sample_rows(logits, temperature, top_k, top_p)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        captured = sample_rows(logits, temperature, top_k, top_p)
    allowed = torch.stack([hf_filter(logits[i].cpu(), float(temperature[i]) or 1.0, int(top_k[i]),
                                     float(top_p[i])).isfinite() for i in range(B)])
    for _ in range(20):
        graph.replay()
        for out in (eager, captured):
            rows = torch.arange(B)
            assert torch.all(allowed[rows, out.cpu()])
            assert torch.equal(out.cpu()[temperature.cpu() == 0], logits.argmax(-1).cpu()[temperature.cpu() == 0])
