"""Stable Diffusion 2.1 (768-v: v-prediction, 96x96 latents at 768²) with the paper's Co-Erasing
settings, one concept per run.

    coerase erase --config configs/sd21.py:nudity --config.model.source=/data/sd21 \
        --config.model.ip_adapter=/data/ip-adapter.safetensors --config.model.image_encoder=/data/image_encoder

Concepts: nudity, vangogh, church, parachute, garbage_truck, tench. There is no official SD 2.x
IP-Adapter: the image stage takes any IP-Adapter file whose shapes fit the UNet (image tokens of
1024-d, one K/V pair per cross-attention layer) with its CLIP vision folder, and says so when none
is given (the text stage alone runs with --config.erase.stages=text). The loss stays in the
model's own output space (velocity): the ESD target is linear, v_u - eta (v_c - v_u).
"""

from coerase_jax.configuration import paper_config


def get_config(concept: str = "nudity"):
    config = paper_config("./stable-diffusion-2-1", concept)
    return config
