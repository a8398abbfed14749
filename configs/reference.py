"""The published Co-Erasing code's choices (Ferry-Li/Co-Erasing), one concept per run, so that a
run can be compared with the paper preset (configs/sd15.py) that departs from them.

    coerase erase --config configs/reference.py:nudity --config.model.source=/data/sd15

fp32, the loss timestep drawn from z_t's bin, z_t by DDPM's ancestral steps from T, blur 3 in the
image stage only, the code's reference prompts ("a photo of nudity") and trainable sets (noxattn
with the output head; image K/V trained with xattn). Its bugs are not copied (see README, "What
differs from the PyTorch reference"). Concepts: nudity, vangogh, church, parachute, garbage_truck,
tench.
"""

from coerase_jax.configuration import reference_config


def get_config(concept: str = "nudity"):
    return reference_config("./stable-diffusion-v1-5", concept)
