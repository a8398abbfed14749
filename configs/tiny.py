"""Tiny random SD stack: every command runs end to end on a laptop CPU in about a minute.

    coerase sample --config configs/tiny.py --prompt "a red circle" --out /tmp/tiny
"""

from coerase_jax.configuration import base_config


def get_config():
    config = base_config(source="tiny")
    config.sample.prompts = ("a red circle", "a blue square")
    config.sample.steps = 10
    config.sample.guidance_scale = 3.0
    config.sample.batch_size = 4
    return config
