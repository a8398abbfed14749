"""The jitted erasure step: subsets, z_t from T downwards, sharded = unsharded."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from coerase_jax.diffusion.schedule import NoiseSchedule
from coerase_jax.erase import subsets
from coerase_jax.erase.step import StepSettings, denoiser, jit_step, sample_zt
from coerase_jax.errors import UserError
from coerase_jax.models.presets import SD_SCHEDULER, TINY_UNET
from coerase_jax.models.unet import UNet
from coerase_jax.parallel.mesh import make_mesh, tree_shardings
from micro import MICRO_UNET, micro_batch, micro_step, micro_world
from tolerance import (BF16, assert_same_maths, assert_same_training, erasure_step_roundings,
                       unet_forward_roundings)

# One DDIM step of the micro UNet: its forward plus the update's few elementwise ops.
DDIM_STEP_ROUNDINGS = unet_forward_roundings(MICRO_UNET) + 8

# What each subset must select, written out independently of subsets.py.
DOCUMENTED = {
    "full": lambda p: True,
    "esd-u": lambda p: "attn2" not in p and "time_embedding" not in p and p[0] not in ("conv_out", "conv_norm_out"),
    "esd-u-reference": lambda p: "attn2" not in p and "time_embedding" not in p,
    "esd-x": lambda p: "attn2" in p,
    "esd-x-strict": lambda p: "attn2" in p and p[-2] in ("to_k", "to_v"),
    "selfattn": lambda p: "attn1" in p,
    "notime": lambda p: "time_embedding" not in p,
}


@pytest.mark.parametrize("subset", sorted(DOCUMENTED))
def test_subset_selects_its_documented_nonempty_set(subset):
    params = jax.eval_shape(UNet(TINY_UNET, with_image_kv=True).init_params, jax.random.PRNGKey(0))
    trainable, frozen = subsets.split(params, subset)
    chosen = set(traverse_util.flatten_dict(trainable))
    rest = set(traverse_util.flatten_dict(frozen))
    assert chosen and not chosen & rest
    assert chosen | rest == set(traverse_util.flatten_dict(params))
    for path in chosen | rest:
        is_ip = path[-2] in ("to_k_ip", "to_v_ip")
        assert (path in chosen) == (DOCUMENTED[subset](path) and not is_ip), path


def test_image_kv_training_is_its_own_switch():
    params = jax.eval_shape(UNet(TINY_UNET, with_image_kv=True).init_params, jax.random.PRNGKey(0))
    trainable, _ = subsets.split(params, "selfattn", train_image_kv=True)
    names = {p[-2] for p in traverse_util.flatten_dict(trainable)}
    assert {"to_k_ip", "to_v_ip"} <= names and "to_q" in names
    assert subsets.resolve("noxattn") == "esd-u" and subsets.resolve("xattn") == "esd-x"
    with pytest.raises(UserError, match="unknown trainable subset"):
        subsets.resolve("xlayer")


# The step's update through three representative splits runs by default (the rest: -m slow); which
# parameters each subset selects is checked for every subset above, without running a step.
STEP_SPLITS = [("esd-u", False), ("esd-x", True), ("full", False)]


@pytest.mark.parametrize("subset,train_image_kv", STEP_SPLITS + [
    pytest.param(s, False, marks=pytest.mark.slow) for s in sorted(DOCUMENTED) if (s, False) not in STEP_SPLITS])
def test_step_leaves_everything_outside_the_subset_bit_identical(subset, train_image_kv):
    step, state, frozen, original, proj = micro_step(StepSettings(use_image=True), subset, ddim_steps=2,
                                                     train_image_kv=train_image_kv)
    new_state, metrics = jax.jit(step)(state, frozen, original, proj, micro_batch(2))
    assert np.isfinite(float(metrics["loss"]))
    before = traverse_util.flatten_dict(original)
    after = traverse_util.flatten_dict(subsets.merge(new_state.trainable, frozen))
    changed = {p for p in before if not np.array_equal(np.asarray(before[p]), np.asarray(after[p]))}
    for path in before:
        if path not in changed:
            continue
        is_ip = path[-2] in ("to_k_ip", "to_v_ip")
        assert (train_image_kv if is_ip else DOCUMENTED[subset](path)), f"{path} changed outside {subset}"
    assert changed, "the step changed nothing"
    if train_image_kv:
        assert any(p[-2] == "to_k_ip" for p in changed)


@pytest.mark.cross_program
def test_matched_zt_is_the_ddim_sampler_run_downwards_from_T():
    """z_t for index i equals diffusers' DDIM scheduler stepped i times from the noisiest timestep."""
    from diffusers import FlaxDDIMScheduler

    unet, params, _, _ = micro_world()
    eps = denoiser(unet)
    plan = NoiseSchedule.from_config(SD_SCHEDULER).ddim_plan(10)
    batch = micro_batch(2, with_image=False)
    settings = StepSettings(use_image=False)
    run = jax.jit(lambda key: sample_zt(eps, params, key, batch, None, plan, settings, (4, 4, 4)))
    key = next(jax.random.PRNGKey(s) for s in range(100)
               if 3 <= int(jax.random.randint(jax.random.split(jax.random.PRNGKey(s), 3)[0], (1,), 0, 10)[0]) <= 8)
    index, z, t = run(key)
    index = int(index)

    scheduler = FlaxDDIMScheduler.from_config({k: v for k, v in SD_SCHEDULER.items() if k != "_class_name"})
    sched_state = scheduler.set_timesteps(scheduler.create_state(), 10, (2, 4, 4, 4))
    x = jax.random.normal(jax.random.split(key, 3)[1], (2, 4, 4, 4))
    for k in range(index):
        timestep = sched_state.timesteps[k]
        noise_pred = eps(params, x, jnp.full((2,), timestep), batch.text)
        x = scheduler.step(sched_state, noise_pred, timestep, x).prev_sample
    # an eager per-step reference against our jitted loop: two programs, ``index`` steps of rounding
    assert_same_maths(z, x, max(index, 1) * DDIM_STEP_ROUNDINGS)
    assert int(t[0]) == int(sched_state.timesteps[index]) and int(sched_state.timesteps[0]) > int(t[0])


def test_zt_loop_compiles_once_for_all_indices():
    unet, params, _, _ = micro_world()
    plan = NoiseSchedule.from_config(SD_SCHEDULER).ddim_plan(10)
    batch = micro_batch(1, with_image=False)
    run = jax.jit(lambda key: sample_zt(denoiser(unet), params, key, batch, None, plan,
                                        StepSettings(use_image=False), (4, 4, 4)))
    indices = {int(run(jax.random.PRNGKey(s))[0]) for s in range(6)}
    assert len(indices) > 2 and run._cache_size() == 1


SHARDED_STEPS = 2


def _run_sharded(mesh, steps=SHARDED_STEPS, preserve_weight=0.0):
    # SGD, not Adam: Adam's first update is lr * sign(g), which turns float reduction-order noise
    # in a near-zero gradient into a full-size difference; SGD keeps differences proportional.
    settings = StepSettings(use_image=True, blur_kernel=3, preserve_weight=preserve_weight)
    step, state, frozen, teacher, proj = micro_step(settings, "full", learning_rate=0.1, ddim_steps=3,
                                                    optimizer="sgd")
    batch = micro_batch(8)
    if preserve_weight:  # kept prompts are batch leaves, split over the data axis like the rest
        batch = batch._replace(kept_text=np.random.default_rng(7).standard_normal((8, 77, 32)).astype(np.float32))
    jitted = jit_step(step, mesh, state, frozen, teacher, proj, batch)
    put = lambda tree: jax.device_put(tree, tree_shardings(tree, mesh))
    state, frozen, teacher, proj = put(state), put(frozen), put(teacher), put(proj)
    losses = []
    for _ in range(steps):
        state, metrics = jitted(state, frozen, teacher, proj, batch)
        losses.append(float(metrics["loss"]))
    return losses, jax.device_get(state.trainable), state


@pytest.mark.cross_program
@pytest.mark.parametrize("preserve_weight", [0.0, pytest.param(1.0, marks=pytest.mark.slow)])
def test_sharded_step_equals_single_device(preserve_weight):
    """With the preservation term (slow, for the default run's time) the kept prompts' trainee and
    teacher calls are two more forwards and a backward: at most one more erasure step's roundings."""
    assert len(jax.devices()) == 8, "conftest sets 8 simulated CPU devices"
    one_losses, one_params, _ = _run_sharded(make_mesh({"data": 1}, jax.devices()[:1]), preserve_weight=preserve_weight)
    mesh = make_mesh({"data": 4, "fsdp": 2})
    many_losses, many_params, state = _run_sharded(mesh, preserve_weight=preserve_weight)
    kernel = state.trainable["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert kernel.sharding.spec[2] == "fsdp"  # the parameters really are sharded
    initial = micro_world()[1]["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]
    assert np.abs(np.asarray(one_params["down_blocks_0"]["resnets_0"]["conv1"]["kernel"]) - initial).max() > 1e-4
    # two programs: one device, and 8 with cross-device sums
    roundings = (2 if preserve_weight else 1) * SHARDED_STEPS * erasure_step_roundings(MICRO_UNET, ddim_steps=3, batch=8)
    assert_same_maths(many_losses, one_losses, roundings)
    start = jax.tree_util.tree_leaves(subsets.split(micro_world()[1], "full")[0])
    assert_same_training(jax.tree_util.tree_leaves(many_params), jax.tree_util.tree_leaves(one_params), start,
                         roundings)


@pytest.mark.cross_program
def test_snapshots_share_one_trajectory_and_match_separate_runs():
    """snapshots_per_trajectory=K (a marked departure): K z_t from one trajectory, each equal to
    denoising to its own index."""
    from coerase_jax.diffusion.sampling import Conditioning, denoise

    unet, params, _, _ = micro_world()
    eps = denoiser(unet)
    plan = NoiseSchedule.from_config(SD_SCHEDULER).ddim_plan(10)
    batch = micro_batch(2, with_image=False)
    settings = StepSettings(use_image=False, snapshots_per_trajectory=3)
    key = jax.random.PRNGKey(4)
    _, z, t = jax.jit(lambda k: sample_zt(eps, params, k, batch, None, plan, settings, (4, 4, 4)))(key)
    k_index, k_latent, _ = jax.random.split(key, 3)
    indices = np.asarray(jax.random.randint(k_index, (3,), 0, 10))
    noise = jax.random.normal(k_latent, (2, 4, 4, 4))
    assert z.shape == (6, 4, 4, 4) and t.shape == (6,)
    for j, index in enumerate(indices):
        alone = jax.jit(lambda: denoise(lambda p, x, tt, c, i: eps(p, x, tt, c, i), params, noise, plan,
                                        Conditioning(batch.text), num_steps=int(index)))()
        # one loop with snapshots vs one without: two programs, ``index`` DDIM steps of rounding each
        assert_same_maths(z[2 * j:2 * j + 2], alone, max(int(index), 1) * DDIM_STEP_ROUNDINGS)
        assert int(t[2 * j]) == int(plan.timesteps[index])

    step, state, frozen, teacher, proj = micro_step(StepSettings(use_image=True, snapshots_per_trajectory=3),
                                                    "esd-x", ddim_steps=4)
    _, metrics = jax.jit(step)(state, frozen, teacher, proj, micro_batch(2))
    assert np.isfinite(float(metrics["loss"]))


@pytest.mark.cross_program
def test_bf16_first_moment_halves_adams_first_moment_only():
    from coerase_jax.erase.step import make_optimizer

    params = {"w": jnp.linspace(-1.0, 1.0, 64, dtype=jnp.float32)}
    grads = {"w": jnp.cos(jnp.arange(64, dtype=jnp.float32))}
    full, half = (make_optimizer("adam", 1e-2, 10, first_moment_dtype=d) for d in ("float32", "bfloat16"))
    state_full, state_half = full.init(params), half.init(params)
    assert state_half[0].mu["w"].dtype == jnp.bfloat16 and state_half[0].nu["w"].dtype == jnp.float32
    assert state_full[0].mu["w"].dtype == jnp.float32
    for step in range(1, 4):  # the same updates, to bf16's precision: the stored first moment is
        # rounded to bf16 once per step
        up_full, state_full = full.update(grads, state_full, params)
        up_half, state_half = half.update(grads, state_half, params)
        assert_same_maths(up_half["w"], up_full["w"], step, unit=BF16)
    assert not np.array_equal(np.asarray(up_half["w"]), np.asarray(up_full["w"]))  # bf16 did round
    with pytest.raises(UserError, match="first_moment_dtype"):
        make_optimizer("adam", 1e-2, 10, first_moment_dtype="float16")


def test_the_micro_unet_sees_the_timestep():
    """The tests' micro UNet must depend on t beyond rounding, or a step test could not catch a wrong
    timestep (with one channel per norm group it did not: the GroupNorm removed the time embedding)."""
    unet, params, _, _ = micro_world()
    x = np.random.default_rng(3).standard_normal((2, 4, 4, 4)).astype(np.float32)
    text = micro_batch(2).text
    early, late = (np.asarray(unet.apply({"params": params}, x, np.full((2,), t), text)) for t in (10, 900))
    assert np.abs(early - late).max() > 1e-2 * np.abs(early).max()


def test_sdxl_add_embedding_counts_as_the_time_embedding():
    from coerase_jax.models.presets import TINY_SDXL_UNET

    params = jax.eval_shape(UNet(TINY_SDXL_UNET).init_params, jax.random.PRNGKey(0))
    for subset, trains_it in (("esd-u", False), ("notime", False), ("full", True), ("esd-x", False)):
        trainable, _ = subsets.split(params, subset)
        assert ("add_embedding" in trainable) == trains_it, subset


def test_sdxl_step_carries_the_added_conditioning_into_every_unet_call():
    """A text_time UNet refuses a call without it, so a step that runs at all (z_t sampled with
    guidance, the teacher's two branches, the trainee) gave it to every call; and each branch's own
    conditioning matters."""
    from coerase_jax.diffusion.schedule import NoiseSchedule
    from coerase_jax.erase.step import Batch, TrainState, build_step, make_optimizer
    from coerase_jax.models.image_proj import ImageProjection
    from coerase_jax.models.presets import random_params
    from micro import EMBED_DIM

    cfg = dataclasses.replace(MICRO_UNET, addition_embed_type="text_time", addition_time_embed_dim=4,
                              projection_class_embeddings_input_dim=8 + 6 * 4)
    rng = np.random.default_rng(0)
    unet, proj = UNet(cfg, with_image_kv=True), ImageProjection(32, 4)
    params = random_params(unet.init_params, rng)
    proj_params = random_params(lambda r: proj.init_params(r, EMBED_DIM), rng)
    optimizer = make_optimizer("adam", 1e-3, 10)
    plan = NoiseSchedule.from_config(SD_SCHEDULER).ddim_plan(4)
    step = jax.jit(build_step(unet, proj, plan, StepSettings(use_image=True, zt_guidance=3.0), optimizer, (4, 4, 4)))
    trainable, frozen = subsets.split(params, "esd-x")
    state = TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))
    pooled = rng.standard_normal((2, 8)).astype(np.float32)
    size = np.tile(np.asarray([[32, 32, 0, 0, 32, 32]], np.float32), (2, 1))
    batch = micro_batch(2)._replace(added=np.concatenate([pooled, size], -1),
                                    uncond_added=np.concatenate([0 * pooled, size], -1))
    loss = float(step(state, frozen, params, proj_params, batch)[1]["loss"])
    other_uncond = batch._replace(uncond_added=np.concatenate([pooled, size], -1))
    other_loss = float(step(state, frozen, params, proj_params, other_uncond)[1]["loss"])
    assert np.isfinite(loss) and abs(other_loss - loss) > 1e-3 * loss  # far above rounding (~1e-7 relative)
    assert isinstance(batch, Batch)
    with pytest.raises(UserError, match="added_cond"):
        jax.eval_shape(step, state, frozen, params, proj_params, micro_batch(2))
