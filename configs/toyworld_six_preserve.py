"""The six-shape main job with the preservation term (issue #21; a DEPARTURE FROM THE PAPER): erase
"circle" while keeping the other five shapes' training prompts ("a square", "a picture of a star",
...; every judged prompt carries a colour and is never kept).

    coerase erase --config configs/toyworld_six_preserve.py --out out/toyworld-six-preserve

No setting of the paper's recipe met #18's targets on this world (``configs/toyworld_six.py``: the
square and the diamond pay). Chosen on the dev seeds at 256 images a group
(``configs/frontier_six_preserve.py``, docs/experiments.md): lambda 1, 16 examples a step, 200 text
steps at 1.25e-4 then 200 image steps at 2e-4 — the gentlest of the four points, circles at 6.6 % /
12.5 % for 3.0 points of the other shapes. The other five shapes are seen by the erasure (by name),
so its collateral figure is weaker evidence than the paper's recipe's; the report says so. On the
test seeds: 3.5 % / 10.9 %, the other five shapes -3.8 [-5.0, -2.6] points (the paper's recipe:
18.4 % / 26.2 % at -6.2).
"""

from pathlib import Path

from coerase_jax.configuration import load_config_file
from coerase_jax.toyworld import world


def get_config():
    config = load_config_file(str(Path(__file__).with_name("toyworld_six.py")))
    config.run_dir = "runs/toyworld-six-preserve"
    config.concept.preserve = tuple(p for shape in world.SIX_SHAPES.shapes if shape != "circle"
                                    for p in world.SIX_SHAPES.concept_prompts(shape))
    config.erase.preserve_weight = 1.0
    config.erase.batch_size = 16
    config.text_stage.learning_rate = 1.25e-4
    config.image_stage.learning_rate = 2e-4
    return config
