"""DDIM (or ancestral DDPM) sampling with classifier-free guidance and optional image tokens, as
one jitted lax loop.

A denoiser is ``eps(params, x, t, text, image_tokens) -> output``, the model's output in its own
prediction type (noise, or velocity for SD 2.x; ``SamplingPlan.step`` reads either); SDXL's gets
its added conditioning as ``added_cond=``. Guidance batches the conditional and unconditional
branches into one UNet call (and, being linear, is the same in either output space). The number
of steps to run may be a traced value, so "denoise from T down to step i" compiles once for every
i (the erasure step relies on that).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from coerase_jax.diffusion.schedule import SamplingPlan

Denoiser = Callable[..., jax.Array]  # (params, x, t, text_states, image_tokens | None[, added_cond=]) -> output


class Conditioning(NamedTuple):
    """What the UNet attends to: text hidden states (B, L, D) and optional image tokens (B, n, D);
    ``added`` is SDXL's text_time conditioning (B, pooled + time ids), None for SD 1.x/2.x."""

    text: jax.Array
    image_tokens: jax.Array | None = None
    added: jax.Array | None = None


def apply_denoiser(denoiser: Denoiser, params, x: jax.Array, t: jax.Array, cond: Conditioning) -> jax.Array:
    """One denoiser call; the added conditioning goes in only when there is one, so denoisers of
    models without it never see the keyword."""
    if cond.added is None:
        return denoiser(params, x, t, cond.text, cond.image_tokens)
    return denoiser(params, x, t, cond.text, cond.image_tokens, added_cond=cond.added)


def guided_eps(denoiser: Denoiser, params, x: jax.Array, t: jax.Array, cond: Conditioning,
               uncond: Conditioning | None, guidance_scale: float | jax.Array) -> jax.Array:
    """eps_u + g (eps_c - eps_u), both branches in one batched call; plain eps_c without ``uncond``."""
    if uncond is None:
        return apply_denoiser(denoiser, params, x, t, cond)
    if (cond.image_tokens is None) != (uncond.image_tokens is None):
        raise ValueError("cond and uncond must both have image tokens or both have none")
    if (cond.added is None) != (uncond.added is None):
        raise ValueError("cond and uncond must both have added conditioning or both have none")
    both = lambda a, b: None if a is None else jnp.concatenate([a, b], axis=0)
    pair = Conditioning(both(uncond.text, cond.text), both(uncond.image_tokens, cond.image_tokens),
                        both(uncond.added, cond.added))
    eps = apply_denoiser(denoiser, params, both(x, x), both(t, t), pair)
    eps_uncond, eps_cond = jnp.split(eps, 2, axis=0)
    return eps_uncond + guidance_scale * (eps_cond - eps_uncond)


def denoise(denoiser: Denoiser, params, latents: jax.Array, plan: SamplingPlan, cond: Conditioning,
            uncond: Conditioning | None = None, guidance_scale: float | jax.Array = 1.0,
            num_steps: int | jax.Array | None = None, key: jax.Array | None = None) -> jax.Array:
    """Runs the first ``num_steps`` sampling steps (all by default) from the noisiest timestep down.

    Returns the latent after those steps; with ``num_steps = i`` that is z at ``plan.timesteps[i]``
    (or the clean sample when i = N). An ancestral (DDPM) plan draws step k's noise from
    ``fold_in(key, k)``.
    """
    stop = plan.num_steps if num_steps is None else num_steps
    body = _step_body(denoiser, params, plan, cond, uncond, guidance_scale, latents.shape[0], key)
    return jax.lax.fori_loop(0, stop, body, latents)


def denoise_with_snapshots(denoiser: Denoiser, params, latents: jax.Array, plan: SamplingPlan, cond: Conditioning,
                           uncond: Conditioning | None, guidance_scale: float | jax.Array,
                           indices: jax.Array, key: jax.Array | None = None) -> jax.Array:
    """One trajectory from the noisiest step, recording the latent after ``indices[j]`` steps.

    Returns (K, B, ...) with entry j equal to ``denoise(..., num_steps=indices[j])``; the loop runs
    ``max(indices)`` steps once instead of K separate trajectories.
    """
    body = _step_body(denoiser, params, plan, cond, uncond, guidance_scale, latents.shape[0], key)
    at_start = (indices == 0).reshape((-1,) + (1,) * latents.ndim)
    snapshots = jnp.where(at_start, latents[None], jnp.zeros_like(latents)[None])

    def record(k, carry):
        x, snaps = carry
        x = body(k, x)
        hit = (indices == k + 1).reshape((-1,) + (1,) * x.ndim)  # x now sits after k + 1 steps
        return x, jnp.where(hit, x[None], snaps)

    _, snapshots = jax.lax.fori_loop(0, jnp.max(indices), record, (latents, snapshots))
    return snapshots


def _step_body(denoiser, params, plan: SamplingPlan, cond, uncond, guidance_scale, batch, key):
    if plan.ancestral and key is None:
        raise ValueError("an ancestral (DDPM) plan needs a key for its noise")

    def body(k, x):
        t = jnp.full((batch,), plan.timesteps[k])
        eps = guided_eps(denoiser, params, x, t, cond, uncond, guidance_scale)
        noise = jax.random.normal(jax.random.fold_in(key, k), x.shape, jnp.float32) if plan.ancestral else None
        return plan.step(k, x, eps, noise).astype(x.dtype)

    return body


def initial_latents(seeds: jax.Array, shape: tuple[int, int, int]) -> jax.Array:
    """Gaussian latents, one PRNG stream per seed, so an image does not depend on its batch-mates."""
    return jax.vmap(lambda s: jax.random.normal(jax.random.PRNGKey(s), shape, jnp.float32))(seeds)
