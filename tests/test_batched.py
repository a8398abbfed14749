"""K independent erasures in one program equal K separate runs (8 simulated devices, concept axis)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coerase_jax.erase.batched import batched_step, jit_batched_step, stack, unstack
from coerase_jax.erase.step import StepSettings
from coerase_jax.errors import UserError
from coerase_jax.parallel.mesh import make_mesh

from micro import MICRO_UNET, micro_batch, micro_step
from tolerance import assert_same_training, erasure_step_roundings

K, STEPS = 8, 2


def _settings():
    return StepSettings(use_image=True, blur_kernel=3)


@pytest.mark.cross_program
def test_eight_concepts_batched_equal_eight_separate_runs():
    assert len(jax.devices()) == 8, "conftest sets 8 simulated CPU devices"
    # SGD: differences stay proportional to float noise (see test_step.py); esd-x: a small subset
    step, state, frozen, teacher, proj = micro_step(_settings(), "esd-x", learning_rate=0.1, ddim_steps=3,
                                                    optimizer="sgd")
    batches = [micro_batch(2, seed=10 + k) for k in range(K)]  # each concept its own prompts and images

    separate = []
    one = jax.jit(step)
    for k in range(K):
        s = state
        for _ in range(STEPS):
            s, _ = one(s, frozen, teacher, proj, batches[k])
        separate.append(jax.device_get(s.trainable))

    mesh = make_mesh({"concept": K, "data": 1})
    stacked_state, stacked_batch = stack([state] * K), stack(batches)
    run = jit_batched_step(batched_step(step), mesh, stacked_state, frozen, teacher, proj, stacked_batch)
    losses = []
    for _ in range(STEPS):
        stacked_state, metrics = run(stacked_state, frozen, teacher, proj, stacked_batch)
        losses.append(np.asarray(metrics["loss"]))
    leaf = jax.tree_util.tree_leaves(stacked_state.trainable)[0]
    assert leaf.sharding.spec[0] == "concept"
    assert {shard.data.shape[0] for shard in leaf.addressable_shards} == {1}  # one concept per device
    assert losses[0].shape == (K,) and len({round(float(x), 6) for x in losses[0]}) == K  # K different problems

    batched = unstack(jax.device_get(stacked_state.trainable), K)
    start = jax.device_get(state.trainable)
    moved = [max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in
                 zip(jax.tree_util.tree_leaves(separate[k]), jax.tree_util.tree_leaves(start))) for k in range(K)]
    assert min(moved) > 1e-4, "a concept's parameters did not move: the comparison would be empty"
    for k in range(K):  # two programs: the step vmapped over concepts, and the step alone
        assert_same_training(jax.tree_util.tree_leaves(batched[k]), jax.tree_util.tree_leaves(separate[k]),
                             jax.tree_util.tree_leaves(start), STEPS * erasure_step_roundings(MICRO_UNET, ddim_steps=3, batch=2),
                             err_msg=f"concept {k}")
    # and the concepts really differ from each other
    first = [np.asarray(x) for x in jax.tree_util.tree_leaves(batched[0])]
    assert any(not np.allclose(x, np.asarray(y)) for x, y in zip(first, jax.tree_util.tree_leaves(batched[1])))


def test_concepts_must_divide_over_the_concept_axis():
    step, state, frozen, teacher, proj = micro_step(_settings(), "esd-x-strict")
    mesh = make_mesh({"concept": 4, "data": 2})
    with pytest.raises(UserError, match="3 concepts do not divide"):
        jit_batched_step(batched_step(step), mesh, stack([state] * 3), frozen, teacher, proj,
                         stack([micro_batch(2)] * 3))


def test_stack_and_unstack_are_inverse():
    trees = [{"a": jnp.full((2,), k), "b": (jnp.ones(3) * k,)} for k in range(3)]
    back = unstack(stack(trees), 3)
    for k in range(3):
        np.testing.assert_array_equal(back[k]["a"], trees[k]["a"])
        np.testing.assert_array_equal(back[k]["b"][0], trees[k]["b"][0])
