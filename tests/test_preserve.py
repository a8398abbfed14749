"""The preservation term (a departure, off by default): loss = erasure + lambda * || eps_theta(z_t, t, c_p)
- eps_0(z_t, t, c_p) ||^2 for a kept prompt c_p, at the erasure's own z_t and t."""

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coerase_jax.configuration import base_config, load_config
from coerase_jax.diffusion.schedule import NoiseSchedule
from coerase_jax.erase import streams, subsets
from coerase_jax.erase.step import StepSettings, denoiser, sample_zt
from coerase_jax.erase.trainer import ConceptData, preserved_prompts, run_erasure, sample_batch
from coerase_jax.errors import UserError
from coerase_jax.models.presets import SD_SCHEDULER
from coerase_jax.parallel.mesh import make_mesh
from micro import MICRO_UNET, micro_batch, micro_step, micro_world
from tolerance import assert_same_maths, assert_same_training, erasure_step_roundings

DDIM_STEPS = 4


def _kept_batch(batch_size: int = 2):
    kept = np.random.default_rng(7).standard_normal((batch_size, 77, 32)).astype(np.float32)
    return micro_batch(batch_size)._replace(kept_text=kept)


@functools.lru_cache(maxsize=None)  # each weight is its own compiled program; the two tests share them
def _step(weight: float):
    """One SGD step of the image stage with preservation weight ``weight``, against a teacher that is
    not the trainee (so the kept prompts' term is not zero from the start)."""
    settings = StepSettings(use_image=True, preserve_weight=weight)
    step, state, frozen, _, proj = micro_step(settings, "full", learning_rate=0.1, ddim_steps=DDIM_STEPS,
                                              optimizer="sgd")
    teacher = micro_world(seed=5)[1]
    new_state, metrics = jax.jit(step)(state, frozen, teacher, proj, _kept_batch())
    return settings, state, frozen, teacher, new_state, jax.device_get(metrics)


def test_the_preservation_term_is_the_kept_prompts_distance_to_the_teacher_by_hand():
    settings, state, frozen, teacher, _, metrics = _step(2.0)
    # the step's z_t and t, drawn again from its own key
    k_zt, _ = jax.random.split(streams.step_key(settings.seed, settings.stage, 0))
    eps = denoiser(micro_world()[0])
    trainee = subsets.merge(state.trainable, frozen)
    plan = NoiseSchedule.from_config(SD_SCHEDULER).ddim_plan(DDIM_STEPS)
    batch = _kept_batch()
    _, z, t = sample_zt(eps, trainee, k_zt, batch, None, plan, settings, (4, 4, 4))
    by_hand = np.mean((np.asarray(eps(trainee, z, t, batch.kept_text))
                       - np.asarray(eps(teacher, z, t, batch.kept_text))) ** 2)
    roundings = erasure_step_roundings(MICRO_UNET, ddim_steps=DDIM_STEPS, batch=2)
    assert by_hand > 1e-3  # the two UNets differ: a term that is really there
    assert_same_maths(metrics["preservation_loss"], by_hand, roundings)
    assert_same_maths(metrics["loss"], metrics["erasure_loss"] + 2.0 * metrics["preservation_loss"], 4)


def test_the_update_is_the_erasure_gradient_plus_lambda_times_the_preservation_gradient():
    """With SGD the update is -lr * (g_erasure + lambda g_preservation): linear in lambda, so the
    update at lambda 2 minus at 1 equals the update at 1 minus at 0; and the erasure term itself is
    the same whatever lambda is."""
    runs = {w: _step(w) for w in (0.0, 1.0, 2.0)}
    start = jax.tree_util.tree_leaves(runs[0.0][1].trainable)
    leaves = {w: jax.tree_util.tree_leaves(run[4].trainable) for w, run in runs.items()}
    # lambda 0 is the step without the term: no parts reported
    assert set(runs[0.0][5]) == {"loss", "grad_norm", "ddim_index", "timestep"}
    roundings = 3 * erasure_step_roundings(MICRO_UNET, ddim_steps=DDIM_STEPS, batch=2)
    for w in (1.0, 2.0):
        assert_same_maths(runs[w][5]["erasure_loss"], runs[0.0][5]["loss"], roundings)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(leaves[1.0], leaves[0.0]))
    assert moved > 1e-4  # the preservation gradient is there
    extrapolated = [2 * one - zero for one, zero in zip(leaves[1.0], leaves[0.0])]
    assert_same_training(leaves[2.0], extrapolated, start, roundings)


def test_a_preservation_weight_without_kept_prompts_is_a_clear_error():
    step, state, frozen, teacher, proj = micro_step(StepSettings(use_image=False, preserve_weight=1.0))
    with pytest.raises(UserError, match="concept.preserve"):
        jax.eval_shape(step, state, frozen, teacher, proj, micro_batch(2, with_image=False))
    with pytest.raises(UserError, match="preserve_weight"):
        StepSettings(use_image=False, preserve_weight=-1.0)


@pytest.mark.parametrize("prompts,weight,ok", [((), 0.0, True), (("a star", "a cross"), 0.5, True),
                                               (("a star",), 0.0, False), ((), 1.0, False), (("",), 1.0, False),
                                               (("a star", "a photo of a cat"), 1.0, False)])
def test_kept_prompts_and_their_weight_go_together(prompts, weight, ok):
    config = base_config("tiny")
    config.concept.preserve = prompts
    config.erase.preserve_weight = weight
    if ok:
        assert preserved_prompts(config) == list(prompts)
    else:
        with pytest.raises(UserError, match="concept.preserve"):
            preserved_prompts(config)


def test_kept_prompts_are_drawn_after_the_erasure_examples():
    """Adding kept prompts leaves every erasure draw as it was (a run with the term erases the same
    examples as one without), and every kept prompt gets drawn."""
    prompts = np.arange(5, dtype=np.float32)[:, None, None] * np.ones((1, 3, 2), np.float32)
    images = np.arange(7, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
    plain = ConceptData(prompts, np.zeros((3, 2), np.float32), prompts, np.ones((5, 3), bool), images)
    kept = dataclasses.replace(plain, kept_states=100 + np.arange(3, dtype=np.float32)[:, None, None]
                               * np.ones((1, 3, 2), np.float32))
    drawn = set()
    for step in range(30):
        a, b = (sample_batch(d, seed=2, stage=1, step=step, batch_size=4) for d in (plain, kept))
        np.testing.assert_array_equal(a.text, b.text)
        np.testing.assert_array_equal(a.image_embeds, b.image_embeds)
        assert a.kept_text is None and b.kept_text.shape == a.text.shape
        drawn |= set(b.kept_text[:, 0, 0].astype(int).tolist())
    assert drawn == {100, 101, 102}


def test_a_run_that_keeps_a_prompt_moves_it_less_than_one_that_does_not(tiny_bundle, tmp_path):
    """End to end on the random tiny model (text-stage ESD on cross-attention, as the trainer's own
    erasure test): keeping "a blue square" holds its prediction nearer the original's than the same
    run without the term, while the concept still moves; both parts of the loss are logged."""
    b = tiny_bundle
    common = ["--config.erase.stages=text", "--config.text_stage.subset=esd-x",
              "--config.text_stage.learning_rate=1e-3", "--config.text_stage.steps=30",
              "--config.checkpoint.every=1000"]
    tiny = str(Path(__file__).resolve().parent.parent / "configs" / "tiny.py")
    mesh = make_mesh({"data": 1}, jax.devices()[:1])
    plain = run_erasure(load_config(tiny, common + [f"--config.run_dir={tmp_path / 'plain'}"]), b, False, mesh)
    kept = run_erasure(load_config(tiny, common + [f"--config.run_dir={tmp_path / 'kept'}",
                                                   "--config.concept.preserve=('a blue square',)",
                                                   "--config.erase.preserve_weight=4.0"]), b, False, mesh)
    eps = jax.jit(denoiser(b.unet))
    encode = lambda prompt: b.encode_text(b.text_params, b.tokenize([prompt] * 10))
    plan = NoiseSchedule.from_config(b.scheduler_config).ddim_plan(10)
    z = jax.random.normal(jax.random.PRNGKey(123), (10, 4, 8, 8))
    move = lambda params, prompt: float(jnp.mean((eps(params, z, plan.timesteps, encode(prompt))
                                                  - eps(b.unet_params, z, plan.timesteps, encode(prompt))) ** 2))
    print({name: (move(p, "a red circle"), move(p, "a blue square")) for name, p in (("plain", plain), ("kept", kept))})
    assert move(kept, "a blue square") < 0.5 * move(plain, "a blue square")
    assert move(kept, "a red circle") > 0.3 * move(plain, "a red circle")
    logged = [json.loads(line) for line in (tmp_path / "kept" / "stage_text" / "metrics.jsonl").read_text().splitlines()]
    assert {"erasure_loss", "preservation_loss"} <= set(logged[-1])


def test_the_joint_config_keeps_the_held_shapes_by_name_and_never_a_judged_or_erased_prompt():
    """What the shipped joint erasure keeps: each held shape's training prompts, nothing of an erased
    shape, and none of the prompts the report judges (those carry a colour; the paraphrases are
    never kept either)."""
    from coerase_jax.toyworld import world
    from coerase_jax.toyworld.report import joint_rows

    config = load_config("configs/joint_toyworld.py")
    kept = set(preserved_prompts(config))
    erased = [name for name, _ in config.concept.joint]
    held = [s for s in world.SIX_SHAPES.shapes if s not in erased]
    assert kept == {p for s in held for p in world.SIX_SHAPES.concept_prompts(s)}
    assert not any(shape in p for p in kept for shape in erased)
    judged = {r.prompt for split in ("dev", "test") for r in joint_rows(erased, 2, split, world.SIX_SHAPES)}
    assert judged and not kept & judged
    paraphrases = {w for s in held for w in world.SIX_SHAPES.paraphrases[s]}
    assert not any(w in p for p in kept for w in paraphrases)
