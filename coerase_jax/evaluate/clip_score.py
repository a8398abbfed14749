"""CLIP score: the cosine between an image's CLIP embedding and its prompt's (as the Co-Erasing and
UnlearnDiff tables report it, e.g. 0.30 for SD 1.4 on COCO prompts — not scaled by 100)."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from coerase_jax.models.bundle import Bundle, load_text_encoder_with_projection
from coerase_jax.models.clip import pooled_output, tokenize


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class ClipScorer:
    """Images through the bundle's CLIP vision tower (``image_embeds``); prompts through a CLIP
    text tower with its projection (a ``CLIPTextModelWithProjection`` folder, e.g. the small
    world's ``evaluator/clip_text``)."""

    def __init__(self, bundle: Bundle, text_folder: str | Path, batch_size: int = 64):
        self.bundle, self.batch_size = bundle, batch_size
        self.text_encoder, self.text_params, self.projection = load_text_encoder_with_projection(Path(text_folder))
        eos = self.text_encoder.config.eos_token_id
        self._text = jax.jit(lambda ids: _unit(pooled_output(
            self.text_encoder.apply({"params": self.text_params}, ids), ids, eos) @ self.projection))
        self._images = jax.jit(lambda pixels: _unit(bundle.encode_images(pixels)))

    def embed_texts(self, prompts: list[str]) -> np.ndarray:
        """(N, D) unit CLIP text embeddings."""
        # the bundle's (first) tokenizer: the scorer's tower shares CLIP's vocabulary, and SDXL's second is not needed
        ids = tokenize(self.bundle.tokenizer, list(prompts), self.text_encoder.config.max_position_embeddings)
        return np.concatenate([np.asarray(self._text(ids[s:s + self.batch_size]))
                               for s in range(0, len(ids), self.batch_size)])

    def embed_images(self, images_uint8: np.ndarray) -> np.ndarray:
        """(N, D) unit CLIP image embeddings."""
        return np.concatenate([np.asarray(self._images(jnp.asarray(images_uint8[s:s + self.batch_size],
                                                                   jnp.float32) / 255.0))
                               for s in range(0, len(images_uint8), self.batch_size)])

    def __call__(self, images_uint8: np.ndarray, prompts: list[str]) -> np.ndarray:
        """(N,) cosines of image i with prompt i."""
        return np.sum(self.embed_images(images_uint8) * self.embed_texts(prompts), axis=-1)

    def zero_shot(self, images_uint8: np.ndarray, classes: list[str], templates: list[str]) -> np.ndarray:
        """(N,) index of the class closest to each image; a class's text embedding is the mean over
        the templates ("a photo of a {}", ...) filled with its name (CLIP's prompt ensembling)."""
        per_class = np.stack([self.embed_texts([t.format(c) for t in templates]).mean(axis=0) for c in classes])
        per_class /= np.linalg.norm(per_class, axis=-1, keepdims=True)
        return np.argmax(self.embed_images(images_uint8) @ per_class.T, axis=-1)
