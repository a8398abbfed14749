"""Text (and optional image) to image: prompts + seeds -> uint8 images, batched and jitted.

One compiled program per (batch size, steps, guidance): text encoding, the DDIM loop with CFG
and the VAE decode all run inside it (the negative prompt is encoded once per call beside it:
SDXL's is zeros when empty, see ``Bundle.unconditional``). The last batch is padded, so it reuses the same program.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from coerase_jax.diffusion.sampling import Conditioning, denoise, initial_latents
from coerase_jax.diffusion.schedule import NoiseSchedule
from coerase_jax.errors import UserError
from coerase_jax.models.bundle import Bundle
from coerase_jax.parallel import distributed
from coerase_jax.parallel import mesh as mesh_lib


class Sampler:
    """With a ``mesh``, each batch is split over its data x fsdp devices (weights replicated)."""

    def __init__(self, bundle: Bundle, steps: int = 25, guidance_scale: float = 7.5, batch_size: int = 8,
                 mesh=None):
        self.bundle = bundle
        self.plan = NoiseSchedule.from_config(bundle.scheduler_config).ddim_plan(steps)
        self.guidance_scale = float(guidance_scale)
        self.batch_size = int(batch_size)
        if self.batch_size < 1:
            raise UserError(f"batch size must be positive, got {batch_size}")
        self._data_sharding = None
        if mesh is None:
            self._sample = jax.jit(self._sample_batch)
        else:
            mesh_lib.batch_size_per_replica_check(self.batch_size, mesh)
            rep, data = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
            self._data_sharding = data
            self._sample = jax.jit(self._sample_batch, in_shardings=(rep, rep, data, data, data, data, data, data),
                                   out_shardings=data)
        self._unconditional = jax.jit(bundle.unconditional, static_argnums=2)

    def _sample_batch(self, unet_params, text_params, cond_ids, uncond_text, uncond_added, seeds, image_tokens,
                      uncond_image_tokens):
        b = self.bundle
        text, added = b.encode_conditioning(text_params, cond_ids)
        cond = Conditioning(text, image_tokens, added)
        uncond = None
        if self.guidance_scale != 1.0:
            uncond = Conditioning(uncond_text, uncond_image_tokens, uncond_added)
        latents = initial_latents(seeds, b.latent_shape)
        latents = denoise(b.unet_eps, unet_params, latents, self.plan, cond, uncond, self.guidance_scale)
        return b.decode(latents)

    def __call__(self, prompts: Sequence[str], seeds: Sequence[int], *, negative_prompt: str = "",
                 unet_params=None, image_embeds: np.ndarray | None = None, progress: bool = True,
                 desc: str = "sampling") -> np.ndarray:
        """Images (N, H, W, 3) uint8 for prompts[i] with seeds[i]; ``image_embeds`` (N, D) adds image tokens."""
        if len(prompts) != len(seeds):
            raise UserError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            return np.zeros((0,) + (0, 0, 3), np.uint8)
        b = self.bundle
        unet_params = b.unet_params if unet_params is None else unet_params
        text_params = b.text_params
        if self._data_sharding is not None:  # the weights, replicated over the mesh once per call
            replicated = mesh_lib.replicated(self._data_sharding.mesh)
            unet_params, text_params = jax.device_put((unet_params, text_params), replicated)
        ids = b.tokenize(list(prompts))
        # the unconditional branch once per call (SDXL: zeros for an empty negative prompt)
        uncond_text, uncond_added = jax.device_get(self._unconditional(b.text_params, b.tokenize([negative_prompt]),
                                                                       not negative_prompt))
        uncond_text = np.repeat(uncond_text, len(prompts), axis=0)
        uncond_added = None if uncond_added is None else np.repeat(uncond_added, len(prompts), axis=0)
        tokens = uncond_tokens = None
        if image_embeds is not None:
            embeds = jnp.asarray(image_embeds)
            tokens = b.image_tokens(b.image.proj_params, embeds)
            uncond_tokens = b.image_tokens(b.image.proj_params, jnp.zeros_like(embeds))
        seeds = np.asarray(seeds, np.uint32)
        out = []
        n, bs = len(prompts), self.batch_size
        for start in tqdm(range(0, n, bs), desc=desc, unit="batch", disable=not progress or not distributed.is_leader()):
            idx = np.arange(start, start + bs) % n  # pad the last batch by wrapping around
            take = lambda a: None if a is None else a[idx]
            batch = (ids[idx], uncond_text[idx], take(uncond_added), seeds[idx], take(tokens), take(uncond_tokens))
            if self._data_sharding is not None:  # (on several hosts jit takes no numpy for sharded inputs)
                batch = jax.device_put(batch, self._data_sharding)
            images = self._sample(unet_params, text_params, *batch)
            out.append(distributed.fetch(images)[: min(bs, n - start)])
        return to_uint8(np.concatenate(out))


def to_uint8(images01: np.ndarray) -> np.ndarray:
    return np.clip(np.round(np.asarray(images01) * 255.0), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray, columns: int | None = None) -> np.ndarray:
    """(N, H, W, 3) -> one (rows*H, cols*W, 3) image, row-major."""
    n, h, w, c = images.shape
    columns = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / columns))
    grid = np.full((rows * h, columns * w, c), 255, images.dtype)
    for i, image in enumerate(images):
        r, col = divmod(i, columns)
        grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = image
    return grid
