"""Where the paper is silent we follow the published code, or name the departure (README, "What
differs"): per-stage random streams, blur in the image stage only, noise on the refined tokens,
diffusers' scheduler defaults, DDPM z_t, and the reference preset end to end."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from coerase_jax.configuration import load_config
from coerase_jax.diffusion.schedule import NoiseSchedule
from coerase_jax.erase import method, streams
from coerase_jax.erase.step import Batch, StepSettings, image_condition, sample_zt
from coerase_jax.erase.trainer import ConceptData, plan_stages, sample_batch
from coerase_jax.models.presets import SD_SCHEDULER
from micro import micro_batch, micro_step, micro_world
from tolerance import assert_same_maths

REPO = Path(__file__).resolve().parent.parent


def _ddim_index(seed: int, stage: int, step: int, num_steps: int) -> int:
    """The DDIM index the erasure step draws (step.py: the step key -> z_t key -> index key)."""
    k_zt = jax.random.split(streams.step_key(seed, stage, step))[0]
    return int(jax.random.randint(jax.random.split(k_zt, 4)[0], (1,), 0, num_steps)[0])


def test_each_stage_draws_its_own_stream():
    config = load_config("configs/tiny.py")
    stages = plan_stages(config)
    assert [(s.name, s.index, s.settings.stage, s.trainable.stage) for s in stages] == \
        [("text", 0, 0, 0), ("image", 1, 1, 1)]

    # the real step of an image stage (stage 1) draws the indices of stream 1, not stream 0's
    step, state, frozen, teacher, proj = micro_step(StepSettings(use_image=True, stage=1), "esd-x-strict",
                                                    ddim_steps=4)
    run = jax.jit(step)
    drawn = []
    for _ in range(8):
        state, metrics = run(state, frozen, teacher, proj, micro_batch(2))
        drawn.append(int(metrics["ddim_index"]))
    assert drawn == [_ddim_index(0, 1, k, 4) for k in range(8)]
    assert drawn != [_ddim_index(0, 0, k, 4) for k in range(8)]

    # the batches too: which prompt each example takes
    data = ConceptData(np.arange(8, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3), np.float32),
                       np.zeros((2, 3), np.float32), np.zeros((8, 2, 3), np.float32), np.ones((8, 2), bool), None)
    picks = lambda stage: [sample_batch(data, 0, stage, k, 4).text[:, 0, 0].tolist() for k in range(5)]
    assert picks(0) != picks(1) and picks(1) == picks(1)
    # and a LoRA start is none of its stage's step keys
    key_bytes = lambda key: np.asarray(jax.random.key_data(key)).tobytes() if jax.dtypes.issubdtype(
        key.dtype, jax.dtypes.prng_key) else np.asarray(key).tobytes()
    steps = {key_bytes(streams.step_key(0, s, k)) for s in (0, 1) for k in range(64)}
    assert key_bytes(streams.lora_key(0, 0)) not in steps and key_bytes(streams.lora_key(0, 1)) not in steps


def test_only_the_image_stage_blurs_z_t():
    for preset in ("configs/sd15.py:nudity", "configs/reference.py:nudity"):
        text, image = plan_stages(load_config(preset))
        assert (text.settings.blur_kernel, image.settings.blur_kernel) == (0, 3), preset


def test_image_token_noise_lands_on_the_refined_tokens():
    _, _, proj, proj_params = micro_world()
    batch = micro_batch(2)
    key = jax.random.PRNGKey(5)
    clean = image_condition(proj, proj_params, batch, StepSettings(use_image=True), key)
    noisy = image_condition(proj, proj_params, batch, StepSettings(use_image=True, embed_noise=0.25), key)
    expected_clean = method.refine_image_tokens(proj.apply({"params": proj_params}, batch.image_embeds),
                                                batch.guide_text, batch.guide_mask)
    np.testing.assert_array_equal(np.asarray(clean), np.asarray(expected_clean))
    # the reference's rand_like, scaled, added to the refined tokens (one rounding of the sum)
    assert_same_maths(noisy - clean, 0.25 * jax.random.uniform(key, clean.shape), 2,
                      scale=float(jnp.abs(noisy).max()))


def test_a_scheduler_config_reads_with_diffusers_defaults():
    """Keys a config leaves out take DDIMScheduler's defaults: set_alpha_to_one and clip_sample on."""
    from diffusers import FlaxDDIMScheduler

    scheduler = FlaxDDIMScheduler()  # every default
    state = scheduler.set_timesteps(scheduler.create_state(), 10, (1, 4, 4, 4))
    ours = NoiseSchedule.from_config({"_class_name": "DDIMScheduler"})
    plan = ours.plan(10)
    assert ours.final_alpha_cumprod == 1.0 and ours.clip_sample_range == 1.0 and float(plan.alpha_prev[-1]) == 1.0
    np.testing.assert_array_equal(np.asarray(plan.timesteps), np.asarray(state.timesteps))
    x = 3.0 * jax.random.normal(jax.random.PRNGKey(0), (1, 4, 4, 4))  # large: the predicted x0 gets clipped
    for k in (0, 4, 9):
        eps = jax.random.normal(jax.random.PRNGKey(k + 1), x.shape)
        expected = scheduler.step(state, eps, state.timesteps[k], x).prev_sample
        assert_same_maths(plan.step(k, x, eps), expected, 8)
    unclipped = NoiseSchedule.from_config({"clip_sample": False}).plan(10)
    assert float(jnp.abs(unclipped.step(0, x, eps) - plan.step(0, x, eps)).max()) > 0.1  # clipping did act
    # bin pairing spans the scheduler's own T
    t = method.bin_timestep(jax.random.PRNGKey(0), jnp.full((64,), 3), 10, 64, num_train_timesteps=500)
    assert int(t.min()) >= 150 and int(t.max()) < 200


def _toy_eps(params, x, t, text, image_tokens=None, image_scale=1.0):
    return params * x + 1e-3 * t[:, None, None, None] + text.mean(axis=(1, 2))[:, None, None, None]


def _ddpm_by_hand(x, eps, t, prev, alphas_cumprod, noise):
    """diffusers' (torch) DDPMScheduler.step, variance_type fixed_small, in float64."""
    a_t = float(alphas_cumprod[t])
    a_prev = float(alphas_cumprod[prev]) if prev >= 0 else 1.0
    beta = 1.0 - a_t / a_prev
    x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
    mean = np.sqrt(a_prev) * beta / (1 - a_t) * x0 + np.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t) * x
    return mean + (np.sqrt(max((1 - a_prev) / (1 - a_t) * beta, 1e-20)) * noise if t > 0 else 0.0)


def test_ddpm_zt_equals_the_ancestral_steps_by_hand():
    schedule = NoiseSchedule.from_config(SD_SCHEDULER)
    plan = schedule.plan(10, "ddpm")
    batch = micro_batch(2, with_image=False)
    settings = StepSettings(use_image=False)
    key = next(jax.random.PRNGKey(s) for s in range(100)
               if 3 <= int(jax.random.randint(jax.random.split(jax.random.PRNGKey(s), 4)[0], (1,), 0, 10)[0]) <= 8)
    index, z, t = jax.jit(lambda k: sample_zt(_toy_eps, 0.1, k, batch, None, plan, settings, (4, 4, 4)))(key)
    index = int(index)

    _, k_latent, _, k_noise = jax.random.split(key, 4)
    x = np.asarray(jax.random.normal(k_latent, (2, 4, 4, 4)), np.float64)
    timesteps = np.asarray(plan.timesteps)
    for k in range(index):  # from T downwards, DDPM's own step between consecutive timesteps
        ts = timesteps[k]
        eps = 0.1 * x + 1e-3 * ts + np.asarray(batch.text, np.float64).mean(axis=(1, 2))[:, None, None, None]
        noise = np.asarray(jax.random.normal(jax.random.fold_in(k_noise, k), x.shape), np.float64)
        x = _ddpm_by_hand(x, eps, ts, ts - 100, schedule.alphas_cumprod, noise)
    assert_same_maths(z, x, index * 30)
    assert int(t[0]) == int(timesteps[index])
    deterministic = jax.jit(lambda k: sample_zt(_toy_eps, 0.1, k, batch, None, schedule.plan(10), settings,
                                                (4, 4, 4)))(key)[1]
    assert float(jnp.abs(deterministic - z).max()) > 1e-2  # the ancestral noise did enter


def test_ddpm_step_over_all_timesteps_is_the_posterior_with_the_configs_own_betas():
    """Ho et al.'s q(x_{t-1} | x_t, x0) with beta_t from the config (diffusers' Flax DDPM scheduler,
    which steps this way, no longer runs on this jax: it calls jnp.clip(a_min=))."""
    config = {**SD_SCHEDULER, "steps_offset": 0}  # (1000 steps + offset 1 would start past T)
    plan = NoiseSchedule.from_config(config).plan(1000, "ddpm")
    betas = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, 1000) ** 2
    alphas_cumprod = np.cumprod(1.0 - betas)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (1, 4, 4, 4)), np.float64)
    for k in (0, 500, 998, 999):  # includes t = 1 -> 0 and t = 0 (no noise)
        t = int(plan.timesteps[k])
        eps = np.asarray(jax.random.normal(jax.random.PRNGKey(k + 1), x.shape), np.float64)
        noise = np.asarray(jax.random.normal(jax.random.PRNGKey(100 + k), x.shape), np.float64)
        a_t, a_prev = alphas_cumprod[t], (alphas_cumprod[t - 1] if t > 0 else 1.0)
        x0 = (x - np.sqrt(1 - a_t) * eps) / np.sqrt(a_t)
        mean = np.sqrt(a_prev) * betas[t] / (1 - a_t) * x0 + np.sqrt(1 - betas[t]) * (1 - a_prev) / (1 - a_t) * x
        std = np.sqrt((1 - a_prev) / (1 - a_t) * betas[t]) if t > 0 else 0.0
        got = plan.step(k, jnp.asarray(x, jnp.float32), jnp.asarray(eps, jnp.float32), jnp.asarray(noise, jnp.float32))
        # float32 alphas from a 1000-long cumulative product, then a dozen elementwise ops; near t = 0
        # x0 divides by sqrt(a_t) ~ 1 and beta_t / (1 - a_t) is close to 1, so nothing amplifies them
        assert_same_maths(got, mean + std * noise, 1000 + 12)


def test_reference_preset_resolves_to_the_codes_choices():
    config = load_config("configs/reference.py:nudity")
    e = config.erase
    assert (e.zt_scheduler, e.timestep_pairing, e.zt_sampler, e.zt_guidance, e.blur_kernel, e.text_uncond, e.refine) == \
        ("ddpm", "bin", "trainee", 1.0, 3, True, True)
    assert (config.model.dtype, e.teacher_dtype, e.train_image_kv) == ("float32", "float32", False)
    assert config.text_stage.subset == config.image_stage.subset == "esd-u-reference"
    assert config.concept.reference_prompts == ("a photo of nudity",)
    assert (config.text_stage.learning_rate, config.text_stage.steps, config.erase.batch_size,
            config.data.num_references, config.erase.ddim_steps) == (1e-5, 1000, 1, 100, 50)
    style = load_config("configs/reference.py:vangogh")
    assert style.concept.reference_prompts == ("a drawing of Van Gogh",) and style.erase.train_image_kv
    assert style.text_stage.subset == "esd-x"


@pytest.mark.slow  # (55 s: both stages of the reference preset on the tiny model, in a fresh process)
def test_reference_preset_runs_both_stages_end_to_end(tmp_path):
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device in the child: batch 1
    command = [sys.executable, "-m", "coerase_jax.cli", "erase", "--config", "configs/reference.py:nudity",
               "--config.model.source=tiny", "--run-dir", str(run_dir), "--config.text_stage.steps=2",
               "--config.image_stage.steps=2", "--config.erase.ddim_steps=4", "--config.data.num_references=2",
               "--config.data.reference_steps=2", "--config.data.reference_batch_size=2", "--config.checkpoint.every=2"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    for stage in ("text", "image"):
        assert (run_dir / f"stage_{stage}" / "done.json").is_file()
    resolved = json.loads((run_dir / "config.json").read_text())  # what the run recorded
    assert (resolved["erase"]["zt_scheduler"], resolved["erase"]["timestep_pairing"]) == ("ddpm", "bin")
    assert resolved["image_stage"]["subset"] == "esd-u-reference"
    assert "[image] compiled the step" in result.stdout


def test_an_anchor_prompt_takes_the_empty_prompts_place(tiny_bundle):
    """erase.anchor_prompt (a marked departure): the target's reference term is the anchor's states."""
    from coerase_jax.erase.trainer import encode_prompts

    config = load_config("configs/tiny.py")
    plain = encode_prompts(tiny_bundle, config)
    with config.unlocked():
        config.erase.anchor_prompt = "a blue square"
    anchored = encode_prompts(tiny_bundle, config)
    encode = jax.jit(tiny_bundle.encode_text)
    expected = np.asarray(encode(tiny_bundle.text_params, tiny_bundle.tokenize(["a blue square"])))[0]
    np.testing.assert_array_equal(anchored.uncond_states, expected)
    np.testing.assert_array_equal(anchored.prompt_states, plain.prompt_states)
    assert np.abs(anchored.uncond_states - plain.uncond_states).max() > 1e-3
