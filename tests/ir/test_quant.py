"""kiln.ir.quant: the weight-only quantized format (packing, validation), its reference dequantization and
round-to-nearest, checked against float64 formulas on small irregular weights."""

import pytest
import torch

from kiln.ir.quant import (QuantWeight, codes_of, default_scale_dtype, dequantize, fit_grid, pack_int4, quantize_rtn,
                           unpack_int4)

gen = torch.Generator().manual_seed(0)
SLACK = 1e-12  # on the half-step bound: scales are rounded up, quotients are float64


def weight(n, k, outliers=True):
    """[N, K] gaussian weights with a few large ones (the groups where rounding is hardest)."""
    w = torch.randn(n, k, generator=gen, dtype=torch.float64)
    if outliers:
        idx = torch.randint(0, n * k, (max(1, n * k // 100),), generator=gen)
        w.view(-1)[idx] *= 8
    return w.float()


def steps(qw):
    """The step of every weight [N, K] in float64."""
    return qw.scales.double().repeat_interleave(qw.group, dim=1)


# ----------------------------------------------------------------------------- packing


def test_pack_unpack_round_trip_all_codes():
    lo, hi = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    codes = torch.stack((lo.flatten(), hi.flatten()), -1).reshape(8, 64).to(torch.uint8)  # every (low, high) pair
    packed = pack_int4(codes)
    assert packed.shape == (8, 32) and packed.dtype == torch.uint8
    assert sorted(packed.flatten().tolist()) == list(range(256))  # each byte value exactly once
    assert torch.equal(unpack_int4(packed), codes)
    assert torch.equal(pack_int4(unpack_int4(packed)), packed)


def test_pack_layout_low_nibble_first():
    codes = torch.tensor([[3, 12, 15, 0], [0, 1, 9, 7]], dtype=torch.uint8)
    assert pack_int4(codes).tolist() == [[3 | 12 << 4, 15], [1 << 4, 9 | 7 << 4]]


@pytest.mark.parametrize("codes,match", [
    (torch.zeros(2, 3, dtype=torch.uint8), "even"),
    (torch.full((2, 4), 16, dtype=torch.uint8), "> 15"),
    (torch.zeros(2, 4, dtype=torch.int32), "uint8"),
])
def test_pack_rejects(codes, match):
    with pytest.raises(ValueError, match=match):
        pack_int4(codes)


# ----------------------------------------------------------------------------- the format


def test_dequantize_hand_computed_4bit_asymmetric():
    # one group per row (K = 4): row 0 scale 0.5 zero 3, row 1 scale 2 zero 0
    codes = torch.tensor([[0, 3, 7, 15], [1, 0, 15, 2]], dtype=torch.uint8)
    qw = QuantWeight(pack_int4(codes), torch.tensor([[0.5], [2.0]]), torch.tensor([[3], [0]], dtype=torch.uint8), 4, 4, (2, 4))
    want = torch.tensor([[-1.5, 0.0, 2.0, 6.0], [2.0, 0.0, 30.0, 4.0]], dtype=torch.float64)
    assert torch.equal(dequantize(qw, torch.float64), want)
    assert torch.equal(dequantize(qw), want.float())


def test_dequantize_hand_computed_groups_symmetric():
    # 8 bits, K = 64, two groups of 32: zero point 128, scales 0.25 / 3 in row 0
    codes = torch.full((1, 64), 128, dtype=torch.uint8)
    codes[0, 0], codes[0, 31], codes[0, 32], codes[0, 63] = 0, 255, 1, 130
    qw = QuantWeight(codes, torch.tensor([[0.25, 3.0]], dtype=torch.float16), None, 8, 32, (1, 64))
    got = dequantize(qw, torch.float64)
    want = torch.zeros(1, 64, dtype=torch.float64)
    want[0, 0], want[0, 31], want[0, 32], want[0, 63] = -32.0, 31.75, -381.0, 6.0
    assert torch.equal(got, want)
    assert torch.equal(qw.zero_point(), torch.full((1, 2), 128.0))


def test_nbytes_and_zero_point():
    qw = quantize_rtn(weight(8, 256), 4, 128, symmetric=True)
    assert qw.nbytes == 8 * 128 + 8 * 2 * 2  # packed codes + float16 scales
    assert torch.equal(qw.zero_point(), torch.full((8, 2), 8.0))
    qa = quantize_rtn(weight(8, 256), 4, 128, symmetric=False)
    assert qa.nbytes == 8 * 128 + 8 * 2 * 2 + 8 * 2 and torch.equal(qa.zero_point(), qa.zeros.float())


def valid():
    return dict(qweight=torch.zeros(3, 32, dtype=torch.uint8), scales=torch.ones(3, 2, dtype=torch.float16),
                zeros=torch.zeros(3, 2, dtype=torch.uint8), bits=4, group=32, shape=(3, 64))


@pytest.mark.parametrize("change,match", [
    (dict(bits=3), "bits must be 4 or 8"),
    (dict(group=16), "group must be K"),
    (dict(group=64, shape=(3, 96)), "not a multiple of group"),
    (dict(qweight=torch.zeros(3, 3, dtype=torch.uint8), scales=torch.ones(3, 1), zeros=None, group=7, shape=(3, 7)), "even K"),
    (dict(qweight=torch.zeros(3, 32, dtype=torch.int8)), "qweight dtype"),
    (dict(qweight=torch.zeros(3, 64, dtype=torch.uint8)), r"qweight shape must be \(3, 32\)"),
    (dict(scales=torch.ones(3, 2, dtype=torch.bfloat16)), "scales dtype"),
    (dict(scales=torch.ones(3, 1, dtype=torch.float16)), r"scales shape must be \(3, 2\)"),
    (dict(zeros=torch.zeros(3, 2, dtype=torch.int32)), "zeros dtype"),
    (dict(zeros=torch.full((3, 2), 16, dtype=torch.uint8)), "zero point 16 > 15"),
    (dict(scales=torch.zeros(3, 2, dtype=torch.float16)), "finite and > 0"),
    (dict(scales=torch.full((3, 2), float("nan"))), "finite and > 0"),
    (dict(shape=(3, 0)), "N, K > 0"),
    (dict(perm=torch.arange(64, dtype=torch.int32)), "perm dtype"),
    (dict(perm=torch.arange(63)), r"perm shape must be \(64,\)"),
    (dict(perm=torch.zeros(64, dtype=torch.int64)), "not a permutation of 0..63"),
])
def test_check_names_what_is_wrong(change, match):
    assert QuantWeight(**valid()).check() is not None
    with pytest.raises(ValueError, match=match):
        QuantWeight(**{**valid(), **change}).check()


def test_a_perm_reorders_the_packed_columns_back_in_dequantize():
    w = weight(4, 64)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(1))
    packed = quantize_rtn(w[:, perm], 4, 32, symmetric=False)  # column j of the packed weight is w's column perm[j]
    qw = QuantWeight(packed.qweight, packed.scales, packed.zeros, 4, 32, (4, 64), perm).check()
    assert torch.equal(dequantize(qw)[:, perm], dequantize(packed))
    assert torch.equal(dequantize(qw.rows(1, 3)), dequantize(qw)[1:3]) and qw.nbytes == packed.nbytes + 64 * 8


def test_8bit_accepts_odd_k_per_channel():
    qw = quantize_rtn(weight(4, 37), 8, 37, symmetric=True)
    assert qw.qweight.shape == (4, 37) and qw.scales.dtype == torch.float32


# ----------------------------------------------------------------------------- round to nearest


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [192, 32, 64])
@pytest.mark.parametrize("symmetric", [True, False])
def test_rtn_within_half_a_step(bits, group, symmetric):
    w = weight(5, 192)
    qw = quantize_rtn(w, bits, group, symmetric)
    assert qw.check() is qw and qw.scales.dtype == default_scale_dtype(group, 192)
    assert (qw.zeros is None) == symmetric
    err = (w.double() - dequantize(qw, torch.float64)).abs()
    assert bool((err <= steps(qw) * (0.5 + SLACK)).all()), f"max error {float((err / steps(qw)).max()):.6f} steps"
    # and the errors are spread like rounding noise (mean square 1/12 of a step squared), not piled at the bound
    ms = float(((err / steps(qw)) ** 2).mean())
    assert 0.06 < ms < 0.11, ms


@pytest.mark.parametrize("bits", [4, 8])
def test_symmetric_grid_formula(bits):
    # s = max(max(w, 0) / (qmax + 1/2), -min(w, 0) / (qmax + 3/2)), stored rounded UP to float16
    w = weight(6, 128)
    w[0, :64] = w[0, :64].abs()  # a group with only positive weights
    w[1, 64:] = -w[1, 64:].abs()  # and one with only negative ones
    qmax = 2 ** (bits - 1) - 1
    wg = w.double().reshape(6, 2, 64)
    want = torch.maximum(wg.amax(-1).clamp_min(0) / (qmax + 0.5), -wg.amin(-1).clamp_max(0) / (qmax + 1.5))
    got = quantize_rtn(w, bits, 64, symmetric=True).scales.double()
    assert bool((got >= want).all() and (got <= want * (1 + 2 ** -10)).all())


@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_grid_formula(bits):
    # s = (max(w, 0) - min(w, 0)) / (2**bits - 1) rounded UP, zero = round(-min(w, 0) / s)
    w = weight(6, 128)
    wg = w.double().reshape(6, 2, 64)
    lo, hi = wg.amin(-1).clamp_max(0), wg.amax(-1).clamp_min(0)
    want = (hi - lo) / (2 ** bits - 1)
    qw = quantize_rtn(w, bits, 64, symmetric=False)
    got = qw.scales.double()
    assert bool((got >= want).all() and (got <= want * (1 + 2 ** -10)).all())
    assert torch.equal(qw.zeros.double(), torch.round(-lo / got))


def test_symmetric_grid_beats_absmax_over_qmax():
    # the choice the module docstring argues for: less rounding error than scale = absmax / 7
    w = weight(64, 256, outliers=False)
    ours = (dequantize(quantize_rtn(w, 4, 64, True)) - w).pow(2).mean()
    s = w.reshape(64, 4, 64).abs().amax(-1, keepdim=True) / 7
    plain = ((torch.round(w.reshape(64, 4, 64) / s) * s).reshape(64, 256) - w).pow(2).mean()
    assert float(ours) < 0.9 * float(plain)


def test_asymmetric_zero_points_and_one_signed_groups():
    w = weight(4, 64)
    w[0] = w[0].abs() + 1.0  # all positive: the range [0, max] puts the zero point at code 0
    w[1] = -w[1].abs() - 1.0  # all negative: zero point 15
    qw = quantize_rtn(w, 4, 64, symmetric=False)
    assert qw.zeros[:, 0].tolist()[:2] == [0, 15]
    err = (w.double() - dequantize(qw, torch.float64)).abs()
    assert bool((err <= steps(qw) * (0.5 + SLACK)).all())


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("group", [96, 32])
def test_zero_groups_dequantize_to_zero(bits, symmetric, group):
    w = weight(3, 96)
    w[0] = 0.0  # a whole zero row
    w[1, 32:64] = 0.0  # one zero group (with group 32)
    qw = quantize_rtn(w, bits, group, symmetric)
    d = dequantize(qw, torch.float64)
    assert bool(torch.isfinite(qw.scales).all()) and bool((qw.scales > 0).all())
    assert bool((d[0] == 0).all())
    if group == 32:
        assert bool((d[1, 32:64] == 0).all())


def test_float16_scales_clamped_into_range():
    w = torch.tensor([[1e-9] * 32 + [1e6] * 16 + [-1e6] * 16]).repeat(2, 1)  # K = 64, group 32
    qw = quantize_rtn(w, 4, 32, symmetric=True)
    assert qw.scales.dtype == torch.float16
    tiny, big = torch.finfo(torch.float16).tiny, torch.finfo(torch.float16).max
    assert qw.scales[:, 0].float().tolist() == [tiny, tiny] and qw.scales[:, 1].float().tolist() == [big, big]
    d = dequantize(qw, torch.float64)
    assert bool(torch.isfinite(d).all())
    assert bool((d[:, :32].abs() <= tiny / 2).all())  # tiny weights: within half the smallest step of 0
    # beyond max * (qmax + 1/2) the codes clamp: 7 * 65504 and -8 * 65504
    assert d[0, 32].item() == 7 * big and d[0, 63].item() == -8 * big
    # float32 scales hold the same weights exactly within half a step
    q32 = quantize_rtn(w, 4, 32, symmetric=True, scale_dtype=torch.float32)
    assert bool(((d32 := dequantize(q32, torch.float64)) - w.double()).abs().le(steps(q32) * (0.5 + SLACK)).all()), d32


def test_rtn_input_dtypes_and_errors():
    w = weight(4, 64)
    ref = quantize_rtn(w, 8, 64, True)
    for dt in (torch.float16, torch.bfloat16, torch.float64):
        qw = quantize_rtn(w.to(dt), 8, 64, True)
        assert qw.check() and float((dequantize(qw) - w).abs().max()) <= 2 * float(ref.scales.max())
    with pytest.raises(ValueError, match="non-finite"):
        quantize_rtn(torch.full((2, 64), float("inf")), 4, 64, True)
    with pytest.raises(ValueError, match=r"weight \[N, K\]"):
        quantize_rtn(torch.zeros(2, 3, 64), 4, 64, True)
    with pytest.raises(ValueError, match="scale dtype"):
        quantize_rtn(w, 4, 64, True, scale_dtype=torch.bfloat16)


def test_codes_range_and_symmetric_zero_code():
    w = weight(4, 64)
    for bits in (4, 8):
        c = codes_of(quantize_rtn(w, bits, 32, True))
        assert int(c.max()) <= 2 ** bits - 1
        z = codes_of(quantize_rtn(torch.zeros(2, 64), bits, 32, True))
        assert bool((z == 2 ** (bits - 1)).all())  # zero weights sit on the zero point


def test_fit_grid_shapes():
    s, z = fit_grid(weight(3, 128), 4, 64, False, torch.float32)
    assert s.shape == z.shape == (3, 2) and z.dtype == torch.float32 and bool((z == z.round()).all())
