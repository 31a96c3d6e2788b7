"""kiln.codegen.kernels.conv_epilogue and the CONV candidates of codegen/lower.py against the CONV op's reference in
float64 (CPU: the Triton interpreter, float16/float32, irregular shapes, NCHW and NHWC operands; GPU: bfloat16 at the
SD VAE decoder's shapes through cuDNN)."""

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


def test_channels_last_h_into_nchw_out():
    h = r(2, 5, 7, 13).permute(0, 3, 1, 2)  # what cuDNN returns for channels-last operands
    out = torch.empty(2, 13, 5, 7)
    assert check(h, r(13), r(2, 13, 5, 7), 0.5, out=out) is out


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
def test_gpu_float32_and_a_plain_conv2d():
    x, w = r(2, 64, 40, 24, device="cuda"), r(32, 64, 3, 3, device="cuda", scale=0.05)
    args, attrs = conv_case("CONV2D", x, w, padding=(1, 1))
    with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):  # the candidates follow eager's TF32 setting
        check_candidates("CONV2D", args, attrs, TOL[torch.float32], "cuda")
