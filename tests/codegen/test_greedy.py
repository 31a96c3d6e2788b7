"""kiln.codegen.kernels.greedy: each row's token is torch.argmax's (first maximum, NaN first, a row of -inf: 0), through
the logits' strides, and the step's inputs advance as the generator's torch ops advance them (CPU: the Triton interpreter;
GPU: a Llama-3 vocabulary in bf16)."""
import pytest
import torch

from kiln.codegen.kernels import greedy as gk

pytestmark = pytest.mark.interpreter


def hard_rows(dtype, v=300, device="cpu"):
    """Rows where the answer is easy to get wrong: a tie (the first wins), two NaNs after a larger finite value (the first
    NaN wins), all -inf (0), +inf in the last column, a maximum in the first and one in the last column."""
    x = torch.randn(7, v, generator=torch.Generator().manual_seed(0)).to(dtype).to(device)
    x[1, 7] = x[1, 200] = 100
    x[2, 3], x[2, 150], x[2, 250] = 1e4, float("nan"), float("nan")
    x[3] = float("-inf")
    x[4, v - 1] = float("inf")
    x[5, 0] = 50
    x[6, v - 1] = 50
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_tokens_are_torch_argmax(dtype):
    x = hard_rows(dtype)
    assert gk.greedy(x).tolist() == x.argmax(-1).tolist() == [x[0].argmax().item(), 7, 150, 0, 299, 0, 299]
    strided = torch.randn(3, 1000, 2).to(dtype)[:, :, 1]  # a padded LM head's view: row stride > V, column stride 2
    assert gk.greedy(strided).tolist() == strided.argmax(-1).tolist()
    one = torch.randn(2, 5).to(dtype)  # narrower than a step
    assert gk.greedy(one).tolist() == one.argmax(-1).tolist()
    wide = hard_rows(dtype, 3000)  # MAX_SPLITS chunks of two steps each
    assert gk.splits(3000) == gk.MAX_SPLITS and gk.greedy(wide).tolist() == wide.argmax(-1).tolist()


@pytest.mark.parametrize("drop", [None, 2])
def test_the_inputs_advance_as_the_generator_advances_them(drop):
    x = torch.randn(3, 77)
    ids = torch.zeros(3, 1, dtype=torch.long)
    pos, slots = torch.tensor([[5], [7], [9]]), torch.tensor([11])
    mask = torch.zeros(3, 1, 1, 16, dtype=torch.bool)
    mask[..., :11] = True
    want_mask = mask.clone()
    want_mask[..., 11] = True
    if drop is not None:
        want_mask[..., drop] = False
    work = gk.scratch(3, 77, "cpu")
    tok = gk.greedy(x, ids, pos, slots, mask, slot=11, drop=drop, work=work)
    assert tok.tolist() == x.argmax(-1).tolist() == ids[:, 0].tolist()
    assert pos.tolist() == [[6], [8], [10]] and slots.tolist() == [12] and torch.equal(mask, want_mask)
    assert not work[2].any()  # the counters are left zero: the same scratch serves the next call
    x2 = torch.randn(3, 77)
    assert gk.greedy(x2, ids, pos, slots, mask, slot=12, work=work).tolist() == x2.argmax(-1).tolist() == ids[:, 0].tolist()
    assert pos.tolist() == [[7], [9], [11]] and slots.tolist() == [13] and mask[..., 12].all()


def test_the_sliding_layers_mask_advances_in_the_same_launch():
    # Gemma 2 / 3: window_mask (the sliding layers') gets the new column and loses its own oldest, the mask its own
    x = torch.randn(2, 77)
    pos, slots = torch.tensor([[5], [7]]), torch.tensor([11])
    mask = torch.zeros(2, 1, 1, 16, dtype=torch.bool)
    mask[..., :11] = True
    window = mask.clone()
    window[..., :7] = False
    want_mask, want_window = mask.clone(), window.clone()
    want_mask[..., 11] = want_window[..., 11] = True
    want_window[..., 7] = False
    gk.greedy(x, None, pos, slots, mask, slot=11, window_mask=window, window_drop=7)
    assert torch.equal(mask, want_mask) and torch.equal(window, want_window)
    with pytest.raises(ValueError, match="want bool, the mask's shape"):
        gk.greedy(x, None, pos, slots, mask, slot=12, window_mask=window[..., :8])
    with pytest.raises(ValueError, match="window_drop 16 needs its mask, and a column"):
        gk.greedy(x, None, pos, slots, mask, slot=12, window_mask=window, window_drop=16)


@pytest.mark.parametrize("kwargs,match", [
    (dict(logits=torch.zeros(2, 0)), "non-empty"),
    (dict(logits=torch.zeros(2, 5, dtype=torch.int64)), "float16 / bfloat16 / float32"),
    (dict(logits=torch.zeros(2, 5), ids=torch.zeros(2, dtype=torch.long)), r"want int64 \[2, 1\]"),
    (dict(logits=torch.zeros(2, 5), positions=torch.zeros(2, 1, dtype=torch.long)), "advance together"),
    (dict(logits=torch.zeros(2, 5), positions=torch.zeros(2, 1, dtype=torch.long), slots=torch.zeros(1, dtype=torch.long),
          mask=torch.zeros(2, 1, 1, 8, dtype=torch.bool), slot=8), "not a column"),
    (dict(logits=torch.zeros(2, 5), drop=1), "needs its mask"),
    (dict(logits=torch.zeros(2, 500), work=gk.scratch(2, 5, "cpu")), "is not scratch"),
])
def test_bad_operands_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gk.greedy(**kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16])
def test_gpu_llama3_vocabulary(rows):
    x = torch.randn(rows, 128256, device="cuda", dtype=torch.bfloat16) * 3  # bf16: many ties among the large values
    assert gk.greedy(x).tolist() == x.argmax(-1).tolist()
    hard = hard_rows(torch.bfloat16, 128256, "cuda")
    assert gk.greedy(hard).tolist() == hard.argmax(-1).tolist()
