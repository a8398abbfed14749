"""The main job on the six-shape world (issue #21): erase "circle"; square, triangle, cross, star
and diamond must hold.

    coerase erase --config configs/toyworld_six.py --out out/toyworld-six

The shipped world's settings (text 2e-4, image 4e-4, 8 examples a step) over-erase here: circles go
(2.7 % named) and the other five shapes lose 21 points, the square and the diamond most. Chosen on
this world's dev seeds from 12 points at 400 iterations (docs/experiments.md, "The six-shape world"):
gentler learning rates and 16 examples a step, the point that erased most for no more than ~7 points
of the other shapes. No point of that search met #18's targets on this world (<= 10 % named,
<= 20 % paraphrased, within 5 points): erasing circles here costs the square more than on three shapes.
"""

from pathlib import Path

from coerase_jax.configuration import load_config_file


def get_config():
    config = load_config_file(str(Path(__file__).with_name("toyworld.py")))
    config.model.source = "toyworld-six"
    config.run_dir = "runs/toyworld-six"
    config.erase.batch_size = 16
    config.text_stage.learning_rate = 1e-4
    config.image_stage.learning_rate = 1.5e-4
    return config
