"""kiln.codegen.kernels.conv_epilogue and the CONV candidates of codegen/lower.py against the CONV op's reference in
float64 (CPU: the Triton interpreter, float16/float32, irregular shapes, NCHW and NHWC operands and outputs; GPU: bfloat16
at the SD VAE decoder's shapes through cuDNN, into NCHW and channels-last buffers)."""

import pytest
import torch

from kiln.codegen import lower
from kiln.codegen.kernels.conv_epilogue import conv_epilogue, reference
from kiln.ir.ops import OPS
from kiln.testing import TOL, rel_err

pytestmark = pytest.mark.interpreter  # CPU cases run under TRITON_INTERPRET=1; gpu-marked ones need it off

gen = torch.Generator().manual_seed(0)


def r(*shape, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(device)


def wide(*ts):
    return [t.double() if t is not None else None for t in ts]


def check(h, bias=None, residual=None, divisor=None, out=None):
    want = reference(*wide(h, bias, residual), divisor)  # first: out may be h or the residual
    got = conv_epilogue(h, bias, residual, divisor, out=out)
    assert got.dtype == h.dtype and got.shape == h.shape
    err = rel_err(got, want)
    assert err <= TOL[h.dtype], f"rel err {err:.2e} > {TOL[h.dtype]:.0e}"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bias,residual,divisor", [
    (True, None, None),
    (False, (2, 13, 5, 7), None),
    (True, (2, 13, 5, 7), 1.0),  # the decoder's resnet: / 1.0 costs nothing
    (True, (2, 13, 5, 7), 0.7),
    (False, (13, 1, 1), 2.0),    # a per-channel residual: stride 0 over the positions
    (True, (2, 1, 1, 7), None),  # H broadcast, W not: the residual's spatial dims do not flatten (copied)
    (False, None, None),         # a plain copy
])
def test_epilogue(dtype, bias, residual, divisor):
    # C = 13, S = 35: partial tiles in both directions with the 8 x 32 interpreter tiles
    h = r(2, 13, 5, 7, dtype=dtype)
    check(h, r(13, dtype=dtype) if bias else None, r(*residual, dtype=dtype) if residual else None, divisor)


def nhwc(t):
    return t.contiguous(memory_format=torch.channels_last)


def test_channels_last_h_into_nchw_out():
    h = r(2, 5, 7, 13).permute(0, 3, 1, 2)  # what cuDNN returns for channels-last operands
    out = torch.empty(2, 13, 5, 7)
    assert check(h, r(13), r(2, 13, 5, 7), 0.5, out=out) is out


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("layouts", ["hro", "ro", "o", "hr"])  # which of h, the residual, out are channels-last
def test_channels_last_outputs_and_mixed_layouts(dtype, layouts):
    shape = (2, 13, 5, 7)
    h, res = r(*shape, dtype=dtype), r(*shape, dtype=dtype)
    h, res = nhwc(h) if "h" in layouts else h, nhwc(res) if "r" in layouts else res
    out = torch.empty(shape, dtype=dtype, memory_format=torch.channels_last if "o" in layouts else torch.contiguous_format)
    assert check(h, r(13, dtype=dtype), res, 1.5, out=out) is out
    assert out.is_contiguous(memory_format=torch.channels_last) == ("o" in layouts)


def test_in_place_on_a_channels_last_h():
    h = nhwc(r(3, 9, 4, 6))
    assert check(h, r(9), r(9, 1, 1), None, out=h) is h


def test_in_place_on_h_and_on_the_residual():
    h, res = r(3, 9, 4, 6), r(3, 9, 4, 6)
    assert check(h, r(9), None, None, out=h) is h
    assert check(r(3, 9, 4, 6), None, res, 2.0, out=res) is res


@pytest.mark.parametrize("kwargs,match", [
    (dict(bias=(12,)), "bias"),
    (dict(residual=(2, 13, 4, 7)), "does not broadcast"),
    (dict(out=(2, 13, 5)), "must have h's shape"),
    (dict(divisor=0.0), "divisor is 0"),
])
def test_errors(kwargs, match):
    h = r(2, 13, 5, 7)
    ops = {k: r(*v) for k, v in kwargs.items() if k != "divisor"}
    with pytest.raises(ValueError, match=match):
        conv_epilogue(h, ops.get("bias"), ops.get("residual"), kwargs.get("divisor"), out=ops.get("out"))


# ----------------------------------------------------------------------------- the CONV candidates


def conv_case(op, x, w, bias=None, residual=None, divisor=None, **geometry):
    attrs = {**dict(stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1), **geometry}
    if op == "CONV":
        attrs.update(bias=bias is not None, residual=residual is not None, divisor=divisor)
    args = [t for t in (x, w, bias, residual) if t is not None]
    return args, attrs


def check_candidates(op, args, attrs, tol, device="cpu", names=None):
    want = OPS[op].ref([t.double() for t in args], attrs)
    out = torch.empty(want.shape, dtype=args[0].dtype, device=device)
    what, candidates = lower.conv(args, attrs, out, torch.device(device))
    assert what["op"] == "CONV" and (names is None or set(candidates) == names)
    for name, run in candidates.items():
        out.fill_(float("nan"))
        run()
        assert rel_err(out, want) <= tol, f"{name}: rel err {rel_err(out, want):.2e}"
    return candidates


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_conv_candidates_on_cpu(dtype):
    """torch's conv2d + the Triton epilogue: the one candidate without cuDNN."""
    x, w = r(2, 4, 9, 11, dtype=dtype), r(6, 2, 3, 3, dtype=dtype, scale=0.3)
    args, attrs = conv_case("CONV", x, w, r(6, dtype=dtype), r(2, 6, 5, 11, dtype=dtype), 2.0, stride=(2, 1), padding=(1, 1), groups=2)
    check_candidates("CONV", args, attrs, TOL[dtype], names={"torch"})
    args, attrs = conv_case("CONV2D", x, r(5, 4, 1, 1, dtype=dtype), r(5, dtype=dtype))
    check_candidates("CONV2D", args, attrs, TOL[dtype], names={"torch"})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("x_layout,out_layout", [("nhwc", "nhwc"), ("nchw", "nhwc"), ("nhwc", "nchw")])
def test_conv_candidates_channels_last(dtype, x_layout, out_layout):
    """x, the residual and out channels-last or not: torch's conv2d computes in x's layout, the epilogue writes out
    through its strides."""
    x = r(2, 6, 7, 9, dtype=dtype)
    x = nhwc(x) if x_layout == "nhwc" else x
    res = nhwc(r(2, 5, 7, 9, dtype=dtype))
    args, attrs = conv_case("CONV", x, r(5, 6, 3, 3, dtype=dtype, scale=0.3), r(5, dtype=dtype), res, None, padding=(1, 1))
    fmt = torch.channels_last if out_layout == "nhwc" else torch.contiguous_format
    want = OPS["CONV"].ref([t.double() for t in args], attrs)
    out = torch.empty(want.shape, dtype=dtype, memory_format=fmt)
    what, candidates = lower.conv(args, attrs, out, torch.device("cpu"))
    assert set(candidates) == {"torch"} and what["out_stride"] == list(out.stride())
    out.fill_(float("nan"))
    candidates["torch"]()
    assert rel_err(out, want) <= TOL[dtype]
    assert lower.memory_layout(out) == out_layout  # written in place: its layout kept


def test_layout_changes_per_candidate():
    a, b = torch.empty(1, 8, 4, 4), nhwc(torch.empty(1, 8, 4, 4))
    assert lower.memory_layout(a) == "nchw" and lower.memory_layout(b) == "nhwc"
    assert lower.memory_layout(nhwc(torch.empty(1, 1, 4, 4))) == "nchw"  # one channel: both at once, called NCHW
    changes = lower.conv_layout_changes
    assert changes("cudnn", b, b) == 0 and changes("cudnn", a, b) == 1 and changes("cudnn-nhwc", a, a) == 2
    assert changes("cudnn-nchw", b, b) == 2 and changes("cudnn-nhwc", b, a) == 1
    assert changes("torch", b, b) == 0 and changes("torch", b, a) == 1 and changes("torch", a, a) == 0


def test_conv_layouts_runs_each_layout_on_its_own_temporaries():
    w = r(5, 6, 3, 3)
    what, candidates = lower.conv_layouts((2, 6, 7, 9), w, dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1),
                                          torch.device("cpu"))
    assert what["op"] == "CONV_LAYOUT" and what["x"] == [2, 6, 7, 9] and set(candidates) == {"nchw", "nhwc"}
    for run in candidates.values():
        run()
        run()
    assert lower.conv_layouts((2, 6, 7), w, {}, torch.device("cpu")) is None  # not 4-d
    assert lower.conv_layouts((2, 6, 7, 9), w.double(), {}, torch.device("cpu")) is None  # float64: the reference


# ----------------------------------------------------------------------------- GPU: cuDNN at the SD VAE decoder's shapes


@pytest.mark.gpu
@pytest.mark.parametrize("cin,cout,hw,k", [(512, 512, 32, 3), (512, 256, 128, 3), (256, 128, 256, 1), (4, 512, 32, 3)])
def test_gpu_vae_convs_every_candidate(cin, cout, hw, k):
    dev = "cuda"
    x, w = r(1, cin, hw, hw, dtype=torch.bfloat16, device=dev), r(cout, cin, k, k, dtype=torch.bfloat16, device=dev, scale=(cin * k * k) ** -0.5)
    res = r(1, cout, hw, hw, dtype=torch.bfloat16, device=dev)
    args, attrs = conv_case("CONV", x, w, r(cout, dtype=torch.bfloat16, device=dev), res, 1.0, padding=(k // 2, k // 2))
    names = check_candidates("CONV", args, attrs, TOL[torch.bfloat16], dev)
    assert {"cudnn", "cudnn-nhwc", "torch"} <= set(names)


@pytest.mark.gpu
@pytest.mark.parametrize("x_layout", ["nhwc", "nchw"])
@pytest.mark.parametrize("cin,cout,hw,k", [(512, 512, 32, 3), (256, 128, 256, 1)])
def test_gpu_channels_last_out_every_candidate(cin, cout, hw, k, x_layout):
    """Out channels-last (the kernels plan's buffers between convs): cuDNN straight into it, no copy of x in NHWC."""
    dev, bf = "cuda", torch.bfloat16
    x = r(1, cin, hw, hw, dtype=bf, device=dev)
    x = nhwc(x) if x_layout == "nhwc" else x
    w = r(cout, cin, k, k, dtype=bf, device=dev, scale=(cin * k * k) ** -0.5)
    args, attrs = conv_case("CONV", x, w, r(cout, dtype=bf, device=dev), nhwc(r(1, cout, hw, hw, dtype=bf, device=dev)), 1.0,
                            padding=(k // 2, k // 2))
    want = OPS["CONV"].ref([t.double() for t in args], attrs)
    out = torch.empty(want.shape, dtype=bf, device=dev, memory_format=torch.channels_last)
    _, candidates = lower.conv(args, attrs, out, torch.device(dev))
    assert set(candidates) == {"cudnn", "cudnn-nchw", "torch"}
    for name, run in candidates.items():
        out.fill_(float("nan"))
        run()
        assert rel_err(out, want) <= TOL[bf], name
    _, layouts = lower.conv_layouts(tuple(x.shape), w, attrs, torch.device(dev))
    for run in layouts.values():
        run()
    torch.cuda.synchronize()


@pytest.mark.gpu
def test_gpu_float32_and_a_plain_conv2d():
    x, w = r(2, 64, 40, 24, device="cuda"), r(32, 64, 3, 3, device="cuda", scale=0.05)
    args, attrs = conv_case("CONV2D", x, w, padding=(1, 1))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # the candidates follow eager's TF32 setting
        check_candidates("CONV2D", args, attrs, TOL[torch.float32], "cuda")
