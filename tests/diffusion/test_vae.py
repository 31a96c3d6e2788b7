"""The diffusers AutoencoderKL decoder (``vae.decode(z).sample``) compiled whole: a tiny config against eager on the
reference backend and, under the Triton interpreter, on the kernels backend (cuDNN's place taken by torch's conv2d);
the SD VAE in bf16 on the GPU against eager bf16 and float32."""

import pytest
import torch

import kiln
from kiln.codegen.tuning import Tuner
from kiln.runtime.executor import Executor
from kiln.runtime.target import Target
from kiln.testing import SD_VAE, TINY_VAE, TOL, VAEDecode, rel_err, vae

pytest.importorskip("diffusers")
DYNAMIC = {"z": {0: ("batch", 1, 4)}}
DYNAMIC_HW = {"z": {0: ("batch", 1, 4), 2: ("h", 2, 32), 3: ("w", 2, 32)}}  # latent height and width too


def latents(*shape, seed=0, device="cpu", dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator(device).manual_seed(seed), device=device).to(dtype)


@pytest.fixture(scope="module")
def tiny():
    decode = VAEDecode(vae(TINY_VAE))
    return decode, kiln.compile(decode, (latents(2, 4, 6, 5),), dynamic=DYNAMIC_HW)


def test_decoder_fuses_into_group_norms_and_convs(tiny):
    _, m = tiny
    hist = m.graph.histogram()
    # 6 resnet blocks (2 norms + SiLU, 2 convs each, the last conv taking the residual and the / 1.0), the mid block's
    # attention (a norm without SiLU), conv_in, post_quant_conv, a 1x1 shortcut, the upsampler's conv, norm_out + SiLU,
    # conv_out; the one ADD and DIV left are the attention block's residual (its sum is read as the next residual)
    assert hist["GROUP_NORM"] == 14 and hist["CONV"] == 6 and hist["CONV2D"] == 11 and "SILU" not in hist
    assert hist["ADD"] == 1 and hist["DIV"] == 1
    assert sum(n.attrs["act"] == "silu" for n in m.graph.nodes if n.op == "GROUP_NORM") == 13
    stats = m.report().to_dict()["passes"]["fuse_conv"]
    assert stats["rules"] == {"group_norm_silu": 13, "residual": 6, "divisor": 6}


@pytest.mark.parametrize("batch,h,w", [(2, 6, 5), (1, 4, 4), (3, 7, 2)])
def test_reference_backend_matches_eager(tiny, batch, h, w):
    decode, m = tiny
    z = latents(batch, 4, h, w, seed=batch)
    with torch.no_grad():
        want = decode(z)
    got = m(z)
    assert got.shape == want.shape == (batch, 3, 2 * h, 2 * w)
    assert rel_err(got, want) <= TOL[torch.float32]


def test_artifact_round_trip(tiny, tmp_path):
    _, m = tiny
    z = latents(2, 4, 5, 3, seed=7)
    back = kiln.load(m.save(tmp_path / "vae.kiln"))
    assert torch.equal(back(z), m(z))


def kernels_plan(m, z, force: dict):
    """The tiny decoder on the kernels backend, the choices ``force`` names forced (group norms on kiln's kernel)."""
    tuner = Tuner(force={"group_norm": "kiln", "gemm": "cublas", "attention": "sdpa", **force})
    ex = Executor(m.graph, Target.from_config(kiln.CompileConfig(backend="kernels"), tuner=tuner))
    return ex.run([z])[0], ex.plans[0]


@pytest.mark.interpreter
@pytest.mark.parametrize("layout,stored,changes", [("nchw", 0, 0), ("nhwc", 30, 2)])
def test_kernels_backend_matches_eager(tiny, layout, stored, changes):
    """Every group norm on kiln's kernel, every conv on torch's conv2d + kiln's epilogue, the 2x upsampling a copy.

    With every conv measured faster channels-last (forced "nhwc"), the values between convs are stored NHWC — 16 conv
    results (not conv_out's, a graph output), 13 group norms (not the attention block's 3-d one) and the upsampling's
    copy — and each conv reads and writes NHWC: 2 layout changes per call are left, z into post_quant_conv and
    conv_out's NCHW output (an NHWC conv between NCHW buffers, as the GPU plan ran before, makes 2 for each of the 17:
    x copied in, the result back out; test_gpu_sd_vae_256px_channels_last counts them). The numbers stay eager's."""
    decode, m = tiny
    z = latents(1, 4, 3, 4, seed=5)
    with torch.no_grad():
        want = decode(z)
    got, plan = kernels_plan(m, z, {"conv_layout": layout, "conv": "torch"})
    assert rel_err(got, want) <= 1e-4
    d = plan.describe()
    assert d["launches"]["group_norm"] == 14 and d["launches"]["conv"] == 17 and d["launches"]["copy"] == 1
    assert "reference" not in d["launches"]
    assert d["layouts"] == {"channels_last": stored, "conv_layout_changes": changes}

    def nhwc(n):
        return plan.env[n].is_contiguous(memory_format=torch.channels_last)
    convs = [(nhwc(g.nodes[0].inputs[0]), nhwc(g.nodes[0])) for g in plan.groups if g.kind == "conv"]  # (x, result) of each
    if layout == "nhwc":
        assert convs[0] == (False, True) and convs[-1] == (True, False) and set(convs[1:-1]) == {(True, True)}
    else:
        assert set(convs) == {(False, False)}
    assert got.is_contiguous()


# ----------------------------------------------------------------------------- GPU: the SD VAE at 256 px in bf16


@pytest.mark.gpu
def test_gpu_sd_vae_256px_bf16():
    """kiln's bf16 decoder is no further from the float32 model than eager bf16 is (a whole model in bf16 accumulates
    rounding beyond one op's tolerance), runs as one CUDA graph of group norm / conv kernels, and replays exactly."""
    model = vae(SD_VAE, noise=0.02, device="cuda")
    z32 = latents(1, 4, 32, 32, seed=3, device="cuda")
    with torch.no_grad():
        want32 = VAEDecode(model)(z32)
        decode = VAEDecode(model.to(torch.bfloat16))
        z = z32.bfloat16()
        eager = decode(z)
    m = kiln.compile(decode, (latents(2, 4, 32, 32, device="cuda", dtype=torch.bfloat16),), dynamic=DYNAMIC)
    got = m(z)
    assert got.shape == (1, 3, 256, 256) and got.dtype == torch.bfloat16
    err, eager_err = rel_err(got.float(), want32), rel_err(eager.float(), want32)
    assert err <= max(1.25 * eager_err, TOL[torch.bfloat16]), (err, eager_err)
    d = m.executor.describe()["plans"][0]
    assert d["cuda_graph"] and d["launches"]["group_norm"] == 30 and "reference" not in d["launches"], d
    assert torch.equal(m(z), got)


@pytest.mark.gpu
def test_gpu_sd_vae_256px_channels_last():
    """Every conv forced channels-last on cuDNN ("cudnn": straight into the NHWC buffer): z into the first conv and the
    image out of the last are the only layout changes, where NCHW buffers around cuDNN's channels-last kernels (the plan
    before) make 2 per conv; both as close to the float32 model as the measured plan must be, each one CUDA graph."""
    model = vae(SD_VAE, noise=0.02, device="cuda")
    z32 = latents(1, 4, 32, 32, seed=3, device="cuda")
    with torch.no_grad():
        want32 = VAEDecode(model)(z32)
        decode = VAEDecode(model.to(torch.bfloat16))
        eager_err = rel_err(decode(z32.bfloat16()).float(), want32)
    m = kiln.compile(decode, (z32.bfloat16(),), config=kiln.CompileConfig(verify=False))
    layouts = {}
    for name, force in {"nhwc": {"conv_layout": "nhwc", "conv": "cudnn"}, "copies": {"conv_layout": "nchw", "conv": "cudnn-nhwc"}}.items():
        ex = Executor(m.graph, Target.from_config(kiln.CompileConfig(backend="kernels", device="cuda"), tuner=Tuner(force=force)))
        err = rel_err(ex.run([z32.bfloat16()])[0].float(), want32)
        assert err <= max(1.25 * eager_err, TOL[torch.bfloat16]), (name, err, eager_err)
        d = ex.plans[0].describe()
        assert d["cuda_graph"], d
        layouts[name] = d["layouts"]
    convs = m.graph.histogram()["CONV"] + m.graph.histogram()["CONV2D"]
    assert layouts["nhwc"]["conv_layout_changes"] == 2 and layouts["nhwc"]["channels_last"] > 30, layouts
    assert layouts["copies"] == {"channels_last": 0, "conv_layout_changes": 2 * convs}, layouts
