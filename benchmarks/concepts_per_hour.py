"""Concepts per hour: K independent erasures batched in one program vs the same K one after another
(a script, not a test). Tiny preset, text stage, one device, both measured in this one run.

    python benchmarks/concepts_per_hour.py [--concepts 8] [--steps 20] [--subset esd-x] [--json out.json]

Sequential: one jitted single-concept step, run ``steps`` times for each of the K concepts.
Batched: the same step vmapped over K stacked concepts (``coerase_jax/erase/batched.py``), run
``steps`` times. Compilation is timed separately and left out of the rates; a real sweep compiles
once per cell sequentially (the step's shapes are the same, so a warm cache may spare it) and
once for the batch.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from coerase_jax.configuration import apply_overrides, load_config
from coerase_jax.erase.batched import batched_step, stack
from coerase_jax.erase.step import TrainState, build_step
from coerase_jax.erase.trainer import ConceptData, encode_prompts, optimizer_for, plan_stages, sample_batch, zt_plan
from coerase_jax.models.bundle import load_bundle


def _concept_data(bundle, config, prompts: tuple[str, ...]) -> ConceptData:
    return encode_prompts(bundle, apply_overrides(config.copy_and_resolve_references(),
                                                  [f"--config.concept.prompts={prompts!r}"]))


def measure(concepts: int, steps: int, subset: str, batch_size: int = 1) -> dict:
    config = load_config("configs/tiny.py", [f"--config.text_stage.subset={subset}", "--config.erase.stages=('text',)",
                                             f"--config.text_stage.steps={steps}"])
    bundle = load_bundle("tiny")
    stage = plan_stages(config)[0]
    optimizer = optimizer_for(config, stage)
    plan = zt_plan(bundle.scheduler_config, config)
    step = build_step(bundle.unet, None, plan, stage.settings, optimizer, bundle.latent_shape,
                      compose=stage.trainable.compose)
    trainable, frozen = stage.trainable.split(bundle.unet_params)
    state = TrainState(np.zeros((), np.int32), trainable, optimizer.init(trainable))
    data = [_concept_data(bundle, config, (f"a photo of concept {k}", f"concept number {k}")) for k in range(concepts)]
    batches = [[sample_batch(d, 0, stage.index, i, batch_size) for i in range(steps)] for d in data]
    teacher, proj = bundle.unet_params, {}

    one = jax.jit(step)
    t0 = time.perf_counter()
    compiled_one = one.lower(state, frozen, teacher, proj, batches[0][0]).compile()
    compile_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    for k in range(concepts):
        s = state
        for i in range(steps):
            s, metrics = compiled_one(s, frozen, teacher, proj, batches[k][i])
        jax.block_until_ready(s)
    sequential = time.perf_counter() - t0

    many = jax.jit(batched_step(step))
    stacked = stack([state] * concepts)
    stacked_batches = [stack([batches[k][i] for k in range(concepts)]) for i in range(steps)]
    t0 = time.perf_counter()
    compiled_many = many.lower(stacked, frozen, teacher, proj, stacked_batches[0]).compile()
    compile_many = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = stacked
    for i in range(steps):
        s, metrics = compiled_many(s, frozen, teacher, proj, stacked_batches[i])
    jax.block_until_ready(s)
    batched = time.perf_counter() - t0
    per_hour = lambda seconds: 3600.0 * concepts / seconds
    return {"device_kind": jax.devices()[0].device_kind, "concepts": concepts, "steps_per_concept": steps,
            "subset": subset, "batch_per_concept": batch_size,
            "trainable_params_per_concept": int(sum(np.size(x) for x in jax.tree_util.tree_leaves(trainable))),
            "sequential_s": round(sequential, 2), "batched_s": round(batched, 2),
            "compile_sequential_s": round(compile_one, 1), "compile_batched_s": round(compile_many, 1),
            "concepts_per_hour_sequential": round(per_hour(sequential), 1),
            "concepts_per_hour_batched": round(per_hour(batched), 1),
            "speedup": round(sequential / batched, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concepts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--subset", default="esd-x")
    parser.add_argument("--json")
    args = parser.parse_args()
    result = measure(args.concepts, args.steps, args.subset)
    print(json.dumps(result, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
