"""Tiny random SD stack: every command runs end to end on a laptop CPU in about a minute.

    coerase sample --config configs/tiny.py --prompt "a red circle" --out /tmp/tiny
    coerase erase --config configs/tiny.py --config.run_dir=/tmp/tiny-run
"""

from coerase_jax.configuration import base_config


def get_config():
    config = base_config(source="tiny")
    config.sample.prompts = ("a red circle", "a blue square")
    config.sample.steps = 10
    config.sample.guidance_scale = 3.0
    config.sample.batch_size = 4

    config.run_dir = "runs/tiny"
    config.concept.name = "circle"
    config.concept.prompts = ("a red circle", "a circle")
    config.concept.reference_prompts = ("a photo of a circle",)
    config.data.num_references = 8
    config.data.reference_steps = 5
    config.data.reference_guidance = 3.0
    config.erase.ddim_steps = 10
    config.erase.batch_size = 2
    config.text_stage.steps = 20
    config.image_stage.steps = 20
    config.text_stage.learning_rate = config.image_stage.learning_rate = 1e-4
    config.checkpoint.every = 10
    return config
