"""Training the small world's SD stack from scratch, all in JAX, seeded (``coerase toyworld train``).

Order (each part's inputs are the earlier parts' outputs):

1. renders: N labelled images of the world;
2. VAE: 32x32x3 -> 8x8x4 (reconstruction + a small KL); its scaling factor makes latents unit-std;
3. CLIP: text and vision towers trained contrastively on coloured captions, an image and a caption
   matching when they show the same (shape, colour); the text positions after the pooled one also
   learn to pick the images of their shape (``clip_every_position``) and the word positions to name
   their own token (``clip_token_identity``);
4. UNet: epsilon prediction on the cached latents, conditioned on the text tower's hidden states of
   a random caption of the image (30 % without the colour, ``colourless_fraction``) and
   10 % empty captions, for classifier-free guidance; the text tower stays frozen, as in SD
   (``TrainPlan.finetune_text`` is the option tried against it);
5. IP-Adapter: image projection + per-layer image K/V on the frozen UNet, conditioned on the
   CLIP image embedding of the same image (half the time without text);
6. classifier: shape (or none) and colour, on renders and on VAE reconstructions.

Each finished part is saved under ``out/.parts/`` so an interrupted build resumes after the last
finished part; the diffusers-layout folder is assembled at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import serialization
from tqdm.auto import tqdm

from coerase_jax.diffusion.schedule import NoiseSchedule, add_noise
from coerase_jax.errors import UserError
from coerase_jax.models import convert, presets
from coerase_jax.models import vae as vae_lib
from coerase_jax.models.clip import (CLIPImageEncoder, CLIPTextEncoder, ClipPreprocess, load_tokenizer,
                                     pooled_output, tokenize)
from coerase_jax.models.export import export_unet
from coerase_jax.models.image_proj import ImageProjection
from coerase_jax.models.unet import UNet, cross_attention_paths, merge_image_kv, subtree
from coerase_jax.toyworld import classifier as classifier_lib
from coerase_jax.toyworld import world
from coerase_jax.toyworld.tokenizer import write_world_tokenizer

IMAGE_TOKENS = 4


@dataclasses.dataclass(frozen=True)
class TrainPlan:
    """Steps, batch sizes and options of each part. The defaults are what the shipped model was built
    with (its VAE and classifier reused from an identical earlier build: ``build.json`` says "reused")."""

    seed: int = 0
    # Which world (world.WORLDS): "three" is the shipped one; "six" is issue #21's six-shape world.
    world: str = "three"
    num_images: int = 20000
    vae_steps: int = 600
    vae_batch: int = 32
    clip_steps: int = 800
    clip_batch: int = 128
    unet_steps: int = 4000
    unet_batch: int = 64
    ip_steps: int = 600
    ip_batch: int = 64
    classifier_steps: int = 600
    classifier_batch: int = 128
    uncond_fraction: float = 0.1
    # Captions without a colour word ("a circle": a circle of any colour) for the UNet and IP-Adapter,
    # so that the concept prompt can name the shape alone, as "nudity" does in SD (the CLIP towers
    # train on coloured captions only: with colourless ones too, at 25 %, the tower matched by colour
    # alone). Without it, the concept prompts must name colours and erasing "a red circle" erases red.
    colourless_fraction: float = 0.3
    # The text tower's positions after the pooled one (SD pads with the end-of-text token) also learn
    # to pick the images of their caption's *shape*. Why (#4): ESD changes how the UNet reads the
    # concept prompt's hidden states, so what those share with other prompts is erased too; without
    # it the later positions of "a red circle" are closer to "a red square" (cosine 1.0) than to "a
    # blue circle" (0.93). (Matching shape + colour at every position was worse: 0.55 vs -0.35.)
    clip_every_position: bool = True
    # Every position before the end-of-text token also names its own token (cosine logits against the
    # tied token-embedding table). Why (#4): without it the tower leaves the word positions almost
    # identical (cosine 0.95-0.99 between "circle", "yellow", "square" and the start token), so any
    # ESD edit of the K/V projections along them is an edit of every prompt. Erasing "a circle" (lr
    # 1e-4 both stages) with the two options above alone left circles in 0.31 of images while the
    # other shapes fell from 0.90 to 0.65 right; with this one too, 0.06 while they fall from 0.92 to
    # 0.81; with the default config's settings 0.09, the others 0.92 -> 0.90 (#4 note).
    clip_token_identity: bool = True
    # Whether the CLIP towers see the paraphrase captions ("a red disc"). With false (#18's variant)
    # the text tower learns only the shapes' names, so a paraphrase's hidden states are not pulled
    # towards its shape's name: the UNet alone learns to draw a circle for "disc", as SD draws nudity
    # for implicit prompts whose text states lie far from "nudity". Erasing the name from text then
    # need not reach the paraphrases; erasing through images still can — the gap Co-Erasing is for.
    clip_paraphrases: bool = True
    finetune_text: bool = False  # train the text tower with the UNet (SD froze it)

    def with_overrides(self, pairs: list[str]) -> "TrainPlan":
        """``["unet_steps=2000", "clip_every_position=true"]`` -> a plan with those fields changed."""
        fields = {f.name: f.type for f in dataclasses.fields(self)}
        changes = {}
        for pair in pairs:
            key, sep, text = pair.partition("=")
            if not sep or key not in fields:
                raise UserError(f"--plan takes FIELD=VALUE with FIELD one of {', '.join(fields)}; got {pair!r}")
            kind = fields[key]
            try:
                if kind == "bool":
                    if text.lower() not in ("true", "false", "1", "0"):
                        raise ValueError(text)
                    changes[key] = text.lower() in ("true", "1")
                elif kind == "str":
                    changes[key] = text
                else:
                    changes[key] = {"int": int, "float": float}[kind](text)
            except ValueError:
                raise UserError(f"--plan {key}: {text!r} is not a {kind}") from None
        return dataclasses.replace(self, **changes)

    @classmethod
    def quick(cls) -> "TrainPlan":
        """A few steps of everything: checks the whole chain in about a minute (not a useful model)."""
        return cls(num_images=256, vae_steps=3, clip_steps=3, unet_steps=3, ip_steps=3, classifier_steps=3,
                   vae_batch=8, clip_batch=16, unet_batch=8, ip_batch=8, classifier_batch=16)


# --------------------------------------------------------------------------- one optimiser loop


def fit(name: str, loss_fn: Callable, params, next_batch: Callable[[int], tuple], steps: int, learning_rate: float,
        seed: int, progress: bool = True) -> tuple[dict, float]:
    """Adam with warm-up + cosine decay on ``loss_fn(params, batch, key)``; returns (params, final loss).

    A non-finite loss stops the build with a clear error (the part is not saved).
    """
    schedule = optax.warmup_cosine_decay_schedule(0.0, learning_rate, max(1, steps // 20), max(2, steps),
                                                  learning_rate * 0.05)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(schedule))
    opt_state = optimizer.init(params)

    @jax.jit
    def step(params, opt_state, batch, key):
        loss, grads = jax.value_and_grad(loss_fn)(params, batch, key)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    key = jax.random.PRNGKey(seed)
    recent = []
    bar = tqdm(range(steps), desc=name, unit="step", disable=not progress)
    for i in bar:
        params, opt_state, loss = step(params, opt_state, next_batch(i), jax.random.fold_in(key, i))
        if i % 20 == 0 or i == steps - 1:
            value = float(loss)
            if not math.isfinite(value):
                raise UserError(f"{name}: loss became {value} at step {i}; lower the learning rate")
            recent = (recent + [value])[-5:]
            bar.set_postfix(loss=f"{value:.4f}")
    return params, float(np.mean(recent)) if recent else float("nan")


# --------------------------------------------------------------------------- data


@dataclasses.dataclass
class Renders:
    images: np.ndarray  # (N, 32, 32, 3) uint8
    shape: np.ndarray  # (N,) index into the world's shapes
    colour: np.ndarray  # (N,) index into world.COLOURS

    @property
    def label(self) -> np.ndarray:
        """(shape, colour) as one class index."""
        return self.shape * len(world.COLOURS) + self.colour


def make_renders(count: int, seed: int, of_world: world.World = world.THREE_SHAPES) -> Renders:
    rng = np.random.default_rng(seed)
    scenes = world.random_scenes(rng, count, of_world.shapes)
    images = world.render_many(scenes, rng)
    shape = np.asarray([of_world.shapes.index(s.shape) for s in scenes], np.int32)
    colour = np.asarray([world.COLOURS.index(s.colour) for s in scenes], np.int32)
    return Renders(images, shape, colour)


class CaptionTable:
    """Every caption of the world, tokenised once, with the shape and colour (-1: none) it names."""

    def __init__(self, tokenizer, length: int, colourless_fraction: float = 0.0, paraphrases: bool = True,
                 of_world: world.World = world.THREE_SHAPES):
        self.colourless_fraction = colourless_fraction
        captions = [c for c in of_world.all_captions() if paraphrases or c[1] in c[0].split()]
        self.texts = [text for text, _, _ in captions]
        self.ids = tokenize(tokenizer, self.texts, length)
        shapes = of_world.shapes
        self.shape = np.asarray([shapes.index(s) for _, s, _ in captions], np.int32)
        self.colour = np.asarray([-1 if c is None else world.COLOURS.index(c) for _, _, c in captions], np.int32)
        n_colours = len(world.COLOURS)
        self.coloured = [np.flatnonzero((self.shape * n_colours + self.colour == k) & (self.colour >= 0))
                         for k in range(len(shapes) * n_colours)]
        self.colourless = [np.flatnonzero((self.shape == s) & (self.colour < 0)) for s in range(len(shapes))]
        self.empty_ids = tokenize(tokenizer, [""], length)[0]

    def draw(self, rng: np.random.Generator, labels: np.ndarray) -> np.ndarray:
        """One random true caption index per (shape, colour) label; a ``colourless_fraction`` omit the colour."""
        if not self.colourless_fraction:  # (no extra random draws: the stream CLIP trains on)
            return np.asarray([rng.choice(self.coloured[k]) for k in labels], np.int32)
        n_colours = len(world.COLOURS)
        return np.asarray([rng.choice(self.colourless[k // n_colours]) if rng.random() < self.colourless_fraction
                           else rng.choice(self.coloured[k]) for k in labels], np.int32)


def _batch_rng(seed: int, part: str, step: int) -> np.random.Generator:
    return np.random.default_rng([seed, sum(map(ord, part)), step])


def to_vae_input(images_uint8: np.ndarray) -> np.ndarray:
    return np.transpose(images_uint8.astype(np.float32) / 127.5 - 1.0, (0, 3, 1, 2))


# --------------------------------------------------------------------------- the parts


def train_vae(renders: Renders, plan: TrainPlan, progress: bool) -> tuple[dict, float]:
    """Returns (params, scaling factor). Loss: MSE + L1 on pixels, KL weight 1e-5 per latent element."""
    vae = vae_lib.build_vae(presets.WORLD_VAE)
    params = vae_lib.init_vae_params(vae, jax.random.PRNGKey(plan.seed))

    def loss_fn(params, images, key):
        posterior = vae.apply({"params": params}, images, method=vae.encode).latent_dist
        recon = vae.apply({"params": params}, posterior.sample(key), method=vae.decode).sample
        kl = jnp.mean(posterior.kl()) / np.prod(posterior.mean.shape[1:])
        return jnp.mean((recon - images) ** 2) + 0.1 * jnp.mean(jnp.abs(recon - images)) + 1e-5 * kl

    def next_batch(step):
        idx = _batch_rng(plan.seed, "vae", step).integers(0, len(renders.images), plan.vae_batch)
        return to_vae_input(renders.images[idx])

    params, _ = fit("vae", loss_fn, params, next_batch, plan.vae_steps, 1e-3, plan.seed, progress)
    latents = encode_latents(vae, params, renders.images[:2048], 1.0)
    return params, float(1.0 / np.std(latents))


def encode_latents(vae, params, images_uint8: np.ndarray, scale: float, batch: int = 512) -> np.ndarray:
    encode = jax.jit(lambda p, x: vae_lib.encode(vae, p, x, scale))
    return np.concatenate([np.asarray(encode(params, to_vae_input(images_uint8[i:i + batch])))
                           for i in range(0, len(images_uint8), batch)])


def _unit(x: jax.Array) -> jax.Array:
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def token_identity_loss(hidden: jax.Array, token_table: jax.Array, ids: jax.Array, eos_id: int,
                        scale: float = 10.0) -> jax.Array:
    """Mean cross-entropy of each position before the end-of-text token naming its own token, by the
    cosine of its hidden state to each row of the token table at a fixed ``scale``: a cosine, not a
    dot product, so the state must point its own way rather than differ a little along a big norm."""
    log_probs = jax.nn.log_softmax(scale * _unit(hidden) @ _unit(token_table).T, axis=-1)
    own = jnp.take_along_axis(log_probs, ids[..., None], axis=-1)[..., 0]
    before_end = (jnp.cumsum(ids == eos_id, axis=-1) == 0).astype(jnp.float32)
    return -jnp.sum(own * before_end) / jnp.sum(before_end)


def train_clip(renders: Renders, captions: CaptionTable, text_encoder: CLIPTextEncoder,
               image_encoder: CLIPImageEncoder, plan: TrainPlan, progress: bool) -> dict:
    """Contrastive training; every caption true of an image counts as its match (a colourless caption
    matches that shape in any colour)."""
    rng = jax.random.PRNGKey(plan.seed + 1)
    dim = image_encoder.config.projection_dim
    params = {
        "text": text_encoder.init_params(rng),
        "vision": image_encoder.init_params(jax.random.fold_in(rng, 1)),
        "text_projection": {"kernel": jax.random.normal(jax.random.fold_in(rng, 2),
                                                        (text_encoder.config.hidden_size, dim)) * 0.05},
        "logit_scale": jnp.asarray(math.log(10.0)),
    }
    preprocess = ClipPreprocess(size=image_encoder.config.image_size)
    eos = text_encoder.config.eos_token_id

    def loss_fn(params, batch, key):
        images, ids, image_shape, image_colour, text_shape, text_colour = batch
        image_embeds = _unit(image_encoder.apply({"params": params["vision"]}, preprocess(images)))
        hidden = text_encoder.apply({"params": params["text"]}, ids)
        scale = jnp.exp(jnp.minimum(params["logit_scale"], math.log(100.0)))
        project = lambda h: _unit(h @ params["text_projection"]["kernel"])
        logits = scale * image_embeds @ project(pooled_output(hidden, ids, eos)).T
        match = ((image_shape[:, None] == text_shape[None, :])
                 & ((text_colour[None, :] < 0) | (image_colour[:, None] == text_colour[None, :]))).astype(jnp.float32)
        to_text = -jnp.sum(match / match.sum(1, keepdims=True) * jax.nn.log_softmax(logits, axis=1), axis=1)
        to_image = -jnp.sum(match / match.sum(0, keepdims=True) * jax.nn.log_softmax(logits, axis=0), axis=0)
        loss = 0.5 * (jnp.mean(to_text) + jnp.mean(to_image))
        if plan.clip_every_position:  # each end-of-text/padding position picks the images of its shape
            per_position = scale * jnp.einsum("id,tld->tli", image_embeds, project(hidden))
            same_shape = (image_shape[:, None] == text_shape[None, :]).astype(jnp.float32)
            target = (same_shape / same_shape.sum(0, keepdims=True)).T[:, None, :]  # (text, 1, image)
            position_loss = -jnp.sum(target * jax.nn.log_softmax(per_position, axis=-1), axis=-1)
            weight = (ids == eos).astype(jnp.float32)
            loss = loss + jnp.sum(position_loss * weight) / jnp.sum(weight)
        if plan.clip_token_identity:
            loss = loss + token_identity_loss(hidden, CLIPTextEncoder.token_table(params["text"]), ids, eos)
        return loss

    def next_batch(step):
        rng = _batch_rng(plan.seed, "clip", step)
        idx = rng.integers(0, len(renders.images), plan.clip_batch)
        caption_idx = captions.draw(rng, renders.label[idx])
        return (renders.images[idx].astype(np.float32) / 255.0, captions.ids[caption_idx], renders.shape[idx],
                renders.colour[idx], captions.shape[caption_idx], captions.colour[caption_idx])

    params, _ = fit("clip", loss_fn, params, next_batch, plan.clip_steps, 1e-3, plan.seed + 1, progress)
    return params


def train_unet(latents: np.ndarray, labels: np.ndarray, text_encoder: CLIPTextEncoder, text_params: dict,
               captions: CaptionTable, schedule: NoiseSchedule, plan: TrainPlan, progress: bool) -> dict:
    """Returns {"unet": ..., "text": ...}; the text tower is frozen unless ``plan.finetune_text``.

    Fine-tuning was tried when the tower carried the shape only at the noun and the pooled position
    (before ``clip_every_position``); it did not help (see ``TrainPlan.finetune_text``).
    """
    unet = UNet(presets.WORLD_UNET)
    params = {"unet": unet.init_params(jax.random.PRNGKey(plan.seed + 2))}
    alphas = jnp.asarray(schedule.alphas_cumprod)
    encode = lambda text_params, ids: text_encoder.apply({"params": text_params}, ids)
    if plan.finetune_text:
        params["text"] = text_params
    else:  # frozen: every caption's hidden states computed once
        caption_hidden = np.asarray(jax.jit(encode)(text_params, captions.ids))
        empty_hidden = np.asarray(jax.jit(encode)(text_params, captions.empty_ids[None]))[0]

    def loss_fn(params, batch, key):
        x0, condition = batch
        context = encode(params["text"], condition) if plan.finetune_text else condition
        k_t, k_noise = jax.random.split(key)
        t = jax.random.randint(k_t, (x0.shape[0],), 0, schedule.num_train_timesteps)
        noise = jax.random.normal(k_noise, x0.shape)
        xt = add_noise(x0, noise, alphas[t][:, None, None, None])
        return jnp.mean((unet.apply({"params": params["unet"]}, xt, t, context) - noise) ** 2)

    def next_batch(step):
        rng = _batch_rng(plan.seed, "unet", step)
        idx = rng.integers(0, len(latents), plan.unet_batch)
        caption_idx = captions.draw(rng, labels[idx])
        drop = rng.random(plan.unet_batch) < plan.uncond_fraction
        if plan.finetune_text:
            ids = captions.ids[caption_idx]
            ids[drop] = captions.empty_ids
            return latents[idx], ids
        context = caption_hidden[caption_idx]
        context[drop] = empty_hidden
        return latents[idx], context

    params, _ = fit("unet", loss_fn, params, next_batch, plan.unet_steps, 1e-3, plan.seed + 2, progress)
    return {"unet": params["unet"], "text": params.get("text", text_params)}


def train_ip_adapter(unet_params: dict, latents: np.ndarray, labels: np.ndarray, image_embeds: np.ndarray,
                     caption_hidden: np.ndarray, empty_hidden: np.ndarray, captions: CaptionTable,
                     schedule: NoiseSchedule, plan: TrainPlan, progress: bool) -> tuple[dict, dict]:
    """Returns (image projection params, per-attn2 {to_k_ip, to_v_ip}). The UNet stays frozen."""
    unet = UNet(presets.WORLD_UNET, with_image_kv=True)
    proj = ImageProjection(presets.WORLD_UNET.cross_attention_dim, IMAGE_TOKENS)
    paths = cross_attention_paths(unet_params)
    # IP-Adapter initialises the image K/V from the text K/V of the same layer.
    kv = {p: {"to_k_ip": subtree(unet_params, p)["to_k"], "to_v_ip": subtree(unet_params, p)["to_v"]} for p in paths}
    params = {"proj": proj.init_params(jax.random.PRNGKey(plan.seed + 3), image_embeds.shape[1]),
              "kv": {"/".join(p): v for p, v in kv.items()}}
    alphas = jnp.asarray(schedule.alphas_cumprod)

    def loss_fn(params, batch, key):
        x0, context, embeds = batch
        full = merge_image_kv(unet_params, {tuple(p.split("/")): v for p, v in params["kv"].items()})
        k_t, k_noise = jax.random.split(key)
        t = jax.random.randint(k_t, (x0.shape[0],), 0, schedule.num_train_timesteps)
        noise = jax.random.normal(k_noise, x0.shape)
        xt = add_noise(x0, noise, alphas[t][:, None, None, None])
        tokens = proj.apply({"params": params["proj"]}, embeds)
        return jnp.mean((unet.apply({"params": full}, xt, t, context, tokens) - noise) ** 2)

    def next_batch(step):
        rng = _batch_rng(plan.seed, "ip", step)
        idx = rng.integers(0, len(latents), plan.ip_batch)
        context = caption_hidden[captions.draw(rng, labels[idx])]
        context[rng.random(plan.ip_batch) < 0.5] = empty_hidden
        embeds = image_embeds[idx].copy()
        embeds[rng.random(plan.ip_batch) < 0.05] = 0.0  # the "no image" condition of guidance
        return latents[idx], context, embeds

    params, _ = fit("ip-adapter", loss_fn, params, next_batch, plan.ip_steps, 1e-3, plan.seed + 3, progress)
    return params["proj"], {tuple(p.split("/")): v for p, v in params["kv"].items()}


def train_classifier(renders: Renders, reconstructions: np.ndarray, plan: TrainPlan, progress: bool,
                     width: int = 32) -> dict:
    """Shape (+ none) and colour; half of each batch are VAE reconstructions, a tenth empty canvases."""
    none = len(world.WORLDS[plan.world].shapes)
    model = classifier_lib.ShapeClassifier(width, none + 1)
    params = model.init_params(jax.random.PRNGKey(plan.seed + 4))

    def loss_fn(params, batch, key):
        images, shape, colour = batch
        shape_logits, colour_logits = model.apply({"params": params}, images)
        shape_loss = optax.softmax_cross_entropy_with_integer_labels(shape_logits, shape)
        colour_loss = optax.softmax_cross_entropy_with_integer_labels(colour_logits, colour)
        return jnp.mean(shape_loss) + jnp.mean(jnp.where(shape == none, 0.0, colour_loss))

    def next_batch(step):
        rng = _batch_rng(plan.seed, "classifier", step)
        n = plan.classifier_batch
        idx = rng.integers(0, len(reconstructions), n)
        use_recon = rng.random(n) < 0.5
        images = np.where(use_recon[:, None, None, None], reconstructions[idx], renders.images[idx]).astype(np.float32)
        shape = renders.shape[idx].copy()
        empty = rng.random(n) < 0.1
        images[empty] = world.BACKGROUND + rng.normal(0, 6, (int(empty.sum()), 1, 1, 3))
        shape[empty] = none
        images += rng.normal(0, rng.uniform(0, 6), images.shape)  # a little pixel noise
        return np.clip(images, 0, 255) / 255.0, shape, renders.colour[idx]

    params, _ = fit("classifier", loss_fn, params, next_batch, plan.classifier_steps, 2e-3, plan.seed + 4, progress)
    return params


# --------------------------------------------------------------------------- orchestration


class Parts:
    """Finished parts as msgpack files under ``out/.parts``, written atomically, for one plan only."""

    def __init__(self, root: Path, plan: TrainPlan):
        self.root = root / ".parts"
        self.root.mkdir(parents=True, exist_ok=True)
        recorded, wanted = self.root / "plan.json", json.dumps(dataclasses.asdict(plan), sort_keys=True)
        if recorded.is_file() and recorded.read_text() != wanted:
            raise UserError(f"{root} holds parts trained with another plan ({recorded}); use a new --out")
        if not recorded.is_file():
            recorded.write_text(wanted)

    def has(self, name: str) -> bool:
        return (self.root / f"{name}.msgpack").is_file()

    def get(self, name: str, build: Callable[[], object]):
        path = self.root / f"{name}.msgpack"
        if path.is_file():
            return serialization.msgpack_restore(path.read_bytes())
        value = jax.tree_util.tree_map(np.asarray, build())
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(serialization.msgpack_serialize(value))
        os.replace(tmp, path)
        return value


def build_world_model(out: str | Path, plan: TrainPlan = TrainPlan(), progress: bool = True) -> Path:
    """Trains every part (resuming finished ones) and writes the diffusers-layout folder ``out``."""
    if plan.world not in world.WORLDS:
        raise UserError(f"--plan world={plan.world}: the worlds are {', '.join(world.WORLDS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    parts = Parts(out, plan)
    started = time.perf_counter()
    timings = {}

    def timed(name, build):
        t0, reused = time.perf_counter(), parts.has(name)
        value = parts.get(name, build)
        timings[name] = "reused" if reused else round(time.perf_counter() - t0, 1)
        return value

    of_world = world.WORLDS[plan.world]
    renders = make_renders(plan.num_images, plan.seed, of_world)
    vocab_size = write_world_tokenizer(out / "tokenizer", of_world.vocabulary())
    tokenizer = load_tokenizer(str(out / "tokenizer"))
    text_config = presets.world_text_config(vocab_size)
    vision_config = presets.world_vision_config()
    text_encoder, image_encoder = CLIPTextEncoder(text_config), CLIPImageEncoder(vision_config)
    clip_captions = CaptionTable(tokenizer, text_config.max_position_embeddings, paraphrases=plan.clip_paraphrases,
                                 of_world=of_world)
    captions = CaptionTable(tokenizer, text_config.max_position_embeddings, plan.colourless_fraction,
                            of_world=of_world)
    schedule = NoiseSchedule.from_config(presets.SD_SCHEDULER)

    vae_part = timed("vae", lambda: dict(zip(("params", "scale"), train_vae(renders, plan, progress))))
    vae_params, scale = vae_part["params"], float(vae_part["scale"])
    vae = vae_lib.build_vae(presets.WORLD_VAE)
    latents = encode_latents(vae, vae_params, renders.images, scale)

    clip = timed("clip", lambda: train_clip(renders, clip_captions, text_encoder, image_encoder, plan, progress))
    if plan.finetune_text:
        trained = timed("unet_and_text", lambda: train_unet(latents, renders.label, text_encoder, clip["text"],
                                                            captions, schedule, plan, progress))
        unet_params, text_params = trained["unet"], trained["text"]
    else:
        unet_params = timed("unet", lambda: train_unet(latents, renders.label, text_encoder, clip["text"], captions,
                                                       schedule, plan, progress)["unet"])
        text_params = clip["text"]
    encode_text = jax.jit(lambda ids: text_encoder.apply({"params": text_params}, ids))
    caption_hidden = np.asarray(encode_text(captions.ids))
    empty_hidden = np.asarray(encode_text(captions.empty_ids[None]))[0]

    preprocess = ClipPreprocess(size=vision_config.image_size)
    embed = jax.jit(lambda x: image_encoder.apply({"params": clip["vision"]}, preprocess(x)))
    image_embeds = np.concatenate([np.asarray(embed(renders.images[i:i + 512].astype(np.float32) / 255.0))
                                   for i in range(0, len(renders.images), 512)])
    ip = timed("ip_adapter", lambda: dict(zip(("proj", "kv"), _ip_as_tree(train_ip_adapter(
        unet_params, latents, renders.label, image_embeds, caption_hidden, empty_hidden, captions, schedule, plan,
        progress)))))

    decode = jax.jit(lambda z: vae_lib.decode(vae, vae_params, z, scale))
    subset = min(len(latents), 4096)
    reconstructions = np.concatenate([
        np.round((np.transpose(np.asarray(decode(latents[i:i + 512])), (0, 2, 3, 1)) + 1.0) * 127.5)
        for i in range(0, subset, 512)]).clip(0, 255).astype(np.uint8)
    classifier = timed("classifier", lambda: train_classifier(
        Renders(renders.images[:subset], renders.shape[:subset], renders.colour[:subset]), reconstructions, plan,
        progress))

    _write_bundle(out, vae_params, scale, text_config, text_params, clip, vision_config, unet_params, ip, classifier,
                  of_world)
    convert.write_json(out / "build.json", {"plan": dataclasses.asdict(plan), "seconds_per_part": timings,
                                            "total_seconds": round(time.perf_counter() - started, 1)})
    return out


def _ip_as_tree(result):
    proj, kv = result
    return proj, {"/".join(p): v for p, v in kv.items()}


def _write_bundle(out: Path, vae_params, scale, text_config, text_params, clip, vision_config, unet_params, ip,
                  classifier, of_world: world.World):
    export_unet(unet_params, presets.WORLD_UNET, out / "unet")
    convert.write_safetensors(out / "vae" / "diffusion_pytorch_model.safetensors", convert.flax_to_torch_state(vae_params))
    convert.write_json(out / "vae" / "config.json", {**presets.WORLD_VAE, "scaling_factor": scale})
    convert.write_safetensors(out / "text_encoder" / "model.safetensors", convert.flax_to_torch_state(text_params))
    convert.write_json(out / "text_encoder" / "config.json",
                       {**text_config.to_dict(), "architectures": ["CLIPTextModel"]})
    convert.write_safetensors(out / "image_encoder" / "model.safetensors", convert.flax_to_torch_state(clip["vision"]))
    convert.write_json(out / "image_encoder" / "config.json",
                       {**vision_config.to_dict(), "architectures": ["CLIPVisionModelWithProjection"]})
    kv = {tuple(p.split("/")): v for p, v in ip["kv"].items()}
    convert.write_safetensors(out / "ip-adapter_sd15.safetensors",
                              convert.ip_adapter_from_flax(ip["proj"], kv, cross_attention_paths(unet_params)))
    convert.write_json(out / "scheduler" / "scheduler_config.json", presets.SD_SCHEDULER)
    # The contrastive CLIP text tower (before its fine-tuning with the UNet) and its projection, which
    # together with image_encoder/ make a CLIP for evaluation (CLIP score); CLIPTextModelWithProjection keys.
    convert.write_safetensors(out / classifier_lib.FOLDER / "clip_text" / "model.safetensors",
                              {**convert.flax_to_torch_state(clip["text"]),
                               "text_projection.weight": np.asarray(clip["text_projection"]["kernel"]).T})
    convert.write_json(out / classifier_lib.FOLDER / "clip_text" / "config.json",
                       {**text_config.to_dict(), "architectures": ["CLIPTextModelWithProjection"]})
    classifier_lib.save(classifier, out, 32, of_world)
    convert.write_json(out / "model_index.json", {"_class_name": "StableDiffusionPipeline", "preset": "toyworld",
                                                  "world": {"name": of_world.name, "shapes": list(of_world.shapes),
                                                            "colours": list(world.COLOURS)}})
