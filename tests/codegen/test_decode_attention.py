"""kiln.codegen.kernels.decode_attention: split-KV decode attention against a float64 SDPA reference (CPU: the Triton
interpreter, float16/float32, 16-key tiles so a 45-key cache spans three chunks; GPU: bfloat16 at Llama-3.2-1B
decode shapes)."""

import pytest
import torch

import kiln.codegen.kernels.decode_attention as DA
from kiln.codegen.kernels.decode_attention import decode_attention, default_splits, reference
from kiln.ir.ops import OPS
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter  # CPU cases run under TRITON_INTERPRET=1; gpu-marked ones need it off

gen = torch.Generator().manual_seed(0)


def r(*shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def qkv(b, hq, hk, sq, s, d, dtype):
    return r(b, hq, sq, d, dtype=dtype), r(b, hk, s, d, dtype=dtype), r(b, hk, s, d, dtype=dtype)


def check(q, k, v, mask=None, **kw):
    got = decode_attention(q, k, v, mask, **kw)
    if kw.get("softcap"):  # (the ATTENTION op's reference soft-caps; gqa: its kv heads repeated)
        want = OPS["ATTENTION"].ref([q.double(), k.double(), v.double()] + ([mask] if mask is not None else []),
                                    dict(causal=False, scale=kw.get("scale"), gqa=kw.get("gqa", False), softcap=kw["softcap"]))
    else:
        want = reference(q.double(), k.double(), v.double(), mask, **{n: kw[n] for n in ("scale", "gqa") if n in kw})
    assert got.dtype == q.dtype and got.shape == want.shape
    err = rel_err(got, want)
    assert err <= TOL[q.dtype], f"rel err {err:.2e} > {TOL[q.dtype]:.0e}"
    return got


def left_padded(pads, sq, s, pos):
    """[B, 1, Sq, S] bool: batch row b attends keys pad_b .. pos + i (its prompt starts at pad_b; the Sq new
    tokens sit at slots pos .. pos + Sq - 1, causal among themselves)."""
    j = torch.arange(s)
    last = pos + torch.arange(sq)  # [Sq]
    return (j >= torch.tensor(pads)[:, None, None, None]) & (j <= last[:, None])


# S = 45 with 16-key tiles: three chunks by default, the last one 13 keys; D = 72 pads to 128 lanes
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("d", [64, 72])
@pytest.mark.parametrize("sq", [1, 3])
@pytest.mark.parametrize("hq,hk,gqa", [(4, 2, True), (2, 2, False)])
def test_shapes(dtype, d, sq, hq, hk, gqa):
    check(*qkv(2, hq, hk, sq, 45, d, dtype), gqa=gqa)


def test_default_splits():
    assert default_splits(1, 8, 4096, 64) == 32  # Llama-3.2-1B batch 1: 8 kv heads x 32 chunks of 128 = 256 programs
    assert default_splits(16, 8, 4096, 64) == 3
    assert default_splits(1, 8, 384, 64) == 6  # short cache: one BLOCK_N step per chunk, no finer
    assert default_splits(64, 8, 4096, 64) == 1  # 512 programs already
    assert default_splits(1, 1, 10, 64) == default_splits(1, 1, 0, 64) == 1
    for b, hk, s, bn in [(1, 8, 4096, 64), (2, 8, 1000, 32), (1, 32, 70000, 64), (4, 2, 45, 16)]:
        n = default_splits(b, hk, s, bn)
        splits, chunk = DA._chunking(s, n, bn)
        assert splits == n and chunk % bn == 0 and (splits - 1) * chunk < s <= splits * chunk
        # about 2 programs per SM (rounding to equal whole-step chunks may land a little under), or chunks as
        # small as they go
        assert 2 * DA.H100_SMS * 0.75 <= b * hk * n <= 2 * DA.H100_SMS * 1.25 or chunk == bn


@pytest.mark.parametrize("s,splits,ran", [(45, 3, 3), (45, 4, 3), (61, 4, 4), (61, 1, 1)])
def test_splits_agree(s, splits, ran):
    # chunks round up to whole 16-key steps: S = 45 in 4 splits runs 3 chunks; S = 61 in 4 runs 16, 16, 16, 13
    assert DA._chunking(s, splits, 16)[0] == ran
    q, k, v = qkv(1, 4, 2, 3, s, 64, torch.float32)
    one = check(q, k, v, gqa=True, splits=1)
    assert rel_err(check(q, k, v, gqa=True, splits=splits), one) <= TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_one_split_stores_directly_the_same_bits(dtype):
    """One split: the partial kernel writes the output itself (one launch) — bit for bit what the reduce makes of it,
    fully masked rows (zeros) and a strided out included."""
    q, k, v = qkv(2, 4, 2, 3, 45, 64, dtype)
    mask = left_padded([0, 20], 3, 45, pos=40)
    mask[1, 0, 2] = False  # a row attending nothing
    outs = []
    for direct in (True, False):
        out = torch.full((2, 3, 4, 64), float("nan"), dtype=dtype).transpose(1, 2)
        outs.append(decode_attention(q, k, v, mask, gqa=True, splits=1, out=out, direct=direct))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0][1, :, 2], torch.zeros(4, 64, dtype=dtype))
    check(q, k, v, mask, gqa=True, splits=1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sq, splits", [(1, 3), (3, 4), (3, 2)])
def test_last_program_reduces_the_same_bits(dtype, sq, splits):
    """Counters given: the last program of each kv head's splits reduces its group's rows in the same launch — bit for
    bit the reduce kernel's output, a fully masked row and a wholly masked first chunk included; the counters are left
    zero for the next call, which gives the same bits again."""
    q, k, v = qkv(2, 4, 2, sq, 45, 64, dtype)
    mask = left_padded([0, 20], sq, 45, pos=40)
    mask[1, 0, sq - 1, :] = False  # a row attending nothing
    counters = torch.zeros(DA.counter_bytes(2, 2), dtype=torch.uint8)
    want = decode_attention(q, k, v, mask, gqa=True, splits=splits)
    for _ in range(2):
        out = torch.full((2, sq, 4, 64), float("nan"), dtype=dtype).transpose(1, 2)
        got = decode_attention(q, k, v, mask, gqa=True, splits=splits, out=out, counters=counters)
        assert torch.equal(got, want) and not counters.any()
    with pytest.raises(ValueError, match="counters must be"):
        decode_attention(q, k, v, mask, gqa=True, splits=splits, counters=torch.zeros(3, dtype=torch.uint8))


def test_more_splits_than_one_reduce_step():
    """20 splits of one 16-key tile (S = 320 keys; the reduce loads REDUCE_BLOCK_S = 16 splits a step): the running
    merge of the two steps, with batch row 0 attending only keys in the second step's splits and row 1 only the first
    step's (a step of empty splits before and after live ones), against the float64 reference; the last program's
    reduce gives the reduce kernel's bits; the length scan takes several tiles (S past the interpreter's scan tile)."""
    q, k, v = qkv(2, 4, 2, 1, 320, 16, torch.float32)
    j = torch.arange(320)
    mask = torch.stack([(j >= 270) & (j < 300), j < 40])[:, None, None, :]  # [2, 1, 1, 320]
    assert DA._chunking(320, 20, 16)[0] == 20 > DA.REDUCE_BLOCK_S and 320 > DA.SCAN_TILE
    want = check(q, k, v, mask, gqa=True, splits=20)
    counters = torch.zeros(DA.counter_bytes(2, 2), dtype=torch.uint8)
    assert torch.equal(decode_attention(q, k, v, mask, gqa=True, splits=20, counters=counters), want)
    assert not counters.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sq", [1, 3])
def test_left_padding_mask(dtype, sq):
    # batch row 2's prompt starts at key 20: its whole first chunk (keys 0..15) is masked -> m = -inf, l = 0
    # there, and the reduce must give that chunk no weight
    q, k, v = qkv(3, 4, 2, sq, 45, 64, dtype)
    check(q, k, v, left_padded([0, 7, 20], sq, 45, pos=40), gqa=True)


@pytest.mark.parametrize("sq, splits", [(1, 3), (3, 1)])
def test_softcapped_scores(sq, splits):
    # Gemma 2's soft-capped scores c * tanh(t / c) (c = 1.5: most of them bend), split over 3 chunks or in one
    q, k, v = qkv(3, 4, 2, sq, 45, 64, torch.float32)
    check(q * 3, k, v, left_padded([0, 7, 20], sq, 45, pos=40), gqa=True, splits=splits, softcap=1.5)


@pytest.mark.parametrize("shape", [(1, 1, 1, 45), (2, 1, 3, 45), (2, 4, 3, 45), (3, 45)])
def test_mask_broadcasts(shape):
    # a per-head mask ([B, Hq, Sq, S]) makes the rows of one group tile read different mask rows
    q, k, v = qkv(2, 4, 2, 3, 45, 64, torch.float32)
    mask = torch.rand(*shape, generator=gen) < 0.6
    mask[..., 44] = True  # every row keeps a key
    check(q, k, v, mask, gqa=True)


def test_fully_masked_rows_give_zeros():
    q, k, v = qkv(2, 4, 2, 3, 45, 64, torch.float32)
    mask = left_padded([0, 7], 3, 45, pos=40)
    mask[1, 0, 1] = False  # batch 1, query row 1 attends nothing
    got = check(q, k, v, mask, gqa=True)  # the reference zeroes that row too
    assert torch.equal(got[1, :, 1], torch.zeros(4, 64))
    assert torch.equal(reference(q, k, v, mask, gqa=True)[1, :, 1], torch.zeros(4, 64))
    assert got[1, :, 0].abs().sum() > 0
    assert torch.equal(decode_attention(q, k[:, :, :0], v[:, :, :0], gqa=True), torch.zeros(2, 4, 3, 64))  # S = 0


def windows(starts, ends, sq, s, heads=1):
    """[B, heads, Sq, S] bool: batch row b (head h) attends keys starts[b][h] .. ends[b][h] - Sq + i, query row i of the
    Sq new tokens causal among them; an end of 0 attends nothing. starts / ends: one int per row, or a list per head."""
    def per_head(x):
        return torch.tensor([[v] * heads if isinstance(v, int) else v for v in x])[:, :, None, None]  # [B, heads, 1, 1]
    j = torch.arange(s)
    last = per_head(ends) - sq + torch.arange(sq)[:, None]  # [B, heads, Sq, 1]
    return (j >= per_head(starts)) & (j <= last)


def poisoned(t, mask, value=float("nan")):
    """t [B, Hk, S, ...] with ``value`` at every slot past the last one any row of its batch row's mask attends: the
    slots the kernel must not read (a NaN read, even at weight 0, reaches the output: 0 * NaN = NaN)."""
    t = t.clone()
    attended = mask.flatten(1, 2).any(1)  # [B, S]
    length = torch.where(attended, torch.arange(1, mask.shape[-1] + 1, device=mask.device), 0).amax(-1)  # [B]
    for b, n in enumerate(length.tolist()):
        t[b, :, n:] = value
    return t


def check_skips_past_length(q, k, v, mask, **kw):
    """decode_attention on k / v poisoned past each batch row's attended length: finite, equal to the float64 reference
    on the clean operands (keys before the length stay masked as the mask says)."""
    got = decode_attention(q, poisoned(k, mask), poisoned(v, mask), mask, **kw)
    want = reference(q.double(), k.double(), v.double(), mask, gqa=kw.get("gqa", False))
    assert torch.isfinite(got).all()
    err = rel_err(got, want)
    assert err <= TOL[q.dtype], f"rel err {err:.2e} > {TOL[q.dtype]:.0e}"
    return got


# S = 45 with 16-key tiles; a prefix of 0 (every row masked), 1, 17 keys or all 45; batch rows of other lengths in one
# launch; two launches + reduce, the last program's reduce (counters) and one split stored directly
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sq", [1, 3])
@pytest.mark.parametrize("mode", ["reduce", "last", "direct"])
def test_reads_only_the_attended_prefix(dtype, sq, mode):
    q, k, v = qkv(4, 4, 2, sq, 45, 64, dtype)
    mask = windows([0, 0, 0, 0], [0, 1, 17, 45], sq, 45)
    mask[0] = False  # a prefix of 0: nothing attended, nothing read
    kw = dict(splits=1) if mode == "direct" else dict(counters=torch.zeros(DA.counter_bytes(4, 2), dtype=torch.uint8)) \
        if mode == "last" else {}
    got = check_skips_past_length(q, k, v, mask, gqa=True, **kw)
    assert torch.equal(got[0], torch.zeros_like(got[0]))
    assert "counters" not in kw or not kw["counters"].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("sq", [1, 3])
def test_left_padding_and_a_prefix(dtype, sq):
    # batch rows' prompts start at 0 / 7 / 20 and end at 30 / 21 / 44: one launch, three lengths, masked heads and tails
    q, k, v = qkv(3, 4, 2, sq, 45, 64, dtype)
    check_skips_past_length(q, k, v, windows([0, 7, 20], [30, 21, 44], sq, 45), gqa=True)


@pytest.mark.parametrize("mode", ["reduce", "last"])
def test_most_splits_empty(mode):
    # 130 keys in 9 chunks of 16; 20 attended keys (batch row 1: 3) run as 9 chunks of 16 over 20: two busy, seven empty
    q, k, v = qkv(2, 4, 2, 1, 130, 64, torch.float32)
    assert DA._chunking(130, 9, 16) == (9, 16)
    kw = dict(counters=torch.zeros(DA.counter_bytes(2, 2), dtype=torch.uint8)) if mode == "last" else {}
    check_skips_past_length(q, k, v, windows([0, 0], [20, 3], 1, 130), gqa=True, splits=9, **kw)


def test_per_head_lengths_take_the_groups_longest():
    # a per-head mask: the heads of one group attend prefixes of 5 / 12 / 30 / 9 (kv head 0) and 40 / 2 / 2 / 2 (kv
    # head 1); the program reads its group's longest, the others' extra keys masked; past 40 nothing is read
    q, k, v = qkv(2, 8, 2, 3, 45, 64, torch.float16)
    mask = windows([0, [3, 0, 0, 0, 0, 0, 0, 0]], [[5, 12, 30, 9, 40, 2, 2, 2], 40], 3, 45, heads=8)
    check_skips_past_length(q, k, v, mask, gqa=True)


@pytest.mark.parametrize("kv", ["int8", "float8_e4m3fn"])
def test_quantized_cache_reads_only_the_attended_prefix(kv):
    # codes past the length hold 0, their scales inf: a read scale makes 0 * inf = NaN
    q = r(2, 4, 3, 64, dtype=torch.float16)
    k, v = (r(2, 2, 45, 64).mul(8).clamp(-100, 100).to(getattr(torch, kv)) for _ in range(2))
    ks, vs = r(2, 2, 45).abs() / 8, r(2, 2, 45).abs() / 8
    mask = windows([0, 4], [17, 33], 3, 45)
    got = decode_attention(q, poisoned(k.float(), mask, 0.0).to(k.dtype), poisoned(v.float(), mask, 0.0).to(v.dtype),
                           mask, gqa=True, k_scale=poisoned(ks, mask, float("inf")), v_scale=poisoned(vs, mask, float("inf")))
    want = reference(q.double(), k, v, mask, gqa=True, k_scale=ks, v_scale=vs)
    assert torch.isfinite(got).all() and rel_err(got, want) <= TOL[torch.float16]


def test_strided_operands_out_and_scale():
    # q from a [B, Sq, H, D] projection; k / v the first 45 slots of a 64-slot cache; out written through a transpose
    q = r(2, 3, 4, 72).transpose(1, 2)
    cache = r(2, 2, 2, 64, 72)  # [k/v, B, Hk, slots, D]
    k, v = cache[0, :, :, :45], cache[1, :, :, :45]
    out = torch.empty(2, 3, 4, 72).transpose(1, 2)
    assert decode_attention(q, k, v, gqa=True, out=out, scale=0.2) is out
    assert rel_err(out, reference(q.double(), k.double(), v.double(), gqa=True, scale=0.2)) <= TOL[torch.float32]


def test_explicit_config():
    assert all(DA.CHUNK_ALIGN % c["BLOCK_N"] == 0 for c in DA.configs())
    check(*qkv(1, 4, 2, 1, 70, 64, torch.float16), gqa=True, config=dict(BLOCK_N=32))  # 3 chunks of 32, last 6 keys


@pytest.mark.parametrize("change,match", [
    (dict(q=(4, 3, 64)), "4-d"),
    (dict(v=(1, 2, 44, 64)), "k .* and v .* one shape"),
    (dict(k=(1, 2, 45, 72), v=(1, 2, 45, 72)), "head dim"),
    (dict(k=(2, 2, 45, 64), v=(2, 2, 45, 64)), "batch"),
    (dict(q=(1, 4, 3, 64), k=(1, 3, 45, 64), v=(1, 3, 45, 64), gqa=True), "4 query heads do not group over 3"),
    (dict(q=(1, 4, 3, 64)), "pass gqa=True"),
    (dict(q=(1, 2, 3, 300), k=(1, 2, 45, 300), v=(1, 2, 45, 300)), "head dim 300"),
    (dict(q=(1, 32, 9, 64), gqa=True), "144 rows exceed 128"),
    (dict(k_dtype=torch.float16), "k has dtype"),
    (dict(q_dtype=torch.int32), "q has dtype"),
    (dict(mask=(3, 44)), "does not broadcast"),
    (dict(mask=(2, 1, 3, 45)), "does not broadcast"),  # would widen the batch
    (dict(mask=(1, 1, 1, 1, 45)), "does not broadcast"),
    (dict(mask=(1, 1, 3, 45), mask_dtype=torch.float32), "mask dtype"),
    (dict(out=(1, 2, 3, 65)), "out"),
    (dict(out=(1, 2, 3, 64), out_dtype=torch.float16), "out has dtype"),
    (dict(splits=0), "splits"),
    (dict(config=dict(BLOCK_N=24)), "BLOCK_N"),
])
def test_bad_operands_raise(change, match):
    q = r(*change.get("q", (1, 2, 3, 64))).to(change.get("q_dtype", torch.float32))
    k = r(*change.get("k", (1, 2, 45, 64)), dtype=change.get("k_dtype", torch.float32))
    v = r(*change.get("v", (1, 2, 45, 64)))
    mask = (r(*change["mask"]) > 0).to(change.get("mask_dtype", torch.bool)) if "mask" in change else None
    out = torch.empty(change["out"], dtype=change.get("out_dtype", torch.float32)) if "out" in change else None
    with pytest.raises(ValueError, match=match):
        decode_attention(q, k, v, mask, gqa=change.get("gqa", False), out=out, splits=change.get("splits"),
                         config=change.get("config"))


def test_bfloat16_refused_by_the_interpreter():
    if not DA.INTERPRET:
        pytest.skip("interpreter only")
    with pytest.raises(ValueError, match="bfloat16"):
        decode_attention(*qkv(1, 1, 1, 1, 16, 64, torch.bfloat16))


# ----------------------------------------------------------------------------- GPU (bf16, real shapes)


def cuda_qkv(b, hq, hk, sq, s, d, dtype=torch.bfloat16):
    g = torch.Generator(device="cuda").manual_seed(0)
    return [torch.randn(b, h, n, d, generator=g, device="cuda", dtype=torch.float32).to(dtype)
            for h, n in ((hq, sq), (hk, s), (hk, s))]


def check_against_fp32(q, k, v, mask=None, **kw):
    wide = torch.float64 if q.dtype == torch.float32 else torch.float32
    if kw.get("softcap"):
        want = OPS["ATTENTION"].ref([q.to(wide), k.to(wide), v.to(wide)] + ([mask] if mask is not None else []),
                                    dict(causal=False, scale=kw.get("scale"), gqa=kw.get("gqa", False), softcap=kw["softcap"]))
    else:
        want = reference(q.to(wide), k.to(wide), v.to(wide), mask, **{n: kw[n] for n in ("scale", "gqa") if n in kw})
    got = decode_attention(q, k, v, mask, **kw)
    torch.cuda.synchronize()
    assert got.dtype == q.dtype and got.shape == want.shape
    err = rel_err(got, want)
    assert err <= TOL[q.dtype], f"rel err {err:.2e} > {TOL[q.dtype]:.0e}"
    return got


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 16])
@pytest.mark.parametrize("s", [384, 4096])
def test_gpu_llama_decode(b, s):
    # Llama-3.2-1B decode step: 32 query heads over 8 kv heads of 64, one new token
    check_against_fp32(*cuda_qkv(b, 32, 8, 1, s, 64), gqa=True)


@pytest.mark.gpu
def test_gpu_llama_left_padded_speculative():
    # 4 speculative tokens over a left-padded 4096-slot cache; one config run directly, and one split vs many
    q, k, v = cuda_qkv(4, 32, 8, 4, 4096, 64)
    mask = left_padded([0, 100, 1000, 3000], 4, 4096, pos=3500).cuda()
    many = check_against_fp32(q, k, v, mask, gqa=True)
    one = check_against_fp32(q, k, v, mask, gqa=True, splits=1, config=DA.configs()[0])
    assert rel_err(many, one) <= TOL[torch.bfloat16]


@pytest.mark.gpu
@pytest.mark.parametrize("b", [1, 16])
def test_gpu_gemma2_softcapped_decode(b):
    # Gemma-2-2B decode: 8 query heads over 4 kv heads of 256, scores soft-capped at 50 (q scaled up so that they bend)
    q, k, v = cuda_qkv(b, 8, 4, 1, 4096, 256)
    check_against_fp32(q * 40, k, v, gqa=True, softcap=50.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,d", [(torch.float16, 128), (torch.float32, 72), (torch.bfloat16, 256)])
def test_gpu_other_dtypes_and_head_dims(dtype, d):
    check_against_fp32(*cuda_qkv(2, 8, 2, 2, 1000, d, dtype=dtype), gqa=True)


@pytest.mark.gpu
@pytest.mark.parametrize("b, s", [(1, 4096), (16, 384)])
def test_gpu_one_launch_reduce_in_a_cuda_graph(b, s):
    """Llama-3.2-1B decode shapes: the last program's reduce against fp32, near the two-launch form (the reduce's sums
    may be laid out over other warps), replayed from a CUDA graph with the counters left zero every time."""
    q, k, v = cuda_qkv(b, 32, 8, 1, s, 64)
    counters = torch.zeros(DA.counter_bytes(b, 8), dtype=torch.uint8, device="cuda")
    cfg = DA.configs()[0]
    two = check_against_fp32(q, k, v, gqa=True, config=cfg)
    one = check_against_fp32(q, k, v, gqa=True, config=cfg, counters=counters)
    assert rel_err(one, two) <= 1e-3 and not counters.any()
    out = torch.empty_like(q)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, k, v, gqa=True, config=cfg, counters=counters, out=out)
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, one) and not counters.any()


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["reduce", "last", "direct"])
def test_gpu_cuda_graph_replays_read_the_growing_prefix(mode):
    """A generator's decode step: Llama-3.2-1B heads over a 4096-slot cache, captured once in a CUDA graph and replayed
    as the context grows (the mask and the cache change in place between replays). Every replay reads only the keys its
    mask attends (the slots past them hold NaN) and matches the float32 reference on the clean cache."""
    b, s = 4, 4096
    q, k, v = cuda_qkv(b, 32, 8, 1, s, 64)
    kq, vq = torch.empty_like(k), torch.empty_like(v)
    mask = torch.zeros(b, 1, 1, s, dtype=torch.bool, device="cuda")
    kw = dict(splits=1) if mode == "direct" else dict(
        counters=torch.zeros(DA.counter_bytes(b, 8), dtype=torch.uint8, device="cuda")) if mode == "last" else {}
    out = torch.empty_like(q)
    decode_attention(q, k, v, mask, gqa=True, config=DA.configs()[0], out=out, **kw)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        decode_attention(q, kq, vq, mask, gqa=True, config=DA.configs()[0], out=out, **kw)
    pads = torch.tensor([0, 3, 100, 900], device="cuda")
    for end in (1, 17, 200, 1000, 2500, s):  # keys pads[b] .. end - 1 attended, the last one the new token
        step = windows(pads.tolist(), [end] * b, 1, s).cuda()
        mask.copy_(step)
        kq.copy_(poisoned(k, step))
        vq.copy_(poisoned(v, step))
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        want = reference(q.float(), k.float(), v.float(), step, gqa=True)
        assert torch.isfinite(out).all(), end
        err = rel_err(out, want)
        assert err <= TOL[torch.bfloat16], f"end {end}: rel err {err:.2e}"
        assert "counters" not in kw or not kw["counters"].any()
