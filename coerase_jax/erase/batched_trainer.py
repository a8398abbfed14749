"""Runs that differ only in their concept, trained side by side in ONE program (for `coerase sweep`).

Per stage, every run's data is encoded as in a single run (its prompts, its reference images);
the runs' trainable parts are stacked on a leading concept axis and trained by the vmapped step
(``erase/batched.py``), split over the mesh's ``concept`` axis, with one shared copy of the frozen
UNet. A later stage's teacher is each run's own earlier result (stacked beside the shared rest).

The stacked state is checkpointed under ``group_dir/stage_<name>/`` (an interrupted group resumes
there). When a stage ends, every run directory receives an ordinary finished stage — its own
checkpoint (unstacked), ``metrics.jsonl`` and ``done.json`` — so export, eval, the report and the
sweep's skip logic treat each concept exactly like a run trained alone.

Only small trainable parts are stacked: all stages ``esd-x`` / ``esd-x-strict`` (the same in each
stage), or a LoRA (a later LoRA stage trains on top of each run's earlier LoRA, which is stacked
beside the shared base and added in the step); anything else runs one after another. The concept
axis may span hosts: every process prepares every concept's batch (cheap host work) and places only
its own devices' shards.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from coerase_jax import compile_cache
from coerase_jax.configuration import to_json
from coerase_jax.erase import lora as lora_lib
from coerase_jax.erase import subsets
from coerase_jax.erase.batched import (batched_step, concept_batch_sharding, concept_sharding, jit_batched_step,
                                       stack, to_global, unstack)
from coerase_jax.erase.step import Batch, TrainState, build_step
from coerase_jax.erase.trainer import (LaggedMetrics, MetricsLog, Preempted, _Preemption, cast_tree, check_run_dir,
                                       checkpoint_manager, encode_prompts, load_stage_trainable, optimizer_for,
                                       plan_stages, reference_embeddings, restore_checkpoint, sample_batch,
                                       save_checkpoint, stage_done, step_made_of, zt_plan)
from coerase_jax.errors import UserError
from coerase_jax.models.bundle import DTYPES, Bundle
from coerase_jax.parallel import distributed
from coerase_jax.parallel import mesh as mesh_lib

STACKABLE_SUBSETS = ("esd-x", "esd-x-strict")
PER_RUN_KEYS = ("concept", "run_dir")  # what may differ between runs trained together


def why_not_batched(cfgs: list, mesh=None) -> str | None:
    """None when these runs can train side by side (on ``mesh``), else the reason they cannot."""
    if len(cfgs) < 2:
        return "a single run"
    common = lambda c: {k: v for k, v in json.loads(to_json(c)).items() if k not in PER_RUN_KEYS}
    if any(common(c) != common(cfgs[0]) for c in cfgs[1:]):
        return "their settings differ"
    if any(c.concept.joint for c in cfgs):
        return "joint erasures"
    stages = plan_stages(cfgs[0])
    lora = cfgs[0].erase.lora_rank > 0
    if not lora and (len({s.subset for s in stages}) > 1 or stages[0].subset not in STACKABLE_SUBSETS):
        return f"subset {'/'.join(s.subset for s in stages)} (stackable: {', '.join(STACKABLE_SUBSETS)} or LoRA)"
    if mesh is not None and len(cfgs) % mesh.shape["concept"]:
        return f"the mesh's concept axis ({mesh.shape['concept']}) does not divide {len(cfgs)} runs"
    return None


def _put_stacked(batches: list[Batch], mesh) -> Batch:
    """K host batches -> one (K, B, ...) batch: concepts over ``concept``, examples over data x fsdp."""
    stacked = jax.tree_util.tree_map(lambda *leaves: np.stack(leaves), *batches)
    return to_global(stacked, jax.tree_util.tree_map(lambda leaf: concept_batch_sharding(mesh, leaf.ndim), stacked))


def train_stage_batched(stage, cfgs: list, bundle: Bundle, start_own: list[dict], frozen: dict, datas: list,
                        group_dir: Path, mesh, progress: bool = True, on_step=None,
                        earlier_loras: list[dict] | None = None) -> list[dict]:
    """One stage for K runs at once; returns each run's trained part (its subset, or its LoRA).

    ``earlier_loras``: each run's LoRA from its earlier stages (scale folded in); this stage's
    frozen weights and teacher are then base + that LoRA, as a single run's merged weights."""
    count, config = len(cfgs), cfgs[0]
    lora = stage.trainable.lora_rank > 0
    optimizer = optimizer_for(config, stage)
    teacher_dtype = DTYPES[config.erase.teacher_dtype]
    compose_frozen = None
    if lora:  # the LoRA starts from the same factors in every run (as each single run would)
        lora_start, base = stage.trainable.split(bundle.unet_params)
        trainables = [lora_start] * count
        if earlier_loras:
            frozen_in = teacher = (stack(earlier_loras), base)
            compose_frozen = lambda earlier, base: lora_lib.apply_lora(base, earlier, 1.0)
            compose_teacher = lambda earlier, base: cast_tree(compose_frozen(earlier, base), teacher_dtype)
        else:
            teacher, compose_teacher, frozen_in = cast_tree(base, teacher_dtype), None, base
    else:  # each run's teacher: its own subset before this stage, joined to the shared rest
        trainables = start_own
        teacher = (cast_tree(stack(start_own), teacher_dtype), cast_tree(frozen, teacher_dtype))
        compose_teacher, frozen_in = subsets.merge, frozen
    proj_params = bundle.image.proj_params if bundle.image is not None else {}
    plan = zt_plan(bundle.scheduler_config, config)
    batch_size = config.erase.batch_size
    mesh_lib.batch_size_per_replica_check(batch_size, mesh)

    init = stack([TrainState(jnp.zeros((), jnp.int32), t, optimizer.init(t)) for t in trainables])
    stage_dir = group_dir / f"stage_{stage.name}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    manager = checkpoint_manager(stage_dir, config)
    step_fn = build_step(bundle.unet, bundle.image.proj if bundle.image else None, plan, stage.settings, optimizer,
                         bundle.latent_shape, None, compose=stage.trainable.compose)
    sample = lambda step: [sample_batch(d, c.erase.seed, stage.index, step, batch_size) for d, c in zip(datas, cfgs)]
    example = _put_stacked(sample(0), mesh)
    shard = lambda tree: to_global(tree, mesh_lib.tree_shardings(tree, mesh))
    on_concepts = lambda tree: jax.tree_util.tree_map(lambda leaf: concept_sharding(mesh, leaf.ndim), tree)
    place = lambda tree, per_concept: ((to_global(tree[0], on_concepts(tree[0])), shard(tree[1]))
                                       if per_concept else shard(tree))
    frozen_in, proj_params = place(frozen_in, compose_frozen is not None), shard(proj_params)
    teacher = place(teacher, compose_teacher is not None)
    jitted = jit_batched_step(batched_step(step_fn, compose_teacher, compose_frozen), mesh, init, frozen_in, teacher,
                              proj_params, example, teacher_per_concept=compose_teacher is not None,
                              frozen_per_concept=compose_frozen is not None)
    state_sh = on_concepts(init)
    abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), init, state_sh)
    state = restore_checkpoint(manager, abstract)
    state = to_global(init, state_sh) if state is None else state
    start_step = int(distributed.fetch(state.step)[0])
    if start_step:
        print(f"[{stage.name}] {count} runs side by side: resuming from step {start_step}")
    started = time.perf_counter()
    compiled, how = compile_cache.compile_program(jitted, (state, frozen_in, teacher, proj_params, example),
                                                  step_made_of(cfgs, stage, plan, bundle),
                                                  f"step-{stage.name}-x{count}")
    print(f"[{stage.name}] {count} runs side by side: {how} the step in {time.perf_counter() - started:.1f}s")

    for c in cfgs:
        (Path(c.run_dir) / f"stage_{stage.name}").mkdir(parents=True, exist_ok=True)
    logs = [MetricsLog(Path(c.run_dir) / f"stage_{stage.name}", stage.name, start_step) for c in cfgs]
    meta = {"seed": config.erase.seed, "stage": stage.name, "runs": [c.run_dir for c in cfgs]}
    losses = [None] * count
    bar = tqdm(total=stage.steps, initial=start_step, desc=f"erase[{stage.name}] x{count}", unit="it",
               disable=not progress or not distributed.is_leader())

    def record(done: int, metrics: dict, seconds: float) -> None:
        per_run = [{k: float(np.asarray(v)[i]) for k, v in metrics.items()} for i in range(count)]
        bad = [c.run_dir for c, m in zip(cfgs, per_run) if not math.isfinite(m["loss"])]
        if bad:
            manager.wait_until_finished()
            raise UserError(f"non-finite loss at step {done} of the {stage.name} stage in {', '.join(bad)}; "
                            f"the last checkpoint (step {manager.latest_step()}) is intact")
        for i, m in enumerate(per_run):
            m["step_s"] = seconds
            losses[i] = m["loss"]
            if done % config.log.every == 0 or done == stage.steps:
                logs[i].write(done, m)
            if on_step is not None:
                on_step(i, stage.name, done, m)
        bar.update(1)
        bar.set_postfix(loss=f"{np.mean(losses):.4g}")

    lagged = LaggedMetrics(record)
    try:
        with _Preemption() as preemption:
            batch = _put_stacked(sample(start_step), mesh) if start_step < stage.steps else None
            for step in range(start_step, stage.steps):
                done = step + 1
                state, metrics = compiled(state, frozen_in, teacher, proj_params, batch)  # (asynchronous)
                lagged.dispatched(done, metrics)  # reads the previous step's metrics while this one runs
                if done < stage.steps:
                    batch = _put_stacked(sample(done), mesh)
                if done % config.checkpoint.every == 0 or done == stage.steps or preemption.requested:
                    lagged.read_now()  # only a state whose losses are finite is saved
                    save_checkpoint(manager, state, {**meta, "data_position": done})
                if preemption.requested:
                    manager.wait_until_finished()
                    raise Preempted(f"SIGTERM: saved the group's checkpoint at step {done} of the {stage.name} "
                                    f"stage in {stage_dir}; run the same command again to resume")
    finally:
        bar.close()
        for log in logs:
            log.close()
        manager.wait_until_finished()
        manager.close()

    # Hand each run its own finished stage, as if it had trained alone.
    final = unstack(distributed.fetch(state), count)
    for c, run_state, loss in zip(cfgs, final, losses):
        run_stage = Path(c.run_dir) / f"stage_{stage.name}"
        run_manager = checkpoint_manager(run_stage, c)
        save_checkpoint(run_manager, run_state, {"seed": c.erase.seed, "stage": stage.name,
                                                 "data_position": stage.steps, "trained_with": meta["runs"]})
        run_manager.wait_until_finished()
        run_manager.close()
        if distributed.is_leader():
            (run_stage / "done.json").write_text(json.dumps({"steps": stage.steps, "final_loss": loss,
                                                             "trained_side_by_side_with": len(cfgs)}))
    return [s.trainable for s in final]


def run_batched(cfgs: list, bundle: Bundle, group_dir: str | Path, progress: bool = True, mesh=None,
                on_step=None) -> None:
    """Every stage of K runs that ``why_not_batched`` accepts, side by side; each run directory
    ends up finished exactly as ``run_erasure`` would leave it."""
    mesh = mesh or mesh_lib.make_mesh(dict(cfgs[0].mesh))
    reason = why_not_batched(cfgs, mesh)
    if reason:
        raise UserError(f"these runs cannot train side by side: {reason}")
    group_dir = Path(group_dir)
    for c in cfgs:
        check_run_dir(Path(c.run_dir), c)
    stages = plan_stages(cfgs[0])
    datas = [encode_prompts(bundle, c) for c in cfgs]
    unfinished = [s for s in stages if not all(stage_done(s, Path(c.run_dir)) for c in cfgs)]
    if any(s.settings.use_image for s in unfinished):
        bundle.require_image_parts()
        for d, c in zip(datas, cfgs):
            d.image_embeds = reference_embeddings(c, bundle, Path(c.run_dir), progress, mesh)
    own, frozen = stages[0].trainable.split(bundle.unet_params)
    owns = [own] * len(cfgs)
    earlier_loras = [[] for _ in cfgs]  # each run's finished LoRA stages, scale folded in
    for stage in stages:
        if all(stage_done(stage, Path(c.run_dir)) for c in cfgs):
            print(f"[{stage.name}] already finished for all {len(cfgs)} runs; loading their results")
            starts = [stage.trainable.compose(o, frozen) for o in owns] if not stage.trainable.lora_rank \
                else [bundle.unet_params] * len(cfgs)
            owns = [load_stage_trainable(stage, c, s, Path(c.run_dir))[0] for c, s in zip(cfgs, starts)]
        else:
            owns = train_stage_batched(stage, cfgs, bundle, owns, frozen, datas, group_dir, mesh, progress,
                                       None if on_step is None else lambda i, *a: on_step(cfgs[i].run_dir, *a),
                                       [lora_lib.concatenate(e) for e in earlier_loras] if earlier_loras[0] else None)
        if stage.trainable.lora_rank:
            for earlier, own in zip(earlier_loras, owns):
                earlier.append(lora_lib.scaled(own, stage.trainable.lora_scale))
