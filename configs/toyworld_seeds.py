"""The default recipe over three erasure seeds, judged on the test seeds (issue #18's repeatability check).

    coerase frontier --config configs/toyworld_seeds.py --out out/toyworld-seeds

Each erasure seed is an ordinary run of ``configs/toyworld.py`` with ``erase.seed`` changed; all are
judged together by the eval suite (256 images a group, the attack included) and frontier.md ends
with the mean and the range over the seeds.
"""

from pathlib import Path

from coerase_jax.configuration import load_config_file


def get_config():
    config = load_config_file(str(Path(__file__).with_name("frontier_toyworld.py")))
    config.erase.batch_size = load_config_file(str(Path(__file__).with_name("toyworld.py"))).erase.batch_size
    config.run_dir = "runs/toyworld-seeds"
    config.report.images_per_group = 256
    stages = (("erase.stages", ("text", "image")), ("text_stage.steps", 200), ("image_stage.steps", 200))
    config.frontier.methods = (("co_erasing", stages, (("erase.seed", (0, 1, 2)),)),)
    return config
