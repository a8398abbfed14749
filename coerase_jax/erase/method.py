"""Co-Erasing as small pure functions; each reads like its equation in DESIGN.md section 2.

Shapes: B batch, L text tokens (77), n image tokens (4), D cross-attention width (768), E CLIP
image-embedding width (1024 for ViT-H/14).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def refine_image_tokens(image_tokens: Array, text_states: Array, text_mask: Array | None = None) -> Array:
    """Text-guided image-concept refinement, parameter-free:

        c_img = softmax(q c_txt^T / sqrt(D)) c_txt,    q = ImageProj(image_embeds)

    Each refined token is a convex combination of the guiding text's token states, so only what
    the text names survives. ``text_mask`` (B, L) True for tokens that may take part (the
    reference lets all 77 take part, padding included, which is the default here too).
    """
    d = image_tokens.shape[-1]
    scores = jnp.einsum("bnd,bld->bnl", image_tokens, text_states) / math.sqrt(d)
    if text_mask is not None:
        scores = jnp.where(text_mask[:, None, :], scores, -jnp.inf)
    weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(text_states.dtype)
    return jnp.einsum("bnl,bld->bnd", weights, text_states)


def real_token_mask(token_ids: Array, eos_token_id: int) -> Array:
    """(B, L) True up to and including the first end-of-text token (the real prompt tokens)."""
    is_eos = token_ids == eos_token_id
    first_eos = jnp.argmax(is_eos, axis=-1)
    return jnp.arange(token_ids.shape[-1])[None, :] <= first_eos[:, None]


def contrastive_embedding(positive: Array, negative: Array, method: str) -> Array:
    """One concept embedding from a (with concept, without concept) image pair's CLIP embeddings."""
    delta = positive - negative
    if method == "diff":
        return delta
    if method == "l1":
        return jnp.abs(delta)
    if method == "l2":
        return delta ** 2
    raise ValueError(f"contrastive method must be diff, l1 or l2, got {method!r}")


def negative_guidance_target(eps_uncond: Array, eps_cond: Array, eta: float) -> Array:
    """ESD's target:  eps_0(z_t, t, c_0) - eta * (eps_0(z_t, t, c) - eps_0(z_t, t, c_0))."""
    return eps_uncond - eta * (eps_cond - eps_uncond)


def erasure_loss(eps_trainee: Array, target: Array) -> Array:
    """|| eps_theta(z_t, t, c) - stopgrad(target) ||^2, averaged over elements (PyTorch's MSELoss)."""
    return jnp.mean((eps_trainee.astype(jnp.float32) - jax.lax.stop_gradient(target).astype(jnp.float32)) ** 2)


def preservation_loss(eps_trainee_kept: Array, eps_teacher_kept: Array) -> Array:
    """|| eps_theta(z_t, t, c_p) - stopgrad(eps_0(z_t, t, c_p)) ||^2 for a kept prompt c_p: its
    prediction stays the teacher's. A DEPARTURE FROM THE PAPER (off by default), used with weight
    lambda: loss = erasure + lambda * preservation."""
    return erasure_loss(eps_trainee_kept, eps_teacher_kept)


def bin_timestep(key: Array, index: Array, num_ddim_steps: int, batch: int, num_train_timesteps: int) -> Array:
    """The reference's pairing: t ~ U[i T/N, (i+1) T/N) for DDIM index i (a known quirk, kept as an option)."""
    low = (index * num_train_timesteps) // num_ddim_steps
    high = ((index + 1) * num_train_timesteps) // num_ddim_steps
    return jax.random.randint(key, (batch,), low, high)


def default_blur_sigma(kernel_size: int) -> float:
    """torchvision's default sigma for a kernel size (what the reference's gaussian_blur uses)."""
    return 0.3 * ((kernel_size - 1) * 0.5 - 1) + 0.8


def gaussian_blur(latents: Array, kernel_size: int, sigma: float) -> Array:
    """Separable Gaussian blur per channel of NCHW latents, reflect padding (as torchvision)."""
    half = kernel_size // 2
    x = jnp.arange(kernel_size, dtype=jnp.float32) - half
    kernel = jnp.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    padded = jnp.pad(latents, ((0, 0), (0, 0), (half, half), (half, half)), mode="reflect")
    h, w = latents.shape[2], latents.shape[3]
    rows = sum(kernel[i] * padded[:, :, i:i + h, :] for i in range(kernel_size))
    return sum(kernel[j] * rows[:, :, :, j:j + w] for j in range(kernel_size)).astype(latents.dtype)
