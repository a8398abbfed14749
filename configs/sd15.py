"""Stable Diffusion 1.5 from a local diffusers-layout folder (nothing is downloaded at run time).

Point model.source at the folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/, and for
Co-Erasing image_encoder/ plus ip-adapter_sd15.safetensors):

    coerase sample --config configs/sd15.py --config.model.source=/data/sd15 --prompt "a church" --out out/
"""

from coerase_jax.configuration import base_config


def get_config():
    config = base_config(source="./stable-diffusion-v1-5")
    config.model.dtype = "bfloat16"
    config.sample.steps = 50
    config.sample.guidance_scale = 7.5
    return config
