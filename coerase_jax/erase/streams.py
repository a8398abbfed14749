"""The random streams of one erasure run, all drawn from ``erase.seed``.

Each stage has its own: its steps' keys (the DDIM index, the starting noise, the loss timestep,
the image-token noise), its batches (which prompt and reference image each example takes), and
its LoRA start. The stage's index is folded into every one of them, so the image stage does not
replay the text stage's draws; and step k of a stage always draws the same numbers, so a resumed
run replays exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import jax
import numpy as np


def _stage_roots(seed: int, stage: int) -> tuple[jax.Array, jax.Array]:
    """(root of the stage's step keys, key of its LoRA start): two independent keys."""
    return tuple(jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), stage)))


def step_key(seed: int, stage: int, step) -> jax.Array:
    """The key of step ``step`` (a Python int or a traced scalar) of stage number ``stage``."""
    return jax.random.fold_in(_stage_roots(seed, stage)[0], step)


def lora_key(seed: int, stage: int) -> jax.Array:
    """The key that draws stage ``stage``'s LoRA A factors."""
    return _stage_roots(seed, stage)[1]


def batch_rng(seed: int, stage: int, step: int) -> np.random.Generator:
    """The host-side generator that picks step ``step``'s prompts and reference images."""
    return np.random.default_rng([seed, stage, step])
