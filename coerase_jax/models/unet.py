"""The Stable Diffusion UNet (1.x, 2.x and XL), with IP-Adapter's decoupled image cross-attention.

The parameter tree is the one diffusers' ``FlaxUNet2DConditionModel`` builds (same module
names, same shapes), so its weights load unchanged. What we add:

* per cross-attention layer (``attn2``) optional ``to_k_ip`` / ``to_v_ip`` projections, and
  image tokens as their own optional argument:
  ``Z = softmax(Q K^T/sqrt(d)) V + s * softmax(Q K'^T/sqrt(d)) V'`` (DESIGN.md section 2);
* attention through ``jax.nn.dot_product_attention`` (cuDNN / XLA / TPU kernels);
* a compute dtype separate from the parameter dtype, and a rematerialisation policy;
* SD 2.x's ``upcast_attention`` (scores and softmax in float32 when computing in bf16/fp16) and
  SDXL's ``text_time`` added conditioning (``added_cond``: the pooled text embedding and the
  micro-conditioning time ids, embedded and added to the time embedding);
* ``numerics``: "torch" reproduces PyTorch diffusers (exact GELU, spatial GroupNorm eps 1e-6),
  which is what real SD weights were trained with; "diffusers_flax" reproduces diffusers' Flax
  port (tanh GELU, eps 1e-5), used only to prove the parameter trees are the same.

Dropout is absent on purpose: SD trains with dropout 0 and erasure never uses it.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from coerase_jax.errors import UserError

Array = jax.Array

CROSS_ATTN_DOWN = "CrossAttnDownBlock2D"
PLAIN_DOWN = "DownBlock2D"
CROSS_ATTN_UP = "CrossAttnUpBlock2D"
PLAIN_UP = "UpBlock2D"
CROSS_ATTN_MID = "UNetMidBlock2DCrossAttn"

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}

# Keys of a diffusers UNet config.json that we read, and the values we support for the keys
# that SD 1.x, 2.x and XL leave at their defaults (anything else is a different architecture).
_SUPPORTED_DEFAULTS = {
    "act_fn": "silu",
    "center_input_sample": False,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "class_embed_type": None,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "time_cond_proj_dim": None,
    "attention_type": "default",
    "cross_attention_norm": None,
    "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0,
    "class_embeddings_concat": False,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "timestep_post_act": None,
    "mid_block_only_cross_attention": None,
    "reverse_transformer_layers_per_block": None,
}
TEXT_TIME = "text_time"  # SDXL's addition_embed_type


@dataclasses.dataclass(frozen=True)
class UNetConfig:
    """The architecture fields of a diffusers ``UNet2DConditionModel`` config (SD 1.x, 2.x and XL)."""

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, CROSS_ATTN_DOWN, PLAIN_DOWN)
    up_block_types: tuple[str, ...] = (PLAIN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP, CROSS_ATTN_UP)
    mid_block_type: str | None = CROSS_ATTN_MID
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    # SD 1.x configs call the number of heads "attention_head_dim" (a known diffusers misnomer);
    # num_attention_heads, when given, wins.
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    use_linear_projection: bool = False
    only_cross_attention: bool | tuple[bool, ...] = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    upcast_attention: bool = False  # SD 2.1: attention scores in float32 (a no-op when computing in float32)
    # SDXL: "text_time" adds Dense-SiLU-Dense([pooled text, sinusoids of the time ids]) to the time embedding
    addition_embed_type: str | None = None
    addition_time_embed_dim: int | None = None  # sinusoid width per time id (256)
    projection_class_embeddings_input_dim: int | None = None  # pooled text + ids x the width above (2816)

    @classmethod
    def from_diffusers(cls, config: dict[str, Any]) -> "UNetConfig":
        """Reads a diffusers ``unet/config.json`` dict; unsupported architectures are a UserError."""
        for key, default in _SUPPORTED_DEFAULTS.items():
            value = config.get(key, default)
            if isinstance(default, (int, float)) and not isinstance(default, bool) and value is not None:
                ok = float(value) == float(default)
            else:
                ok = value == default
            if not ok:
                raise UserError(
                    f"unet config: {key}={value!r} is not supported (this project handles SD 1.x, 2.x and XL "
                    f"UNets; expected {default!r})"
                )
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in config.items() if k in fields}
        for key in ("down_block_types", "up_block_types", "block_out_channels"):
            if key in kwargs:
                kwargs[key] = tuple(kwargs[key])
        for key in ("attention_head_dim", "num_attention_heads", "transformer_layers_per_block",
                    "only_cross_attention"):
            if isinstance(kwargs.get(key), list):
                kwargs[key] = tuple(kwargs[key])
        kwargs["upcast_attention"] = bool(kwargs.get("upcast_attention"))  # SDXL's config says null
        made = cls(**kwargs)
        made.validate()
        return made

    def validate(self) -> None:
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise UserError("unet config: down/up block types and block_out_channels differ in length")
        for kind in self.down_block_types:
            if kind not in (CROSS_ATTN_DOWN, PLAIN_DOWN):
                raise UserError(f"unet config: down block type {kind!r} is not supported")
        for kind in self.up_block_types:
            if kind not in (CROSS_ATTN_UP, PLAIN_UP):
                raise UserError(f"unet config: up block type {kind!r} is not supported")
        if self.mid_block_type not in (CROSS_ATTN_MID, None):
            raise UserError(f"unet config: mid block type {self.mid_block_type!r} is not supported")
        for channels in self.block_out_channels:
            if channels % self.norm_num_groups:
                raise UserError(
                    f"unet config: {channels} channels do not divide into {self.norm_num_groups} norm groups"
                )
        if self.addition_embed_type not in (None, TEXT_TIME):
            raise UserError(f"unet config: addition_embed_type {self.addition_embed_type!r} is not supported "
                            f"(None, or SDXL's {TEXT_TIME!r})")
        if self.addition_embed_type == TEXT_TIME and (
                not self.addition_time_embed_dim or not self.projection_class_embeddings_input_dim
                or self.added_text_dim <= 0):
            raise UserError("unet config: text_time needs addition_time_embed_dim and a "
                            "projection_class_embeddings_input_dim larger than the time ids' sinusoids")

    def to_diffusers(self) -> dict[str, Any]:
        """A config.json that diffusers' torch ``UNet2DConditionModel.from_pretrained`` accepts."""
        out = {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.39.0"}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        out.update(_SUPPORTED_DEFAULTS)
        return out

    def per_block(self, value, reverse: bool = False) -> list:
        values = list(value) if isinstance(value, (tuple, list)) else [value] * len(self.block_out_channels)
        return values[::-1] if reverse else values

    @property
    def heads(self) -> list[int]:
        return self.per_block(self.num_attention_heads or self.attention_head_dim)

    @property
    def added_time_ids(self) -> int:
        """How many micro-conditioning numbers ``text_time`` takes: 6 for SDXL base (original size,
        crop corner, target size), 5 for the refiner (an aesthetic score instead of the target size),
        told apart as diffusers does."""
        refiner = 5 * self.addition_time_embed_dim + self.cross_attention_dim == \
            self.projection_class_embeddings_input_dim
        return 5 if refiner else 6

    @property
    def added_text_dim(self) -> int:
        """Width of the pooled text embedding in ``added_cond`` (1280 for SDXL)."""
        return self.projection_class_embeddings_input_dim - self.added_time_ids * self.addition_time_embed_dim

    @property
    def added_cond_dim(self) -> int:
        """Width of the UNet's ``added_cond`` argument: pooled text, then the time ids (0: none)."""
        return self.added_text_dim + self.added_time_ids if self.addition_embed_type == TEXT_TIME else 0


def timestep_embedding(timesteps: Array, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> Array:
    """Sinusoidal embedding of (B,) timesteps, as diffusers' ``get_timestep_embedding``."""
    half = dim // 2
    exponent = -math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
    angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    return jnp.concatenate([cos, sin] if flip_sin_to_cos else [sin, cos], axis=-1)


QUERY_CHUNK = 1024


def multihead_attention(q: Array, k: Array, v: Array, heads: int, implementation: str | None,
                        upcast: bool = False) -> Array:
    """softmax(Q K^T / sqrt(d)) V per head; q (B,T,D), k/v (B,S,D) -> (B,T,D).

    ``implementation``: None (JAX chooses), "xla", "cudnn" (flash attention on NVIDIA GPUs), or
    "chunked": queries in blocks of QUERY_CHUNK under a sequential map, each block rematerialised,
    so at most one (block x S) score matrix is alive, in the forward and the backward pass alike.
    ``upcast`` (SD 2.1's upcast_attention): a bf16/fp16 attention runs in float32 and is cast back;
    cuDNN's flash kernel already keeps its scores in float32, so it is left as it is.
    """
    b, t, d = q.shape
    dtype = q.dtype
    if upcast and implementation != "cudnn":
        q, k, v = (x.astype(jnp.promote_types(x.dtype, jnp.float32)) for x in (q, k, v))
    split = lambda x: x.reshape(x.shape[0], x.shape[1], heads, d // heads)
    q, k, v = split(q), split(k), split(v)
    if implementation == "chunked":
        out = _chunked_attention(q, k, v)
    else:
        out = jax.nn.dot_product_attention(q, k, v, implementation=implementation)
    return out.reshape(b, t, d).astype(dtype)


def _chunked_attention(q: Array, k: Array, v: Array) -> Array:
    b, t, n, h = q.shape
    if t <= QUERY_CHUNK or t % QUERY_CHUNK:
        return jax.nn.dot_product_attention(q, k, v)
    blocks = jnp.moveaxis(q.reshape(b, t // QUERY_CHUNK, QUERY_CHUNK, n, h), 1, 0)
    attend = jax.checkpoint(lambda q_block: jax.nn.dot_product_attention(q_block, k, v))
    out = jax.lax.map(attend, blocks)
    return jnp.moveaxis(out, 0, 1).reshape(b, t, n, h)


@dataclasses.dataclass(frozen=True)
class Precision:
    """How the UNet computes: dtypes, attention kernel, rematerialisation, reference numerics."""

    dtype: Any = jnp.float32  # compute dtype
    param_dtype: Any = jnp.float32  # dtype of freshly initialised parameters
    attention_impl: str | None = None  # None lets JAX choose; "xla" | "cudnn" | "chunked"
    remat: str = "none"  # key of REMAT_POLICIES
    numerics: str = "torch"  # "torch" | "diffusers_flax"

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise UserError(f"remat must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")
        if self.attention_impl not in (None, "xla", "cudnn", "chunked"):
            raise UserError(f"attention_impl must be xla, cudnn or chunked, got {self.attention_impl!r}")
        if self.numerics not in ("torch", "diffusers_flax"):
            raise UserError(f"numerics must be 'torch' or 'diffusers_flax', got {self.numerics!r}")

    def dense(self, features: int, name: str, use_bias: bool = True) -> nn.Dense:
        return nn.Dense(features, use_bias=use_bias, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def conv(self, features: int, name: str, kernel: int = 3, stride: int = 1) -> nn.Conv:
        pad = (kernel - 1) // 2
        return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                       dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def group_norm(self, groups: int, eps: float, name: str) -> nn.GroupNorm:
        return nn.GroupNorm(num_groups=groups, epsilon=eps, dtype=self.dtype, param_dtype=self.param_dtype,
                            name=name)

    def layer_norm(self, name: str) -> nn.LayerNorm:
        return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, param_dtype=self.param_dtype, name=name)

    def remat_module(self, module_cls):
        if self.remat == "none":
            return module_cls
        return nn.remat(module_cls, policy=REMAT_POLICIES[self.remat])


class Attention(nn.Module):
    """Multi-head attention; with ``with_image_kv`` it is IP-Adapter's decoupled cross-attention."""

    heads: int
    precision: Precision
    with_image_kv: bool = False
    upcast: bool = False  # scores in float32 (UNetConfig.upcast_attention)

    @nn.compact
    def __call__(self, x: Array, context: Array | None = None, image_tokens: Array | None = None,
                 image_scale: float | Array = 1.0) -> Array:
        p = self.precision
        inner = x.shape[-1]
        context = x if context is None else context
        q = p.dense(inner, "to_q", use_bias=False)(x)
        k = p.dense(inner, "to_k", use_bias=False)(context)
        v = p.dense(inner, "to_v", use_bias=False)(context)
        out = multihead_attention(q, k, v, self.heads, p.attention_impl, self.upcast)
        if image_tokens is not None:
            if not self.with_image_kv:
                raise UserError("image tokens given, but this UNet was built without IP-Adapter image K/V")
            image_tokens = image_tokens.astype(p.dtype)
            k_ip = p.dense(inner, "to_k_ip", use_bias=False)(image_tokens)
            v_ip = p.dense(inner, "to_v_ip", use_bias=False)(image_tokens)
            scale = jnp.asarray(image_scale, out.dtype)
            scale = scale.reshape(-1, 1, 1) if scale.ndim == 1 else scale  # one scale per example
            out = out + scale * multihead_attention(q, k_ip, v_ip, self.heads, p.attention_impl, self.upcast)
        return p.dense(x.shape[-1], "to_out_0")(out)


class GEGLU(nn.Module):
    """(x W)_a * gelu((x W)_b): the gated half of SD's feed-forward, hidden size 4·dim."""

    precision: Precision

    @nn.compact
    def __call__(self, x: Array) -> Array:
        h = self.precision.dense(x.shape[-1] * 8, "proj")(x)
        linear, gate = jnp.split(h, 2, axis=-1)
        return linear * jax.nn.gelu(gate, approximate=self.precision.numerics == "diffusers_flax")


class FeedForward(nn.Module):
    precision: Precision

    @nn.compact
    def __call__(self, x: Array) -> Array:
        return self.precision.dense(x.shape[-1], "net_2")(GEGLU(self.precision, name="net_0")(x))


class TransformerBlock(nn.Module):
    """Self-attention, (decoupled) cross-attention, GEGLU feed-forward, each pre-norm residual."""

    heads: int
    only_cross_attention: bool
    with_image_kv: bool
    precision: Precision
    upcast_attention: bool = False

    @nn.compact
    def __call__(self, x, context, image_tokens=None, image_scale=1.0):
        p = self.precision
        self_context = context if self.only_cross_attention else None
        x = x + Attention(self.heads, p, upcast=self.upcast_attention, name="attn1")(p.layer_norm("norm1")(x),
                                                                                     self_context)
        x = x + Attention(self.heads, p, self.with_image_kv, self.upcast_attention, name="attn2")(
            p.layer_norm("norm2")(x), context, image_tokens, image_scale)
        return x + FeedForward(p, name="ff")(p.layer_norm("norm3")(x))


class SpatialTransformer(nn.Module):
    """diffusers' Transformer2DModel: GroupNorm, project in, transformer blocks, project out, residual."""

    heads: int
    depth: int
    use_linear_projection: bool
    only_cross_attention: bool
    with_image_kv: bool
    norm_num_groups: int
    precision: Precision
    upcast_attention: bool = False

    @nn.compact
    def __call__(self, x, context, image_tokens=None, image_scale=1.0):
        p = self.precision
        b, h, w, c = x.shape
        eps = 1e-6 if p.numerics == "torch" else 1e-5
        residual = x
        x = p.group_norm(self.norm_num_groups, eps, "norm")(x)
        if self.use_linear_projection:
            x = p.dense(c, "proj_in")(x.reshape(b, h * w, c))
        else:
            x = p.conv(c, "proj_in", kernel=1)(x).reshape(b, h * w, c)
        block_cls = p.remat_module(TransformerBlock)
        for i in range(self.depth):
            x = block_cls(self.heads, self.only_cross_attention, self.with_image_kv, p, self.upcast_attention,
                          name=f"transformer_blocks_{i}")(x, context, image_tokens, image_scale)
        if self.use_linear_projection:
            x = p.dense(c, "proj_out")(x).reshape(b, h, w, c)
        else:
            x = p.conv(c, "proj_out", kernel=1)(x.reshape(b, h, w, c))
        return x + residual


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with the time embedding added in between; 1x1 shortcut if needed."""

    out_channels: int
    norm_num_groups: int
    norm_eps: float
    precision: Precision

    @nn.compact
    def __call__(self, x, temb):
        p = self.precision
        residual = x
        x = p.conv(self.out_channels, "conv1")(nn.silu(p.group_norm(self.norm_num_groups, self.norm_eps, "norm1")(x)))
        x = x + p.dense(self.out_channels, "time_emb_proj")(nn.silu(temb))[:, None, None, :]
        x = p.conv(self.out_channels, "conv2")(nn.silu(p.group_norm(self.norm_num_groups, self.norm_eps, "norm2")(x)))
        if residual.shape[-1] != self.out_channels:
            residual = p.conv(self.out_channels, "conv_shortcut", kernel=1)(residual)
        return x + residual


class _Sampler(nn.Module):
    """diffusers' Downsample2D / Upsample2D: a 3x3 conv, stride 2 down or after a nearest 2x up."""

    out_channels: int
    up: bool
    precision: Precision

    @nn.compact
    def __call__(self, x):
        if self.up:
            x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
            return self.precision.conv(self.out_channels, "conv")(x)
        return self.precision.conv(self.out_channels, "conv", stride=2)(x)


@dataclasses.dataclass(frozen=True)
class _BlockSpec:
    """What one down/up/mid block needs to know about the UNet around it."""

    channels: int
    num_layers: int
    with_attention: bool
    heads: int
    depth: int
    only_cross_attention: bool
    resample: bool  # downsample after a down block, upsample after an up block


def _resnet(s: _BlockSpec, cfg: UNetConfig, p: Precision, name: str) -> nn.Module:
    """A (possibly rematerialised) resnet of a block; built inside its parent's compact call."""
    return p.remat_module(ResnetBlock)(s.channels, cfg.norm_num_groups, cfg.norm_eps, p, name=name)


def _transformer(s: _BlockSpec, cfg: UNetConfig, p: Precision, with_image_kv: bool, name: str) -> nn.Module:
    return SpatialTransformer(s.heads, s.depth, cfg.use_linear_projection, s.only_cross_attention, with_image_kv,
                              cfg.norm_num_groups, p, cfg.upcast_attention, name=name)


class DownBlock(nn.Module):
    spec: _BlockSpec
    config: UNetConfig
    with_image_kv: bool
    precision: Precision

    @nn.compact
    def __call__(self, x, temb, context, image_tokens, image_scale):
        s, cfg, p = self.spec, self.config, self.precision
        skips = []
        for i in range(s.num_layers):
            x = _resnet(s, cfg, p, f"resnets_{i}")(x, temb)
            if s.with_attention:
                x = _transformer(s, cfg, p, self.with_image_kv, f"attentions_{i}")(x, context, image_tokens,
                                                                                   image_scale)
            skips.append(x)
        if s.resample:
            x = _Sampler(s.channels, False, p, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class UpBlock(nn.Module):
    spec: _BlockSpec
    config: UNetConfig
    with_image_kv: bool
    precision: Precision

    @nn.compact
    def __call__(self, x, skips, temb, context, image_tokens, image_scale):
        s, cfg, p = self.spec, self.config, self.precision
        for i in range(s.num_layers):
            x = jnp.concatenate([x, skips.pop()], axis=-1)
            x = _resnet(s, cfg, p, f"resnets_{i}")(x, temb)
            if s.with_attention:
                x = _transformer(s, cfg, p, self.with_image_kv, f"attentions_{i}")(x, context, image_tokens,
                                                                                   image_scale)
        if s.resample:
            x = _Sampler(s.channels, True, p, name="upsamplers_0")(x)
        return x


class MidBlock(nn.Module):
    spec: _BlockSpec
    config: UNetConfig
    with_image_kv: bool
    precision: Precision

    @nn.compact
    def __call__(self, x, temb, context, image_tokens, image_scale):
        s, cfg, p = self.spec, self.config, self.precision
        x = _resnet(s, cfg, p, "resnets_0")(x, temb)
        x = _transformer(s, cfg, p, self.with_image_kv, "attentions_0")(x, context, image_tokens, image_scale)
        return _resnet(s, cfg, p, "resnets_1")(x, temb)


class UNet(nn.Module):
    """SD UNet on NCHW latents. ``image_tokens`` (B, n, cross_dim) are optional and decoupled;
    ``image_scale`` is a scalar or one value per example (0 turns an example's image tokens off);
    ``added_cond`` (B, config.added_cond_dim), SDXL's only: the pooled text embedding followed by
    the micro-conditioning time ids (``time_ids``)."""

    config: UNetConfig
    with_image_kv: bool = False
    precision: Precision = Precision()

    @nn.compact
    def __call__(self, sample: Array, timesteps: Array, encoder_hidden_states: Array,
                 image_tokens: Array | None = None, image_scale: float | Array = 1.0,
                 added_cond: Array | None = None) -> Array:
        cfg, p = self.config, self.precision
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps), (sample.shape[0],))
        temb = timestep_embedding(timesteps, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        temb = _TimeEmbedding(cfg.block_out_channels[0] * 4, p, name="time_embedding")(temb.astype(p.dtype))
        if cfg.addition_embed_type == TEXT_TIME:
            if added_cond is None:
                raise UserError("this UNet (SDXL) takes added_cond: the pooled text embedding and the time ids")
            added = text_time_input(added_cond, cfg).astype(p.dtype)
            temb = temb + _TimeEmbedding(cfg.block_out_channels[0] * 4, p, name="add_embedding")(added)
        context = encoder_hidden_states.astype(p.dtype)
        cond = (temb, context, image_tokens, image_scale)

        x = jnp.transpose(sample, (0, 2, 3, 1)).astype(p.dtype)
        x = p.conv(cfg.block_out_channels[0], "conv_in")(x)
        heads, depth = cfg.heads, cfg.per_block(cfg.transformer_layers_per_block)
        only_cross = cfg.per_block(cfg.only_cross_attention)
        last = len(cfg.block_out_channels) - 1

        skips = [x]
        for b, kind in enumerate(cfg.down_block_types):
            spec = _BlockSpec(cfg.block_out_channels[b], cfg.layers_per_block, kind == CROSS_ATTN_DOWN,
                              heads[b], depth[b], only_cross[b], resample=b < last)
            x, block_skips = DownBlock(spec, cfg, self.with_image_kv, p, name=f"down_blocks_{b}")(x, *cond)
            skips.extend(block_skips)

        if cfg.mid_block_type == CROSS_ATTN_MID:
            spec = _BlockSpec(cfg.block_out_channels[-1], 1, True, heads[-1], depth[-1], False, False)
            x = MidBlock(spec, cfg, self.with_image_kv, p, name="mid_block")(x, *cond)

        for b, kind in enumerate(cfg.up_block_types):
            r = last - b
            spec = _BlockSpec(cfg.block_out_channels[r], cfg.layers_per_block + 1, kind == CROSS_ATTN_UP,
                              heads[r], depth[r], only_cross[r], resample=b < last)
            x = UpBlock(spec, cfg, self.with_image_kv, p, name=f"up_blocks_{b}")(x, skips, *cond)

        x = nn.silu(p.group_norm(cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out")(x))
        x = p.conv(cfg.out_channels, "conv_out")(x)
        return jnp.transpose(x, (0, 3, 1, 2)).astype(jnp.float32)

    def init_params(self, rng: Array, num_image_tokens: int = 4) -> dict:
        """Random parameters; includes the image K/V projections when ``with_image_kv``."""
        cfg = self.config
        sample = jnp.zeros((1, cfg.in_channels, cfg.sample_size, cfg.sample_size), jnp.float32)
        text = jnp.zeros((1, 77, cfg.cross_attention_dim), jnp.float32)
        image = jnp.zeros((1, num_image_tokens, cfg.cross_attention_dim)) if self.with_image_kv else None
        added = jnp.zeros((1, cfg.added_cond_dim)) if cfg.addition_embed_type else None
        return self.init(rng, sample, jnp.zeros((1,), jnp.int32), text, image, 1.0, added)["params"]


def text_time_input(added_cond: Array, cfg: UNetConfig) -> Array:
    """SDXL's added conditioning (B, pooled + ids) -> [pooled, sinusoids of each time id] (B, P + ids x W),
    the input of ``add_embedding`` (diffusers' ``add_time_proj`` on the flattened time ids)."""
    pooled, time_ids = added_cond[:, :cfg.added_text_dim], added_cond[:, cfg.added_text_dim:]
    sinusoids = timestep_embedding(time_ids.reshape(-1), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                   cfg.freq_shift)
    return jnp.concatenate([pooled.astype(jnp.float32), sinusoids.reshape(added_cond.shape[0], -1)], axis=-1)


class _TimeEmbedding(nn.Module):
    dim: int
    precision: Precision

    @nn.compact
    def __call__(self, temb):
        temb = self.precision.dense(self.dim, "linear_1")(temb)
        return self.precision.dense(self.dim, "linear_2")(nn.silu(temb))


def cross_attention_paths(unet_params: dict) -> list[tuple[str, ...]]:
    """Paths of every ``attn2`` module, in the order diffusers lists attention processors.

    That order (down blocks, up blocks, mid block; then attentions, then transformer blocks) is
    the one the IP-Adapter file's ``ip_adapter.{1,3,5,...}`` numbering follows.
    """
    found = []

    def walk(node, path):
        if not isinstance(node, dict):
            return
        for key, child in node.items():
            if key == "attn2":
                found.append(path + (key,))
            else:
                walk(child, path + (key,))

    walk(unet_params, ())
    group_rank = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}

    def sort_key(path):
        numbers = []
        for segment in path:
            head, _, tail = segment.rpartition("_")
            numbers.append(int(tail) if tail.isdigit() else -1)
        top = path[0].rpartition("_")[0] or path[0]
        return (group_rank.get(top, 3), numbers)

    return sorted(found, key=sort_key)


def subtree(tree: dict, path: tuple[str, ...]) -> dict:
    for key in path:
        tree = tree[key]
    return tree


def merge_image_kv(unet_params: dict, kv: dict[tuple[str, ...], dict]) -> dict:
    """UNet params with ``to_k_ip``/``to_v_ip`` added under each attn2 path (a new tree)."""
    out = jax.tree_util.tree_map(lambda x: x, unet_params)
    for path, layer in kv.items():
        subtree(out, path).update(layer)
    return out


def split_image_kv(unet_params: dict) -> tuple[dict, dict[tuple[str, ...], dict]]:
    """(plain SD UNet params, {attn2 path: its image K/V}) — the exported UNet is the plain part."""
    plain = jax.tree_util.tree_map(lambda x: x, unet_params)
    kv = {}
    for path in cross_attention_paths(plain):
        attn2 = subtree(plain, path)
        layer = {name: attn2.pop(name) for name in ("to_k_ip", "to_v_ip") if name in attn2}
        if layer:
            kv[path] = layer
    return plain, kv
