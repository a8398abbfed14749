"""The DDPM noise schedule of a diffusers ``scheduler_config.json`` and the sampling plans.

A config is read as diffusers' ``DDIMScheduler.from_config`` reads it: a key it leaves out takes
that class's default (linear betas 1e-4..0.02, ``clip_sample`` and ``set_alpha_to_one`` on);
SD's own configs set every key they need.

The model's output is the noise (``prediction_type`` epsilon: SD 1.x, SDXL) or the velocity
v = sqrt(a_t) eps - sqrt(1 - a_t) x0 (``v_prediction``: SD 2.x at 768²); either gives x0 and eps:

    epsilon:       x0 = (x - sqrt(1 - a_t) eps) / sqrt(a_t)
    v_prediction:  x0 = sqrt(a_t) x - sqrt(1 - a_t) v,    eps = sqrt(a_t) v + sqrt(1 - a_t) x

DDIM (eta = 0), as diffusers' ``DDIMScheduler``: for step k at timestep t_k with
``prev = t_k - T // N``, x0 clipped to +-r with clip_sample,

    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps,    a_prev = alphas_cumprod[prev] or the final alpha.

DDPM's ancestral step, as diffusers' (torch) ``DDPMScheduler`` with ``variance_type`` fixed_small:

    beta   = 1 - a_t / a_prev                                       (a_prev = 1 past the first timestep)
    x_prev = sqrt(a_prev) beta / (1 - a_t) x0 + sqrt(1 - beta) (1 - a_prev) / (1 - a_t) x
             + sqrt((1 - a_prev) / (1 - a_t) beta) noise            (no noise at t = 0)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from coerase_jax.errors import UserError

# diffusers' DDIMScheduler defaults for keys a scheduler config leaves out.
DIFFUSERS_DEFAULTS = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
                      "clip_sample": True, "clip_sample_range": 1.0, "set_alpha_to_one": True, "steps_offset": 0,
                      "prediction_type": "epsilon", "timestep_spacing": "leading", "thresholding": False,
                      "rescale_betas_zero_snr": False, "variance_type": "fixed_small"}
SAMPLERS = ("ddim", "ddpm")
PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    alphas_cumprod: np.ndarray  # (num_train_timesteps,)
    final_alpha_cumprod: float
    steps_offset: int = 0
    timestep_spacing: str = "leading"
    clip_sample_range: float | None = None  # clip the predicted x0 to +-this (None: no clipping)
    prediction_type: str = "epsilon"  # what the UNet outputs: epsilon | v_prediction

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "NoiseSchedule":
        get = lambda key: config[key] if config.get(key) is not None else DIFFUSERS_DEFAULTS[key]
        steps = int(get("num_train_timesteps"))
        start, end, kind = float(get("beta_start")), float(get("beta_end")), get("beta_schedule")
        if config.get("trained_betas") is not None:
            betas = np.asarray(config["trained_betas"], np.float64)
        elif kind == "scaled_linear":
            betas = np.linspace(start ** 0.5, end ** 0.5, steps, dtype=np.float64) ** 2
        elif kind == "linear":
            betas = np.linspace(start, end, steps, dtype=np.float64)
        else:
            raise UserError(f"scheduler config: beta_schedule {kind!r} is not supported (scaled_linear, linear)")
        if get("prediction_type") not in PREDICTION_TYPES:
            raise UserError(f"scheduler config: prediction_type {get('prediction_type')!r} is not supported "
                            f"(epsilon: SD 1.x and SDXL; v_prediction: SD 2.x)")
        for key in ("thresholding", "rescale_betas_zero_snr"):
            if get(key):
                raise UserError(f"scheduler config: {key}=true is not supported")
        if get("variance_type") != "fixed_small":
            raise UserError(f"scheduler config: variance_type {get('variance_type')!r} is not supported (fixed_small)")
        spacing = get("timestep_spacing")
        if spacing not in ("leading", "trailing", "linspace"):
            raise UserError(f"scheduler config: timestep_spacing {spacing!r} is not supported")
        alphas_cumprod = np.cumprod(1.0 - betas).astype(np.float32)
        final = 1.0 if get("set_alpha_to_one") else float(alphas_cumprod[0])
        clip = float(get("clip_sample_range")) if get("clip_sample") else None
        return cls(alphas_cumprod, final, int(get("steps_offset")), spacing, clip, get("prediction_type"))

    def ddim_timesteps(self, num_steps: int) -> np.ndarray:
        """The N sampling timesteps, noisiest first (diffusers' ``set_timesteps``)."""
        total = self.num_train_timesteps
        if not 1 <= num_steps <= total:
            raise UserError(f"number of sampling steps must be in [1, {total}], got {num_steps}")
        if self.timestep_spacing == "leading":
            ts = (np.arange(num_steps) * (total // num_steps))[::-1] + self.steps_offset
        elif self.timestep_spacing == "trailing":
            ts = np.round(np.arange(total, 0, -total / num_steps)) - 1
        else:
            ts = np.linspace(0, total - 1, num_steps).round()[::-1]
        if ts.max() >= total:
            raise UserError(f"{num_steps} sampling steps with steps_offset {self.steps_offset} reach timestep "
                            f"{int(ts.max())}, past the schedule's {total}")
        return ts.astype(np.int32)

    def plan(self, num_steps: int, sampler: str = "ddim") -> "SamplingPlan":
        """N steps of ``sampler`` (ddim | ddpm) from the noisiest timestep down."""
        if sampler not in SAMPLERS:
            raise UserError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        ts = self.ddim_timesteps(num_steps)
        prev = ts - self.num_train_timesteps // num_steps
        # DDIM's last step lands on the "final" alpha; DDPM's on 1 (a clean sample)
        final = self.final_alpha_cumprod if sampler == "ddim" else 1.0
        alpha = self.alphas_cumprod[ts]
        alpha_prev = np.where(prev >= 0, self.alphas_cumprod[np.clip(prev, 0, None)], final)
        return SamplingPlan(jnp.asarray(ts), jnp.asarray(alpha, jnp.float32), jnp.asarray(alpha_prev, jnp.float32),
                            self.num_train_timesteps, self.clip_sample_range, ancestral=sampler == "ddpm",
                            prediction_type=self.prediction_type)

    def ddim_plan(self, num_steps: int) -> "SamplingPlan":
        return self.plan(num_steps, "ddim")


@dataclasses.dataclass(frozen=True)
class SamplingPlan:
    """Per sampling step k (noisiest first): timestep t_k, alphas_cumprod at t_k and at t_k's
    successor; how a step updates (DDIM, or DDPM's ancestral step when ``ancestral``); and what the
    model's output is (``prediction_type``)."""

    timesteps: jnp.ndarray
    alpha: jnp.ndarray
    alpha_prev: jnp.ndarray
    num_train_timesteps: int = 1000
    clip_sample_range: float | None = None
    ancestral: bool = False
    prediction_type: str = "epsilon"

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def step(self, k, x: jnp.ndarray, output: jnp.ndarray, noise: jnp.ndarray | None = None) -> jnp.ndarray:
        """Sampling step k (a traced index is fine) from the model's ``output`` (its prediction
        type's); ``noise`` is needed when ``ancestral``."""
        if self.ancestral:
            return ddpm_step(x, output, self.alpha[k], self.alpha_prev[k], noise, self.timesteps[k] > 0,
                             self.clip_sample_range, self.prediction_type)
        return ddim_step(x, output, self.alpha[k], self.alpha_prev[k], self.clip_sample_range, self.prediction_type)


def x0_and_eps(x: jnp.ndarray, output: jnp.ndarray, alpha: jnp.ndarray,
               prediction_type: str = "epsilon") -> tuple[jnp.ndarray, jnp.ndarray]:
    """(predicted x0, predicted noise) from the model's output at x_t (module docstring)."""
    if prediction_type == "v_prediction":
        x0 = jnp.sqrt(alpha) * x - jnp.sqrt(1.0 - alpha) * output
        return x0, jnp.sqrt(alpha) * output + jnp.sqrt(1.0 - alpha) * x
    return (x - jnp.sqrt(1.0 - alpha) * output) / jnp.sqrt(alpha), output


def predicted_x0(x: jnp.ndarray, output: jnp.ndarray, alpha: jnp.ndarray, clip_range: float | None = None,
                 prediction_type: str = "epsilon") -> jnp.ndarray:
    x0, _ = x0_and_eps(x, output, alpha, prediction_type)
    return x0 if clip_range is None else jnp.clip(x0, -clip_range, clip_range)


def ddim_step(x: jnp.ndarray, output: jnp.ndarray, alpha: jnp.ndarray, alpha_prev: jnp.ndarray,
              clip_range: float | None = None, prediction_type: str = "epsilon") -> jnp.ndarray:
    """One deterministic DDIM update x_t -> x_prev given the model's output (noise or velocity)."""
    x0, eps = x0_and_eps(x, output, alpha, prediction_type)
    x0 = x0 if clip_range is None else jnp.clip(x0, -clip_range, clip_range)
    return jnp.sqrt(alpha_prev) * x0 + jnp.sqrt(1.0 - alpha_prev) * eps


def ddpm_step(x: jnp.ndarray, output: jnp.ndarray, alpha: jnp.ndarray, alpha_prev: jnp.ndarray, noise: jnp.ndarray,
              add_noise_here, clip_range: float | None = None, prediction_type: str = "epsilon") -> jnp.ndarray:
    """One ancestral DDPM update x_t -> x_prev (fixed_small variance); no noise unless ``add_noise_here``."""
    x0 = predicted_x0(x, output, alpha, clip_range, prediction_type)
    beta = 1.0 - alpha / alpha_prev
    mean = (jnp.sqrt(alpha_prev) * beta / (1.0 - alpha) * x0
            + jnp.sqrt(1.0 - beta) * (1.0 - alpha_prev) / (1.0 - alpha) * x)
    variance = jnp.maximum((1.0 - alpha_prev) / (1.0 - alpha) * beta, 1e-20)
    return mean + jnp.where(add_noise_here, jnp.sqrt(variance), 0.0) * noise


def add_noise(x0: jnp.ndarray, noise: jnp.ndarray, alpha: jnp.ndarray) -> jnp.ndarray:
    """q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
    return jnp.sqrt(alpha) * x0 + jnp.sqrt(1.0 - alpha) * noise


def training_target(x0: jnp.ndarray, noise: jnp.ndarray, alpha: jnp.ndarray, prediction_type: str = "epsilon"
                    ) -> jnp.ndarray:
    """What the model should output at add_noise(x0, noise, alpha): the noise, or the velocity
    v = sqrt(a_t) noise - sqrt(1 - a_t) x0."""
    if prediction_type == "v_prediction":
        return jnp.sqrt(alpha) * noise - jnp.sqrt(1.0 - alpha) * x0
    return noise
