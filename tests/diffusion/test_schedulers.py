"""kiln.diffusion.schedulers against diffusers: whole trajectories of a fixed random "model" through
diffusers' scheduler and kiln's from the same noise, every intermediate sample compared (float64 to 1e-10,
float32 to 1e-5, bf16 near diffusers and nearer the exact value); the step reads no tensor value on the
host and runs the same ops at every step (a dispatch-mode trace, and a run on the meta device); refusals
name the option; on a GPU, one captured CUDA graph replayed S times follows the eager trajectory."""
import contextlib
import math

import diffusers
import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from kiln.diffusion.schedulers import COLUMNS, make_scheduler
from kiln.errors import KilnError

F64 = torch.float64
TOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 5e-2}  # max |kiln - diffusers| / max |diffusers|, per sample
BF16_VS_F32 = 2e-2  # a bf16 trajectory against the float32 one (bf16 eps = 7.8e-3)
SHAPE = (2, 4, 5, 3)  # [B, C, H, W]
STEPS = (1, 2, 10, 25, 50)
SEED_NOISE = 7  # the generator of DDPM's / DDIM(eta)'s per-step noise

# facebook/DiT-XL-2-256's scheduler (DDIMScheduler, linear betas, 1000 training steps)
DIT = {"_class_name": "DDIMScheduler", "_diffusers_version": "0.12.0.dev0", "beta_start": 0.0001, "beta_end": 0.02,
       "beta_schedule": "linear", "clip_sample": False, "num_train_timesteps": 1000, "prediction_type": "epsilon",
       "set_alpha_to_one": True, "steps_offset": 0, "trained_betas": None}
# PixArt-alpha/PixArt-XL-2-1024-MS's scheduler (DPM-Solver++ 2M)
PIXART = {"_class_name": "DPMSolverMultistepScheduler", "_diffusers_version": "0.22.0.dev0", "algorithm_type": "dpmsolver++",
          "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear", "dynamic_thresholding_ratio": 0.995,
          "euler_at_final": False, "lambda_min_clipped": -math.inf, "lower_order_final": True, "num_train_timesteps": 1000,
          "prediction_type": "epsilon", "sample_max_value": 1.0, "solver_order": 2, "solver_type": "midpoint",
          "steps_offset": 0, "thresholding": False, "timestep_spacing": "linspace", "trained_betas": None,
          "use_karras_sigmas": False, "use_lu_lambdas": False, "variance_type": None}
SD_BETAS = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}

CASES = {  # name: (config, DDIM's eta or None)
    "dit-leading": (DIT, None),
    "dit-trailing": ({**DIT, "timestep_spacing": "trailing"}, None),
    "dit-linspace": ({**DIT, "timestep_spacing": "linspace"}, None),
    "dit-eta": (DIT, 0.7),
    "ddim-v-clip": ({**DIT, **SD_BETAS, "prediction_type": "v_prediction", "clip_sample": True, "set_alpha_to_one": False,
                     "steps_offset": 1}, None),
    "ddim-sample-cos": ({**DIT, "beta_schedule": "squaredcos_cap_v2", "prediction_type": "sample", "clip_sample": True,
                         "clip_sample_range": 1.5, "timestep_spacing": "trailing"}, None),
    "ddpm": ({"_class_name": "DDPMScheduler"}, None),
    "ddpm-smalllog-v": ({"_class_name": "DDPMScheduler", "variance_type": "fixed_small_log", "prediction_type": "v_prediction",
                         "clip_sample": False, "timestep_spacing": "trailing"}, None),
    "ddpm-large-sample": ({"_class_name": "DDPMScheduler", **SD_BETAS, "variance_type": "fixed_large",
                           "prediction_type": "sample", "timestep_spacing": "linspace"}, None),
    "euler-sd": ({"_class_name": "EulerDiscreteScheduler", **SD_BETAS, "timestep_spacing": "leading", "steps_offset": 1}, None),
    "euler-v-trailing": ({"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction",
                          "timestep_spacing": "trailing"}, None),
    "euler-karras": ({"_class_name": "EulerDiscreteScheduler", **SD_BETAS, "use_karras_sigmas": True,
                      "final_sigmas_type": "sigma_min", "prediction_type": "sample"}, None),
    "euler-continuous-v": ({"_class_name": "EulerDiscreteScheduler", "prediction_type": "v_prediction",
                            "timestep_type": "continuous"}, None),
    "pixart": (PIXART, None),
    "pixart-leading": ({**PIXART, "timestep_spacing": "leading", "steps_offset": 1}, None),
    "pixart-trailing": ({**PIXART, "timestep_spacing": "trailing"}, None),
    "dpm-heun-karras-v": ({**PIXART, **SD_BETAS, "solver_type": "heun", "use_karras_sigmas": True,
                           "prediction_type": "v_prediction"}, None),
    "dpm-sigmamin-2nd-final": ({**PIXART, "lower_order_final": False, "final_sigmas_type": "sigma_min"}, None),
    "dpm-euler-final-cos": ({**PIXART, "beta_schedule": "squaredcos_cap_v2", "euler_at_final": True,
                             "final_sigmas_type": "sigma_min", "lambda_min_clipped": -5.1}, None),
    "dpm-order1-sample": ({**PIXART, "solver_order": 1, "prediction_type": "sample"}, None),
}

_W = torch.randn(SHAPE[1], SHAPE[1], generator=torch.Generator().manual_seed(1), dtype=F64) / SHAPE[1] ** 0.5


def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A fixed random "denoiser" in x's dtype: tanh of a channel mix of x, plus noise seeded by the timestep."""
    seed = int(round(float(t) * 1000)) % 2 ** 31
    n = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return (torch.tanh(torch.einsum("oc,bchw->bohw", _W, x.double())) + 0.3 * n).to(x.dtype)


def start_noise(dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=F64).to(dtype)


class Float64Steps(TorchFunctionMode):
    """Makes diffusers' step a float64 reference: its ``sample.to(torch.float32)`` upcasts (Euler, DPM) stay
    float64. With its tables upcast (``upcast``) every number of its step is then float64."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        swap = lambda a: F64 if a is torch.float32 else a  # noqa: E731
        return func(*map(swap, args), **{k: swap(v) for k, v in (kwargs or {}).items()})


def upcast(ref) -> None:
    """The float32 tensors a diffusers scheduler holds after set_timesteps (alphas_cumprod, sigmas, ...) as
    float64: the same values, so its per-step arithmetic runs in float64 (timesteps stay: the model's input)."""
    for name, value in list(vars(ref).items()):
        if isinstance(value, torch.Tensor) and value.dtype == torch.float32 and name != "timesteps":
            setattr(ref, name, value.to(F64))


def diffusers_trajectory(config: dict, n: int, dtype: torch.dtype, eta: float | None):
    ref = getattr(diffusers, config["_class_name"]).from_config(config)
    ref.set_timesteps(n)
    timesteps, init = ref.timesteps.clone(), float(ref.init_noise_sigma)
    mode = Float64Steps() if dtype == F64 else contextlib.nullcontext()
    if dtype == F64:
        upcast(ref)
    x, g, samples = start_noise(dtype) * init, torch.Generator().manual_seed(SEED_NOISE), []
    for t in ref.timesteps:
        with mode:
            x_in = ref.scale_model_input(x, t)
        m = model(x_in, t)
        with mode:
            x = ref.step(m, t, x, generator=g, **({} if eta is None else {"eta": eta})).prev_sample
        samples.append(x)
    return timesteps, init, samples


def kiln_trajectory(config: dict, n: int, dtype: torch.dtype, eta: float | None, table_dtype: torch.dtype | None = None):
    """Samples in ``dtype``; the schedule's table (and so the update's arithmetic) in float64 for float64
    samples, else float32 unless ``table_dtype`` says otherwise."""
    table_dtype = table_dtype or (F64 if dtype == F64 else torch.float32)
    schedule = make_scheduler(config).set_timesteps(n, "cpu", table_dtype, **({} if eta is None else {"eta": eta}))
    x = start_noise(dtype) * schedule.init_noise_sigma
    state, g, samples = schedule.init_state(x), torch.Generator().manual_seed(SEED_NOISE), []
    for k in range(schedule.num_steps):
        i = torch.tensor(k)
        m = model(schedule.scale_input(x, i), schedule.timesteps[k])
        schedule.draw_noise(state, g)
        x, state = schedule.step(m, i, x, state)
        samples.append(x)
    return schedule, samples


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max())


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("n", STEPS)
@pytest.mark.parametrize("case", CASES)
def test_trajectory_matches_diffusers(case, n, dtype):
    """float64: kiln and diffusers (its tables and in-step casts lifted to float64) agree to 1e-10 at every
    step. float32: they agree to 1e-5 plus diffusers' own float32 error at that step (measured against a
    float64 update on the same noise: diffusers' Euler cancels x + (x - x0)/s (s' - s) in float32 and is
    off by up to 4e-5 on 1-2 step schedules, where kiln's folded coefficients are not), and kiln is within
    1e-5 of that float64 update."""
    config, eta = CASES[case]
    timesteps, init, ref = diffusers_trajectory(config, n, dtype, eta)
    schedule, ours = kiln_trajectory(config, n, dtype, eta)
    assert torch.equal(schedule.timesteps, timesteps) and schedule.timesteps.dtype == timesteps.dtype
    assert schedule.init_noise_sigma == init
    assert len(ours) == len(ref) and all(a.dtype == b.dtype == dtype for a, b in zip(ours, ref))
    if dtype == F64:
        errs = [rel_err(a, b) for a, b in zip(ours, ref)]
        assert max(errs) <= TOL[F64], f"step {errs.index(max(errs))}: {max(errs):.3g}"
        return
    _, exact = kiln_trajectory(config, n, dtype, eta, table_dtype=F64)
    for k, (a, b, e) in enumerate(zip(ours, ref, exact)):
        assert rel_err(a, b) <= TOL[dtype] + rel_err(b, e), f"step {k}: {rel_err(a, b):.3g} vs diffusers"
        assert rel_err(a, e) <= TOL[dtype], f"step {k}: {rel_err(a, e):.3g} vs the float64 update"


@pytest.mark.parametrize("case", ["dit-leading", "ddpm", "euler-sd", "pixart"])
def test_bf16_trajectory_near_diffusers_and_float32(case):
    """bf16 samples and model outputs: kiln's output dtype is diffusers' at every step, the trajectory stays
    within a few bf16 ulps of diffusers' bf16 run and of the float32 run (deterministic cases; DDPM's bf16
    noise is another draw than float32's)."""
    config, eta = CASES[case]
    _, _, ref = diffusers_trajectory(config, 25, torch.bfloat16, eta)
    _, ours = kiln_trajectory(config, 25, torch.bfloat16, eta)
    _, f32 = kiln_trajectory(config, 25, torch.float32, eta)
    assert all(a.dtype == b.dtype == torch.bfloat16 for a, b in zip(ours, ref))
    assert max(rel_err(a, b) for a, b in zip(ours, ref)) <= TOL[torch.bfloat16]
    if case != "ddpm":
        assert max(rel_err(a, b) for a, b in zip(ours, f32)) <= BF16_VS_F32


class HostReads(TorchDispatchMode):
    """Records every aten op (name, output shapes) and raises on one that reads tensor values on the host:
    ``.item()``, ``.tolist()``, ``bool(t)`` and a 0-d tensor index all reach ``aten._local_scalar_dense``
    (tagged data_dependent_output), and nonzero / masked_select have value-dependent shapes. Such an op is
    a device sync, which a CUDA graph capture refuses."""

    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if torch.Tag.data_dependent_output in func.tags or torch.Tag.dynamic_output_shape in func.tags:
            raise AssertionError(f"{func} reads tensor values on the host")
        out = func(*args, **(kwargs or {}))
        outs = [o for o in (out if isinstance(out, (tuple, list)) else (out,)) if isinstance(o, torch.Tensor)]
        self.ops.append((str(func), tuple((tuple(o.shape), o.device.type) for o in outs)))
        return out


def test_host_reads_is_not_blind():
    table, i = torch.arange(4.0), torch.tensor(2)
    with pytest.raises(AssertionError, match="_local_scalar_dense"), HostReads():
        table[i]  # what the step must not do
    with HostReads() as watch:
        table.index_select(0, i.reshape(1))
    assert [op for op, _ in watch.ops] == ["aten.view.default", "aten.index_select.default"]


@pytest.mark.parametrize("case", ["dit-eta", "ddpm", "euler-karras", "pixart", "dpm-heun-karras-v"])
def test_step_is_the_same_ops_at_every_step_and_reads_no_value(case):
    """scale_input + draw_noise + step under HostReads: no host read at any step, and step k's op list is
    step 0's (first-order, second-order and final steps alike). Then a step on the meta device, where
    tensors have no values at all, with every tensor it makes on that device (no CPU scalar tensor that a
    GPU step would have to copy up)."""
    config, eta = CASES[case]
    schedule = make_scheduler(config).set_timesteps(10, "cpu", **({} if eta is None else {"eta": eta}))
    x, g, traces = start_noise(torch.float32), torch.Generator().manual_seed(0), []
    state = schedule.init_state(x)
    m = model(x, schedule.timesteps[0])
    for k in range(schedule.num_steps):
        with HostReads() as watch:
            i = torch.tensor(k)
            schedule.draw_noise(state, g)
            x, state = schedule.step(m, i, schedule.scale_input(x, i), state)
        traces.append(watch.ops)
    assert all(trace == traces[0] for trace in traces) and len(traces[0]) >= 4
    meta = make_scheduler(config).set_timesteps(10, "meta", **({} if eta is None else {"eta": eta}))
    x = torch.empty(SHAPE, device="meta")
    state, i = meta.init_state(x), torch.full((), 9, dtype=torch.int64, device="meta")
    with HostReads() as watch:
        meta.draw_noise(state)
        prev, state = meta.step(x.to(torch.bfloat16), i, meta.scale_input(x, i), state)
    assert {device for _, outs in watch.ops for _, device in outs} == {"meta"}
    assert prev.shape == SHAPE and prev.dtype == (torch.bfloat16 if case == "euler-karras" else torch.float32)


@pytest.mark.parametrize("config, option", [
    ({**DIT, "thresholding": True}, "thresholding=True"),
    ({**DIT, "rescale_betas_zero_snr": True}, "rescale_betas_zero_snr=True"),
    ({**DIT, "prediction_type": "flow_prediction"}, "prediction_type='flow_prediction'"),
    ({"_class_name": "DDPMScheduler", "beta_schedule": "sigmoid"}, "beta_schedule='sigmoid'"),
    ({"_class_name": "DDPMScheduler", "variance_type": "learned_range"}, "variance_type='learned_range'"),
    ({"_class_name": "EulerDiscreteScheduler", "use_exponential_sigmas": True}, "use_exponential_sigmas=True"),
    ({"_class_name": "EulerDiscreteScheduler", "interpolation_type": "log_linear"}, "interpolation_type='log_linear'"),
    ({**PIXART, "algorithm_type": "sde-dpmsolver++"}, "algorithm_type='sde-dpmsolver++'"),
    ({**PIXART, "solver_order": 3}, "solver_order=3"),
    ({**PIXART, "solver_type": "bh2"}, "solver_type='bh2'"),
    ({**PIXART, "use_lu_lambdas": True}, "use_lu_lambdas=True"),
    ({**PIXART, "variance_type": "learned_range"}, "variance_type='learned_range'"),
    ({**PIXART, "thresholding": True}, "thresholding=True"),
], ids=lambda v: v if isinstance(v, str) else v["_class_name"])
def test_unsupported_option_is_refused_by_name(config, option):
    with pytest.raises(KilnError) as err:
        make_scheduler(config)
    assert f"{config['_class_name']}: {option} is not supported" in str(err.value) and "kiln supports" in str(err.value)


def test_refusals_outside_the_config():
    with pytest.raises(KilnError, match="'PNDMScheduler' is not supported.*DDIMScheduler"):
        make_scheduler({"_class_name": "PNDMScheduler"})
    ddim = make_scheduler({**DIT, "skip_prk_steps": True})  # a key DDIMScheduler does not know: ignored, like diffusers
    for bad in (0, 1001, 2.5):
        with pytest.raises(KilnError, match=f"num_inference_steps={bad!r}"):
            ddim.set_timesteps(bad)
    with pytest.raises(KilnError, match="float32 or float64"):
        ddim.set_timesteps(10, dtype=torch.bfloat16)
    with pytest.raises(KilnError, match="eta=-0.5"):
        ddim.set_timesteps(10, eta=-0.5)
    with pytest.raises(KilnError, match="non-finite coefficients"):  # sqrt(1 - a' - std^2) of a negative: NaN in diffusers
        ddim.set_timesteps(10, eta=1.5)


def test_step_kind_is_a_table_entry():
    """DPM-Solver++ 2M: the weight on x0 - x0_prev is 0 on the first step and on a lower-order final step, not
    between, and with lower_order_final off and a final sigma_min the last step is second order; DDPM's
    noise weight is 0 only at t = 0; deterministic DDIM holds no state."""
    pixart = make_scheduler(PIXART).set_timesteps(10)
    w = pixart.table[:, COLUMNS.index("p_delta")]
    assert w[0] == 0 and w[-1] == 0 and bool((w[1:-1] != 0).all()) and pixart.state_names == ("x0_prev",)
    assert make_scheduler(CASES["dpm-sigmamin-2nd-final"][0]).set_timesteps(20).table[-1, COLUMNS.index("p_delta")] != 0
    ddpm = make_scheduler({"_class_name": "DDPMScheduler"}).set_timesteps(10)
    z = ddpm.table[:, COLUMNS.index("p_noise")]
    assert bool((z[:-1] > 0).all()) and z[-1] == 0 and ddpm.timesteps[-1] == 0 and ddpm.state_names == ("noise",)
    assert make_scheduler(DIT).set_timesteps(10).state_names == ()


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["ddpm", "euler-sd", "pixart"])
def test_cuda_graph_replay_follows_eager_and_diffusers(case):
    """One step (scale_input, a device-only model, draw_noise, step, write-back, i += 1) runs eagerly with no
    host sync, is captured once and replayed S times: the replays give the eager trajectory, and diffusers'
    (eager, same CUDA generator seed, so the same DDPM noise) within 1e-5 plus its own float32 error."""
    config, dev = CASES[case][0], torch.device("cuda")
    W = _W.to(dev, torch.float32)
    gpu_model = lambda x, t: torch.tanh(torch.einsum("oc,bchw->bohw", W, x)) + 0.1 * torch.sin(t.float() / 100)  # noqa: E731

    def trajectory(table_dtype, graphed):
        schedule = make_scheduler(config).set_timesteps(25, dev, table_dtype)
        x = start_noise(torch.float32).to(dev) * schedule.init_noise_sigma
        state, i, g = schedule.init_state(x), torch.zeros((), dtype=torch.int64, device=dev), torch.Generator(dev)

        def one_step():
            m = gpu_model(schedule.scale_input(x, i), schedule.timesteps.index_select(0, i.reshape(1)))
            schedule.draw_noise(state, g)
            prev, new_state = schedule.step(m, i, x, state)
            x.copy_(prev)
            for buf, new in zip(state, new_state):
                buf.copy_(new)  # DDPM's noise buffer comes back as itself: a no-op copy
            i.add_(1)
        run_step = one_step
        if graphed:
            cuda_graph = torch.cuda.CUDAGraph()
            cuda_graph.register_generator_state(g)
            with torch.cuda.graph(cuda_graph):
                one_step()  # recorded, not run: x, state and i keep their start values
            run_step = cuda_graph.replay
        g.manual_seed(SEED_NOISE)
        out = []
        torch.cuda.set_sync_debug_mode(0 if graphed else "error")
        try:
            for _ in range(schedule.num_steps):
                run_step()
                out.append(x.clone())
        finally:
            torch.cuda.set_sync_debug_mode(0)
        return out

    eager, replayed, exact = trajectory(torch.float32, False), trajectory(torch.float32, True), trajectory(F64, False)
    ref = getattr(diffusers, config["_class_name"]).from_config(config)
    ref.set_timesteps(25, dev)
    x, g = start_noise(torch.float32).to(dev) * float(ref.init_noise_sigma), torch.Generator(dev).manual_seed(SEED_NOISE)
    for k, t in enumerate(ref.timesteps):
        x = ref.step(gpu_model(ref.scale_model_input(x, t), t), t, x, generator=g).prev_sample
        assert torch.equal(replayed[k], eager[k])
        assert rel_err(replayed[k], x) <= TOL[torch.float32] + rel_err(x, exact[k]), f"step {k}"
