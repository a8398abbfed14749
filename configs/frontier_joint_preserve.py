"""Choosing the preservation term's weight for the joint erasure (issue #21) on the dev seeds.

    coerase frontier --config configs/frontier_joint_preserve.py --out out/frontier-joint-preserve-dev \
        --config.report.split=dev

The joint frontier (``configs/frontier_joint.py``) found no setting of the paper's recipe that erases
circle, square and triangle without costing the diamond more than 5 points (a diamond is a turned
square, and it falls to the square's erasure too). These points add the preservation term (a
departure, ``erase.preserve_weight``) at the shipped joint settings, 400 iterations each as there:
``keep_held`` keeps the three held shapes' training prompts (the colourless templates, never the
judged "a <colour> <shape>" prompts); ``keep_diamond`` keeps the diamond's alone, so the cross and the
star stay shapes the erasure never saw.

Two rounds (docs/experiments.md, "A preservation term"): keeping the three held shapes meets every
bound at weights 0.5 and 1 (and at 1 on a second erasure seed; at 2 the circle is left in 15.6 %);
keeping the diamond alone holds it and costs the cross 16 points. ``configs/joint_toyworld.py``
ships weight 1.
"""

from pathlib import Path

from coerase_jax.configuration import load_config_file
from coerase_jax.toyworld import world

ITERATIONS = 400


def kept(*shapes: str) -> tuple[str, ...]:
    return tuple(p for shape in shapes for p in world.SIX_SHAPES.concept_prompts(shape))


def get_config():
    config = load_config_file(str(Path(__file__).with_name("frontier_joint.py")))
    config.run_dir = "runs/frontier-joint-preserve"
    shipped = (("erase.stages", ("text", "image")), ("text_stage.steps", ITERATIONS // 2),
               ("image_stage.steps", ITERATIONS // 2))
    config.frontier.methods = (
        ("keep_held", shipped + (("concept.preserve", kept("cross", "star", "diamond")),),
         (("erase.preserve_weight", (1.0, 2.0)),)),
        ("keep_diamond", shipped + (("concept.preserve", kept("diamond")),),
         (("erase.preserve_weight", (1.0,)),)),
        # second round: a weaker term (the circle is near its bound at 1), and another erasure seed at 1
        ("keep_held", shipped + (("concept.preserve", kept("cross", "star", "diamond")),),
         (("erase.preserve_weight", (0.5,)),)),
        ("keep_held_seeds", shipped + (("concept.preserve", kept("cross", "star", "diamond")),),
         (("erase.preserve_weight", (1.0,)), ("erase.seed", (1,)))),
    )
    return config
