"""The main job on the six-shape world (issue #21): erase "circle"; square, triangle, cross, star
and diamond must hold.

    coerase erase --config configs/toyworld_six.py --out out/toyworld-six
"""

from pathlib import Path

from coerase_jax.configuration import load_config_file


def get_config():
    config = load_config_file(str(Path(__file__).with_name("toyworld.py")))
    config.model.source = "toyworld-six"
    config.run_dir = "runs/toyworld-six"
    return config
