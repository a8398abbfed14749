"""Joint erasure on the small world: circle and square erased together into ONE model; the
triangle, not erased, must hold.

    coerase erase --config configs/joint_toyworld.py --out out/joint     # references, both stages, report

The world has three shapes, so a joint erasure of all three would leave nothing to check that
the rest holds; two are erased here and the third is the control.
"""

from pathlib import Path

from coerase_jax.configuration import load_config_file
from coerase_jax.toyworld import world


def get_config():
    config = load_config_file(str(Path(__file__).with_name("toyworld.py")))
    config.run_dir = "runs/joint_toyworld"
    config.concept.joint = tuple((shape, tuple(world.concept_prompts(shape))) for shape in ("circle", "square"))
    config.concept.joint_sampling = "per_example"
    config.concept.name = "circle+square"
    return config
