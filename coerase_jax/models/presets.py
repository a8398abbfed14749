"""Named model presets, written once as diffusers-layout folders and loaded like any other.

``tiny``: every SD component at toy size with random weights (32-px images, 8x8x4 latents), for
tests and for trying the commands in seconds. ``tiny-sd2`` and ``tiny-sdxl`` are the same for the
SD 2.x and SDXL architectures, with every part that differs from SD 1.x: v-prediction,
``upcast_attention``, per-block head counts, linear projections, a GELU text tower and "!" padding
(SD 2.x); two text towers (the second with its projection), ``text_time`` added conditioning, two
transformer layers in a block, the VAE's own scaling factor and zeros for the empty prompt (SDXL).
Writing them through the same exporters and reading them through the same loader as real SD means
the tests exercise the real loading path.
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

# Random-weight presets by the architecture family they copy.
TINY_FAMILIES = {"tiny": "sd1", "tiny-sd2": "sd2", "tiny-sdxl": "sdxl"}
# The trained small worlds ship inside the package (built by ``coerase toyworld train``): the
# three-shape world everything defaults to, and issue #21's six-shape world (``--plan world=six``).
TOYWORLD_DIR = Path(__file__).resolve().parent.parent / "toyworld" / "model"
SHIPPED_WORLDS = {"toyworld": (TOYWORLD_DIR, ""),
                  "toyworld-six": (TOYWORLD_DIR.with_name("six"),
                                   " --plan world=six --plan num_images=30000 --plan clip_steps=1200"
                                   " --plan unet_steps=6000 --plan ip_steps=800")}
PRESETS = (*TINY_FAMILIES, *SHIPPED_WORLDS)
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

# SD 2.x (768-v): the UNet outputs the velocity; SD 2.1's scheduler otherwise as SD 1.x's.
SD2_SCHEDULER = {**SD_SCHEDULER, "prediction_type": "v_prediction"}
# SDXL base ships an Euler scheduler config; its schedule (what we read) is SD 1.x's.
SDXL_SCHEDULER = {**SD_SCHEDULER, "_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear",
                  "use_karras_sigmas": False, "sample_max_value": 1.0, "skip_prk_steps": True}

TINY_UNET = UNetConfig(
    sample_size=8,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=4,
    cross_attention_dim=32,
)

# SD 2.x's differences at toy size: heads per block, linear projections, upcast attention.
TINY_SD2_UNET = UNetConfig(
    sample_size=8,
    block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    attention_head_dim=(2, 4),
    cross_attention_dim=32,
    use_linear_projection=True,
    upcast_attention=True,
)

# SDXL's layout at toy size: no attention in the first block, 1 and 2 transformer layers, text
# states of both towers (32 + 32), text_time with the second tower's pooled 32-d embedding.
TINY_SDXL_UNET = UNetConfig(
    sample_size=8,
    block_out_channels=(32, 64),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=1,
    attention_head_dim=(2, 4),
    transformer_layers_per_block=(1, 2),
    cross_attention_dim=64,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=32 + 6 * 8,
)

# The real architectures (no weights: shapes for `coerase bench` and the tests that count layers).
SD21_UNET = UNetConfig(sample_size=96, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                       use_linear_projection=True, upcast_attention=True)
SDXL_UNET = UNetConfig(
    sample_size=128,
    block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block=2,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    cross_attention_dim=2048,
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
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


def tiny_text_config(vocab_size: int, hidden_act: str = "quick_gelu", pad_token_id: int | None = None
                     ) -> CLIPTextConfig:
    """OpenAI CLIP's (SD 1.x, SDXL's first tower) at toy size; OpenCLIP's towers (SD 2.x, SDXL's
    second) use exact GELU and pad with "!"."""
    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=77, projection_dim=32, hidden_act=hidden_act,
                          bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1,
                          pad_token_id=vocab_size - 1 if pad_token_id is None else pad_token_id)


def tiny_vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=32, patch_size=8, projection_dim=32)


def write_byte_tokenizer(folder: Path, merges: list[tuple[str, str]] = (), pad_token: str = END) -> int:
    """A CLIP-format tokenizer: CLIP's 512 byte symbols, optional BPE merges, then the two specials.

    Returns the vocabulary size. The layout (bytes, bytes+``</w>``, merges, specials last) is CLIP's;
    OpenCLIP's tokenizers (SD 2.x, SDXL's second) pad with "!" (id 0) instead of the end token.
    """
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(pair) for pair in merges] + [START, END]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": START, "eos_token": END,
        "unk_token": END, "pad_token": pad_token, "do_lower_case": True}))
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


def write_tiny_bundle(folder: str | Path, seed: int = 0, family: str = "sd1") -> Path:
    """Writes a random-weight preset (seeded) of ``family`` (sd1 | sd2 | sdxl) as a diffusers-layout folder."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    unet_config = {"sd1": TINY_UNET, "sd2": TINY_SD2_UNET, "sdxl": TINY_SDXL_UNET}[family]

    unet = UNet(unet_config, with_image_kv=True)
    unet_params = random_params(unet.init_params, rng)
    export_unet(unet_params, unet_config, folder / "unet")

    vae_config = {**TINY_VAE, "scaling_factor": 0.13025} if family == "sdxl" else TINY_VAE
    vae = vae_lib.build_vae(vae_config)
    vae_params = random_params(lambda k: vae_lib.init_vae_params(vae, k), rng)
    convert.write_safetensors(folder / "vae" / "diffusion_pytorch_model.safetensors",
                              convert.flax_to_torch_state(vae_params))
    convert.write_json(folder / "vae" / "config.json", vae_config)

    openclip = family == "sd2"  # SD 2.x's one tower is OpenCLIP's; SDXL's first is OpenAI's
    vocab_size = write_byte_tokenizer(folder / "tokenizer", pad_token="!" if openclip else END)
    text_config = tiny_text_config(vocab_size, "gelu" if openclip else "quick_gelu", 0 if openclip else None)
    _write_text_tower(folder / "text_encoder", text_config, rng)
    if family == "sdxl":
        write_byte_tokenizer(folder / "tokenizer_2", pad_token="!")
        _write_text_tower(folder / "text_encoder_2", tiny_text_config(vocab_size, "gelu", 0), rng, projection=True)

    vision_config = tiny_vision_config()
    vision = CLIPImageEncoder(vision_config)
    convert.write_safetensors(folder / "image_encoder" / "model.safetensors",
                              convert.flax_to_torch_state(random_params(vision.init_params, rng)))
    convert.write_json(folder / "image_encoder" / "config.json",
                       {**vision_config.to_dict(), "architectures": ["CLIPVisionModelWithProjection"]})

    proj = ImageProjection(unet_config.cross_attention_dim, 4)
    _, kv = split_image_kv(unet_params)
    proj_params = random_params(lambda k: proj.init_params(k, vision_config.projection_dim), rng)
    state = convert.ip_adapter_from_flax(proj_params, kv,
                                         cross_attention_paths(unet_params))
    ip_name = {"sd1": "ip-adapter_sd15", "sd2": "ip-adapter_sd21", "sdxl": "ip-adapter_sdxl"}[family]
    convert.write_safetensors(folder / f"{ip_name}.safetensors", state)

    scheduler = {"sd1": SD_SCHEDULER, "sd2": SD2_SCHEDULER, "sdxl": SDXL_SCHEDULER}[family]
    convert.write_json(folder / "scheduler" / "scheduler_config.json", scheduler)
    name = {v: k for k, v in TINY_FAMILIES.items()}[family]
    index = {"_class_name": "StableDiffusionPipeline", "preset": name}
    if family == "sdxl":
        index = {"_class_name": "StableDiffusionXLPipeline", "preset": name, "force_zeros_for_empty_prompt": True}
    convert.write_json(folder / "model_index.json", index)
    return folder


def _write_text_tower(folder: Path, config: CLIPTextConfig, rng: np.random.Generator, projection: bool = False) -> None:
    """A ``CLIPTextModel`` (or, with ``projection``, ``CLIPTextModelWithProjection``) folder."""
    encoder = CLIPTextEncoder(config, projection=projection)
    convert.write_safetensors(folder / "model.safetensors",
                              convert.flax_to_torch_state(random_params(encoder.init_params, rng)))
    architecture = "CLIPTextModelWithProjection" if projection else "CLIPTextModel"
    convert.write_json(folder / "config.json", {**config.to_dict(), "architectures": [architecture]})


def is_preset(source: str) -> bool:
    return source in PRESETS


def cache_root() -> Path:
    return Path(os.environ.get("COERASE_CACHE", Path.home() / ".cache" / "coerase_jax"))


def source_folder(source: str) -> Path:
    """The folder a model source names: a preset's (materialised) or the given path."""
    return materialise(source) if is_preset(source) else Path(source).expanduser()


def materialise(name: str, seed: int = 0) -> Path:
    """The preset's folder: the shipped small world, or (``tiny``, ``tiny-sd2``, ``tiny-sdxl``) a
    cache folder written first if absent (atomically: temp dir + rename)."""
    if name in SHIPPED_WORLDS:
        folder, plan = SHIPPED_WORLDS[name]
        if not (folder / "model_index.json").is_file():
            raise UserError(f"the small world's model is missing from {folder} (rebuild it with "
                            f"`coerase toyworld train --out {folder}{plan}`)")
        return folder
    tag = hashlib.sha1(f"{name}-{seed}-{_FORMAT_VERSION}".encode()).hexdigest()[:10]
    target = cache_root() / f"{name}-{tag}"
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    try:
        write_tiny_bundle(tmp, seed, TINY_FAMILIES[name])
        try:
            tmp.rename(target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return target
