"""IP-Adapter's image projection: CLIP ``image_embeds`` -> ``num_tokens`` cross-attention tokens.

    c_img = LayerNorm(reshape(image_embeds @ W + b, (num_tokens, cross_attention_dim)))

Parameter names follow ``ip-adapter_sd15.safetensors`` (``image_proj.proj`` / ``image_proj.norm``).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class ImageProjection(nn.Module):
    cross_attention_dim: int = 768
    num_tokens: int = 4
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, image_embeds: jax.Array) -> jax.Array:
        tokens = nn.Dense(self.num_tokens * self.cross_attention_dim, dtype=self.dtype, name="proj")(image_embeds)
        tokens = tokens.reshape(image_embeds.shape[0], self.num_tokens, self.cross_attention_dim)
        return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(tokens)

    def init_params(self, rng: jax.Array, embed_dim: int) -> dict:
        return self.init(rng, jnp.zeros((1, embed_dim), jnp.float32))["params"]
