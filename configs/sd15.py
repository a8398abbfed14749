"""Stable Diffusion 1.5 with the paper's Co-Erasing settings, one concept per run.

    coerase erase --config configs/sd15.py:nudity --config.model.source=/data/sd15

Concepts: nudity, vangogh, church, parachute, garbage_truck, tench. model.source is a local
diffusers-layout folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/ image_encoder/ and
ip-adapter_sd15.safetensors); nothing is downloaded at run time.
"""

from coerase_jax.configuration import paper_config


def get_config(concept: str = "nudity"):
    return paper_config("./stable-diffusion-v1-5", concept)
