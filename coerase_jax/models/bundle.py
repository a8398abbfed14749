"""The model bundle: every part of an SD 1.x, 2.x or XL stack (plus IP-Adapter) loaded from one folder.

A source is a local folder in the diffusers layout, as users download it from the Hub::

    unet/            config.json  diffusion_pytorch_model.safetensors
    vae/             config.json  diffusion_pytorch_model.safetensors
    text_encoder/    config.json  model.safetensors
    tokenizer/       vocab.json  merges.txt  tokenizer_config.json
    text_encoder_2/  tokenizer_2/                               (SDXL: the second tower, with projection)
    scheduler/       scheduler_config.json
    model_index.json                                            (optional; SDXL's force_zeros_for_empty_prompt)
    image_encoder/   config.json  model.safetensors             (optional, CLIPVisionModelWithProjection)
    ip-adapter_sd15.safetensors                                 (optional, any ip-adapter*.safetensors)

or the name of a preset (``tiny``, ``tiny-sd2``, ``tiny-sdxl``: random weights, written once to a
cache folder and then read through the same path). The image parts are loaded when both the image
encoder and an IP-Adapter file are found (or named explicitly).

How a prompt conditions the UNet (``encode_conditioning``): SD 1.x and 2.x, the one tower's final
hidden states; SDXL, both towers' penultimate hidden states side by side, and the ``text_time``
added conditioning: the second tower's pooled, projected embedding followed by the micro-conditioning
time ids ``[H, W, 0, 0, H, W]`` (original size, crop corner, target size: the bundle's own resolution).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from transformers import CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

from coerase_jax.errors import UserError
from coerase_jax.models import clip as clip_lib
from coerase_jax.models import convert
from coerase_jax.models import vae as vae_lib
from coerase_jax.models import presets
from coerase_jax.models.export import UNET_WEIGHTS
from coerase_jax.models.image_proj import ImageProjection
from coerase_jax.models.unet import Precision, UNet, UNetConfig, cross_attention_paths, merge_image_kv, subtree
CLIP_WEIGHTS = "model"
IMAGE_TOKENS = 4
EMPTY_PROMPT_CHOICES = ("auto", "zeros", "encoded")


@dataclasses.dataclass
class ImageParts:
    """IP-Adapter's side: the CLIP vision tower, its preprocessing and the image projection."""

    encoder: clip_lib.CLIPImageEncoder
    encoder_params: dict
    preprocess: clip_lib.ClipPreprocess
    proj: ImageProjection
    proj_params: dict


@dataclasses.dataclass
class Bundle:
    """Modules (stateless Flax definitions) and their parameters, plus the non-neural parts."""

    unet: UNet
    unet_params: dict  # includes attn2 to_k_ip/to_v_ip when image parts are loaded
    vae: Any
    vae_params: dict
    vae_scale: float
    text_encoder: clip_lib.CLIPTextEncoder | clip_lib.SDXLTextEncoder
    text_params: dict
    tokenizer: CLIPTokenizer
    scheduler_config: dict
    image: ImageParts | None = None
    source: str = ""
    tokenizer_2: CLIPTokenizer | None = None  # SDXL's second tower's
    # The unconditional branch for an empty prompt: zeros (SDXL's force_zeros_for_empty_prompt) or
    # the encoded empty prompt (SD 1.x / 2.x).
    zero_empty_prompt: bool = False

    @property
    def unet_config(self) -> UNetConfig:
        return self.unet.config

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        cfg = self.unet.config
        return (cfg.in_channels, cfg.sample_size, cfg.sample_size)

    @property
    def image_size(self) -> int:
        """Pixels per side of the images the UNet's latents decode to (768 for SD 2.1, 1024 for SDXL)."""
        return self.unet.config.sample_size * 2 ** (len(self.vae.block_out_channels) - 1)

    # ---- the small pure pieces the pipelines compose (all jittable) ----

    def tokenize(self, prompts: list[str]) -> np.ndarray:
        """Prompts -> ids (B, L); SDXL: (B, 2, L), one row per tower's tokenizer."""
        length = self.text_encoder.config.max_position_embeddings
        ids = clip_lib.tokenize(self.tokenizer, prompts, length)
        if self.tokenizer_2 is None:
            return ids
        return np.stack([ids, clip_lib.tokenize(self.tokenizer_2, prompts, length)], axis=1)

    def encode_text(self, text_params, token_ids: jax.Array) -> jax.Array:
        """The text states the UNet attends to (B, L, cross_attention_dim)."""
        return self.text_encoder.apply({"params": text_params}, token_ids)

    def encode_conditioning(self, text_params, token_ids: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """(text states (B, L, D), SDXL's added conditioning (B, pooled + time ids) or None)."""
        states, pooled = self.text_encoder.apply({"params": text_params}, token_ids,
                                                 method=self.text_encoder.encode)
        return states, self.added_cond(pooled)

    def added_cond(self, pooled: jax.Array) -> jax.Array | None:
        """SDXL's ``text_time`` input: the pooled text embedding, then the time ids (None for SD 1.x/2.x)."""
        if not self.unet.config.addition_embed_type:
            return None
        size = float(self.image_size)  # original size, crop corner (0, 0), target size
        time_ids = jnp.broadcast_to(jnp.asarray([size, size, 0.0, 0.0, size, size], jnp.float32), (pooled.shape[0], 6))
        return jnp.concatenate([pooled.astype(jnp.float32), time_ids], axis=-1)

    def unconditional(self, text_params, token_ids: jax.Array, empty: bool) -> tuple[jax.Array, jax.Array | None]:
        """The unconditional branch's conditioning from the negative prompt's ids: for an ``empty``
        prompt with ``zero_empty_prompt`` (SDXL), zero text states and a zero pooled embedding, the
        time ids kept (diffusers' force_zeros_for_empty_prompt); else the encoded prompt."""
        states, added = self.encode_conditioning(text_params, token_ids)
        if not (empty and self.zero_empty_prompt):
            return states, added
        zero_added = None if added is None else self.added_cond(
            jnp.zeros((added.shape[0], self.unet.config.added_text_dim)))
        return jnp.zeros_like(states), zero_added

    def unet_eps(self, unet_params, x, t, text, image_tokens=None, image_scale=1.0, added_cond=None) -> jax.Array:
        """The UNet's output: the noise, or the velocity for a v-prediction model (SD 2.x)."""
        return self.unet.apply({"params": unet_params}, x, t, text, image_tokens, image_scale, added_cond)

    def encode_images(self, images01: jax.Array) -> jax.Array:
        """Images (B,H,W,3) in [0,1] -> CLIP ``image_embeds`` (B, projection_dim)."""
        parts = self._image_parts()
        return parts.encoder.apply({"params": parts.encoder_params}, parts.preprocess(images01))

    def image_tokens(self, proj_params, image_embeds: jax.Array) -> jax.Array:
        return self._image_parts().proj.apply({"params": proj_params}, image_embeds)

    def decode(self, latents: jax.Array) -> jax.Array:
        """Scaled latents (B,C,h,w) -> images (B,H,W,3) in [0,1]."""
        images = vae_lib.decode(self.vae, self.vae_params, latents, self.vae_scale)
        return (jnp.transpose(images, (0, 2, 3, 1)) + 1.0) / 2.0

    def encode_latents(self, images01: jax.Array) -> jax.Array:
        """Images (B,H,W,3) in [0,1] -> scaled latents (mean of the posterior)."""
        images = jnp.transpose(images01 * 2.0 - 1.0, (0, 3, 1, 2))
        return vae_lib.encode(self.vae, self.vae_params, images, self.vae_scale)

    def _image_parts(self) -> ImageParts:
        self.require_image_parts()
        return self.image

    def require_image_parts(self) -> None:
        """The image stage's parts are there, or a one-line error saying where to put them."""
        if self.image is not None:
            return
        raise UserError(f"{self.source}: the image stage needs an image encoder and an IP-Adapter: set "
                        f"model.ip_adapter and model.image_encoder, or put image_encoder/ and ip-adapter*.safetensors "
                        f"in the model folder. Any IP-Adapter file whose shapes fit this UNet (cross-attention "
                        f"width {self.unet.config.cross_attention_dim}) will do; SD 2.x has no official one")


# --------------------------------------------------------------------------- loading


def _read_json(path: Path, component: str) -> dict:
    if not path.is_file():
        raise UserError(f"{component}: missing {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{component}: {path} is not valid JSON ({err})") from None


def _component_dir(root: Path, name: str) -> Path:
    folder = root / name
    if not folder.is_dir():
        raise UserError(f"{root}: missing component '{name}/' (a diffusers-layout folder needs "
                        f"unet/, vae/, text_encoder/, tokenizer/ and scheduler/)")
    return folder


def _abstract(init_fn) -> dict:
    return jax.eval_shape(init_fn, jax.random.PRNGKey(0))


def load_unet(folder: Path, precision: Precision = Precision(), allow_pickle: bool = False) -> tuple[UNet, dict]:
    config = UNetConfig.from_diffusers(_read_json(folder / "config.json", "unet"))
    unet = UNet(config, with_image_kv=False, precision=precision)
    flax_file = folder / "diffusion_flax_model.msgpack"
    if not (folder / f"{UNET_WEIGHTS}.safetensors").is_file() and flax_file.is_file():
        return unet, _read_flax_msgpack(flax_file, _abstract(unet.init_params), "unet")
    state = convert.read_torch_weights(folder, UNET_WEIGHTS, "unet", allow_pickle)
    return unet, convert.torch_state_to_flax(state, _abstract(unet.init_params), "unet")


def _read_flax_msgpack(path: Path, expected: dict, component: str) -> dict:
    from flax import serialization, traverse_util

    params = serialization.msgpack_restore(path.read_bytes())
    want = traverse_util.flatten_dict(expected)
    got = traverse_util.flatten_dict(params)
    if set(want) - set(got) or any(tuple(got[k].shape) != tuple(want[k].shape) for k in want):
        raise UserError(f"{component}: {path} does not match its config.json")
    return traverse_util.unflatten_dict({k: np.asarray(got[k], np.float32) for k in want})


def load_vae(folder: Path, allow_pickle: bool = False) -> tuple[Any, dict, float]:
    config = _read_json(folder / "config.json", "vae")
    vae = vae_lib.build_vae(config)
    state = convert.read_torch_weights(folder, UNET_WEIGHTS, "vae", allow_pickle)
    params = convert.torch_state_to_flax(state, _abstract(lambda r: vae_lib.init_vae_params(vae, r)), "vae")
    return vae, params, vae_lib.scaling_factor(config)


def _text_encoder(folder: Path, state: dict, component: str = "text_encoder", hidden_layer: str = "last",
                  projection: bool = False) -> tuple[clip_lib.CLIPTextEncoder, dict]:
    config = CLIPTextConfig.from_dict(_read_json(folder / "config.json", component))
    encoder = clip_lib.CLIPTextEncoder(config, hidden_layer=hidden_layer, projection=projection)
    return encoder, convert.torch_state_to_flax(state, _abstract(encoder.init_params), component)


def load_text_encoder(folder: Path, allow_pickle: bool = False) -> tuple[clip_lib.CLIPTextEncoder, dict]:
    return _text_encoder(folder, convert.read_torch_weights(folder, CLIP_WEIGHTS, "text_encoder", allow_pickle))


def load_sdxl_text_encoders(root: Path, allow_pickle: bool = False) -> tuple[clip_lib.SDXLTextEncoder, dict]:
    """SDXL's ``text_encoder/`` (CLIPTextModel) and ``text_encoder_2/`` (CLIPTextModelWithProjection)."""
    towers = []
    for name, projection in (("text_encoder", False), ("text_encoder_2", True)):
        folder = _component_dir(root, name)
        state = convert.read_torch_weights(folder, CLIP_WEIGHTS, name, allow_pickle)
        if projection and "text_projection.weight" not in state:
            raise UserError(f"{folder} has no text_projection.weight (SDXL's second tower is a "
                            f"CLIPTextModelWithProjection)")
        towers.append(_text_encoder(folder, state, name, "penultimate", projection))
    (first, first_params), (second, second_params) = towers
    encoder = clip_lib.SDXLTextEncoder(first.config, second.config)
    return encoder, {"text_encoder": first_params, "text_encoder_2": second_params}


def load_text_encoder_with_projection(folder: Path) -> tuple[clip_lib.CLIPTextEncoder, dict, jax.Array]:
    """A ``CLIPTextModelWithProjection`` folder: (encoder, params, projection (hidden, proj_dim))."""
    state = dict(convert.read_torch_weights(folder, CLIP_WEIGHTS, "text_encoder", False))
    projection = state.pop("text_projection.weight", None)
    if projection is None:
        raise UserError(f"{folder} has no text_projection.weight (a CLIPTextModelWithProjection is needed)")
    encoder, params = _text_encoder(folder, state)
    return encoder, params, jnp.asarray(np.asarray(projection).T)


def load_image_encoder(folder: Path, allow_pickle: bool = False) -> tuple[clip_lib.CLIPImageEncoder, dict]:
    raw = _read_json(folder / "config.json", "image_encoder")
    config = CLIPVisionConfig.from_dict(raw.get("vision_config", raw))
    encoder = clip_lib.CLIPImageEncoder(config)
    state = convert.read_torch_weights(folder, CLIP_WEIGHTS, "image_encoder", allow_pickle)
    return encoder, convert.torch_state_to_flax(state, _abstract(encoder.init_params), "image_encoder")


def load_tokenizer(folder: Path) -> CLIPTokenizer:
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise UserError(f"tokenizer: missing {folder / name}")
    return clip_lib.load_tokenizer(str(folder))


def load_ip_adapter(path: Path, unet: UNet, unet_params: dict, embed_dim: int) -> tuple[UNet, dict, ImageProjection,
                                                                                          dict]:
    """Adds IP-Adapter's per-layer image K/V to the UNet params and loads its image projection."""
    state = convert.read_safetensors(path)
    ip_unet = UNet(unet.config, with_image_kv=True, precision=unet.precision)
    expected = _abstract(lambda r: ip_unet.init_params(r, IMAGE_TOKENS))
    paths = cross_attention_paths(expected)
    kv_shapes = {p: subtree(expected, p)["to_k_ip"]["kernel"].shape for p in paths}
    proj = ImageProjection(unet.config.cross_attention_dim, IMAGE_TOKENS)
    proj_params, kv = convert.ip_adapter_to_flax(state, paths, _abstract(lambda r: proj.init_params(r, embed_dim)),
                                                 kv_shapes)
    return ip_unet, merge_image_kv(unet_params, kv), proj, proj_params


def find_ip_adapter(root: Path) -> Path | None:
    candidates = sorted(root.glob("ip-adapter*.safetensors")) + sorted(root.glob("ip_adapter/*.safetensors"))
    return candidates[0] if candidates else None


def zero_empty_prompt(root: Path, choice: str = "auto") -> bool:
    """Whether the unconditional branch of an empty prompt is zeros: ``choice`` zeros | encoded, or
    auto: the pipeline's ``force_zeros_for_empty_prompt`` in model_index.json (SDXL's pipelines
    default to true; SD 1.x/2.x have no such key and encode the empty prompt)."""
    if choice not in EMPTY_PROMPT_CHOICES:
        raise UserError(f"model.empty_prompt must be one of {EMPTY_PROMPT_CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice == "zeros"
    index = root / "model_index.json"
    values = _read_json(index, "model_index") if index.is_file() else {}
    sdxl_pipeline = "XL" in str(values.get("_class_name", "")) or (root / "text_encoder_2").is_dir()
    return bool(values.get("force_zeros_for_empty_prompt", sdxl_pipeline))


def load_bundle(source: str, *, ip_adapter: str | None = None, image_encoder: str | None = None,
                precision: Precision = Precision(), allow_pickle: bool = False,
                with_image_parts: bool = True, empty_prompt: str = "auto") -> Bundle:
    """Loads a bundle from a diffusers-layout folder or a preset name (see module docstring)."""
    root = presets.source_folder(source)
    if not root.is_dir():
        raise UserError(f"model source {source!r} is neither a folder nor a preset ({', '.join(presets.PRESETS)})")
    unet, unet_params = load_unet(_component_dir(root, "unet"), precision, allow_pickle)
    vae, vae_params, vae_scale = load_vae(_component_dir(root, "vae"), allow_pickle)
    tokenizer = load_tokenizer(_component_dir(root, "tokenizer"))
    tokenizer_2 = None
    if (root / "text_encoder_2").is_dir():
        text_encoder, text_params = load_sdxl_text_encoders(root, allow_pickle)
        tokenizer_2 = load_tokenizer(_component_dir(root, "tokenizer_2"))
    else:
        text_encoder, text_params = load_text_encoder(_component_dir(root, "text_encoder"), allow_pickle)
    _check_text_fits_unet(text_encoder, unet.config, root)
    scheduler_config = _read_json(_component_dir(root, "scheduler") / "scheduler_config.json", "scheduler")

    image = None
    ip_path = Path(ip_adapter) if ip_adapter else find_ip_adapter(root)
    encoder_dir = Path(image_encoder) if image_encoder else root / "image_encoder"
    if with_image_parts and (ip_adapter or image_encoder or (ip_path and encoder_dir.is_dir())):
        if ip_path is None or not ip_path.is_file():
            raise UserError(f"IP-Adapter file not found ({ip_adapter or root / 'ip-adapter*.safetensors'})")
        if not encoder_dir.is_dir():
            raise UserError(f"image encoder folder not found: {encoder_dir}")
        encoder, encoder_params = load_image_encoder(encoder_dir, allow_pickle)
        unet, unet_params, proj, proj_params = load_ip_adapter(ip_path, unet, unet_params,
                                                               encoder.config.projection_dim)
        preprocess = clip_lib.ClipPreprocess(size=encoder.config.image_size)
        image = ImageParts(encoder, encoder_params, preprocess, proj, proj_params)

    return Bundle(unet, unet_params, vae, vae_params, vae_scale, text_encoder, text_params, tokenizer,
                  scheduler_config, image, source=str(source), tokenizer_2=tokenizer_2,
                  zero_empty_prompt=zero_empty_prompt(root, empty_prompt))


def _check_text_fits_unet(text_encoder, unet_config: UNetConfig, root: Path) -> None:
    """The text states' width is the UNet's cross-attention width; SDXL's pooled embedding fits text_time."""
    if isinstance(text_encoder, clip_lib.SDXLTextEncoder):
        width = text_encoder.config.hidden_size + text_encoder.config_2.hidden_size
        if not unet_config.addition_embed_type:
            raise UserError(f"{root}: text_encoder_2/ is there (SDXL) but the UNet has no text_time conditioning")
        if unet_config.added_time_ids != 6:
            raise UserError(f"{root}: the SDXL refiner (aesthetic-score conditioning) is not supported; use SDXL base")
        if text_encoder.config_2.projection_dim != unet_config.added_text_dim:
            raise UserError(f"{root}: text_encoder_2's projection_dim {text_encoder.config_2.projection_dim} does "
                            f"not fit the UNet's text_time pooled width {unet_config.added_text_dim}")
    else:
        width = text_encoder.config.hidden_size
        if unet_config.addition_embed_type:
            raise UserError(f"{root}: the UNet takes text_time conditioning (SDXL) but there is no text_encoder_2/")
    if width != unet_config.cross_attention_dim:
        raise UserError(f"{root}: the text towers give {width}-d states, the UNet's cross-attention takes "
                        f"{unet_config.cross_attention_dim}")


DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def precision_from_config(model_config) -> Precision:
    if model_config.dtype not in DTYPES:
        raise UserError(f"model.dtype must be one of {sorted(DTYPES)}, got {model_config.dtype!r}")
    return Precision(dtype=DTYPES[model_config.dtype], attention_impl=model_config.attention_impl or None,
                     remat=model_config.remat)


def load_bundle_from_config(model_config) -> Bundle:
    """``load_bundle`` with the arguments of a config's ``model`` section."""
    return load_bundle(model_config.source, ip_adapter=model_config.ip_adapter or None,
                       image_encoder=model_config.image_encoder or None,
                       precision=precision_from_config(model_config), allow_pickle=model_config.allow_pickle,
                       empty_prompt=model_config.get("empty_prompt", "auto"))
