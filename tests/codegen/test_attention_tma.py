"""kiln's TMA-fed attention (codegen/kernels/attention_tma.py) against the float64 reference: under the Triton interpreter
with float16 (tl.dot on bfloat16 is computed wrongly there) at small shapes with partial tiles, on the GPU at the DiT /
PixArt / Llama shapes with every configuration."""
import pytest
import torch

import kiln.codegen.kernels.attention_tma as T
from kiln.codegen.kernels.attention import reference
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter  # CPU cases run under TRITON_INTERPRET=1; gpu-marked ones need it off
gen = torch.Generator().manual_seed(0)


def r(*shape, dtype=torch.float16, device="cpu"):
    return torch.randn(*shape, generator=gen, dtype=torch.float32).to(device=device, dtype=dtype)


def fused(b, s, hq, hk, d, dv=None, dtype=torch.float16, device="cpu"):
    """q, k, v as a fused projection leaves them: views of one [B, S, Hq * D + Hk * D + Hk * Dv] buffer, [B, H, S, D]."""
    dv = dv or d
    x = r(b, s, hq * d + hk * d + hk * dv, dtype=dtype, device=device)
    q = x[..., :hq * d].unflatten(-1, (hq, d)).transpose(1, 2)
    k = x[..., hq * d:(hq + hk) * d].unflatten(-1, (hk, d)).transpose(1, 2)
    v = x[..., (hq + hk) * d:].unflatten(-1, (hk, dv)).transpose(1, 2)
    return q, k, v


def check(q, k, v, tol=None, **kw):
    got = T.attention(q, k, v, **kw)
    kw.pop("config", None)
    kw.pop("out", None)
    wide = torch.float64 if q.device.type == "cpu" else torch.float32
    if kw.get("mask") is not None and kw["mask"].is_floating_point():
        kw["mask"] = kw["mask"].to(wide)
    want = reference(q.to(wide), k.to(wide), v.to(wide), gqa=q.shape[1] != k.shape[1], **kw)
    assert got.dtype == q.dtype and got.shape == want.shape
    err = rel_err(got, want)
    assert err <= (tol or TOL[q.dtype]), f"rel err {err:.2e}"
    return got


@pytest.fixture(params=[{}, {"AHEAD": True}], ids=["in-turn", "ahead"])
def loop_form(request, monkeypatch):
    """The interpreter's tile in each loop form: each key tile's q k^T issued after the previous tile's softmax, or
    before it (AHEAD)."""
    monkeypatch.setattr(T, "INTERPRET_CONFIG", dict(T.INTERPRET_CONFIG, **request.param))


# interpreter tiles 16 x 16: 21 query rows are a partial tile, 29 / 40 keys partial key tiles
@pytest.mark.parametrize("d,dv", [(16, 16), (64, 64), (72, 72), (40, 40), (96, 96), (72, 32), (32, 72)])
def test_head_dims(d, dv, loop_form):
    # a power of two one box; between powers of two a main box and a window box from its end (72: 64 + 64..79, the
    # lanes past 71 zero-filled by TMA, though the fused buffer holds k's / v's lanes there)
    check(*fused(2, 29, 2, 2, d, dv))


@pytest.mark.parametrize("heavy_first", [True, False])
@pytest.mark.parametrize("sq,sk", [(21, 21), (13, 40), (40, 13)])
def test_causal_gqa(sq, sk, heavy_first, monkeypatch, loop_form):
    # SDPA's upper-left is_causal: query i attends keys j <= i; 4 query heads over 2 kv heads; the query tiles launched
    # last first (HEAVY_FIRST) or in order
    monkeypatch.setattr(T, "HEAVY_FIRST", heavy_first)
    q = r(1, 4, sq, 72)
    _, k, v = fused(1, sk, 2, 2, 72)
    check(q, k, v, causal=True)


def test_scale_and_out_given():
    q, k, v = fused(2, 17, 2, 1, 64)
    out = torch.full((2, 2, 17, 64), float("nan"), dtype=torch.float16)
    got = check(q, k, v, scale=0.3, out=out)
    assert got.data_ptr() == out.data_ptr() and not got.isnan().any()


def test_window_lanes_stored_once(loop_form):
    # the p v window's lanes 64..79: those past the head dim (72..79) are not stored; out a view of wider rows, whose
    # lanes past 72 must keep their NaN (and a NaN left in out would show a lane not stored)
    q, k, v = fused(1, 33, 1, 1, 72)
    wide = torch.full((1, 1, 33, 80), float("nan"), dtype=torch.float16)
    assert not check(q, k, v, out=wide[..., :72]).isnan().any()
    assert wide[..., 72:].isnan().all()


@pytest.mark.parametrize("shape", [(2, 1, 1, 29), (2, 2, 1, 29), (1, 29)], ids=["padding", "per-head", "broadcast"])
@pytest.mark.parametrize("kind", ["bool", "bias"])
def test_masks(shape, kind, loop_form):
    # a bool mask (True attends) or a bias added to the scores (-inf masks; finite values shift), the same for every
    # query row: its row read a key tile at a time with the mask's strides (0 on broadcast dims); 29 keys: a partial
    # key tile past which nothing is read
    q = r(2, 2, 21, 72)
    _, k, v = fused(2, 29, 2, 2, 72)
    keep = torch.rand(*shape, generator=gen) < 0.7
    keep[..., 0] = True  # every row keeps a key (the degenerate rows: test_fully_masked_rows_give_zeros)
    mask = keep if kind == "bool" else (r(*shape) * 2).masked_fill(~keep, float("-inf"))
    check(q, k, v, mask=mask)


@pytest.mark.parametrize("kind", ["bool", "bias"])
def test_padding_mask_with_causal_and_gqa(kind, loop_form):
    # both apply: a batch's padded keys and the triangle; 4 query heads over 2 kv heads
    q = r(2, 4, 21, 64)
    _, k, v = fused(2, 21, 2, 2, 64)
    keep = torch.ones(2, 1, 1, 21, dtype=torch.bool)
    keep[1, ..., 5:9] = False
    mask = keep if kind == "bool" else torch.zeros(2, 1, 1, 21, dtype=torch.float16).masked_fill(~keep, float("-inf"))
    check(q, k, v, mask=mask, causal=True)


def test_fully_masked_rows_give_zeros(loop_form):
    # a head whose every key is masked (bool False or a -inf bias) gives zeros, as attention.py's kernel does, not NaN
    q, k, v = fused(2, 29, 1, 1, 72)
    keep = torch.rand(2, 1, 1, 29, generator=gen) < 0.7
    keep[0, ..., 0] = True
    keep[1] = False
    want = reference(q.double(), k.double(), v.double(), keep)
    for mask in (keep, torch.zeros(2, 1, 1, 29, dtype=torch.float16).masked_fill(~keep, float("-inf"))):
        got = T.attention(q, k, v, mask=mask)
        assert (got[1] == 0).all()
        assert rel_err(got[0], want[0]) <= TOL[torch.float16]


@pytest.mark.parametrize("change,match", [
    (lambda q, k, v: (q, k, v, dict(mask=torch.ones(1, 1, 9, 8, dtype=torch.bool))), "does not broadcast"),
    (lambda q, k, v: (q, k, v, dict(mask=torch.ones(9, 9, dtype=torch.bool).tril())), "differs between query rows"),
    (lambda q, k, v: (q, k, v, dict(mask=torch.ones(1, 1, 9, 9, dtype=torch.float32))), "mask dtype"),
    (lambda q, k, v: (q, k, v, dict(k_scale=torch.ones(1, 1, 9))), "quantized"),
    (lambda q, k, v: (q.float(), k.float(), v.float(), {}), "dtype"),
    (lambda q, k, v: (q, k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), {}), "shapes"),
    (lambda q, k, v: (q[..., :24], k[..., :24], v, {}), "head dims"),
    (lambda q, k, v: (q[..., 1:65], k[..., 1:65], v[..., 1:65], {}), "strides"),
    (lambda q, k, v: (q.transpose(-1, -2).contiguous().transpose(-1, -2), k, v, {}), "strides"),
])
def test_what_it_does_not_take(change, match):
    q, k, v, kw = change(*fused(1, 9, 1, 1, 72))
    assert match in T.supported(q, k, v, **kw)
    if set(kw) <= {"mask"}:
        with pytest.raises(ValueError, match=match):
            T.attention(q, k, v, **kw)


def cuda(*args, **kw):
    return fused(*args, dtype=torch.bfloat16, device="cuda", **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(2, 256, 16, 16, 72), (16, 256, 16, 16, 72), (2, 1024, 16, 16, 72), (2, 4096, 16, 16, 72),
                                   (1, 333, 8, 8, 128)], ids=["dit-cfg", "dit-b8", "pixart512", "pixart1024", "d128-ragged"])
def test_gpu_every_config(shape):
    check_every(*cuda(*shape))


@pytest.mark.gpu
@pytest.mark.parametrize("kind", ["bool", "bias"])
def test_gpu_pixart_cross_attention_padding_mask(kind):
    # PixArt 512's cross-attention: 1024 queries over 120 text tokens of which 24 / 120 attended (CFG batch 2)
    q = cuda(2, 1024, 16, 16, 72)[0]
    _, k, v = cuda(2, 120, 16, 16, 72)
    keep = torch.zeros(2, 1, 1, 120, dtype=torch.bool, device="cuda")
    keep[0, ..., :24] = True
    keep[1] = True
    mask = keep if kind == "bool" else torch.zeros(keep.shape, dtype=q.dtype, device="cuda").masked_fill(~keep, float("-inf"))
    check_every(q, k, v, mask=mask)


@pytest.mark.gpu
def test_gpu_llama_prefill_causal_gqa():
    q, k, v = cuda(1, 2048, 32, 8, 64)
    check_every(q, k, v, causal=True)


def check_every(q, k, v, mask=None, **kw):
    """``check`` with every config in every loop form ``forms`` offers for the operands (the GPU tests), a failure
    naming its config."""
    for c in T.configs():
        for form in T.forms(q, v, mask):
            try:
                check(q, k, v, mask=mask, config=dict(c, **form), **kw)
            except AssertionError as e:
                raise AssertionError(f"config {dict(c, **form)}: {e}") from None


def test_forms_offered_where_they_overlap():
    # AHEAD where its next q k^T overlaps the softmax (one-box head dims, no mask; sm_90 SASS)
    q, k, v = fused(1, 9, 1, 1, 64)
    keep = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    assert T.forms(q, v) == [{}, {"AHEAD": True}] and T.forms(q, v, keep) == [{}]
    q72, _, v72 = fused(1, 9, 1, 1, 72)
    assert T.forms(q72, v72) == [{}] and T.forms(q72, v72, keep) == [{}]
    assert T.forms(q, v72) == [{}]  # (v's window: its two p v products)


def lowered(q, k, v, mask=None, causal=False, configs=3):
    """lower_attention.attention's (what, candidates, out) for ATTENTION(q, k, v, mask), ``configs`` TMA configs offered."""
    from kiln.codegen import lower_attention
    out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype).transpose(1, 2).contiguous().transpose(1, 2)
    attrs = dict(causal=causal, scale=None, gqa=q.shape[1] != k.shape[1], k_scale=False, v_scale=False)
    with pytest.MonkeyPatch.context() as m:
        m.setattr(lower_attention, "TMA_ATTENTION_CONFIGS", configs)
        what, cands = lower_attention.attention([q, k, v, mask], attrs, out, None, q.device)
    return what, cands, out


def test_offered_by_default_in_the_measured_order():
    # (on the GPU the lowering offers the first TMA_ATTENTION_CONFIGS: the H100's bests at every shape measured)
    from kiln.codegen import lower_attention
    what, _, _ = lowered(*fused(1, 70, 2, 2, 72), configs=lower_attention.TMA_ATTENTION_CONFIGS)
    assert what["tma"] and lower_attention.TMA_ATTENTION_CONFIGS == 3
    assert [(c["BLOCK_M"], c["BLOCK_N"], c["num_warps"]) for c in T.configs()[:3]] == [(128, 64, 8), (64, 128, 4), (64, 64, 4)]


def test_offered_by_the_lowering_beside_the_template():
    # a DiT-like self-attention (strided views of one projection, more query rows than decode's): "kiln-tma" candidates,
    # keyed apart ("tma" in what), writing the plan's buffer (here [B, S, H, D] memory viewed as [B, H, S, D])
    q, k, v = fused(1, 70, 2, 2, 72)
    what, cands, out = lowered(q, k, v)
    tma = [n for n in cands if n.startswith("kiln-tma:")]
    assert tma and what["tma"] and {n.split(":")[0] for n in cands} >= {"sdpa", "kiln", "kiln-tma"}
    cands[tma[0]]()
    assert rel_err(out, reference(q.double(), k.double(), v.double())) <= TOL[torch.float16]


def test_offered_with_a_padding_mask():
    # PixArt's cross-attention: a [B, 1, 1, Sk] bias over the text tokens; the TMA candidate reads it and agrees
    q = r(2, 2, 70, 72)
    _, k, v = fused(2, 24, 2, 2, 72)
    bias = torch.zeros(2, 1, 1, 24, dtype=torch.float16)
    bias[1, ..., 17:] = float("-inf")
    what, cands, out = lowered(q, k, v, bias)
    tma = [n for n in cands if n.startswith("kiln-tma:")]
    assert tma and what["tma"]
    cands[tma[0]]()
    assert rel_err(out, reference(q.double(), k.double(), v.double(), bias.double())) <= TOL[torch.float16]


@pytest.mark.parametrize("case", ["2-d mask", "decode rows", "misaligned"])
def test_not_offered_where_it_does_not_take_the_operands(case):
    q, k, v = fused(1, 70, 2, 2, 72)
    mask = None
    if case == "2-d mask":
        mask = torch.ones(1, 1, 70, 70, dtype=torch.bool)
    elif case == "decode rows":
        q = q[:, :, :16]
    else:
        q, k, v = fused(1, 70, 2, 2, 72, dv=68)
        q, k, v = q[..., :64], k[..., :64], v[..., 4:]  # v's base 8 bytes past a 16-byte boundary
    what, cands, _ = lowered(q, k, v, mask)
    assert "tma" not in what and not any(n.startswith("kiln-tma") for n in cands)


def test_the_tuner_compares_attention_outputs_and_refuses_a_wrong_kernel(monkeypatch):
    # an attention decision's candidates run once on random q, k, v before they are timed (lower_attention.output_check):
    # one whose output differs from SDPA's is refused, the plan's buffers left as they were
    from kiln.codegen import lower_attention, tuning
    q, k, v = fused(1, 70, 2, 2, 72)
    before = [t.clone() for t in (q, k, v)]
    what, cands, out = lowered(q, k, v)
    name = next(n for n in cands if n.startswith("kiln-tma:"))
    good = cands[name]
    cands[name] = lambda: (good(), out.mul_(1.5))
    check = lower_attention.output_check([q, k, v, None], dict(causal=False, scale=None, gqa=False), out, what, set())
    assert [id(t) for t in check.inputs] == [id(q), id(k), id(v)]
    refused = check.refusals(cands, torch.device("cpu"))
    assert list(refused) == [name] and "differs from sdpa's" in refused[name]
    assert all(torch.equal(a, b) for a, b in zip((q, k, v), before))
    assert lower_attention.output_check([q, k, v, None], {}, out, dict(what, rope=[True]), set()) is None
    monkeypatch.setattr(tuning, "CHECK_OUTPUTS", "always")
    tuner = tuning.Tuner()
    assert tuner.choose("attention", what, cands, torch.device("cpu"), check) != name
