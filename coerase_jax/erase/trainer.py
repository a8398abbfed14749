"""The erasure run: stages, data, the step loop, Orbax checkpoints, metrics, resume.

A run directory holds everything of one run::

    run_dir/config.json                 the resolved config (a different config refuses to resume)
    run_dir/references/                 generated reference images + manifest + embedding cache
    run_dir/stage_<name>/checkpoints/   Orbax: train state (step, trainable params, optimizer
                                        state) + JSON metadata (seed, data position)
    run_dir/stage_<name>/damaged_checkpoints/   checkpoints that did not read, moved aside on resume
    run_dir/stage_<name>/metrics.jsonl  one line per step; TensorBoard events beside it
    run_dir/stage_<name>/done.json      written when the stage finished

Every step's randomness and its batch come from the stage's own stream (``streams.py``: the seed,
the stage's index and the step), so resuming from step k replays exactly what an uninterrupted run
would have done, and the image stage does not replay the text stage's draws. SIGTERM (pre-emption)
saves a checkpoint and exits; a non-finite loss stops the run without saving, leaving the last
checkpoint intact; a checkpoint that does not read is skipped for the one before it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from tqdm.auto import tqdm

from coerase_jax import compile_cache
from coerase_jax.configuration import config_from_run, to_json
from coerase_jax.diffusion.schedule import NoiseSchedule
from coerase_jax.erase import lora, streams, subsets
from coerase_jax.erase.method import real_token_mask
from coerase_jax.erase.step import Batch, StepSettings, TrainState, build_step, jit_step, make_optimizer
from coerase_jax.erase.trainable import Trainable
from coerase_jax.errors import UserError
from coerase_jax.models.bundle import DTYPES, Bundle
from coerase_jax.parallel import distributed
from coerase_jax.parallel import mesh as mesh_lib

STAGES = ("text", "image")
# Config sections that may change between a run and its resumption (they do not change the math).
RESUMABLE_CHANGES = ("checkpoint", "log", "report", "sample", "bench", "sweep", "eval", "compile", "frontier")


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str  # "text" (ESD, text only) | "image" (Co-Erasing image stage)
    index: int  # its place in erase.stages (its random stream)
    subset: str
    steps: int
    learning_rate: float
    settings: StepSettings
    trainable: Trainable  # what the stage trains (the subset's weights, or a LoRA of them)


def plan_stages(config) -> list[Stage]:
    e = config.erase
    if not e.stages or any(s not in STAGES for s in e.stages):
        raise UserError(f"erase.stages must be a non-empty sequence of {STAGES}, got {tuple(e.stages)}")
    out = []
    for index, name in enumerate(e.stages):
        section = config.text_stage if name == "text" else config.image_stage
        image = name == "image"
        settings = StepSettings(
            use_image=image, eta=e.eta, text_uncond=e.text_uncond, zt_sampler=e.zt_sampler,
            zt_guidance=e.zt_guidance, zt_image_tokens=e.zt_image_tokens, timestep_pairing=e.timestep_pairing,
            # the blur is the image stage's (the reference's text stage never blurs z_t)
            blur_kernel=e.blur_kernel if image else 0, blur_sigma=e.blur_sigma, refine=e.refine,
            embed_noise=e.embed_noise, embed_noise_kind=e.embed_noise_kind, image_scale=e.image_scale,
            snapshots_per_trajectory=e.snapshots_per_trajectory, preserve_weight=float(e.preserve_weight),
            seed=e.seed, stage=index)
        if section.steps < 1:
            raise UserError(f"{name}_stage.steps must be positive")
        if e.lora_rank < 0:
            raise UserError(f"erase.lora_rank must be 0 (off) or positive, got {e.lora_rank}")
        subset = subsets.resolve(section.subset)
        scale = (e.lora_alpha or e.lora_rank) / e.lora_rank if e.lora_rank else 1.0
        trainable = Trainable(subset, e.train_image_kv, int(e.lora_rank), float(scale), e.seed, index)
        steps, learning_rate = joint_scaled(config, int(section.steps), float(section.learning_rate))
        out.append(Stage(name, index, subset, steps, learning_rate, settings, trainable))
    return out


def program_config(config) -> dict:
    """The config sections the compiled step is made of (the rest only say where and how often)."""
    return {name: config[name] for name in ("model", "erase", "text_stage", "image_stage", "optim", "mesh")}


def step_made_of(configs: list, stage: Stage, plan, bundle: Bundle) -> tuple:
    """What the step's closures read besides its arguments: the key of its kept executable."""
    return ([program_config(c) for c in configs], stage, plan, bundle.unet,
            bundle.image.proj if bundle.image else None, bundle.latent_shape)


def zt_plan(scheduler_config: dict, config):
    """How a step samples z_t: ``erase.ddim_steps`` steps of ``erase.zt_scheduler`` (ddim | ddpm)."""
    return NoiseSchedule.from_config(scheduler_config).plan(config.erase.ddim_steps, config.erase.zt_scheduler)


def optimizer_for(config, stage: Stage):
    o = config.optim
    return make_optimizer(o.name, stage.learning_rate, stage.steps, o.schedule, o.warmup_steps, o.clip_norm,
                          o.weight_decay, first_moment_dtype=o.first_moment_dtype)


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class ConceptData:
    """Everything a step gathers from, encoded once: prompt states and image embeddings."""

    prompt_states: np.ndarray  # (P, L, D) concept prompts
    uncond_states: np.ndarray  # (L, D) the empty prompt c_0 (or erase.anchor_prompt in its place)
    guide_states: np.ndarray  # (P, L, D) refinement guide per prompt
    guide_masks: np.ndarray  # (P, L)
    image_embeds: np.ndarray | None  # (N, E)
    # Joint erasure of K concepts: which concept each prompt / image belongs to (None: one concept).
    prompt_concept: np.ndarray | None = None  # (P,)
    image_concept: np.ndarray | None = None  # (N,)
    joint_sampling: str = "per_example"  # how a step's examples pick their concepts (concept.joint_sampling)
    joint_shares: tuple[int, ...] = ()  # each concept's share of the examples (concept.joint_shares; () = equal)
    # SDXL's added conditioning (pooled text + time ids) of each prompt and of the empty prompt
    prompt_added: np.ndarray | None = None  # (P, A)
    uncond_added: np.ndarray | None = None  # (A,)
    # concept.preserve: the prompts whose predictions are kept (None: no preservation term)
    kept_states: np.ndarray | None = None  # (Q, L, D)
    kept_added: np.ndarray | None = None  # (Q, A)


def joint_concepts(config) -> list[tuple[str, tuple[str, ...]]]:
    """``concept.joint`` as [(name, prompts)], checked; [] when the run erases one concept."""
    entries = list(config.concept.joint)
    out = []
    for entry in entries:
        if (len(entry) != 2 or not isinstance(entry[0], str) or not entry[0] or isinstance(entry[1], str)
                or not entry[1] or not all(isinstance(p, str) and p for p in entry[1])):
            raise UserError(f"concept.joint entries must be (name, (prompt, ...)), got {entry!r}")
        if "/" in entry[0] or entry[0].startswith("."):
            raise UserError(f"concept.joint name {entry[0]!r} must be a plain folder name")
        out.append((entry[0], tuple(entry[1])))
    if len({name for name, _ in out}) != len(out):
        raise UserError("concept.joint names repeat")
    if config.concept.joint_sampling not in JOINT_SAMPLING:
        raise UserError(f"concept.joint_sampling must be one of {', '.join(JOINT_SAMPLING)}, "
                        f"got {config.concept.joint_sampling!r}")
    shares = tuple(config.concept.joint_shares)
    if shares and (len(shares) != len(out) or not all(isinstance(w, int) and w > 0 for w in shares)):
        raise UserError(f"concept.joint_shares must be one whole number > 0 per concept.joint entry "
                        f"({len(out)}), or empty; got {shares!r}")
    return out


JOINT_SAMPLING = ("per_example", "per_step", "balanced")


def joint_scaled(config, steps: int, learning_rate: float) -> tuple[int, float]:
    """A stage's steps and learning rate for a joint erasure of K concepts (unchanged for one):
    steps * K**concept.joint_steps_exponent, learning_rate * K**concept.joint_lr_exponent."""
    count = max(1, len(config.concept.joint))
    return (max(1, round(steps * count ** config.concept.joint_steps_exponent)),
            learning_rate * count ** config.concept.joint_lr_exponent)


def encode_prompts(bundle: Bundle, config) -> ConceptData:
    joint = joint_concepts(config)
    prompts = [p for _, ps in joint for p in ps] if joint else list(config.concept.prompts)
    if not prompts:
        raise UserError("concept.prompts is empty")
    guide = config.concept.guide_prompt
    encode = jax.jit(bundle.encode_conditioning)
    ids = bundle.tokenize(prompts)
    states, added = jax.device_get(encode(bundle.text_params, ids))
    # c_0: the encoded empty prompt, or SDXL's zeros (Bundle.unconditional). DEPARTURE FROM THE PAPER
    # when erase.anchor_prompt is set (off by default): the anchor takes the empty prompt's place, so
    # the concept is pushed towards the anchor's pictures instead of away into whatever the
    # unconditional model draws.
    anchor = config.erase.anchor_prompt
    uncond, uncond_added = jax.device_get(jax.jit(bundle.unconditional, static_argnums=2)(
        bundle.text_params, bundle.tokenize([anchor]), not anchor))
    guide_ids = bundle.tokenize([guide] * len(prompts)) if guide else ids
    guide_states = np.asarray(encode(bundle.text_params, guide_ids)[0]) if guide else states
    # (SDXL's towers tokenize alike up to their padding: the first tower's ids mark the real tokens)
    mask_ids = guide_ids[:, 0] if guide_ids.ndim == 3 else guide_ids
    if config.erase.refine_mask_padding:
        masks = np.asarray(real_token_mask(jnp.asarray(mask_ids), bundle.tokenizer.eos_token_id))
    else:
        masks = np.ones(mask_ids.shape, bool)
    data = ConceptData(np.asarray(states), np.asarray(uncond)[0], np.asarray(guide_states), masks, None,
                       prompt_added=added, uncond_added=None if uncond_added is None else uncond_added[0])
    kept = preserved_prompts(config)
    if kept:
        kept_states, kept_added = jax.device_get(encode(bundle.text_params, bundle.tokenize(kept)))
        data.kept_states = np.asarray(kept_states)
        data.kept_added = None if kept_added is None else np.asarray(kept_added)
    if joint:
        data.prompt_concept = np.asarray([k for k, (_, ps) in enumerate(joint) for _ in ps])
        data.joint_sampling = config.concept.joint_sampling
        data.joint_shares = tuple(config.concept.joint_shares)
    return data


def preserved_prompts(config) -> list[str]:
    """``concept.preserve``, checked against ``erase.preserve_weight`` (each needs the other) and
    against the prompts being erased (a prompt cannot be both)."""
    kept = config.concept.preserve
    if not all(isinstance(p, str) and p for p in kept):  # (the config types it as a tuple)
        raise UserError(f"concept.preserve must be a tuple of prompts, got {kept!r}")
    if bool(kept) != (config.erase.preserve_weight > 0):
        raise UserError("concept.preserve and erase.preserve_weight go together: give both prompts to keep "
                        f"and a weight > 0, or neither (got {len(kept)} prompts, weight {config.erase.preserve_weight})")
    erased = {p for _, ps in joint_concepts(config) for p in ps} or set(config.concept.prompts)
    if both := sorted(erased.intersection(kept)):
        raise UserError(f"concept.preserve keeps prompts that are being erased: {', '.join(both)}")
    return list(kept)


def shared_turns(shares: tuple[int, ...]) -> np.ndarray:
    """One cycle of ``balanced`` turns: concept k comes shares[k] times in sum(shares) examples, each
    as evenly spread as it can be (every next turn goes to the concept furthest behind its share)."""
    shares = np.asarray(shares, np.float64)
    given, turns = np.zeros(len(shares)), []
    for t in range(1, int(shares.sum()) + 1):
        k = int(np.argmax(t * shares / shares.sum() - given))
        given[k] += 1
        turns.append(k)
    return np.asarray(turns)


def sample_batch(data: ConceptData, seed: int, stage: int, step: int, batch_size: int) -> Batch:
    """The step's examples: prompt and image indices drawn from (seed, stage index, step) alone. In a
    joint erasure each example first gets a concept (its own draw, the step's draw, or the next in
    turn for ``balanced``), then draws a prompt and a reference image of that same concept."""
    rng = streams.batch_rng(seed, stage, step)
    if data.prompt_concept is None:
        p = rng.integers(0, len(data.prompt_states), batch_size)
        images = None
        if data.image_embeds is not None:
            images = data.image_embeds[rng.integers(0, len(data.image_embeds), batch_size)]
    else:
        count = int(data.prompt_concept.max()) + 1
        shares = np.asarray(data.joint_shares or (1,) * count)
        if data.joint_sampling == "balanced":  # example j of step s: turn (s * B + j) of the cycle of shares
            turns = shared_turns(tuple(shares))
            concepts = turns[(step * batch_size + np.arange(batch_size)) % len(turns)]
        elif data.joint_shares:
            size = 1 if data.joint_sampling == "per_step" else batch_size
            concepts = np.broadcast_to(rng.choice(count, size, p=shares / shares.sum()), (batch_size,))
        elif data.joint_sampling == "per_step":
            concepts = np.full(batch_size, rng.integers(0, count))
        else:
            concepts = rng.integers(0, count, batch_size)
        p = np.asarray([rng.choice(np.flatnonzero(data.prompt_concept == k)) for k in concepts])
        images = None
        if data.image_embeds is not None:
            images = data.image_embeds[[rng.choice(np.flatnonzero(data.image_concept == k)) for k in concepts]]
    added = uncond_added = None
    if data.prompt_added is not None:
        added = data.prompt_added[p]
        uncond_added = np.broadcast_to(data.uncond_added, added.shape)
    kept_text = kept_added = None
    if data.kept_states is not None:  # drawn last, so the erasure's own draws are those of a run without
        q = rng.integers(0, len(data.kept_states), batch_size)
        kept_text = data.kept_states[q]
        kept_added = None if data.kept_added is None else data.kept_added[q]
    return Batch(data.prompt_states[p], np.broadcast_to(data.uncond_states, data.prompt_states[p].shape),
                 data.guide_states[p], data.guide_masks[p], images, added, uncond_added, kept_text, kept_added)


def put_batch(batch: Batch, mesh) -> Batch:
    """Host arrays -> global arrays sharded over data x fsdp (each process passes its own rows)."""
    sharding = mesh_lib.batch_sharding(mesh)
    n, i = jax.process_count(), jax.process_index()

    def put(array):
        if array is None:
            return None
        rows = len(array) // n
        return jax.make_array_from_process_local_data(sharding, np.asarray(array[i * rows:(i + 1) * rows]),
                                                      array.shape)

    return Batch(*(put(a) for a in batch))


# --------------------------------------------------------------------------- checkpoints


def checkpoint_manager(stage_dir: Path, config) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(max_to_keep=config.checkpoint.keep,
                                           enable_async_checkpointing=config.checkpoint.async_save)
    return ocp.CheckpointManager(stage_dir.resolve() / "checkpoints", options=options)


def save_checkpoint(manager: ocp.CheckpointManager, state: TrainState, meta: dict) -> None:
    step = int(np.ravel(distributed.fetch(state.step))[0])  # (a stacked state has one step per concept, all equal)
    if step in manager.all_steps():
        return
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave({**meta, "step": step})))


DAMAGED = "damaged_checkpoints"  # beside checkpoints/: unreadable ones moved aside, never deleted


def restore_checkpoint(manager: ocp.CheckpointManager, abstract_state, set_aside: bool = True) -> TrainState | None:
    """The newest checkpoint that reads (None when there is none yet).

    One that does not read (a damaged file, a write cut short on a lost host) is skipped with a
    message saying why; the run goes on from the one before it. With ``set_aside`` the skipped
    ones are moved to ``damaged_checkpoints/`` beside ``checkpoints/`` (never deleted), so the run
    can save those steps again. When none reads, nothing is moved and the error says why."""
    steps = sorted(manager.all_steps(), reverse=True)
    failures = []
    for step in steps:
        try:
            restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
        except Exception as err:  # Orbax and TensorStore raise many kinds for damaged data; each is named
            reason = " ".join(f"{type(err).__name__}: {err}".split())[:300]
            failures.append((step, reason))
            print(f"checkpoint {step} in {manager.directory} does not read ({reason}); trying the one before it",
                  flush=True)
            continue
        if failures and set_aside:
            _set_aside([s for s, _ in failures], Path(manager.directory))
            manager.reload()
        if failures:
            print(f"resuming from checkpoint {step} (skipped {', '.join(str(s) for s, _ in failures)})", flush=True)
        return restored["state"]
    if failures:
        raise UserError(f"no checkpoint in {manager.directory} reads (" +
                        "; ".join(f"step {s}: {r}" for s, r in failures) + "). Nothing was moved or deleted; "
                        "move the checkpoints folder aside to start the stage again")
    return None


def _set_aside(steps: list[int], checkpoints: Path) -> None:
    """Moves unreadable checkpoint folders to ``damaged_checkpoints/<step>`` (process 0 moves; all wait)."""
    if distributed.is_leader():
        damaged = checkpoints.parent / DAMAGED
        damaged.mkdir(exist_ok=True)
        for step in steps:
            target = damaged / str(step)
            suffix = 1
            while target.exists():  # (damaged twice: keep both)
                target, suffix = damaged / f"{step}.{suffix}", suffix + 1
            (checkpoints / str(step)).rename(target)
            print(f"moved the unreadable checkpoint {step} to {target}", flush=True)
    distributed.barrier("damaged checkpoints set aside")


class _Preemption:
    """Turns SIGTERM into a flag the loop checks after each step (then it saves and exits)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, pre-emption then kills as usual
            self._previous = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class Preempted(Exception):
    """Raised after a SIGTERM-triggered checkpoint; the CLI exits with status 143."""


# --------------------------------------------------------------------------- logging


class LaggedMetrics:
    """Reads each step's metrics one step late, so the host never waits for the step it just
    dispatched: after dispatching step k it reads step k - 1's numbers (done or nearly) and then
    prepares step k + 1's batch while the device works. ``read_now()`` reads the pending step at
    once (before a checkpoint is saved, so that only a state with a finite loss is ever saved).

    ``handle(done, metrics, seconds)`` gets each step's metrics as host numbers, in order, with the
    time since the previous step's were read."""

    def __init__(self, handle):
        self.handle = handle
        self.pending = None
        self.last_read = time.perf_counter()

    def dispatched(self, done: int, metrics) -> None:
        self.read_now()
        self.pending = (done, metrics)

    def read_now(self) -> None:
        if self.pending is None:
            return
        (done, metrics), self.pending = self.pending, None
        host = distributed.fetch(metrics)  # (a side-by-side group's metrics may be spread over hosts)
        now = time.perf_counter()
        seconds, self.last_read = now - self.last_read, now
        self.handle(done, host, seconds)


class MetricsLog:
    """metrics.jsonl plus TensorBoard event files; only process 0 writes."""

    def __init__(self, folder: Path, stage: str, start_step: int):
        self.enabled = distributed.is_leader()
        self.stage = stage
        if self.enabled:
            from tensorboardX import SummaryWriter

            path = folder / "metrics.jsonl"
            if path.is_file():  # a resumed run replays the steps after its checkpoint: drop their old lines
                kept = [line for line in path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] <= start_step]
                path.write_text("".join(line + "\n" for line in kept))
            self.jsonl = open(path, "a")
            self.tb = SummaryWriter(str(folder / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"stage": self.stage, "step": step, **metrics}) + "\n")
        self.jsonl.flush()
        for name, value in metrics.items():
            self.tb.add_scalar(f"{self.stage}/{name}", value, step)

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


# --------------------------------------------------------------------------- the run


def check_run_dir(run_dir: Path, config) -> None:
    """A run directory holds one config; resuming with a different one is refused. Keys added to
    the project since the run was made count as their defaults (the behaviour of that time)."""
    saved = run_dir / "config.json"
    current = json.loads(to_json(config))
    if saved.is_file():
        previous = json.loads(to_json(config_from_run(str(run_dir))))
        strip = lambda c: {k: v for k, v in c.items() if k not in RESUMABLE_CHANGES}
        if strip(previous) != strip(current):
            diff = sorted(k for k in set(previous) | set(current) if previous.get(k) != current.get(k)
                          and k not in RESUMABLE_CHANGES)
            raise UserError(f"{run_dir} holds a run with a different config (sections {diff}); use a new "
                            f"run_dir or the same config to resume it")
    if distributed.is_leader():
        run_dir.mkdir(parents=True, exist_ok=True)
        tmp = saved.with_name(".config.json.tmp")
        tmp.write_text(json.dumps(current, indent=2, sort_keys=True))
        tmp.replace(saved)
    distributed.barrier("run directory checked")


def cast_tree(tree, dtype):
    return jax.tree_util.tree_map(lambda x: x.astype(dtype), tree)


def train_stage(stage: Stage, config, bundle: Bundle, start_params: dict, teacher_params: dict,
                data: ConceptData, run_dir: Path, mesh, progress: bool = True, on_step=None) -> dict:
    """Trains one stage to completion (resuming from its checkpoints) and returns the full params.

    ``on_step(stage_name, step, metrics)`` is called after every step (for monitors and tests)."""
    stage_dir = run_dir / f"stage_{stage.name}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    optimizer = optimizer_for(config, stage)
    trainable, frozen = stage.trainable.split(start_params)
    teacher_dtype = DTYPES.get(config.erase.teacher_dtype)
    if teacher_dtype is None:
        raise UserError(f"erase.teacher_dtype must be one of {sorted(DTYPES)}")
    teacher = cast_tree(teacher_params, teacher_dtype)
    proj_params = bundle.image.proj_params if bundle.image is not None else {}
    if stage.settings.use_image:
        bundle.require_image_parts()
    plan = zt_plan(bundle.scheduler_config, config)
    batch_size = config.erase.batch_size
    mesh_lib.batch_size_per_replica_check(batch_size, mesh)

    # Lay everything out on the mesh.
    shard = lambda tree: jax.device_put(tree, mesh_lib.tree_shardings(tree, mesh))
    frozen, teacher, proj_params = shard(frozen), shard(teacher), shard(proj_params)
    init_state = lambda t: TrainState(jnp.zeros((), jnp.int32), t, optimizer.init(t))
    abstract_state = jax.eval_shape(init_state, trainable)
    state_shardings = mesh_lib.tree_shardings(abstract_state, mesh)
    manager = checkpoint_manager(stage_dir, config)
    abstract_with_sh = jax.tree_util.tree_map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_shardings)
    state = restore_checkpoint(manager, abstract_with_sh)
    if state is None:
        state = jax.jit(init_state, out_shardings=state_shardings)(trainable)
    start_step = int(state.step)
    if start_step:
        print(f"[{stage.name}] resuming from step {start_step}")

    step_fn = build_step(bundle.unet, bundle.image.proj if bundle.image else None, plan, stage.settings,
                         optimizer, bundle.latent_shape, mesh, compose=stage.trainable.compose)
    example = put_batch(sample_batch(data, config.erase.seed, stage.index, 0, batch_size), mesh)
    jitted = jit_step(step_fn, mesh, abstract_state, frozen, teacher, proj_params, example)
    compile_start = time.perf_counter()
    compiled, how = compile_cache.compile_program(jitted, (state, frozen, teacher, proj_params, example),
                                                  step_made_of([config], stage, plan, bundle), f"step-{stage.name}")
    print(f"[{stage.name}] {how} the step in {time.perf_counter() - compile_start:.1f}s "
          f"({sum(x.size for x in jax.tree_util.tree_leaves(trainable)):,} trainable parameters, "
          f"subset {stage.subset}{f', LoRA rank {stage.trainable.lora_rank}' if stage.trainable.lora_rank else ''})")

    meta = {"seed": config.erase.seed, "stage": stage.name, "data_position": None}
    log = MetricsLog(stage_dir, stage.name, start_step)
    final_loss = None
    bar = tqdm(total=stage.steps, initial=start_step, desc=f"erase[{stage.name}]", unit="it",
               disable=not progress or not distributed.is_leader())

    def record(done: int, metrics: dict, seconds: float) -> None:
        nonlocal final_loss
        metrics = {k: float(v) for k, v in metrics.items()} | {"step_s": seconds}
        if not math.isfinite(metrics["loss"]):
            manager.wait_until_finished()
            raise UserError(f"non-finite loss ({metrics['loss']}) at step {done} of the {stage.name} stage; "
                            f"nothing was saved after it, the last checkpoint (step {manager.latest_step()}) "
                            f"is intact. Lower the learning rate or check the inputs.")
        final_loss = metrics["loss"]
        if done % config.log.every == 0 or done == stage.steps:
            log.write(done, metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4g}")
        if on_step is not None:
            on_step(stage.name, done, metrics)

    lagged = LaggedMetrics(record)
    next_batch = lambda step: put_batch(sample_batch(data, config.erase.seed, stage.index, step, batch_size), mesh)
    try:
        with _Preemption() as preemption:
            batch = next_batch(start_step) if start_step < stage.steps else None
            for step in range(start_step, stage.steps):
                done = step + 1
                state, metrics = compiled(state, frozen, teacher, proj_params, batch)  # (asynchronous)
                lagged.dispatched(done, metrics)  # reads step `step`'s metrics while this one runs
                if done < stage.steps:
                    batch = next_batch(done)
                if done % config.checkpoint.every == 0 or done == stage.steps or preemption.requested:
                    lagged.read_now()  # only a state whose loss is finite is saved
                    save_checkpoint(manager, state, {**meta, "data_position": done})
                if preemption.requested:
                    manager.wait_until_finished()
                    raise Preempted(f"SIGTERM: saved a checkpoint at step {done} of the {stage.name} stage in "
                                    f"{stage_dir}; run the same command again to resume")
    finally:
        bar.close()
        log.close()
        manager.wait_until_finished()
        manager.close()
    if distributed.is_leader():
        (stage_dir / "done.json").write_text(json.dumps({"steps": stage.steps, "final_loss": final_loss}))
    distributed.barrier(f"stage {stage.name} done")
    return stage.trainable.compose(distributed.fetch(state.trainable), distributed.fetch(frozen))


def load_stage_result(stage: Stage, config, start_params: dict, run_dir: Path) -> dict:
    """The full params a finished stage ended with (from its last checkpoint)."""
    trainable, frozen = load_stage_trainable(stage, config, start_params, run_dir)
    return stage.trainable.compose(trainable, frozen)


def load_stage_trainable(stage: Stage, config, start_params: dict, run_dir: Path) -> tuple[dict, dict]:
    """(trained part, frozen part) of a finished stage, from its last checkpoint."""
    stage_dir = run_dir / f"stage_{stage.name}"
    optimizer = optimizer_for(config, stage)
    trainable, frozen = stage.trainable.split(start_params)
    abstract = jax.eval_shape(lambda t: TrainState(jnp.zeros((), jnp.int32), t, optimizer.init(t)), trainable)
    # Restored whole on every device (on several hosts Orbax needs a sharding to restore into).
    everywhere = mesh_lib.replicated(mesh_lib.make_mesh({"data": -1}))
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=everywhere), abstract)
    manager = checkpoint_manager(stage_dir, config)
    try:
        state = restore_checkpoint(manager, abstract, set_aside=False)  # (reading only: nothing moves)
    finally:
        manager.close()
    if state is None or int(state.step) != stage.steps:
        hint = ("remove its done.json and run `coerase erase` with this config again: it resumes from the newest "
                "checkpoint that reads" if (stage_dir / "done.json").is_file() else
                "run `coerase erase` with this config first")
        raise UserError(f"{stage_dir} has no finished, readable checkpoint ({hint})")
    return distributed.fetch(state.trainable), frozen


def final_lora(config, bundle: Bundle) -> dict:
    """The LoRA factors of every stage of a finished LoRA run as one update (scale 1): the stages'
    updates add up on the same kernels, so their factors concatenate along the rank."""
    run_dir, params, per_stage = Path(config.run_dir), bundle.unet_params, []
    for stage in plan_stages(config):
        if not stage.trainable.lora_rank:
            raise UserError(f"the {stage.name} stage of {run_dir} did not train a LoRA (erase.lora_rank is 0)")
        trainable, frozen = load_stage_trainable(stage, config, params, run_dir)
        per_stage.append(lora.scaled(trainable, stage.trainable.lora_scale))
        params = stage.trainable.compose(trainable, frozen)
    return lora.concatenate(per_stage)


def stage_done(stage: Stage, run_dir: Path) -> bool:
    return (run_dir / f"stage_{stage.name}" / "done.json").is_file()


def reference_embeddings(config, bundle: Bundle, run_dir: Path, progress: bool = True, mesh=None) -> np.ndarray:
    """The image side: a given folder, contrastive pairs, or references generated by the original model."""
    from coerase_jax.data import embeddings, references

    d = config.data
    if d.contrastive_dir:
        return embeddings.contrastive_embeddings(bundle, d.contrastive_dir, d.contrastive_method,
                                                 d.contrastive_average)
    folder = Path(d.image_dir) if d.image_dir else run_dir / "references"
    if not d.image_dir:
        prompts = list(config.concept.reference_prompts) or list(config.concept.prompts)
        shards = mesh.shape["data"] * mesh.shape["fsdp"] if mesh is not None else 1
        references.generate_references(bundle, folder, prompts, d.num_references, d.reference_seed,
                                       d.reference_steps, d.reference_guidance, d.reference_batch_size, progress,
                                       mesh if d.reference_batch_size % shards == 0 else None)
        distributed.barrier("references written")  # (process 0 wrote them; every host reads them next)
    return embeddings.folder_embeddings(bundle, folder)


def joint_reference_embeddings(config, bundle: Bundle, run_dir: Path, progress: bool = True,
                               mesh=None) -> tuple[np.ndarray, np.ndarray]:
    """(embeddings, concept index of each) for a joint erasure: one folder per concept, either
    ``data.image_dir/<name>/`` or generated from the concept's prompts into ``references/<name>/``."""
    from coerase_jax.data import embeddings, references

    d = config.data
    if d.contrastive_dir:
        raise UserError("a joint erasure takes reference images per concept (data.image_dir/<name>/ or generated), "
                        "not data.contrastive_dir")
    parts = []
    for k, (name, prompts) in enumerate(joint_concepts(config)):
        folder = Path(d.image_dir) / name if d.image_dir else run_dir / "references" / name
        if not d.image_dir:
            shards = mesh.shape["data"] * mesh.shape["fsdp"] if mesh is not None else 1
            references.generate_references(bundle, folder, list(prompts), d.num_references,
                                           d.reference_seed + k * d.num_references, d.reference_steps,
                                           d.reference_guidance, d.reference_batch_size, progress,
                                           mesh if d.reference_batch_size % shards == 0 else None)
            distributed.barrier(f"references of {name} written")
        parts.append(embeddings.folder_embeddings(bundle, folder))
    return np.concatenate(parts), np.concatenate([np.full(len(e), k) for k, e in enumerate(parts)])


def run_erasure(config, bundle: Bundle, progress: bool = True, mesh=None, on_step=None) -> dict:
    """All stages of the config, in order, each resuming where it stopped. Returns the final params."""
    if not config.run_dir:
        raise UserError("run_dir is not set (--config.run_dir=DIR)")
    run_dir = Path(config.run_dir)
    check_run_dir(run_dir, config)
    mesh = mesh or mesh_lib.make_mesh(dict(config.mesh))
    stages = plan_stages(config)
    data = encode_prompts(bundle, config)
    if any(s.settings.use_image for s in stages) and not all(stage_done(s, run_dir) for s in stages):
        bundle.require_image_parts()
        if data.prompt_concept is not None:
            data.image_embeds, data.image_concept = joint_reference_embeddings(config, bundle, run_dir, progress,
                                                                               mesh)
        else:
            data.image_embeds = reference_embeddings(config, bundle, run_dir, progress, mesh)
    params, teacher = bundle.unet_params, bundle.unet_params
    for stage in stages:
        if stage_done(stage, run_dir):
            print(f"[{stage.name}] already finished; loading its result")
            trained = load_stage_result(stage, config, params, run_dir)
        else:
            trained = train_stage(stage, config, bundle, params, teacher, data, run_dir, mesh, progress, on_step)
        # The next stage starts from this one's weights, and its teacher is this model.
        params, teacher = trained, trained
    return params


def stage_models(config, bundle: Bundle) -> dict[str, dict]:
    """The UNet after each stage of a finished run: ``text_only`` after the text stage (ESD, the
    text-only baseline) and ``co_erasing`` after the image stage."""
    run_dir, params, models = Path(config.run_dir), bundle.unet_params, {}
    for stage in plan_stages(config):
        params = load_stage_result(stage, config, params, run_dir)
        models["text_only" if stage.name == "text" else "co_erasing"] = params
    return models


def final_params(config, bundle: Bundle) -> dict:
    """The trained UNet of a finished run directory (every stage replayed from its checkpoints)."""
    return list(stage_models(config, bundle).values())[-1]
