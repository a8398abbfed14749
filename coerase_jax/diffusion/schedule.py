"""The DDPM noise schedule of a diffusers ``scheduler_config.json`` and the DDIM timestep plan.

Matches diffusers' ``DDIMScheduler`` (eta = 0): for step k at timestep t_k with
``prev = t_k - T // N`` the update is

    x0     = (x - sqrt(1 - a_t) eps) / sqrt(a_t)
    x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps,    a_prev = alphas_cumprod[prev] or the final alpha.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from coerase_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class NoiseSchedule:
    alphas_cumprod: np.ndarray  # (num_train_timesteps,)
    final_alpha_cumprod: float
    steps_offset: int = 1
    timestep_spacing: str = "leading"

    @property
    def num_train_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "NoiseSchedule":
        steps = int(config.get("num_train_timesteps", 1000))
        start, end = float(config.get("beta_start", 0.00085)), float(config.get("beta_end", 0.012))
        kind = config.get("beta_schedule", "scaled_linear")
        if kind == "scaled_linear":
            betas = np.linspace(start ** 0.5, end ** 0.5, steps, dtype=np.float64) ** 2
        elif kind == "linear":
            betas = np.linspace(start, end, steps, dtype=np.float64)
        else:
            raise UserError(f"scheduler config: beta_schedule {kind!r} is not supported (scaled_linear, linear)")
        if config.get("prediction_type", "epsilon") != "epsilon":
            raise UserError("scheduler config: only prediction_type 'epsilon' (SD 1.x) is supported")
        spacing = config.get("timestep_spacing", "leading")
        if spacing not in ("leading", "trailing", "linspace"):
            raise UserError(f"scheduler config: timestep_spacing {spacing!r} is not supported")
        alphas_cumprod = np.cumprod(1.0 - betas).astype(np.float32)
        final = 1.0 if config.get("set_alpha_to_one", False) else float(alphas_cumprod[0])
        return cls(alphas_cumprod, final, int(config.get("steps_offset", 0)), spacing)

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
        return ts.astype(np.int32)

    def ddim_plan(self, num_steps: int) -> "DDIMPlan":
        ts = self.ddim_timesteps(num_steps)
        prev = ts - self.num_train_timesteps // num_steps
        alpha = self.alphas_cumprod[ts]
        alpha_prev = np.where(prev >= 0, self.alphas_cumprod[np.clip(prev, 0, None)], self.final_alpha_cumprod)
        return DDIMPlan(jnp.asarray(ts), jnp.asarray(alpha, jnp.float32), jnp.asarray(alpha_prev, jnp.float32))


@dataclasses.dataclass(frozen=True)
class DDIMPlan:
    """Per sampling step k (noisiest first): timestep t_k, alphas_cumprod at t_k and at t_k's successor."""

    timesteps: jnp.ndarray
    alpha: jnp.ndarray
    alpha_prev: jnp.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])


def ddim_step(x: jnp.ndarray, eps: jnp.ndarray, alpha: jnp.ndarray, alpha_prev: jnp.ndarray) -> jnp.ndarray:
    """One deterministic DDIM update x_t -> x_prev given the predicted noise."""
    x0 = (x - jnp.sqrt(1.0 - alpha) * eps) / jnp.sqrt(alpha)
    return jnp.sqrt(alpha_prev) * x0 + jnp.sqrt(1.0 - alpha_prev) * eps


def add_noise(x0: jnp.ndarray, noise: jnp.ndarray, alpha: jnp.ndarray) -> jnp.ndarray:
    """q(x_t | x_0): sqrt(a_t) x0 + sqrt(1 - a_t) noise."""
    return jnp.sqrt(alpha) * x0 + jnp.sqrt(1.0 - alpha) * noise
