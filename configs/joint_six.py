"""Joint erasure on the six-shape world (issue #21): circle, square and triangle erased into ONE
model while cross, star and diamond hold.

    coerase erase --config configs/joint_six.py --out out/joint-six
"""

from pathlib import Path

from coerase_jax.configuration import load_config_file
from coerase_jax.toyworld import world


def get_config():
    config = load_config_file(str(Path(__file__).with_name("toyworld_six.py")))
    config.run_dir = "runs/joint-six"
    erased = ("circle", "square", "triangle")
    config.concept.joint = tuple((shape, tuple(world.SIX_SHAPES.concept_prompts(shape))) for shape in erased)
    config.concept.name = "+".join(erased)
    config.concept.joint_sampling = "balanced"
    return config
