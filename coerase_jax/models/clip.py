"""CLIP towers: the text encoder(s) that condition SD (one for 1.x/2.x, two for SDXL), and the
vision encoder IP-Adapter uses.

transformers has Flax CLIP transformers but no ``FlaxCLIPVisionModelWithProjection``; the vision
encoder here adds the ``visual_projection`` (no bias) to the pooled output itself, so the
parameter tree matches the PyTorch ``CLIPVisionModelWithProjection`` file key for key.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from transformers import CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig
from transformers.models.clip.modeling_flax_clip import FlaxCLIPTextTransformer, FlaxCLIPVisionTransformer

from coerase_jax.errors import UserError

# CLIP's own preprocessing statistics (OpenAI CLIP, also ViT-H/14 open_clip).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# The PyTorch reference normalises with 0.5/0.5 (a bug); kept only as an explicit option.
HALF_MEAN = HALF_STD = (0.5, 0.5, 0.5)


class CLIPTextEncoder(nn.Module):
    """Token ids (B, L) -> hidden states (B, L, hidden), as a ``CLIPTextModel`` conditions SD.

    ``hidden_layer``: "last" is the final hidden state after the last LayerNorm (SD 1.x and 2.x);
    "penultimate" is the hidden state that enters the last layer, before any LayerNorm (SDXL).
    With ``projection`` it is a ``CLIPTextModelWithProjection`` (``text_projection``, no bias).
    ``encode`` also returns the pooled feature (the final hidden state at the end-of-text token),
    projected when there is a projection (SDXL's pooled ``text_embeds``)."""

    config: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32
    hidden_layer: str = "last"  # last | penultimate
    projection: bool = False

    def setup(self):
        if self.hidden_layer not in ("last", "penultimate"):
            raise ValueError(f"hidden_layer must be last or penultimate, got {self.hidden_layer!r}")
        self.text_model = FlaxCLIPTextTransformer(self.config, dtype=self.dtype)
        if self.projection:
            self.text_projection = nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype)

    def __call__(self, input_ids: jax.Array, token_embeds: jax.Array | None = None) -> jax.Array:
        """``token_embeds`` (B, L, hidden), if given, replaces the token-embedding lookup of
        ``input_ids`` (position embeddings are still added): prompts made of continuous token
        vectors, as the UnlearnDiff attack optimises them. ``input_ids`` still sets the length."""
        return self.encode(input_ids, token_embeds)[0]

    def encode(self, input_ids: jax.Array, token_embeds: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(hidden states (B, L, hidden), pooled feature (B, projection_dim or hidden))."""
        position_ids = jnp.broadcast_to(jnp.arange(input_ids.shape[-1])[None], input_ids.shape)
        penultimate = self.hidden_layer == "penultimate"
        run = lambda: self.text_model(input_ids, jnp.ones_like(input_ids), position_ids, deterministic=True,
                                      output_hidden_states=penultimate)
        if token_embeds is None:
            out = run()
        else:
            def use_given_embeddings(next_fun, args, kwargs, context):
                if context.module.name == "token_embedding" and context.method_name == "__call__":
                    return token_embeds.astype(self.dtype)
                return next_fun(*args, **kwargs)

            with nn.intercept_methods(use_given_embeddings):
                out = run()
        states = out.hidden_states[-2] if penultimate else out.last_hidden_state
        pooled = self.text_projection(out.pooler_output) if self.projection else out.pooler_output
        return states, pooled

    @staticmethod
    def token_table(params: dict) -> jax.Array:
        """The (vocab, hidden) token-embedding matrix."""
        return params["text_model"]["embeddings"]["token_embedding"]["embedding"]

    def init_params(self, rng: jax.Array) -> dict:
        ids = jnp.zeros((1, self.config.max_position_embeddings), jnp.int32)
        return self.init(rng, ids)["params"]


class SDXLTextEncoder(nn.Module):
    """SDXL's two text towers on ids (B, 2, L) (one row per tower's tokenizer):

        states = [penultimate(CLIP-L)(ids_1), penultimate(OpenCLIP-bigG)(ids_2)]   (B, L, 768 + 1280)
        pooled = text_projection(final state of bigG at its end-of-text token)     (B, 1280)

    Parameters: ``text_encoder`` (a ``CLIPTextModel``) and ``text_encoder_2`` (a
    ``CLIPTextModelWithProjection``), each the tree of its own diffusers folder."""

    config: CLIPTextConfig  # the first tower's (its tokenizer's length and vocabulary)
    config_2: CLIPTextConfig
    dtype: jnp.dtype = jnp.float32

    def setup(self):
        self.text_encoder = CLIPTextEncoder(self.config, self.dtype, hidden_layer="penultimate")
        self.text_encoder_2 = CLIPTextEncoder(self.config_2, self.dtype, hidden_layer="penultimate", projection=True)

    def __call__(self, input_ids: jax.Array, token_embeds: jax.Array | None = None) -> jax.Array:
        if token_embeds is not None:
            raise UserError("prompts made of token vectors (the UnlearnDiff-style attack) need one text tower; "
                            "SDXL has two (set eval.attack_tokens=0)")
        return self.encode(input_ids)[0]

    @staticmethod
    def token_table(params: dict) -> jax.Array:
        raise UserError("the UnlearnDiff-style attack optimises tokens of one text tower; SDXL has two "
                        "(set eval.attack_tokens=0)")

    def encode(self, input_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
        states_1, _ = self.text_encoder.encode(input_ids[:, 0])
        states_2, pooled = self.text_encoder_2.encode(input_ids[:, 1])
        return jnp.concatenate([states_1, states_2.astype(states_1.dtype)], axis=-1), pooled

    def init_params(self, rng: jax.Array) -> dict:
        ids = jnp.zeros((1, 2, self.config.max_position_embeddings), jnp.int32)
        return self.init(rng, ids)["params"]


class CLIPImageEncoder(nn.Module):
    """Pixels (B, H, W, 3), already CLIP-preprocessed -> ``image_embeds`` (B, projection_dim)."""

    config: CLIPVisionConfig
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, pixel_values: jax.Array) -> jax.Array:
        pooled = FlaxCLIPVisionTransformer(self.config, dtype=self.dtype, name="vision_model")(
            pixel_values, deterministic=True).pooler_output
        return nn.Dense(self.config.projection_dim, use_bias=False, dtype=self.dtype,
                        name="visual_projection")(pooled)

    def init_params(self, rng: jax.Array) -> dict:
        size = self.config.image_size
        return self.init(rng, jnp.zeros((1, size, size, 3), jnp.float32))["params"]


@dataclasses.dataclass(frozen=True)
class ClipPreprocess:
    """CLIP's image preprocessing as a jittable function: resize short side, centre crop, normalise."""

    size: int = 224
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD

    def __call__(self, images: jax.Array) -> jax.Array:
        """images: (B, H, W, 3) floats in [0, 1] -> (B, size, size, 3) normalised."""
        b, h, w, c = images.shape
        scale = self.size / min(h, w)
        new_h, new_w = max(self.size, round(h * scale)), max(self.size, round(w * scale))
        if (new_h, new_w) != (h, w):
            images = jax.image.resize(images, (b, new_h, new_w, c), method="bicubic", antialias=True)
        top, left = (new_h - self.size) // 2, (new_w - self.size) // 2
        images = images[:, top:top + self.size, left:left + self.size, :]
        mean = jnp.asarray(self.mean, images.dtype)
        std = jnp.asarray(self.std, images.dtype)
        return (images - mean) / std


def pooled_output(hidden: jax.Array, ids: jax.Array, eos_id: int) -> jax.Array:
    """CLIP's pooled text feature: the hidden state at the first end-of-text token."""
    position = jnp.argmax(ids == eos_id, axis=-1)
    return hidden[jnp.arange(hidden.shape[0]), position]


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str], length: int | None = None) -> np.ndarray:
    """Prompts -> (B, L) int32 ids, padded/truncated to the text encoder's length, as SD does."""
    length = length or tokenizer.model_max_length
    ids = tokenizer(list(prompts), padding="max_length", max_length=length, truncation=True,
                    return_tensors="np").input_ids
    return ids.astype(np.int32)


def load_tokenizer(folder: str) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
