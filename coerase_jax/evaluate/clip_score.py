"""CLIP score: the cosine between an image's CLIP embedding and its prompt's (as the Co-Erasing and
UnlearnDiff tables report it, e.g. 0.30 for SD 1.4 on COCO prompts — not scaled by 100)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from coerase_jax.models.bundle import Bundle, load_text_encoder_with_projection
from coerase_jax.models.clip import pooled_output


class ClipScorer:
    """Images through the bundle's CLIP vision tower (``image_embeds``); prompts through a CLIP
    text tower with its projection (a ``CLIPTextModelWithProjection`` folder, e.g. the small
    world's ``evaluator/clip_text``)."""

    def __init__(self, bundle: Bundle, text_folder: str | Path, batch_size: int = 64):
        self.bundle, self.batch_size = bundle, batch_size
        self.text_encoder, self.text_params, self.projection = load_text_encoder_with_projection(Path(text_folder))
        eos = self.text_encoder.config.eos_token_id
        self._text = jax.jit(lambda ids: pooled_output(
            self.text_encoder.apply({"params": self.text_params}, ids), ids, eos) @ self.projection)
        self._images = jax.jit(bundle.encode_images)

    def __call__(self, images_uint8: np.ndarray, prompts: list[str]) -> np.ndarray:
        """(N,) cosines of image i with prompt i."""
        ids = self.bundle.tokenize(list(prompts))
        out = []
        for start in range(0, len(prompts), self.batch_size):
            pixels = jnp.asarray(images_uint8[start:start + self.batch_size], jnp.float32) / 255.0
            image = self._images(pixels)
            text = self._text(ids[start:start + self.batch_size])
            image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
            text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
            out.append(np.asarray(jnp.sum(image * text, axis=-1)))
        return np.concatenate(out)
