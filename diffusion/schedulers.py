"""Diffusion schedulers as replayable tensor math: DDIM, DDPM, Euler, DPM-Solver++ (order 1, 2M), matching diffusers.

diffusers' schedulers keep Python state (a step counter, a list of past outputs) and branch on it, so a
denoising step cannot be captured in a CUDA graph. Here ``set_timesteps`` precomputes every per-step
number as a table, and ONE update, the same for the four schedulers, runs at every step i:

    model input = input_scale[i] * x                                  (Euler's scale_model_input)
    x0 = clip(c_sample[i] * x + c_model[i] * m)                       the predicted clean sample
    x' = p_sample[i] * x + p_x0[i] * x0 + p_model[i] * m
         + p_delta[i] * (x0 - x0_prev) + p_noise[i] * z               multistep term, noise term

with x the sample, m the model output, x0_prev the previous step's x0 and z standard normal noise.
``i`` is a 0-d int64 tensor on the device; a step reads its row of the [S, 8] table with
``index_select`` (indexing with a 0-d tensor calls ``.item()``) and reads no tensor value on the host,
so every step launches the same kernels on different data: capture once, replay S times. Whether a
DPM-Solver++ step is first or second order, or whether a DDPM step adds noise, is a table entry
(p_delta[i] = 0 on first-order steps, p_noise[i] = 0 at t = 0), never a Python ``if``. A term that is 0
at every step (p_model for all but DDIM, p_noise without noise) is left out of the step altogether,
decided once at ``set_timesteps``.

Numerics. The schedule itself (alphas_cumprod, sigmas, timesteps) is computed exactly as diffusers
computes it (its float32 tensors, its numpy float64 interpolation), so timesteps and sigmas are
bit-equal; the coefficients derived from it are computed in float64 on the CPU, then cast to the
schedule's dtype (float32; float64 for tests). The update runs in that dtype, bf16 / fp16 inputs
upcast. diffusers' Euler and DPM-Solver++ do the same (``sample.to(torch.float32)``) and cast the
result to the model output's dtype, as here. Its DDIM and DDPM compute in the inputs' promoted dtype,
i.e. bf16 arithmetic for bf16 inputs; here that is float32 arithmetic with one rounding to the same
output dtype: a few bf16 ulps apart, nearer the exact value. DPM-Solver++ keeps x0_prev in the table's
dtype (diffusers keeps x0 in its own dtype, bf16 for bf16 inputs).

Noise (DDPM, DDIM with eta > 0) is a state buffer that the caller fills before each step with
``draw_noise(state, generator)``, i.e. ``buf.normal_(generator=g)``. In a captured CUDA graph that is one
Philox kernel whose seed and offset are read on the device at replay (register a non-default
generator with ``cuda_graph.register_generator_state(g)``), so each replay draws fresh noise with no
host work, and memory does not grow with the step count as a pre-drawn [S, ...] tensor would. It takes
one draw of the sample's shape per step from the generator, as diffusers' ``randn_tensor`` does, so the
same seed gives the same noise (diffusers skips the draw of DDPM's last step, t = 0, which adds none).
A caller may also copy its own noise into the buffer.

Use (the per-step part is what a CUDA graph captures; Python only counts the steps):

    schedule = make_scheduler(pipe.scheduler.config).set_timesteps(25, "cuda")
    x = noise * schedule.init_noise_sigma; state = schedule.init_state(x); i = torch.zeros((), dtype=torch.int64, device="cuda")
    t = schedule.timesteps.index_select(0, i.reshape(1)); m = model(schedule.scale_input(x, i), t)
    schedule.draw_noise(state, g); x_new, state_new = schedule.step(m, i, x, state)
    x.copy_(x_new); [s.copy_(n) for s, n in zip(state, state_new)]; i.add_(1)

numpy appears only where diffusers uses numpy (timestep spacing, sigma interpolation, Karras sigmas), so
that the integers it rounds come out the same. Each class's OPTIONS lists the config keys it reads, with
diffusers' default and the values implemented; any other value is refused with a KilnError naming it.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from ..errors import KilnError

F64 = torch.float64


class StepCoefficients(NamedTuple):
    """One step's numbers: the columns of a schedule's table ([S] each, [1] once a step's row is read)."""

    input_scale: torch.Tensor  # model input = input_scale * x
    c_sample: torch.Tensor  # x0 = c_sample * x + c_model * m
    c_model: torch.Tensor
    p_sample: torch.Tensor  # x' = p_sample * x + p_x0 * x0 + p_model * m + p_delta * (x0 - x0_prev) + p_noise * z
    p_x0: torch.Tensor
    p_model: torch.Tensor
    p_delta: torch.Tensor
    p_noise: torch.Tensor


COLUMNS = StepCoefficients._fields


@dataclass(frozen=True, eq=False)
class Schedule:
    """S inference steps: the model's timesteps and the coefficient table the step reads.

    timesteps         [S]     the model's timestep input: diffusers' ``scheduler.timesteps`` (values, dtype)
    init_noise_sigma  float   x_T = init_noise_sigma * N(0, I)
    table             [S, 8]  one StepCoefficients row per step, float32 (or float64)
    terms             the columns some step uses (not identically 0; input_scale: not identically 1)
    clip              clamp x0 to [-clip, clip] (DDIM / DDPM ``clip_sample``), or None
    output_dtype      "promote": promote_types(sample, model_output), diffusers' DDIM / DDPM / DPM's x0;
                      "model": model_output's dtype, diffusers' Euler / DPM with prediction "sample"
    """

    timesteps: torch.Tensor
    init_noise_sigma: float
    table: torch.Tensor
    terms: tuple[str, ...]
    clip: float | None = None
    output_dtype: str = "promote"

    @property
    def num_steps(self) -> int:
        return self.table.shape[0]

    @property
    def state_names(self) -> tuple[str, ...]:
        """The state tuple's layout: ("x0_prev",) for 2nd-order DPM-Solver++, ("noise",) for DDPM and
        DDIM with eta > 0, () otherwise."""
        return tuple(name for term, name in (("p_delta", "x0_prev"), ("p_noise", "noise")) if term in self.terms)

    def coefficients(self, i: torch.Tensor) -> StepCoefficients:
        """Step i's row, each [1] on the table's device (index_select: a 0-d tensor index would sync)."""
        return StepCoefficients(*self.table.index_select(0, i.reshape(1)).unbind(1))

    def init_state(self, sample: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Zeroed state buffers shaped like the sample: x0_prev in the table's dtype, noise in the sample's."""
        return tuple(torch.zeros_like(sample, dtype=self.table.dtype if name == "x0_prev" else sample.dtype)
                     for name in self.state_names)

    def draw_noise(self, state: tuple[torch.Tensor, ...], generator: torch.Generator | None = None) -> None:
        """Fill the state's noise buffer in place with N(0, I) from ``generator`` (nothing to do without one)."""
        for name, buf in zip(self.state_names, state):
            if name == "noise":
                buf.normal_(generator=generator)

    def scale_input(self, sample: torch.Tensor, i: torch.Tensor) -> torch.Tensor:
        """diffusers' ``scale_model_input``: x / sqrt(sigma_i^2 + 1) for Euler, x itself otherwise."""
        if "input_scale" not in self.terms:
            return sample
        return (sample.to(self.table.dtype) * self.coefficients(i).input_scale).to(sample.dtype)

    def step(self, model_output: torch.Tensor, i: torch.Tensor, sample: torch.Tensor,
             state: tuple[torch.Tensor, ...] = ()) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """x_t -> x_{t-1} for step i (module docstring's formula): returns (prev_sample, new_state).

        model_output, sample: [B, C, ...] alike; i: 0-d int64 on the table's device; state: as
        ``init_state`` made it (noise filled by ``draw_noise``). Same kernels at every step."""
        row, cdt = self.coefficients(i), self.table.dtype
        x, m = sample.to(cdt), model_output.to(cdt)  # [B, C, ...]
        x0 = self._combine(row, c_sample=x, c_model=m)
        if self.clip is not None:
            x0 = x0.clamp(-self.clip, self.clip)
        held = dict(zip(self.state_names, state))
        delta = x0 - held["x0_prev"] if "x0_prev" in held else None
        noise = held["noise"].to(cdt) if "noise" in held else None
        prev = self._combine(row, p_sample=x, p_x0=x0, p_model=m, p_delta=delta, p_noise=noise)
        new_state = tuple(x0 if name == "x0_prev" else held[name] for name in self.state_names)
        out = model_output.dtype if self.output_dtype == "model" else torch.promote_types(sample.dtype, model_output.dtype)
        return prev.to(out), new_state

    def _combine(self, row: StepCoefficients, **operands: torch.Tensor | None) -> torch.Tensor:
        """sum of row.<name> * operand over the named columns this schedule uses, in the order given."""
        out = None
        for name, operand in operands.items():
            if name in self.terms:
                term = getattr(row, name) * operand
                out = term if out is None else out + term
        return out


def _schedule(timesteps: torch.Tensor, init_noise_sigma: float, columns: dict[str, torch.Tensor], device, dtype,
              clip: float | None = None, output_dtype: str = "promote") -> Schedule:
    """Stack float64 [S] columns (missing ones: input_scale 1, others 0) into a Schedule on ``device``."""
    S = timesteps.shape[0]
    full = {name: columns.get(name, torch.full((S,), 1.0 if name == "input_scale" else 0.0, dtype=F64)).to(F64)
            for name in COLUMNS}
    table = torch.stack([full[name].expand(S) for name in COLUMNS], 1)  # [S, 8]
    if not bool(torch.isfinite(table).all()):
        bad = sorted({COLUMNS[j] for j in torch.nonzero(~torch.isfinite(table))[:, 1].tolist()})
        raise KilnError(f"the schedule has non-finite coefficients ({', '.join(bad)}) for {S} steps",
                        hint="diffusers' update is undefined here too (NaN / inf): check eta (<= 1) and the noise schedule")
    terms = tuple(name for name in COLUMNS if bool((full[name] != (1.0 if name == "input_scale" else 0.0)).any()))
    return Schedule(timesteps.to(device), float(init_noise_sigma), table.to(dtype).to(device), terms, clip, output_dtype)


# ----------------------------------------------------------------------------------------------------------
# configs: option -> (diffusers' default, the values kiln supports or ANY)

ANY = None
SPACINGS = ("leading", "trailing", "linspace")
PREDICTIONS = ("epsilon", "sample", "v_prediction")
_OFF = (False, None)
_TRAIN = {"num_train_timesteps": (1000, ANY), "beta_start": (0.0001, ANY), "beta_end": (0.02, ANY),
          "beta_schedule": ("linear", ("linear", "scaled_linear", "squaredcos_cap_v2")), "trained_betas": (None, ANY),
          "rescale_betas_zero_snr": (False, _OFF), "steps_offset": (0, ANY)}
_THRESHOLDING = {"thresholding": (False, _OFF), "dynamic_thresholding_ratio": (0.995, ANY), "sample_max_value": (1.0, ANY)}
_CLIP = {"clip_sample": (True, ANY), "clip_sample_range": (1.0, ANY)}
_SIGMAS = {"use_karras_sigmas": (False, (False, None, True)), "use_exponential_sigmas": (False, _OFF),
           "use_beta_sigmas": (False, _OFF), "final_sigmas_type": ("zero", ("zero", "sigma_min"))}


def _checked(name: str, options: dict, config: dict) -> dict:
    """The config with diffusers' defaults filled in; a KilnError for a value kiln does not implement.
    Keys the diffusers class does not know are ignored, as diffusers' ``from_config`` ignores them."""
    out = {}
    for key, (default, allowed) in options.items():
        value = config.get(key, default)
        if allowed is not ANY and not any(value is a or (type(value) is type(a) and value == a) for a in allowed):
            shown = ", ".join(repr(a) for a in allowed if a is not None)
            raise KilnError(f"{name}: {key}={value!r} is not supported (kiln supports {key} in {{{shown}}})",
                            hint="kiln replays diffusers' update as per-step coefficient tables and implements only the "
                                 "settings listed; change the setting or run diffusers' scheduler eagerly")
        out[key] = value
    return out


def _alphas_cumprod(cfg: dict) -> torch.Tensor:
    """prod_{s<=t} (1 - beta_s) over the training steps [T], float32, bit-equal to diffusers'."""
    T, schedule = cfg["num_train_timesteps"], cfg["beta_schedule"]
    if cfg["trained_betas"] is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    elif schedule == "linear":
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], T, dtype=torch.float32)
    elif schedule == "scaled_linear":
        betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, T, dtype=torch.float32) ** 2
    else:  # squaredcos_cap_v2: beta_t = min(1 - abar((t+1)/T) / abar(t/T), 0.999) in Python floats
        betas = torch.tensor([min(1 - _cosine_abar((t + 1) / T) / _cosine_abar(t / T), 0.999) for t in range(T)],
                             dtype=torch.float32)
    return torch.cumprod(1.0 - betas, dim=0)


def _cosine_abar(u: float) -> float:
    """alpha_bar(u) = cos((u + 0.008) / 1.008 * pi / 2)^2 (Nichol & Dhariwal's cosine schedule)."""
    return math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2


def _spaced_timesteps(cfg: dict, n: int) -> np.ndarray:
    """diffusers' DDIM / DDPM / Euler timesteps, descending, float64 before its final cast:
    linspace: linspace(0, T-1, n); leading: k * (T // n) + steps_offset; trailing: round(T - k T/n) - 1."""
    T, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    if spacing == "linspace":
        return np.linspace(0, T - 1, n)[::-1].copy()
    if spacing == "leading":
        return (np.arange(0, n) * (T // n)).round()[::-1] + cfg["steps_offset"]
    return np.round(np.arange(T, 0, -T / n)) - 1


def _karras(in_sigmas: np.ndarray, n: int, sigma_min=None, sigma_max=None, rho: float = 7.0) -> np.ndarray:
    """Karras et al.'s sigmas: (s_max^(1/rho) + u (s_min^(1/rho) - s_max^(1/rho)))^rho, u = linspace(0, 1, n)."""
    sigma_min = sigma_min if sigma_min is not None else in_sigmas[-1].item()
    sigma_max = sigma_max if sigma_max is not None else in_sigmas[0].item()
    ramp = np.linspace(0, 1, n)
    return (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _sigma_to_t(sigma, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep of ``sigma``: linear interpolation in log sigma (diffusers' _sigma_to_t)."""
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum((dists >= 0), axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(np.shape(sigma))


def _x0_and_eps(prediction: str, a: torch.Tensor) -> tuple[dict[str, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """For alpha_bar a [S]: x0 = c_sample x + c_model m and eps = e_s x + e_m m (diffusers' DDIM / DDPM), per
    prediction type: epsilon: x0 = (x - sqrt(1-a) m) / sqrt(a), eps = m; sample: x0 = m,
    eps = (x - sqrt(a) m) / sqrt(1-a); v_prediction: x0 = sqrt(a) x - sqrt(1-a) m, eps = sqrt(a) m + sqrt(1-a) x."""
    sa, sb = a.sqrt(), (1 - a).sqrt()
    zero, one = torch.zeros_like(a), torch.ones_like(a)
    if prediction == "epsilon":
        return dict(c_sample=1 / sa, c_model=-sb / sa), (zero, one)
    if prediction == "sample":
        return dict(c_sample=zero, c_model=one), (1 / sb, -sa / sb)
    return dict(c_sample=sa, c_model=-sb), (sb, sa)


# ----------------------------------------------------------------------------------------------------------
# the schedulers


class Scheduler(abc.ABC):
    """A checked diffusers scheduler config and its training noise schedule; ``set_timesteps`` -> Schedule."""

    NAME = ""
    OPTIONS: dict = {}

    def __init__(self, config: dict):
        self.config = _checked(self.NAME, self.OPTIONS, config)
        self.alphas_cumprod = _alphas_cumprod(self.config)  # [T] float32

    @abc.abstractmethod
    def set_timesteps(self, num_inference_steps: int, device=None, dtype: torch.dtype = torch.float32) -> Schedule:
        """The inference timesteps and every step's coefficients, precomputed (each scheduler's own rule)."""

    def _check(self, n: int, dtype: torch.dtype) -> int:
        T = self.config["num_train_timesteps"]
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= T:
            raise KilnError(f"{self.NAME}: num_inference_steps={n!r} must be an int in [1, {T}] (num_train_timesteps)")
        if dtype not in (torch.float32, F64):
            raise KilnError(f"{self.NAME}: a schedule's dtype is float32 or float64, not {dtype}",
                            hint="the update runs in float32 whatever the model's dtype; bf16 inputs are upcast")
        return int(n)

    def _sigma_last(self) -> float:
        """The sigma after the last step (Euler, DPM-Solver++): 0, or the training schedule's smallest."""
        if self.config["final_sigmas_type"] == "zero":
            return 0.0
        a0 = self.alphas_cumprod[0]
        return float(((1 - a0) / a0) ** 0.5)


class DDIM(Scheduler):
    """diffusers' DDIMScheduler. With a = alpha_bar_t, a' = alpha_bar at t - T // n (or the final alpha):
    x' = sqrt(a') x0 + sqrt(1 - a' - std^2) eps + std z,  std = eta sqrt((1-a')/(1-a) (1 - a/a'))."""

    NAME = "DDIMScheduler"
    OPTIONS = {**_TRAIN, **_THRESHOLDING, **_CLIP, "timestep_spacing": ("leading", SPACINGS),
               "set_alpha_to_one": (True, ANY), "prediction_type": ("epsilon", PREDICTIONS)}

    def set_timesteps(self, num_inference_steps: int, device=None, dtype: torch.dtype = torch.float32,
                      eta: float = 0.0) -> Schedule:
        """``eta`` is diffusers' ``step(eta=...)``, fixed for the whole schedule (eta > 0 adds a noise state)."""
        cfg, n = self.config, self._check(num_inference_steps, dtype)
        if not (isinstance(eta, (int, float)) and eta >= 0):
            raise KilnError(f"DDIMScheduler: eta={eta!r} must be a number >= 0")
        t = torch.from_numpy(_spaced_timesteps(cfg, n).round().astype(np.int64))  # [S]
        acp = self.alphas_cumprod.to(F64)
        prev = t - cfg["num_train_timesteps"] // n
        final = 1.0 if cfg["set_alpha_to_one"] else acp[0]
        a, a_prev = acp[t], torch.where(prev >= 0, acp[prev.clamp(min=0)], final)
        std = eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        x0, (e_s, e_m) = _x0_and_eps(cfg["prediction_type"], a)
        direction = (1 - a_prev - std ** 2).sqrt()
        columns = dict(x0, p_x0=a_prev.sqrt(), p_sample=direction * e_s, p_model=direction * e_m, p_noise=std)
        clip = float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None
        return _schedule(t, 1.0, columns, device, dtype, clip=clip)


class DDPM(Scheduler):
    """diffusers' DDPMScheduler. With a = alpha_bar_t, a' = alpha_bar at the next timestep (1 after the last),
    beta = 1 - a/a':  x' = sqrt(a') beta / (1-a) x0 + sqrt(a/a') (1-a') / (1-a) x + std z,  std = 0 at t = 0,
    else sqrt(var) (fixed_small), exp(log(var) / 2) (fixed_small_log) or sqrt(beta) (fixed_large),
    var = max((1-a') / (1-a) beta, 1e-20)."""

    NAME = "DDPMScheduler"
    OPTIONS = {**_TRAIN, **_THRESHOLDING, **_CLIP, "timestep_spacing": ("leading", SPACINGS),
               "prediction_type": ("epsilon", PREDICTIONS),
               "variance_type": ("fixed_small", ("fixed_small", "fixed_small_log", "fixed_large"))}

    def set_timesteps(self, num_inference_steps: int, device=None, dtype: torch.dtype = torch.float32) -> Schedule:
        cfg, n = self.config, self._check(num_inference_steps, dtype)
        t = torch.from_numpy(_spaced_timesteps(cfg, n).round().astype(np.int64))  # [S]
        acp = self.alphas_cumprod.to(F64)
        prev = torch.cat([t[1:], t.new_tensor([-1])])
        a, a_prev = acp[t], torch.where(prev >= 0, acp[prev.clamp(min=0)], 1.0)
        beta = 1 - a / a_prev
        var = ((1 - a_prev) / (1 - a) * beta).clamp(min=1e-20)
        std = {"fixed_small": var.sqrt(), "fixed_small_log": torch.exp(0.5 * torch.log(var)),
               "fixed_large": beta.sqrt()}[cfg["variance_type"]]
        x0, _ = _x0_and_eps(cfg["prediction_type"], a)
        columns = dict(x0, p_x0=a_prev.sqrt() * beta / (1 - a), p_sample=(a / a_prev).sqrt() * (1 - a_prev) / (1 - a),
                       p_noise=torch.where(t > 0, std, 0.0))
        clip = float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None
        return _schedule(t, 1.0, columns, device, dtype, clip=clip)


class EulerDiscrete(Scheduler):
    """diffusers' EulerDiscreteScheduler (s_churn = 0). With s = sigma_i, s' = sigma_{i+1}:
    model input x / sqrt(s^2 + 1);  x' = x + (x - x0) / s (s' - s),  x0 = x - s m (epsilon),
    m (sample), -s / sqrt(s^2+1) m + x / (s^2+1) (v_prediction)."""

    NAME = "EulerDiscreteScheduler"
    OPTIONS = {**_TRAIN, **_SIGMAS, "timestep_spacing": ("linspace", SPACINGS),
               "prediction_type": ("epsilon", PREDICTIONS + ("original_sample",)), "interpolation_type": ("linear", ("linear",)),
               "sigma_min": (None, ANY), "sigma_max": (None, ANY), "timestep_type": ("discrete", ("discrete", "continuous"))}

    def set_timesteps(self, num_inference_steps: int, device=None, dtype: torch.dtype = torch.float32) -> Schedule:
        cfg, n = self.config, self._check(num_inference_steps, dtype)
        timesteps, sigmas = self._timesteps_and_sigmas(n)
        s, s_next = sigmas[:-1].to(F64), sigmas[1:].to(F64)  # [S]
        ratio = (s_next - s) / s  # dt / sigma
        prediction = cfg["prediction_type"]
        if prediction == "epsilon":
            x0 = dict(c_sample=torch.ones_like(s), c_model=-s)
        elif prediction == "v_prediction":
            x0 = dict(c_sample=1 / (s ** 2 + 1), c_model=-s / (s ** 2 + 1).sqrt())
        else:
            x0 = dict(c_model=torch.ones_like(s))
        columns = dict(x0, input_scale=1 / (s ** 2 + 1).sqrt(), p_sample=1 + ratio, p_x0=-ratio)
        top = sigmas.max()  # diffusers' init_noise_sigma, in float32 like it
        init = top if cfg["timestep_spacing"] in ("linspace", "trailing") else (top ** 2 + 1) ** 0.5
        return _schedule(timesteps, float(init), columns, device, dtype, output_dtype="model")

    def _timesteps_and_sigmas(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' ``timesteps`` [S] float32 and ``sigmas`` [S+1] float32 (sigma interpolated at each timestep)."""
        cfg, acp = self.config, self.alphas_cumprod
        t = _spaced_timesteps(cfg, n).astype(np.float32)
        train_sigmas = (((1 - acp) / acp) ** 0.5).numpy()  # [T] float32 (np.array(tensor) is deprecated under numpy 2)
        sig = np.interp(t, np.arange(0, len(train_sigmas)), train_sigmas)
        if cfg["use_karras_sigmas"]:
            sig = _karras(sig, n, cfg["sigma_min"], cfg["sigma_max"])
            t = np.array([_sigma_to_t(x, np.log(train_sigmas)) for x in sig])
        sigmas = torch.from_numpy(np.concatenate([sig, [self._sigma_last()]]).astype(np.float32))
        if cfg["timestep_type"] == "continuous" and cfg["prediction_type"] == "v_prediction":
            return torch.stack([0.25 * x.log() for x in sigmas[:-1]]), sigmas
        return torch.from_numpy(t.astype(np.float32)), sigmas


class DPMSolverMultistep(Scheduler):
    """diffusers' DPMSolverMultistepScheduler, algorithm "dpmsolver++", order 1 or 2. With alpha_i =
    1/sqrt(sigma_i^2+1), s_i = sigma_i alpha_i, lambda_i = log(alpha_i / s_i), h = lambda_{i+1} - lambda_i:
    x' = s_{i+1}/s_i x - alpha_{i+1} (e^-h - 1) x0 + w D1,  D1 = (x0 - x0_prev) / r,  r = (lambda_i - lambda_{i-1}) / h,
    w = -alpha_{i+1} (e^-h - 1) / 2 (midpoint) or alpha_{i+1} ((e^-h - 1)/h + 1) (heun); w = 0 on first-order steps
    (the first, order 1, and the last when lower_order_final / euler_at_final / final sigma 0 ask for it)."""

    NAME = "DPMSolverMultistepScheduler"
    OPTIONS = {**_TRAIN, **_THRESHOLDING, **_SIGMAS, "timestep_spacing": ("linspace", SPACINGS),
               "prediction_type": ("epsilon", PREDICTIONS), "solver_order": (2, (1, 2)),
               "algorithm_type": ("dpmsolver++", ("dpmsolver++",)), "solver_type": ("midpoint", ("midpoint", "heun")),
               "lower_order_final": (True, ANY), "euler_at_final": (False, ANY), "use_lu_lambdas": (False, _OFF),
               "use_flow_sigmas": (False, _OFF), "flow_shift": (1.0, ANY), "lambda_min_clipped": (-math.inf, ANY),
               "variance_type": (None, (None,)), "use_dynamic_shifting": (False, _OFF), "time_shift_type": ("exponential", ANY)}

    def set_timesteps(self, num_inference_steps: int, device=None, dtype: torch.dtype = torch.float32) -> Schedule:
        cfg, n = self.config, self._check(num_inference_steps, dtype)
        timesteps, sigmas = self._timesteps_and_sigmas(n)
        S, sig = timesteps.shape[0], sigmas.to(F64)  # sig [S+1]
        alpha = 1 / (sig ** 2 + 1).sqrt()
        s = sig * alpha
        lam = alpha.log() - s.log()  # +inf at a final sigma of 0
        h = lam[1:] - lam[:-1]  # [S]
        phi = alpha[1:] * (torch.exp(-h) - 1)
        r = (lam[:-1] - lam[:-1].roll(1)) / h  # step 0's wraps around: unused
        w = -0.5 * phi / r if cfg["solver_type"] == "midpoint" else alpha[1:] * ((torch.exp(-h) - 1) / h + 1) / r
        k = torch.arange(S)
        second = (k >= 1) & (cfg["solver_order"] == 2)
        if cfg["euler_at_final"] or (cfg["lower_order_final"] and S < 15) or cfg["final_sigmas_type"] == "zero":
            second &= k != S - 1
        prediction = cfg["prediction_type"]
        if prediction == "epsilon":
            x0 = dict(c_sample=1 / alpha[:-1], c_model=-s[:-1] / alpha[:-1])
        elif prediction == "v_prediction":
            x0 = dict(c_sample=alpha[:-1], c_model=-s[:-1])
        else:
            x0 = dict(c_model=torch.ones(S, dtype=F64))
        columns = dict(x0, p_sample=s[1:] / s[:-1], p_x0=-phi, p_delta=torch.where(second, w, 0.0))
        return _schedule(timesteps, 1.0, columns, device, dtype, output_dtype="model" if prediction == "sample" else "promote")

    def _timesteps_and_sigmas(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """diffusers' ``timesteps`` [S] int64 (n + 1 points, the last dropped) and ``sigmas`` [S+1] float32."""
        cfg, acp = self.config, self.alphas_cumprod
        T, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
        lambda_t = torch.log(torch.sqrt(acp)) - torch.log(torch.sqrt(1 - acp))
        last = T - int(torch.searchsorted(torch.flip(lambda_t, [0]), cfg["lambda_min_clipped"]))
        if spacing == "linspace":
            t = np.linspace(0, last - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        elif spacing == "leading":
            t = (np.arange(0, n + 1) * (last // (n + 1))).round()[::-1][:-1].astype(np.int64) + cfg["steps_offset"]
        else:
            t = np.arange(last, 0, -T / n).round().astype(np.int64) - 1
        train_sigmas = (((1 - acp) / acp) ** 0.5).numpy()  # [T] float32 (np.array(tensor) is deprecated under numpy 2)
        if cfg["use_karras_sigmas"]:
            sig = _karras(np.flip(train_sigmas).copy(), n)
            t = np.array([_sigma_to_t(x, np.log(train_sigmas)) for x in sig])
            t = t if cfg["beta_schedule"] == "squaredcos_cap_v2" else t.round()
        else:
            sig = np.interp(t, np.arange(0, len(train_sigmas)), train_sigmas)
        sigmas = torch.from_numpy(np.concatenate([sig, [self._sigma_last()]]).astype(np.float32))
        return torch.from_numpy(t).to(torch.int64), sigmas


SCHEDULERS = {cls.NAME: cls for cls in (DDIM, DDPM, EulerDiscrete, DPMSolverMultistep)}


def make_scheduler(config: dict) -> Scheduler:
    """A kiln scheduler from a diffusers scheduler config (``pipe.scheduler.config``, scheduler_config.json):
    ``_class_name`` picks the class, missing options take diffusers' defaults, unsupported ones raise."""
    name = config.get("_class_name")
    if name not in SCHEDULERS:
        raise KilnError(f"scheduler class {name!r} is not supported (kiln supports {', '.join(SCHEDULERS)})",
                        hint="convert the config with diffusers first, e.g. DPMSolverMultistepScheduler.from_config(cfg)")
    return SCHEDULERS[name](config)
