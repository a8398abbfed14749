"""Joint erasure on the six-shape world (issue #21): circle, square and triangle erased into ONE
model; cross, star and diamond, not erased, must hold.

    coerase erase --config configs/joint_toyworld.py --out out/joint     # references, both stages, report

Each example of a step takes its concept in turn (``balanced``), then a prompt and a reference image
of that concept. Chosen on the dev seeds (docs/experiments.md, "Joint erasure of three shapes"): the
circle is the hardest of the three to erase and the square and triangle go easily, so the circle
gets half the examples (``joint_shares`` 2, 1, 1); 200 text steps at 2e-4, then 200 image steps at
1e-4, 8 examples a step (steps and learning rates as one erasure's: ``joint_steps_exponent`` =
``joint_lr_exponent`` = 0). On the test seeds every erased shape is within #21's bounds, but the
diamond loses 8.6 points (its bound is 5): not yet the setting #21 asks for. Eighteen more points on
dev at 256 images a group (``configs/frontier_joint.py``) found none that meets every bound and none
clearly better than this one.
"""

from pathlib import Path

from coerase_jax.configuration import load_config_file
from coerase_jax.toyworld import world

ERASED = ("circle", "square", "triangle")


def get_config():
    config = load_config_file(str(Path(__file__).with_name("toyworld_six.py")))
    config.run_dir = "runs/joint_toyworld"
    config.concept.joint = tuple((shape, tuple(world.SIX_SHAPES.concept_prompts(shape))) for shape in ERASED)
    config.concept.name = "+".join(ERASED)
    config.concept.joint_sampling = "balanced"
    config.concept.joint_shares = (2, 1, 1)
    config.erase.batch_size = 8
    config.text_stage.learning_rate = 2e-4
    config.image_stage.learning_rate = 1e-4
    return config
