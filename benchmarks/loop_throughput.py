"""Iterations per second of the real training loop (``run_erasure``), host work included.

    python benchmarks/loop_throughput.py [--steps 60] [--ddim-steps 50] [--subset full]

The tiny preset's image stage (batch 1, N = 50, references from random pixels), timed from the
second step's metrics to the last (compilation and the first step excluded) through ``on_step``.
Unlike ``coerase bench``, which times the compiled step alone, this sees what the loop adds per
step: preparing the batch, reading metrics, logging. To compare two versions of the code in one
run, point PYTHONPATH at each checkout in turn.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from PIL import Image

from coerase_jax.configuration import load_config
from coerase_jax.erase.trainer import run_erasure
from coerase_jax.models.bundle import load_bundle
from coerase_jax.parallel.mesh import make_mesh


def measure(steps: int, ddim_steps: int, subset: str) -> dict:
    bundle = load_bundle("tiny")
    with tempfile.TemporaryDirectory() as folder:
        images = Path(folder) / "refs"
        images.mkdir()
        rng = np.random.default_rng(0)
        for i in range(4):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{i}.png")
        config = load_config("configs/tiny.py", [
            f"--config.run_dir={folder}/run", f"--config.data.image_dir={images}", "--config.erase.stages=('image',)",
            f"--config.image_stage.steps={steps}", f"--config.image_stage.subset={subset}",
            "--config.erase.batch_size=1", f"--config.erase.ddim_steps={ddim_steps}",
            f"--config.checkpoint.every={steps}", "--config.log.every=1"])
        stamps, indices = [], []

        def on_step(stage, step, metrics):
            stamps.append(time.perf_counter())
            indices.append(metrics["ddim_index"])

        run_erasure(config, bundle, progress=False, mesh=make_mesh({"data": 1}, jax.devices()[:1]), on_step=on_step)
    seconds = stamps[-1] - stamps[0]
    # A step's cost grows with its random DDIM index (the z_t loop), and two versions of the code may
    # draw different indices: UNet evaluations per second (z_t loop + teacher's 2 + trainee's ~3)
    # compare them at equal work.
    evaluations = sum(i + 5 for i in indices[1:])
    return {"steps_timed": len(stamps) - 1, "seconds": round(seconds, 3),
            "iterations_per_s": round((len(stamps) - 1) / seconds, 3),
            "mean_ddim_index": round(float(np.mean(indices[1:])), 2),
            "unet_evaluations_per_s": round(evaluations / seconds, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--ddim-steps", type=int, default=50)
    parser.add_argument("--subset", default="full")
    args = parser.parse_args()
    print(json.dumps(measure(args.steps, args.ddim_steps, args.subset)))


if __name__ == "__main__":
    main()
