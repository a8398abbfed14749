"""An UnlearnDiff-style attack: find k prompt tokens that make the erased model draw the concept again.

For each attacked prompt p with a target image x₀ of the concept (the original model's image for
that prompt and seed), k token vectors v₁..v_k are placed after the start token, and

    min_v  E_{t, ε} ‖ ε_θ*( √ᾱ_t z₀ + √(1−ᾱ_t) ε,  t,  c([v₁..v_k] ⊕ p) ) − ε ‖²,   z₀ = VAE(x₀)

i.e. the erased model θ* is asked to denoise the concept's own image under the adversarial
prompt: where it can, the prompt has found the concept again (UnlearnDiff, Zhang et al. 2024).
Tokens must be real words, so every forward pass uses v projected onto the nearest vocabulary
token (cosine) and the gradient goes to the continuous v (straight-through, as PEZ). After the
step the projected tokens are decoded to text and prepended to the prompt: the adversarial prompt
is then generated from and judged like any other. As in UnlearnDiff, the attack on a prompt
succeeds when any of its checked prompts (every ``check_every`` steps and after the last) makes
the model draw the concept; the first such prompt is kept.

All attacked prompts are optimised together in one jitted program (their losses are independent,
so one batched gradient is P separate attacks); with a mesh the batch is split over its devices.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from coerase_jax.diffusion.schedule import NoiseSchedule, add_noise, training_target
from coerase_jax.models.bundle import Bundle
from coerase_jax.parallel import distributed
from coerase_jax.parallel import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class AttackSettings:
    tokens: int = 5  # k adversarial tokens, placed as a prefix
    steps: int = 40
    learning_rate: float = 0.01
    seed: int = 0
    check_every: int = 10  # judge the current adversarial prompts this often


def insert_prefix_slots(ids: np.ndarray, k: int) -> np.ndarray:
    """(P, L) token ids -> (P, L) ids with k slots after the start token (the last k positions,
    padding for short prompts, are dropped). The slot ids are placeholders: their vectors are given."""
    return np.concatenate([ids[:, :1], np.repeat(ids[:, :1], k, axis=1), ids[:, 1:ids.shape[1] - k]], axis=1)


def nearest_tokens(vectors: jax.Array, table: jax.Array, allowed: jax.Array) -> jax.Array:
    """(..., D) vectors -> (...) ids of the most cosine-similar allowed rows of table (V, D)."""
    unit = lambda x: x / (jnp.linalg.norm(x, axis=-1, keepdims=True) + 1e-8)
    similarity = unit(vectors) @ unit(table).T
    return jnp.argmax(jnp.where(allowed, similarity, -jnp.inf), axis=-1)


def attack_loss(vectors, unet_params, bundle: Bundle, text_params, slot_ids, latents, timesteps, noise,
                alphas_cumprod, allowed, prediction_type: str = "epsilon"):
    """Mean squared denoising error of the erased UNet under the (projected) adversarial prompts, in
    the model's own output space (noise, or velocity for SD 2.x)."""
    table = bundle.text_encoder.token_table(text_params)
    projected = table[nearest_tokens(vectors, table, allowed)]
    prefix = vectors + jax.lax.stop_gradient(projected - vectors)  # value: real tokens; gradient: to v
    k = vectors.shape[1]
    embeds = table[slot_ids].at[:, 1:1 + k].set(prefix)
    text = bundle.text_encoder.apply({"params": text_params}, slot_ids, embeds)
    alpha = alphas_cumprod[timesteps][:, None, None, None]
    output = bundle.unet_eps(unet_params, add_noise(latents, noise, alpha), timesteps, text)
    return jnp.mean((output - training_target(latents, noise, alpha, prediction_type)) ** 2, axis=(1, 2, 3)).sum()


def allowed_tokens(bundle: Bundle) -> np.ndarray:
    """Every vocabulary token except the special ones (start, end, padding)."""
    vocab = bundle.text_encoder.config.vocab_size
    allowed = np.ones(vocab, bool)
    tok = bundle.tokenizer
    for special in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id):
        if special is not None and special < vocab:
            allowed[special] = False
    return allowed


def attack(bundle: Bundle, unet_params, prompts: list[str], target_images: np.ndarray,
           settings: AttackSettings = AttackSettings(), check: Callable[[list[str]], np.ndarray] | None = None,
           mesh=None, progress: bool = True) -> list[str]:
    """Adversarial prompts ("<k tokens> <prompt>"), one per prompt, against ``unet_params``.

    ``check(prompts)`` -> (P,) bool: whether each prompt makes the model show the concept. Without
    it the last step's prompts are returned; with it, each prompt's first successful one."""
    count, k = len(prompts), settings.tokens
    if mesh is not None:  # whole batches per device: pad by repeating prompts (their results are dropped)
        shards = mesh.shape["data"] * mesh.shape["fsdp"]
        pad = np.arange(-count % shards) % count
        prompts, target_images = list(prompts) + [prompts[i] for i in pad], np.concatenate(
            [target_images, target_images[pad]])
    slot_ids = insert_prefix_slots(bundle.tokenize(list(prompts)), k)
    latents = np.asarray(jax.jit(bundle.encode_latents)(jnp.asarray(target_images, jnp.float32) / 255.0))
    schedule = NoiseSchedule.from_config(bundle.scheduler_config)
    alphas = jnp.asarray(schedule.alphas_cumprod)
    allowed = jnp.asarray(allowed_tokens(bundle))
    table = jnp.asarray(bundle.text_encoder.token_table(bundle.text_params))
    rng = np.random.default_rng(settings.seed)
    vectors = table[rng.choice(np.flatnonzero(np.asarray(allowed)), size=(len(prompts), k))]
    optimizer = optax.adam(settings.learning_rate)
    opt_state = optimizer.init(vectors)

    def step(vectors, opt_state, key, unet_params, text_params, slot_ids, latents):
        t_key, n_key = jax.random.split(key)
        timesteps = jax.random.randint(t_key, (latents.shape[0],), 0, schedule.num_train_timesteps)
        noise = jax.random.normal(n_key, latents.shape, latents.dtype)
        loss, grad = jax.value_and_grad(attack_loss)(vectors, unet_params, bundle, text_params, slot_ids, latents,
                                                     timesteps, noise, alphas, allowed, schedule.prediction_type)
        updates, opt_state = optimizer.update(grad, opt_state, vectors)
        return optax.apply_updates(vectors, updates), opt_state, loss

    project = lambda vectors: nearest_tokens(vectors, table, allowed)
    text_params, key = bundle.text_params, jax.random.PRNGKey(settings.seed)
    place_key = lambda key: key
    if mesh is None:
        step, project = jax.jit(step), jax.jit(project)
    else:  # the attacked prompts split over the mesh's batch devices, the weights replicated
        rep, data = mesh_lib.replicated(mesh), mesh_lib.batch_sharding(mesh)
        opt_sharding = jax.tree_util.tree_map(lambda a: data if np.ndim(a) else rep, opt_state)
        # every input placed explicitly (on several hosts jit takes no numpy for sharded inputs)
        vectors, opt_state, slot_ids, latents = jax.device_put((vectors, opt_state, slot_ids, latents),
                                                               (data, opt_sharding, data, data))
        unet_params, text_params = jax.device_put((unet_params, text_params), rep)
        place_key = lambda key: jax.device_put(key, rep)
        step = jax.jit(step, in_shardings=(data, opt_sharding, rep, rep, rep, data, data),
                       out_shardings=(data, opt_sharding, rep))
        project = jax.jit(project, in_shardings=data, out_shardings=rep)

    def current_prompts() -> list[str]:
        tokens = np.asarray(distributed.fetch(project(vectors)))[:count]
        return [f"{bundle.tokenizer.decode(row.tolist()).strip()} {prompt}".strip()
                for row, prompt in zip(tokens, prompts)]

    chosen, succeeded = None, np.zeros(count, bool)
    steps = tqdm(range(1, settings.steps + 1), desc=f"attacking {count} prompts", unit="step",
                 disable=not progress or not distributed.is_leader())
    for i in steps:
        vectors, opt_state, loss = step(vectors, opt_state, place_key(jax.random.fold_in(key, i)), unet_params,
                                        text_params, slot_ids, latents)
        if check is not None and (i % settings.check_every == 0 or i == settings.steps):
            candidates = current_prompts()
            chosen = chosen or candidates
            new = check(candidates) & ~succeeded
            chosen = [c if n else old for c, n, old in zip(candidates, new, chosen)]
            succeeded |= new
            steps.set_postfix(loss=f"{float(loss) / len(prompts):.4f}", succeeded=int(succeeded.sum()))
    final = current_prompts()
    return final if chosen is None else [c if ok else f for c, ok, f in zip(chosen, succeeded, final)]
