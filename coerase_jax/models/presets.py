"""Named model presets, written once as diffusers-layout folders and loaded like any other.

``tiny``: every SD component at toy size with random weights (32-px images, 8x8x4 latents), for
tests and for trying the commands in seconds. Writing it through the same exporters and reading
it through the same loader as real SD means the tests exercise the real loading path.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
from transformers import CLIPTextConfig, CLIPVisionConfig
from transformers.models.clip.tokenization_clip import bytes_to_unicode

from coerase_jax.errors import UserError
from coerase_jax.models import convert
from coerase_jax.models import vae as vae_lib
from coerase_jax.models.clip import CLIPImageEncoder, CLIPTextEncoder
from coerase_jax.models.image_proj import ImageProjection
from coerase_jax.models.export import export_unet
from coerase_jax.models.unet import UNet, UNetConfig, cross_attention_paths, split_image_kv

PRESETS = ("tiny", "toyworld")
# The trained small world ships inside the package (built by ``coerase toyworld train``).
TOYWORLD_DIR = Path(__file__).resolve().parent.parent / "toyworld" / "model"
_FORMAT_VERSION = "1"  # bump when the tiny preset's contents change, so caches are rebuilt

SD_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

TINY_UNET = UNetConfig(
    sample_size=8,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=4,
    cross_attention_dim=32,
)

TINY_VAE = {
    "_class_name": "AutoencoderKL",
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 3,
    "up_block_types": ["UpDecoderBlock2D"] * 3,
    "block_out_channels": [32, 32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 32,
    "act_fn": "silu",
    "scaling_factor": 0.18215,
}

# The small world's stack (DESIGN.md section 7): 32-px images, 8x8x4 latents, 16-token prompts.
WORLD_UNET = UNetConfig(
    sample_size=8,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=4,
    cross_attention_dim=64,
)

WORLD_VAE = {**TINY_VAE, "block_out_channels": [32, 64, 64], "norm_num_groups": 16}


def world_text_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                          num_attention_heads=4, max_position_embeddings=16, projection_dim=64,
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


def world_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                            image_size=32, patch_size=4, projection_dim=64)


START, END = "<|startoftext|>", "<|endoftext|>"


def tiny_text_config(vocab_size: int) -> CLIPTextConfig:
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=32,
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1, pad_token_id=vocab_size - 1)


def tiny_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=32)


def write_byte_tokenizer(folder: Path, merges: list[tuple[str, str]] = ()) -> int:
    """A CLIP-format tokenizer: CLIP's 512 byte symbols, optional BPE merges, then the two specials.

    Returns the vocabulary size. The layout (bytes, bytes+``</w>``, merges, specials last) is CLIP's.
    """
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] + [START, END]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": START, "eos_token": END,
        "unk_token": END, "pad_token": END, "do_lower_case": True}))
    return len(vocab)


def random_params(init_fn, rng: np.random.Generator) -> dict:
    """Seeded random weights of the tree ``init_fn`` builds, drawn in numpy.

    Only the tree's shapes are traced (no XLA compile of the initialisers, which costs ~20 s on
    CPU for the tiny stack): kernels ~ N(0, 1/fan_in), norm scales 1, biases 0, tables N(0, 0.02).
    """
    abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))

    def draw(path, leaf):
        name = path[-1].key
        if name == "scale":
            return np.ones(leaf.shape, np.float32)
        if name == "bias":
            return np.zeros(leaf.shape, np.float32)
        if name == "kernel":
            fan_in = int(np.prod(leaf.shape[:-1]))
            return rng.normal(0.0, fan_in ** -0.5, leaf.shape).astype(np.float32)
        return rng.normal(0.0, 0.02, leaf.shape).astype(np.float32)

    return jax.tree_util.tree_map_with_path(draw, abstract)


def write_tiny_bundle(folder: str | Path, seed: int = 0) -> Path:
    """Writes the ``tiny`` preset (random weights, seeded) as a diffusers-layout folder."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)

    unet = UNet(TINY_UNET, with_image_kv=True)
    unet_params = random_params(unet.init_params, rng)
    export_unet(unet_params, TINY_UNET, folder / "unet")

    vae = vae_lib.build_vae(TINY_VAE)
    convert.write_safetensors(folder / "vae" / "diffusion_pytorch_model.safetensors",
                              convert.flax_to_torch_state(random_params(lambda k: vae_lib.init_vae_params(vae, k), rng)))
    convert.write_json(folder / "vae" / "config.json", TINY_VAE)

    vocab_size = write_byte_tokenizer(folder / "tokenizer")
    text_config = tiny_text_config(vocab_size)
    text = CLIPTextEncoder(text_config)
    convert.write_safetensors(folder / "text_encoder" / "model.safetensors",
                              convert.flax_to_torch_state(random_params(text.init_params, rng)))
    convert.write_json(folder / "text_encoder" / "config.json",
                       {**text_config.to_dict(), "architectures": ["CLIPTextModel"]})

    vision_config = tiny_vision_config()
    vision = CLIPImageEncoder(vision_config)
    convert.write_safetensors(folder / "image_encoder" / "model.safetensors",
                              convert.flax_to_torch_state(random_params(vision.init_params, rng)))
    convert.write_json(folder / "image_encoder" / "config.json",
                       {**vision_config.to_dict(), "architectures": ["CLIPVisionModelWithProjection"]})

    proj = ImageProjection(TINY_UNET.cross_attention_dim, 4)
    _, kv = split_image_kv(unet_params)
    proj_params = random_params(lambda k: proj.init_params(k, vision_config.projection_dim), rng)
    state = convert.ip_adapter_from_flax(proj_params, kv,
                                         cross_attention_paths(unet_params))
    convert.write_safetensors(folder / "ip-adapter_sd15.safetensors", state)

    convert.write_json(folder / "scheduler" / "scheduler_config.json", SD_SCHEDULER)
    convert.write_json(folder / "model_index.json", {"_class_name": "StableDiffusionPipeline", "preset": "tiny"})
    return folder


def is_preset(source: str) -> bool:
    return source in PRESETS


def cache_root() -> Path:
    return Path(os.environ.get("COERASE_CACHE", Path.home() / ".cache" / "coerase_jax"))


def source_folder(source: str) -> Path:
    """The folder a model source names: a preset's (materialised) or the given path."""
    return materialise(source) if is_preset(source) else Path(source).expanduser()


def materialise(name: str, seed: int = 0) -> Path:
    """The preset's folder: the shipped small world, or (``tiny``) a cache folder written first if
    absent (atomically: temp dir + rename)."""
    if name == "toyworld":
        if not (TOYWORLD_DIR / "model_index.json").is_file():
            raise UserError(f"the small world's model is missing from {TOYWORLD_DIR} (rebuild it with "
                            f"`coerase toyworld train --out {TOYWORLD_DIR}`)")
        return TOYWORLD_DIR
    tag = hashlib.sha1(f"{name}-{seed}-{_FORMAT_VERSION}".encode()).hexdigest()[:10]
    target = cache_root() / f"{name}-{tag}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        write_tiny_bundle(tmp, seed)
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target
