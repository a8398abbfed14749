"""One erasure iteration as a single jitted, sharded function.

    key   = streams.step_key(seed, stage, step)             (per stage and step: resumable)
    i     ~ U{0..N-1}                                       (one DDIM index per step, traced)
    z_t   = DDIM (or DDPM) from T with the concept prompt, i steps   (no gradient; one lax loop)
    t     = plan.timesteps[i]  (matched)  |  U[iT/N, (i+1)T/N)  (bin)
    c_img = refine(ImageProj(e), c_guide) + noise           (image stage only)
    eps_c, eps_u = teacher(z_t, t, [c; c_img]), teacher(z_t, t, [c_0; c_img or nothing])
    loss  = || trainee(z_t, t, [c; c_img]) - (eps_u - eta (eps_c - eps_u)) ||^2
          (+ lambda || trainee(z_t, t, c_p) - teacher(z_t, t, c_p) ||^2 for a kept prompt c_p, when
           erase.preserve_weight > 0: a departure; the same z_t and t, text only)

The loss stays in the model's own output space: for a v-prediction model (SD 2.x) every "eps" here
is a velocity, and since the target is linear in the teacher's outputs it is the same ESD target
written in v (v_u - eta (v_c - v_u)); only z_t's sampler converts (``SamplingPlan.step``). SDXL's
added conditioning (pooled text + time ids) goes with its text into every UNet call: z_t's sampler,
the teacher's two branches and the trainee.

Only the trainable subset is differentiated and carries optimizer state; the frozen rest and
the teacher are inputs that are never donated.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax
import jax
import jax.numpy as jnp
import optax

from coerase_jax.diffusion.sampling import Conditioning, denoise, denoise_with_snapshots
from coerase_jax.diffusion.schedule import SamplingPlan
from coerase_jax.erase import method, streams, subsets
from coerase_jax.errors import UserError
from coerase_jax.models.image_proj import ImageProjection
from coerase_jax.models.unet import UNet
from coerase_jax.parallel import mesh as mesh_lib


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: iterations done (also the data position)
    trainable: dict
    opt_state: Any


class Batch(NamedTuple):
    """Per-example conditioning, gathered on the host from the caches (see trainer.sample_batch)."""

    text: jax.Array  # (B, L, D) concept prompt states
    uncond_text: jax.Array  # (B, L, D) empty prompt states
    guide_text: jax.Array  # (B, L, D) text that guides refinement
    guide_mask: jax.Array  # (B, L) tokens of the guide text that take part in refinement
    image_embeds: jax.Array | None  # (B, E) CLIP image embeddings; None in the text stage
    added: jax.Array | None = None  # (B, A) SDXL's added conditioning of the concept prompt; None otherwise
    uncond_added: jax.Array | None = None  # (B, A) the empty prompt's
    kept_text: jax.Array | None = None  # (B, L, D) a prompt to preserve per example (concept.preserve); None: off
    kept_added: jax.Array | None = None  # (B, A) its SDXL added conditioning; None otherwise


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The static method options of one stage (hashable: part of the compiled program)."""

    use_image: bool  # False: text-only ESD; True: Co-Erasing image stage
    eta: float = 1.0
    text_uncond: bool = True
    zt_sampler: str = "trainee"  # trainee | teacher
    zt_guidance: float = 1.0  # 1.0 = no guidance (Co-Erasing); 3.0 = ESD
    zt_image_tokens: bool = False  # condition the z_t sampler on the image tokens too
    timestep_pairing: str = "matched"  # matched | bin
    blur_kernel: int = 0  # 0 = no blur of z_t
    blur_sigma: float = 0.0  # 0 = torchvision's default for the kernel size
    refine: bool = True
    embed_noise: float = 0.0
    embed_noise_kind: str = "uniform"  # uniform (the reference's rand_like) | gaussian
    image_scale: float = 1.0
    # DEPARTURE FROM THE PAPER when > 1 (off by default): take this many z_t from one sampled
    # trajectory, at independent DDIM indices, and use them all in the step's loss; the z_t loop
    # (the dominant cost) then runs once per K loss examples.
    snapshots_per_trajectory: int = 1
    # DEPARTURE FROM THE PAPER when > 0 (off by default): lambda of the preservation term on the
    # batch's kept prompts (Batch.kept_text)
    preserve_weight: float = 0.0
    seed: int = 0
    stage: int = 0  # the stage's index in the run: its own random stream (streams.py)

    def __post_init__(self):
        if self.zt_sampler not in ("trainee", "teacher"):
            raise UserError(f"erase.zt_sampler must be trainee or teacher, got {self.zt_sampler!r}")
        if self.timestep_pairing not in ("matched", "bin"):
            raise UserError(f"erase.timestep_pairing must be matched or bin, got {self.timestep_pairing!r}")
        if self.blur_kernel and (self.blur_kernel < 3 or self.blur_kernel % 2 == 0):
            raise UserError(f"erase.blur_kernel must be 0 or an odd size >= 3, got {self.blur_kernel}")
        if self.snapshots_per_trajectory < 1:
            raise UserError("erase.snapshots_per_trajectory must be at least 1")
        if self.preserve_weight < 0:
            raise UserError(f"erase.preserve_weight must be 0 (off) or positive, got {self.preserve_weight}")
        if self.embed_noise_kind not in ("uniform", "gaussian"):
            raise UserError(f"erase.embed_noise_kind must be uniform or gaussian, got {self.embed_noise_kind!r}")


def make_optimizer(name: str, learning_rate: float, total_steps: int, schedule: str = "constant",
                   warmup_steps: int = 0, clip_norm: float = 0.0, weight_decay: float = 0.0,
                   b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
                   first_moment_dtype: str = "float32") -> optax.GradientTransformation:
    if schedule == "constant":
        lr = optax.constant_schedule(learning_rate)
    elif schedule == "cosine":
        lr = optax.cosine_decay_schedule(learning_rate, max(total_steps - warmup_steps, 1))
    elif schedule == "linear":
        lr = optax.linear_schedule(learning_rate, 0.0, max(total_steps - warmup_steps, 1))
    else:
        raise UserError(f"optim.schedule must be constant, cosine or linear, got {schedule!r}")
    if warmup_steps:
        lr = optax.join_schedules([optax.linear_schedule(0.0, learning_rate, warmup_steps), lr], [warmup_steps])
    if first_moment_dtype not in ("float32", "bfloat16"):
        raise UserError(f"optim.first_moment_dtype must be float32 or bfloat16, got {first_moment_dtype!r}")
    mu_dtype = jnp.bfloat16 if first_moment_dtype == "bfloat16" else None  # None: the parameters' (fp32)
    if name == "adam":
        opt = optax.adam(lr, b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype)
    elif name == "adamw":
        opt = optax.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mu_dtype=mu_dtype)
    elif name == "sgd":
        opt = optax.sgd(lr)
    else:
        raise UserError(f"optim.name must be adam, adamw or sgd, got {name!r}")
    return optax.chain(optax.clip_by_global_norm(clip_norm), opt) if clip_norm > 0 else opt


def denoiser(unet: UNet):
    """eps(params, z, t, text, image_tokens=None, image_scale=1.0, added_cond=None) for a UNet definition."""

    def eps(params, x, t, text, image_tokens=None, image_scale=1.0, added_cond=None):
        return unet.apply({"params": params}, x, t, text, image_tokens, image_scale, added_cond)

    return eps


def build_step(unet: UNet, image_proj: ImageProjection | None, plan: SamplingPlan, settings: StepSettings,
               optimizer: optax.GradientTransformation, latent_shape: tuple[int, int, int], mesh=None,
               compose: Callable[[dict, dict], dict] = subsets.merge):
    """The pure step: (state, frozen, teacher, proj_params, batch) -> (state, metrics).

    ``compose(trainable, frozen)`` makes the UNet's parameters (a subset merge, or LoRA's W + s·AB).

    With a ``mesh``, gradients are constrained to their parameters' shardings, so under FSDP each
    gradient is reduce-scattered as soon as it exists instead of living unsharded until the update."""
    s = settings
    eps = denoiser(unet)
    # Mixed precision: fp32 master weights, cast to the compute dtype where they are used, so a
    # sharded (FSDP) parameter is gathered in bf16 and its gradient flows back through the cast.
    compute = lambda tree: jax.tree_util.tree_map(lambda x: x.astype(unet.precision.dtype), tree)

    def step(state: TrainState, frozen: dict, teacher: dict, proj_params, batch: Batch):
        key = streams.step_key(s.seed, s.stage, state.step)
        k_zt, k_embed = jax.random.split(key)
        image_tokens = None
        if s.use_image:
            image_tokens = image_condition(image_proj, proj_params, batch, s, k_embed)
        sampler_params = compose(state.trainable, frozen) if s.zt_sampler == "trainee" else teacher
        index, z, t = sample_zt(eps, jax.lax.stop_gradient(compute(sampler_params)), k_zt, batch,
                                image_tokens if s.zt_image_tokens else None, plan, s, latent_shape)
        batch = repeat_batch(batch, s.snapshots_per_trajectory)  # one row per z_t
        if image_tokens is not None:
            image_tokens = jnp.tile(image_tokens, (s.snapshots_per_trajectory, 1, 1))
        eps_cond, eps_uncond = teacher_terms(eps, compute(teacher), z, t, batch.text, batch.uncond_text,
                                             image_tokens, s, batch.added, batch.uncond_added)
        target = method.negative_guidance_target(eps_uncond, eps_cond, s.eta)
        kept_target = None
        if s.preserve_weight > 0:  # the kept prompts' own teacher predictions, text only, at the same z_t and t
            if batch.kept_text is None:
                raise UserError("erase.preserve_weight > 0 needs prompts to keep (concept.preserve)")
            kept_target = jax.lax.stop_gradient(
                eps(compute(teacher), z, t, batch.kept_text, **added_keyword(batch.kept_added)))

        def loss_fn(trainable):
            params = compute(compose(trainable, frozen))
            prediction = eps(params, z, t, batch.text, image_tokens, s.image_scale, **added_keyword(batch.added))
            erasure = method.erasure_loss(prediction, target)
            if kept_target is None:
                return erasure, {}
            kept = eps(params, z, t, batch.kept_text, **added_keyword(batch.kept_added))
            preservation = method.preservation_loss(kept, kept_target)
            return erasure + s.preserve_weight * preservation, {"erasure_loss": erasure,
                                                                "preservation_loss": preservation}

        (loss, parts), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
        if mesh is not None:
            grads = jax.lax.with_sharding_constraint(grads, mesh_lib.tree_shardings(grads, mesh))
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "ddim_index": index,
                   "timestep": t[0], **parts}
        return TrainState(state.step + 1, trainable, opt_state), metrics

    return step


def image_condition(image_proj: ImageProjection, proj_params, batch: Batch, s: StepSettings, key) -> jax.Array:
    """c_img = refine(ImageProj(e), c_guide) + noise (or the projected tokens + noise without
    refinement): the noise lands on the tokens the UNet sees, where the reference adds its
    ``rand_like`` noise after refining."""
    tokens = image_proj.apply({"params": proj_params}, batch.image_embeds)
    if s.refine:
        tokens = method.refine_image_tokens(tokens, batch.guide_text, batch.guide_mask)
    if s.embed_noise > 0:
        draw = jax.random.uniform if s.embed_noise_kind == "uniform" else jax.random.normal
        tokens = tokens + s.embed_noise * draw(key, tokens.shape, tokens.dtype)
    return jax.lax.stop_gradient(tokens)


def sample_zt(eps, sampler_params, key, batch: Batch, zt_tokens, plan: SamplingPlan, s: StepSettings,
              latent_shape: tuple[int, int, int]):
    """(i, z_t, t): index i ~ U{0..N-1}, the latent after i sampling steps (DDIM, or ancestral DDPM
    as ``plan`` says) from the noisiest timestep with the concept prompt (no gradient), and the loss
    timestep paired with it.

    With K = ``snapshots_per_trajectory`` > 1: K indices on one trajectory; z_t and t are then
    (K*B, ...) in snapshot-major order, and i is the largest index."""
    k_index, k_latent, k_time, k_ancestral = jax.random.split(key, 4)
    batch_size = batch.text.shape[0]
    snapshots = s.snapshots_per_trajectory
    uncond = Conditioning(batch.uncond_text, zt_tokens, batch.uncond_added) if s.zt_guidance != 1.0 else None
    noise = jax.random.normal(k_latent, (batch_size,) + latent_shape, jnp.float32)
    cond = Conditioning(batch.text, zt_tokens, batch.added)
    zt_eps = lambda p, x, t, c, i, **added: eps(p, x, t, c, i, s.image_scale, **added)
    if snapshots == 1:
        indices = jax.random.randint(k_index, (1,), 0, plan.num_steps)
        z = denoise(zt_eps, sampler_params, noise, plan, cond, uncond, s.zt_guidance, num_steps=indices[0],
                    key=k_ancestral)
    else:
        indices = jax.random.randint(k_index, (snapshots,), 0, plan.num_steps)
        z = denoise_with_snapshots(zt_eps, sampler_params, noise, plan, cond, uncond, s.zt_guidance, indices,
                                   key=k_ancestral)
        z = z.reshape((snapshots * batch_size,) + latent_shape)
    if s.blur_kernel:
        z = method.gaussian_blur(z, s.blur_kernel, s.blur_sigma or method.default_blur_sigma(s.blur_kernel))
    per_example = jnp.repeat(indices, batch_size)
    if s.timestep_pairing == "matched":
        t = plan.timesteps[per_example]
    else:
        t = method.bin_timestep(k_time, per_example, plan.num_steps, per_example.shape[0], plan.num_train_timesteps)
    return jnp.max(indices), jax.lax.stop_gradient(z), t


def added_keyword(added: jax.Array | None) -> dict:
    """SDXL's added conditioning as the ``added_cond`` keyword, or nothing: eps functions of models
    without it need not take it."""
    return {} if added is None else {"added_cond": added}


def repeat_batch(batch: Batch, times: int) -> Batch:
    """The batch tiled ``times`` over (snapshot-major, matching sample_zt's z_t order)."""
    if times == 1:
        return batch
    tile = lambda a: None if a is None else jnp.tile(a, (times,) + (1,) * (a.ndim - 1))
    return Batch(*(tile(a) for a in batch))


def teacher_terms(eps, teacher, z, t, text, uncond_text, image_tokens, s: StepSettings, added=None,
                  uncond_added=None):
    """(eps_0(z_t, t, [c; c_img]), eps_0(z_t, t, c_0 [; c_img])), both branches in one batched call.

    With ``text_uncond`` the unconditional branch sees no image tokens (its image scale is 0,
    which is exactly text-only attention); without image tokens both branches are text-only.
    ``added`` / ``uncond_added``: SDXL's added conditioning of each branch (None otherwise).
    """
    both = lambda a, b: None if a is None else jnp.concatenate([a, b], axis=0)
    added = added_keyword(both(added, uncond_added))
    if image_tokens is None:
        out = eps(teacher, both(z, z), both(t, t), both(text, uncond_text), **added)
    else:
        batch = z.shape[0]
        scales = both(jnp.full((batch,), s.image_scale), jnp.full((batch,), 0.0 if s.text_uncond else s.image_scale))
        out = eps(teacher, both(z, z), both(t, t), both(text, uncond_text), both(image_tokens, image_tokens), scales,
                  **added)
    eps_cond, eps_uncond = jnp.split(jax.lax.stop_gradient(out), 2, axis=0)
    return eps_cond, eps_uncond


def jit_step(step_fn, mesh, state, frozen, teacher, proj_params, batch: Batch, donate: bool = True):
    """``jax.jit`` with explicit shardings from the rules table; the state is donated (its buffers
    are reused for the new state) unless ``donate`` is off.

    The arguments may be arrays or ShapeDtypeStructs (only their shapes and tree structure count).
    """
    state_sh = mesh_lib.tree_shardings(state, mesh)
    rep = mesh_lib.replicated(mesh)
    batch_sh = jax.tree_util.tree_map(lambda _: mesh_lib.batch_sharding(mesh), batch)
    in_shardings = (state_sh, mesh_lib.tree_shardings(frozen, mesh), mesh_lib.tree_shardings(teacher, mesh),
                    mesh_lib.tree_shardings(proj_params, mesh), batch_sh)
    # every metric is a replicated scalar (one sharding for the whole dict, whatever its keys)
    return jax.jit(step_fn, in_shardings=in_shardings, out_shardings=(state_sh, rep),
                   donate_argnums=(0,) if donate else ())
