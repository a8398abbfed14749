"""A micro UNet + image projection + text states: enough to run the real erasure step in seconds."""

import jax.numpy as jnp
import numpy as np

from coerase_jax.diffusion.schedule import NoiseSchedule
from coerase_jax.erase.step import Batch, StepSettings, TrainState, build_step, make_optimizer
from coerase_jax.erase import subsets
from coerase_jax.models.image_proj import ImageProjection
from coerase_jax.models.presets import SD_SCHEDULER, random_params
from coerase_jax.models.unet import UNet, UNetConfig

# 8 norm groups, not one channel per group: a GroupNorm over single channels removes the per-channel
# constant the time embedding adds in every resnet, and the UNet would not see the timestep at all.
MICRO_UNET = UNetConfig(sample_size=4, block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                        up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, attention_head_dim=2,
                        cross_attention_dim=32, norm_num_groups=8)
EMBED_DIM = 16


def micro_world(seed: int = 0):
    rng = np.random.default_rng(seed)
    unet = UNet(MICRO_UNET, with_image_kv=True)
    params = random_params(unet.init_params, rng)
    proj = ImageProjection(32, 4)
    proj_params = random_params(lambda r: proj.init_params(r, EMBED_DIM), rng)
    return unet, params, proj, proj_params


def micro_batch(batch_size: int, seed: int = 1, with_image: bool = True) -> Batch:
    rng = np.random.default_rng(seed)
    text = rng.standard_normal((batch_size, 77, 32)).astype(np.float32)
    uncond = np.broadcast_to(rng.standard_normal((1, 77, 32)).astype(np.float32), text.shape)
    images = rng.standard_normal((batch_size, EMBED_DIM)).astype(np.float32) if with_image else None
    return Batch(text, np.asarray(uncond), text, np.ones((batch_size, 77), bool), images)


def micro_step(settings: StepSettings, subset: str = "full", learning_rate: float = 1e-3, ddim_steps: int = 4,
               train_image_kv: bool = False, seed: int = 0, optimizer: str = "adam"):
    """(jittable step, initial state, frozen, teacher, proj_params) on the micro world."""
    unet, params, proj, proj_params = micro_world(seed)
    optimizer = make_optimizer(optimizer, learning_rate, 100)
    plan = NoiseSchedule.from_config(SD_SCHEDULER).ddim_plan(ddim_steps)
    step = build_step(unet, proj, plan, settings, optimizer, (4, 4, 4))
    trainable, frozen = subsets.split(params, subset, train_image_kv)
    state = TrainState(jnp.zeros((), jnp.int32), trainable, optimizer.init(trainable))
    return step, state, frozen, params, proj_params
