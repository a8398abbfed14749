"""Stable Diffusion XL base 1.0 (128x128 latents at 1024², two text towers, text_time conditioning)
with the paper's Co-Erasing settings, one concept per run.

    coerase erase --config configs/sdxl.py:nudity --config.model.source=/data/sdxl \
        --config.model.ip_adapter=/data/sdxl_models/ip-adapter_sdxl_vit-h.safetensors \
        --config.model.image_encoder=/data/models/image_encoder

Concepts: nudity, vangogh, church, parachute, garbage_truck, tench. IP-Adapter SDXL in its
published layout: ``ip-adapter_sdxl_vit-h`` (with the ViT-H/14 encoder, 1024-d embeddings) or
``ip-adapter_sdxl`` (with the bigG encoder, 1280-d), 4 image tokens of 2048-d. The unconditional
branch of the empty prompt is zeros, as diffusers' SDXL pipeline makes it
(``force_zeros_for_empty_prompt``); ``--config.model.empty_prompt=encoded`` encodes "" instead.
Guidance 5.0 while sampling (diffusers' SDXL default). ``coerase eval`` runs without the
UnlearnDiff-style attack here: it optimises the tokens of one text tower, and SDXL has two.
"""

from coerase_jax.configuration import paper_config


def get_config(concept: str = "nudity"):
    config = paper_config("./stable-diffusion-xl-base-1.0", concept)
    config.sample.guidance_scale = config.data.reference_guidance = config.eval.guidance_scale = 5.0
    config.sample.batch_size = config.data.reference_batch_size = config.eval.batch_size = 4
    config.eval.attack_tokens = 0  # one text tower's attack (evaluate/attack.py); SDXL has two
    return config
