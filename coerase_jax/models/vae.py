"""The SD VAE (diffusers' ``FlaxAutoencoderKL``), with the latent scaling factor applied.

``encode`` maps images in [-1, 1] (NCHW) to scaled latents; ``decode`` maps scaled latents back to
images in [-1, 1]. The scaling factor comes from the VAE's own config (0.18215 for SD 1.x).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from diffusers import FlaxAutoencoderKL

from coerase_jax.errors import UserError


def build_vae(config: dict[str, Any], dtype=jnp.float32) -> FlaxAutoencoderKL:
    fields = {f.name for f in dataclasses.fields(FlaxAutoencoderKL)} - {"parent", "name"}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in config.items() if k in fields}
    kwargs["dtype"] = dtype
    try:
        return FlaxAutoencoderKL(**kwargs)
    except TypeError as err:
        raise UserError(f"vae config: {err}") from None


def scaling_factor(config: dict[str, Any]) -> float:
    return float(config.get("scaling_factor", 0.18215))


def init_vae_params(vae: FlaxAutoencoderKL, rng: jax.Array) -> dict:
    size = vae.sample_size
    return vae.init(rng, jnp.zeros((1, vae.in_channels, size, size), jnp.float32))["params"]


def encode(vae: FlaxAutoencoderKL, params: dict, images: jax.Array, scale: float,
           rng: jax.Array | None = None) -> jax.Array:
    """Images (B,3,H,W) in [-1,1] -> latents (B,C,h,w) times the scaling factor (mean if no rng)."""
    dist = vae.apply({"params": params}, images, method=vae.encode).latent_dist
    latents = dist.mean if rng is None else dist.sample(rng)
    return jnp.transpose(latents, (0, 3, 1, 2)) * scale


def decode(vae: FlaxAutoencoderKL, params: dict, latents: jax.Array, scale: float) -> jax.Array:
    """Scaled latents (B,C,h,w) -> images (B,3,H,W) clipped to [-1, 1]."""
    # NHWC in, so diffusers' channel-guessing transpose never fires on square 4-channel latents.
    latents_nhwc = jnp.transpose(latents / scale, (0, 2, 3, 1))
    images = vae.apply({"params": params}, latents_nhwc, method=vae.decode).sample
    return jnp.clip(images, -1.0, 1.0)
