"""Every shape of the small world x two negative-guidance strengths, each judged like the main job.

    coerase sweep --config configs/sweep_toyworld.py --out runs/sweep-toyworld     # ~3 min a cell, 2 cores
"""

from pathlib import Path

from coerase_jax.configuration import load_config_file
from coerase_jax.toyworld import world


def get_config():
    config = load_config_file(str(Path(__file__).with_name("toyworld.py")))
    config.sweep.concepts = tuple((shape, tuple(world.concept_prompts(shape))) for shape in world.SHAPES)
    config.sweep.grid = (("erase.eta", (1.0, 2.0)),)
    return config
