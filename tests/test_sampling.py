"""DDIM math against diffusers' scheduler, the traced-length loop, CFG, and the tiny pipeline."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coerase_jax.diffusion.pipeline import Sampler
from coerase_jax.diffusion.sampling import Conditioning, denoise, guided_eps
from coerase_jax.diffusion.schedule import NoiseSchedule, add_noise, ddim_step, training_target, x0_and_eps
from coerase_jax.models.clip import CLIP_MEAN, CLIP_STD, ClipPreprocess
from coerase_jax.models.presets import SD_SCHEDULER
from tolerance import assert_same_maths

DDIM_UPDATE_ROUNDINGS = 8  # x0 from x and eps, then x_prev: a handful of elementwise ops


@pytest.mark.cross_program
def test_ddim_matches_diffusers_flax_scheduler():
    from diffusers import FlaxDDIMScheduler

    scheduler = FlaxDDIMScheduler.from_config({k: v for k, v in SD_SCHEDULER.items() if k != "_class_name"})
    state = scheduler.set_timesteps(scheduler.create_state(), 50, (1, 4, 8, 8))
    plan = NoiseSchedule.from_config(SD_SCHEDULER).ddim_plan(50)
    np.testing.assert_array_equal(np.asarray(plan.timesteps), np.asarray(state.timesteps))

    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 8, 8))
    for k in (0, 1, 25, 49):  # includes the last step, whose successor is the "final" alpha
        eps = jax.random.normal(jax.random.PRNGKey(k + 1), x.shape)
        expected = scheduler.step(state, eps, state.timesteps[k], x).prev_sample
        got = ddim_step(x, eps, plan.alpha[k], plan.alpha_prev[k])
        assert_same_maths(got, expected, DDIM_UPDATE_ROUNDINGS)


@pytest.mark.cross_program
def test_v_prediction_ddim_matches_diffusers_flax_scheduler():
    """SD 2.x: the UNet outputs v; x0 = sqrt(a) x - sqrt(1-a) v, eps = sqrt(a) v + sqrt(1-a) x."""
    from diffusers import FlaxDDIMScheduler

    from coerase_jax.models.presets import SD2_SCHEDULER

    scheduler = FlaxDDIMScheduler.from_config({k: v for k, v in SD2_SCHEDULER.items() if k != "_class_name"})
    state = scheduler.set_timesteps(scheduler.create_state(), 50, (1, 4, 8, 8))
    schedule = NoiseSchedule.from_config(SD2_SCHEDULER)
    plan = schedule.ddim_plan(50)
    assert plan.prediction_type == "v_prediction"
    x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 8, 8))
    for k in (0, 1, 25, 49):
        v = jax.random.normal(jax.random.PRNGKey(k + 1), x.shape)
        expected = scheduler.step(state, v, state.timesteps[k], x).prev_sample
        assert_same_maths(plan.step(k, x, v), expected, DDIM_UPDATE_ROUNDINGS)
    read_as_noise = ddim_step(x, v, plan.alpha[25], plan.alpha_prev[25])  # what an epsilon plan would do
    assert float(jnp.abs(read_as_noise - plan.step(25, x, v)).max()) > 0.1
    # v from a known (x0, noise) gives them back
    x0 = jax.random.normal(jax.random.PRNGKey(9), (2, 4, 8, 8))
    noise = jax.random.normal(jax.random.PRNGKey(8), (2, 4, 8, 8))
    alpha = plan.alpha[10]
    z = add_noise(x0, noise, alpha)
    got_x0, got_eps = x0_and_eps(z, training_target(x0, noise, alpha, "v_prediction"), alpha, "v_prediction")
    assert_same_maths(got_x0, x0, 8)
    assert_same_maths(got_eps, noise, 8)


def _toy_denoiser(params, x, t, text, image_tokens):
    """A cheap stand-in for the UNet whose output depends on every input."""
    out = params * x + 1e-3 * t[:, None, None, None] + text.mean(axis=(1, 2))[:, None, None, None]
    if image_tokens is not None:
        out = out + image_tokens.mean(axis=(1, 2))[:, None, None, None]
    return out


@pytest.mark.cross_program
def test_denoise_compiles_once_for_every_step_count_and_goes_downwards():
    plan = NoiseSchedule.from_config(SD_SCHEDULER).ddim_plan(10)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 8, 8))
    cond = Conditioning(jnp.ones((2, 3, 5)))
    run = jax.jit(lambda i: denoise(_toy_denoiser, 0.1, x, plan, cond, num_steps=i))
    results = {i: run(jnp.int32(i)) for i in (0, 3, 7)}
    assert run._cache_size() == 1

    manual = x
    for k in range(3):  # from the noisiest timestep (981) down
        t = jnp.full((2,), plan.timesteps[k])
        manual = ddim_step(manual, _toy_denoiser(0.1, manual, t, cond.text, None), plan.alpha[k], plan.alpha_prev[k])
    # the jitted loop vs eager steps: per step the toy denoiser (a mean over 15 text values) and the update
    assert_same_maths(results[3], manual, 3 * (15 + 4 + DDIM_UPDATE_ROUNDINGS))
    np.testing.assert_array_equal(np.asarray(results[0]), np.asarray(x))
    assert int(plan.timesteps[0]) == 901 and np.all(np.diff(np.asarray(plan.timesteps)) < 0)


@pytest.mark.cross_program
def test_classifier_free_guidance_formula():
    x = jnp.ones((2, 1, 2, 2))
    t = jnp.array([5, 5])
    cond = Conditioning(jnp.full((2, 3, 4), 2.0), jnp.full((2, 4, 4), 0.5))
    uncond = Conditioning(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4, 4)))
    got = guided_eps(_toy_denoiser, 1.0, x, t, cond, uncond, 3.0)
    eps_c = 1.0 + 5e-3 + 2.0 + 0.5
    eps_u = 1.0 + 5e-3
    assert_same_maths(got, np.full(x.shape, eps_u + 3.0 * (eps_c - eps_u)), 12 + 3)  # the toy's means, then CFG
    with pytest.raises(ValueError):
        guided_eps(_toy_denoiser, 1.0, x, t, cond, Conditioning(uncond.text), 3.0)


def test_clip_preprocessing_uses_clip_statistics_and_centre_crop():
    image = np.zeros((1, 32, 48, 3), np.float32)
    image[:, :, 8:40, :] = 0.25  # the centre 32 columns
    out = np.asarray(ClipPreprocess(size=32)(jnp.asarray(image)))
    assert out.shape == (1, 32, 32, 3)
    expected = (0.25 - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)
    np.testing.assert_allclose(out[0, 5, 5], expected, rtol=1e-5)
    np.testing.assert_allclose(out, np.broadcast_to(expected, out.shape), rtol=1e-5)


def test_sampler_is_seeded_and_independent_of_batch_mates(tiny_bundle):
    sampler = Sampler(tiny_bundle, steps=3, guidance_scale=3.0, batch_size=2)
    images = sampler(["a red circle", "a blue square", "a green triangle"], [11, 12, 13], progress=False)
    assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
    alone = sampler(["a blue square"], [12], progress=False)
    np.testing.assert_array_equal(alone[0], images[1])
    other_seed = sampler(["a blue square"], [99], progress=False)
    assert np.abs(other_seed[0].astype(int) - images[1].astype(int)).max() > 0
    with_image = sampler(["a blue square"], [12], image_embeds=np.ones((1, 32), np.float32), progress=False)
    assert np.abs(with_image[0].astype(int) - images[1].astype(int)).max() > 0


def test_sampler_split_over_eight_devices_gives_the_same_images(tiny_bundle):
    from coerase_jax.parallel.mesh import make_mesh

    prompts, seeds = ["a red circle", "a blue square"] * 4, list(range(8))
    single = Sampler(tiny_bundle, steps=2, guidance_scale=3.0, batch_size=8)(prompts, seeds, progress=False)
    sharded = Sampler(tiny_bundle, steps=2, guidance_scale=3.0, batch_size=8, mesh=make_mesh({"data": -1}))
    images = sharded(prompts, seeds, progress=False)
    assert np.abs(images.astype(int) - single.astype(int)).max() <= 1  # rounding to uint8 may differ by one
