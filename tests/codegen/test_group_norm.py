"""kiln.codegen.kernels.group_norm: the two-pass chunked group norm (+ SiLU), both kernel pairs ("group" and "nhwc"),
against the GROUP_NORM op's reference in float64 (CPU: the Triton interpreter, float16/float32, irregular shapes that cut
groups into several tiles and chunks, NCHW and channels-last inputs and outputs; GPU: bfloat16 at the SD VAE decoder's
shapes, in both layouts)."""

import pytest
import torch

import kiln.codegen.kernels.group_norm as GN
from kiln.codegen import lower
from kiln.codegen.kernels.group_norm import group_norm, kernel_form, reference, scratch_shape
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter  # CPU cases run under TRITON_INTERPRET=1; gpu-marked ones need it off

gen = torch.Generator().manual_seed(0)


def r(*shape, dtype=torch.float32, scale=1.0, shift=0.0, device="cpu"):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype).to(device)


def check(x, w, b, groups, act, eps=1e-5, **kw):
    want = reference(*(t.double() if t is not None else None for t in (x, w, b)), groups=groups, eps=eps, act=act)
    got = group_norm(x, w, b, groups, eps, act, **kw)
    assert got.dtype == x.dtype and got.shape == x.shape
    err = rel_err(got, want)
    assert err <= TOL[x.dtype], f"rel err {err:.2e} > {TOL[x.dtype]:.0e}"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("act", ["none", "silu"])
@pytest.mark.parametrize("shape,groups", [
    ((2, 12, 7, 19), 3),  # 4 channels x 133 positions a group: tiles of 4 x 32, the fifth 5 positions long
    ((1, 3, 300), 1),     # 3 channels (a masked fourth) x 10 tiles, 2 chunks of 5: a chunk boundary inside a row of tiles
    ((2, 18, 5, 7), 2),   # 9 channels: 3 channel blocks (the last 1 wide) x 2 position blocks, chunks of 3 tiles
    ((3, 8, 37), 4),      # one tile per group, 2 x 37 of its 4 x 64
    ((2, 6), 2),          # [N, C]: one value per channel
])
def test_shapes_and_activation(dtype, act, shape, groups):
    c = shape[1]
    check(r(*shape, dtype=dtype, scale=2.0, shift=0.5), r(c, dtype=dtype), r(c, dtype=dtype), groups, act)


@pytest.mark.parametrize("params", ["weight", "bias", "none"])
def test_optional_parameters(params):
    x = r(2, 6, 5, 7)
    w = r(6) if params == "weight" else None
    b = r(6) if params == "bias" else None
    check(x, w, b, 3, "silu", eps=1e-3)


def test_a_mean_far_from_zero_does_not_cancel():
    """float32 values 100 +- 1: float32 sums of x and x^2, then sum(x^2) / n - mean^2, get the variance to ~1e-4 (the output
    to ~6e-5); the shifted sums keep it to float32's rounding of the mean itself (100 * 6e-8)."""
    x = r(2, 8, 300, shift=100.0)
    check(x, r(8), r(8), 2, "none")


def empty(shape, layout, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)


@pytest.mark.parametrize("form", ["group", "nhwc"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("x_layout,out_layout", [("nhwc", "nhwc"), ("nchw", "nhwc"), ("nhwc", "nchw")])
def test_channels_last_input_and_output(dtype, x_layout, out_layout, form):
    """NHWC memory read and written through strides (stride_c = 1), by either pair: 6 channels a group, so "group" tiles of
    4 channels (the second block 2 wide) by 32 positions, "nhwc" blocks of one group (8 wide, 2 masked) by 16 positions;
    out and scratch preallocated, as the kernels plan does."""
    shape = (2, 18, 5, 7)
    x = empty(shape, x_layout, dtype).copy_(r(*shape, dtype=dtype, scale=3.0, shift=0.5))
    out = empty(shape, out_layout, dtype)
    scratch = torch.empty(scratch_shape(shape, 3), dtype=torch.float32)
    got = check(x, r(18, dtype=dtype), r(18, dtype=dtype), 3, "silu", out=out, scratch=scratch, form=form)
    assert got is out and out.is_contiguous(memory_format=torch.channels_last) == (out_layout == "nhwc")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape,groups", [
    ((2, 24, 5, 7), 8),   # 3 channels a group: blocks of 2 groups (6 of 8 channels), 3 tiles of 16 positions, chunks of 2
    ((2, 40, 9, 13), 4),  # 10 channels a group: blocks of 1 group (10 of 16), chunks of 8 tiles of 8 positions
    ((2, 24, 9, 13), 2),  # 12 channels a group, 2 blocks
    ((1, 32, 6, 6), 8),   # 4 channels a group: blocks of 2 whole groups, no masked channel
])
@pytest.mark.parametrize("act", ["none", "silu"])
def test_nhwc_pair_irregular_shapes(dtype, shape, groups, act):
    x = empty(shape, "nhwc", dtype).copy_(r(*shape, dtype=dtype, scale=2.0, shift=-0.7))
    check(x, r(shape[1], dtype=dtype), r(shape[1], dtype=dtype), groups, act, out=empty(shape, "nhwc", dtype))


@pytest.mark.parametrize("params", ["weight", "bias", "none"])
def test_nhwc_pair_optional_parameters(params):
    x = empty((2, 24, 5, 7), "nhwc").copy_(r(2, 24, 5, 7))
    w = r(24) if params == "weight" else None
    b = r(24) if params == "bias" else None
    check(x, w, b, 4, "silu", eps=1e-3, form="nhwc")


@pytest.mark.parametrize("form", ["group", "nhwc"])
def test_a_large_mean_channels_last_does_not_cancel(form):
    """float32 values 1000 +- 1, channels-last: float32 sums of x and x^2 would get the variance only to ~1e6 * 6e-8 = 0.06;
    the per-group shifts keep the output to float32's rounding of the mean, 1000 * 6e-8 = 6e-5 against a spread of 1."""
    x = empty((2, 24, 9, 13), "nhwc").copy_(r(2, 24, 9, 13, shift=1000.0))
    w, b = r(24), r(24)
    want = reference(x.double(), w.double(), b.double(), 8, 1e-5, "silu")
    assert rel_err(group_norm(x, w, b, 8, 1e-5, "silu", form=form), want) <= 1e-4


def test_channels_last_takes_the_nhwc_pair():
    x = r(2, 24, 5, 7, dtype=torch.float16)
    xl = x.contiguous(memory_format=torch.channels_last)
    assert kernel_form(x) == "group" and kernel_form(xl) == "nhwc" and kernel_form(r(2, 1, 5, 7)) == "group"
    w, b = r(24, dtype=torch.float16), r(24, dtype=torch.float16)
    assert torch.equal(group_norm(xl, w, b, 8, 1e-6, "silu"), group_norm(xl, w, b, 8, 1e-6, "silu", form="nhwc"))


@pytest.mark.parametrize("form", ["group", "nhwc"])
def test_layout_does_not_change_the_numbers(form):
    """Each pair runs the same tiles in either layout: NCHW and NHWC give the same bits."""
    x = r(1, 24, 9, 13, dtype=torch.float16, scale=2.0)
    w, b = r(24, dtype=torch.float16), r(24, dtype=torch.float16)
    a = group_norm(x, w, b, 4, 1e-6, "silu", form=form)
    c = group_norm(x.contiguous(memory_format=torch.channels_last), w, b, 4, 1e-6, "silu", out=empty(x.shape, "nhwc", x.dtype),
                   form=form)
    assert torch.equal(a, c)


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_lower_offers_the_nhwc_pair_for_channels_last(layout):
    x = empty((2, 24, 5, 7), layout).copy_(r(2, 24, 5, 7))
    w, b = r(24), r(24)
    out = empty(x.shape, layout)
    scratch = torch.empty(lower.group_norm_scratch(tuple(x.shape), 8), dtype=torch.float32)
    attrs = dict(groups=8, eps=1e-5, act="silu")
    what, candidates = lower.group_norm([x, w, b], attrs, out, scratch, torch.device("cpu"))
    assert sorted(candidates) == (["kiln", "kiln-nhwc", "torch"] if layout == "nhwc" else ["kiln", "torch"]) == what["kernels"]
    want = reference(x.double(), w.double(), b.double(), 8, 1e-5, "silu")
    for name in candidates:
        candidates[name]()
        assert rel_err(out, want) <= TOL[torch.float32], name


def test_plan_fills_chunks_with_whole_tiles(monkeypatch):
    monkeypatch.setattr(GN, "INTERPRET", False)  # the GPU plan
    # SD VAE's last norm at 1024 px: 32 groups of 4 channels x 1M positions, tiles of 4 x 512
    block_c, block_s, nsb, tiles, tpc, chunks = GN._plan(32, 4, 1024 * 1024)
    assert (block_c, block_s, nsb, tiles) == (4, 512, 2048, 2048)
    assert chunks * 32 >= GN.TARGET_PROGRAMS and (chunks - 1) * tpc < tiles
    assert GN._plan(32, 16, 1024) == (16, 128, 8, 8, 1, 8)  # mid block at 256 px: 16 channels a tile, a chunk per tile
    assert GN._plan(32, 32, 64)[:4] == (16, 64, 1, 2)  # more channels than a tile holds: two channel blocks
    assert GN._plan(8, 2, 3)[-1] == 1  # never more chunks than tiles


@pytest.mark.parametrize("c,s", [(512, 128 * 128), (256, 256 * 256), (128, 256 * 256), (128, 1024 * 1024), (512, 32 * 32)])
def test_nhwc_plan_fills_the_gpu_with_whole_groups(monkeypatch, c, s):
    """The SD VAE decoder's norms (32 groups): blocks of whole groups 64 channels wide, chunks of whole position tiles, at
    least 512 programs where there are positions enough, and a block's partials within MAX_PARTIALS."""
    monkeypatch.setattr(GN, "INTERPRET", False)
    gb, block_c, block_s, spc, chunks = GN._plan_nhwc(1, c, 32, s)
    assert gb * c // 32 == block_c == 64 and block_s * block_c == GN.BLOCK_NHWC and spc % block_s == 0
    assert (chunks - 1) * spc < s <= chunks * spc and gb * chunks <= GN.MAX_PARTIALS
    assert chunks * 32 // gb >= min(512, s // block_s)
    assert scratch_shape((1, c, s), 32)[1] == max(chunks, GN._plan(32, c // 32, s)[-1])


def test_empty_input():
    assert scratch_shape((2, 4, 0), 2) == (4, 1, 3) and group_norm(r(2, 4, 0), groups=2).shape == (2, 4, 0)


@pytest.mark.parametrize("kwargs,match", [
    (dict(groups=5), "12 channels do not split into 5 groups"),
    (dict(w=(6,)), r"weight torch.float32\(6,\) must be"),
    (dict(act="gelu"), "unknown activation"),
    (dict(scratch=(4, 1, 3)), "scratch"),
    (dict(x_dtype=torch.float64), "dtype torch.float64"),
    (dict(form="nchw"), "unknown form 'nchw'"),
])
def test_errors(kwargs, match):
    x = r(2, 12, 5, dtype=kwargs.get("x_dtype", torch.float32))
    w = r(*kwargs.get("w", (12,)))
    s = torch.empty(kwargs["scratch"]) if "scratch" in kwargs else None
    with pytest.raises(ValueError, match=match):
        group_norm(x, w, None, kwargs.get("groups", 4), act=kwargs.get("act", "none"), scratch=s, form=kwargs.get("form"))


# ----------------------------------------------------------------------------- GPU (bf16 at the SD VAE decoder's shapes)


def check_gpu(shape, groups, act, dtype=torch.bfloat16, layout="nchw", form=None):
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    x = r(*shape, dtype=dtype, scale=2.0, shift=0.3, device="cuda").contiguous(memory_format=fmt)
    w, b = r(shape[1], dtype=dtype, device="cuda"), r(shape[1], dtype=dtype, device="cuda")
    want = reference(x.float(), w.float(), b.float(), groups, 1e-6, act)
    got = group_norm(x, w, b, groups, 1e-6, act, out=torch.empty_like(x, memory_format=fmt), form=form)
    torch.cuda.synchronize()
    assert rel_err(got, want) <= TOL[dtype]
    # eager bf16 (group_norm, then silu on the rounded values) is no closer to float32 than kiln is
    eager = reference(x, w, b, groups, 1e-6, act)
    assert rel_err(got, want) <= rel_err(eager, want) * 1.5 + 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("shape", [(1, 512, 32, 32), (1, 512, 128, 128), (1, 128, 256, 256), (2, 256, 64, 64)])
def test_gpu_vae_shapes(shape, layout):
    check_gpu(shape, 32, "silu", layout=layout)


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["group", "nhwc"])
@pytest.mark.parametrize("shape", [(1, 512, 32, 32), (1, 256, 256, 256), (1, 128, 256, 256), (2, 512, 64, 64)])
def test_gpu_vae_shapes_channels_last_both_pairs(shape, form):
    check_gpu(shape, 32, "silu", layout="nhwc", form=form)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_gpu_other_dtypes_irregular(dtype):
    check_gpu((3, 96, 37, 41), 8, "none", dtype)
    check_gpu((3, 96, 37, 41), 4, "silu", dtype, "nhwc", "group")  # 24 channels a group: two channel blocks
    check_gpu((3, 96, 37, 41), 4, "silu", dtype, "nhwc", "nhwc")  # blocks of one group, 32 wide (8 masked)
    check_gpu((3, 120, 37, 41), 8, "none", dtype, "nhwc", "nhwc")  # 15 channels a group: blocks of 4 (60 of 64)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
def test_gpu_deterministic(layout):
    x = r(1, 128, 512, 512, dtype=torch.bfloat16, device="cuda")
    x = x.contiguous(memory_format=torch.channels_last) if layout == "nhwc" else x
    a, b = group_norm(x, groups=32, act="silu"), group_norm(x, groups=32, act="silu")
    assert torch.equal(a, b)
