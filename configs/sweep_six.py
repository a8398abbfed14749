"""Six single-shape erasures of the six-shape world (issue #21), side by side in one program, each
judged like the main job; compare with `--config.sweep.batch_concepts=false` (one after another).

    coerase sweep --config configs/sweep_six.py --out runs/sweep-six
"""

from pathlib import Path

from coerase_jax.configuration import load_config_file
from coerase_jax.toyworld import world


def get_config():
    config = load_config_file(str(Path(__file__).with_name("toyworld_six.py")))
    config.sweep.concepts = tuple((shape, tuple(world.SIX_SHAPES.concept_prompts(shape)))
                                  for shape in world.SIX_SHAPES.shapes)
    config.sweep.grid = ()
    # The settings of the comparison in docs/experiments.md (chosen before the six-shape main job's own):
    # 8 examples a step, text 2e-4, image 1.5e-4.
    config.erase.batch_size = 8
    config.text_stage.learning_rate = 2e-4
    config.image_stage.learning_rate = 1.5e-4
    return config
