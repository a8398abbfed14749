"""Writing the erased UNet out: diffusers PyTorch layout (safetensors) and diffusers Flax layout.

The exported UNet is plain SD: IP-Adapter's image K/V are a training device only (DESIGN.md s.2).
"""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np

from coerase_jax.models import convert
from coerase_jax.models.unet import UNetConfig, split_image_kv

UNET_WEIGHTS = "diffusion_pytorch_model"


def export_unet(unet_params: dict, config: UNetConfig, out_dir: str | Path, dtype=np.float32) -> Path:
    """Writes the plain SD UNet (image K/V dropped) as ``config.json`` +
    ``diffusion_pytorch_model.safetensors``, which diffusers' torch ``UNet2DConditionModel`` loads."""
    out_dir = Path(out_dir)
    plain, _ = split_image_kv(unet_params)
    convert.write_safetensors(out_dir / f"{UNET_WEIGHTS}.safetensors", convert.flax_to_torch_state(plain), dtype)
    convert.write_json(out_dir / "config.json", config.to_diffusers())
    return out_dir


def export_unet_flax(unet_params: dict, config: UNetConfig, out_dir: str | Path) -> Path:
    """Writes the plain UNet in diffusers' Flax layout (``diffusion_flax_model.msgpack``)."""
    from flax import serialization

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    plain, _ = split_image_kv(unet_params)
    data = serialization.msgpack_serialize(jax.tree_util.tree_map(np.asarray, plain))
    tmp = out_dir / ".diffusion_flax_model.msgpack.tmp"
    tmp.write_bytes(data)
    tmp.replace(out_dir / "diffusion_flax_model.msgpack")
    convert.write_json(out_dir / "config.json", config.to_diffusers())
    return out_dir
