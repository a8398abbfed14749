"""A small sweep on the tiny random model: 2 concepts x 2 learning rates, text stage only, in minutes.

    coerase sweep --config configs/sweep_tiny.py --out runs/sweep-tiny
"""

from pathlib import Path

from coerase_jax.configuration import load_config_file


def get_config():
    config = load_config_file(str(Path(__file__).with_name("tiny.py")))
    config.erase.stages = ("text",)
    config.text_stage.steps = 10
    config.sweep.concepts = (("circle", ("a red circle", "a circle")), ("square", ("a blue square", "a square")))
    config.sweep.grid = (("text_stage.learning_rate", (1e-5, 1e-4)),)
    return config
