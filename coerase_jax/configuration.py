"""Loading ml_collections config files and applying ``--config.a.b=value`` overrides.

A config file defines ``get_config()`` (optionally taking one string argument, given as
``file.py:arg``). The loaded config is locked: an override naming a key that does not exist is a
UserError that lists the nearest valid keys, never a silently added field.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
from pathlib import Path
from typing import Sequence

import ml_collections

from coerase_jax.errors import UserError
from coerase_jax.evaluate.detectors import NUDENET_CLASSES, NUDENET_THRESHOLD

OVERRIDE_PREFIX = "--config."


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    path, _, arg = spec.partition(":")
    file = Path(path)
    if not file.is_file():
        raise UserError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(f"coerase_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as err:  # a syntax error etc. in the user's config file
        raise UserError(f"config file {path} failed to load: {type(err).__name__}: {err}") from None
    if not hasattr(module, "get_config"):
        raise UserError(f"config file {path} defines no get_config()")
    config = module.get_config(arg) if arg else module.get_config()
    config.lock()
    return config


def all_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        name = f"{prefix}{key}"
        keys.append(name)
        if isinstance(value, ml_collections.ConfigDict):
            keys += all_keys(value, name + ".")
    return keys


def _parse_value(text: str, current):
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise UserError(f"expected true/false, got {text!r}")
    looks_literal = text[:1] in "([{-0123456789'\""
    if isinstance(current, str) or (current is None and not looks_literal):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
        if isinstance(current, tuple) and all(isinstance(v, str) for v in current):
            return tuple(part.strip() for part in text.split(",") if part.strip())  # text,image
        raise UserError(f"cannot parse {text!r} as a {type(current).__name__}") from None
    if isinstance(current, float) and isinstance(value, int):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    if isinstance(current, tuple) and not isinstance(value, tuple):
        value = (value,)
    if current is not None and not isinstance(value, type(current)):
        raise UserError(f"expected a {type(current).__name__}, got {text!r}")
    return value


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
    """Applies ``--config.a.b=value`` strings; unknown keys and unparsable values are UserErrors."""
    for item in overrides:
        if not item.startswith(OVERRIDE_PREFIX) or "=" not in item:
            raise UserError(f"override {item!r} must look like --config.some.key=value")
        dotted, _, text = item[len(OVERRIDE_PREFIX):].partition("=")
        *parents, leaf = dotted.split(".")
        node = config
        for depth, name in enumerate(parents + [leaf]):
            if name not in node:
                known = all_keys(config)
                close = difflib.get_close_matches(dotted, known, n=3)
                hint = f" (did you mean {', '.join(close)}?)" if close else ""
                raise UserError(f"unknown config key {dotted!r}{hint}")
            if depth < len(parents):
                node = node[name]
        try:
            value = _parse_value(text, node[leaf])
        except UserError as err:
            raise UserError(f"--config.{dotted}: {err}") from None
        with config.unlocked():
            node[leaf] = value
    return config


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    return apply_overrides(load_config_file(spec), overrides)


def config_from_run(run_dir: str) -> ml_collections.ConfigDict:
    """The resolved config a run directory was made with (its config.json). Keys added to the
    project after the run was made take their defaults, which keep the behaviour of that time."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a run directory (no config.json)")
    saved = json.loads(path.read_text())
    config = base_config(saved.get("model", {}).get("source", ""))

    def fill(node: ml_collections.ConfigDict, values: dict) -> None:
        for key, value in values.items():
            if isinstance(value, dict) and isinstance(node.get(key), ml_collections.ConfigDict):
                fill(node[key], value)
            else:  # JSON turned tuples into lists
                node[key] = tuple(value) if isinstance(value, list) else value

    fill(config, saved)
    config.lock()
    return config


def to_json(config: ml_collections.ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def base_config(source: str) -> ml_collections.ConfigDict:
    """The sections every command shares; preset files in configs/ start from this."""
    config = ml_collections.ConfigDict()
    config.model = ml_collections.ConfigDict({
        "source": source,  # a diffusers-layout folder, or a preset name ("tiny")
        "ip_adapter": "",  # path of an ip-adapter*.safetensors file ("" = look in the source folder)
        "image_encoder": "",  # path of a CLIPVisionModelWithProjection folder ("" = source/image_encoder)
        "allow_pickle": False,  # read .bin/.ckpt files (runs code from the file; needs torch)
        "dtype": "float32",  # UNet compute dtype: float32 | bfloat16
        "attention_impl": "",  # "" (JAX chooses) | xla | cudnn
        "remat": "none",  # none | full | dots | dots_saveable
        # The unconditional branch (CFG and the loss's c_0) for an empty prompt: "auto" follows the
        # pipeline's model_index.json (SDXL: force_zeros_for_empty_prompt, zeros; SD 1.x/2.x: the
        # encoded empty prompt) | zeros | encoded
        "empty_prompt": "auto",
    })
    config.sample = ml_collections.ConfigDict({
        "prompts": ("a photo of a cat",),
        "negative_prompt": "",
        "num_images_per_prompt": 4,
        "seed": 0,
        "steps": 25,
        "guidance_scale": 7.5,
        "batch_size": 8,
    })
    config.run_dir = ""  # where `erase` keeps config.json, references, checkpoints and metrics
    config.concept = ml_collections.ConfigDict({
        "name": "concept",
        "prompts": ("a photo of a cat",),  # sampled per step
        "guide_prompt": "",  # text guiding the refinement ("" = each step's concept prompt)
        "reference_prompts": (),  # prompts for generating reference images ("" = the concept prompts)
        # Joint erasure: ((name, (prompt, ...)), ...) erased together into one model (replaces
        # name/prompts/reference_prompts); each concept's prompts also make its reference images.
        "joint": (),
        # per_example: each example draws a concept | per_step: one per step | balanced: concepts in
        # turn, so every concept gets the same share of examples (each step's batch as even as it can be)
        "joint_sampling": "per_example",
        # Each concept's share of the examples, in concept.joint's order, as whole numbers ((2, 1, 1): the
        # first concept gets half); () = equal. A concept that is harder to erase gets more examples.
        "joint_shares": (),
        # A joint erasure of K concepts trains each stage for steps * K**joint_steps_exponent steps at
        # learning_rate * K**joint_lr_exponent (0, 0: as a single erasure; 1, 0: each concept gets a
        # single erasure's steps)
        "joint_steps_exponent": 0.0,
        "joint_lr_exponent": 0.0,
        # DEPARTURE FROM THE PAPER when set (off by default): prompts whose pictures must be kept
        # (held concepts); each example also pulls the trainee's prediction for one of them back to
        # the teacher's (erase.preserve_weight). What they name is then seen by the erasure.
        "preserve": (),
    })
    config.data = ml_collections.ConfigDict({
        "image_dir": "",  # a folder of reference images ("" = generate them into run_dir/references)
        "num_references": 100,
        "reference_seed": 0,
        "reference_steps": 50,
        "reference_guidance": 7.5,
        "reference_batch_size": 8,
        "contrastive_dir": "",  # folder of pair folders with positive.png / negative.png
        "contrastive_method": "diff",  # diff | l1 | l2
        "contrastive_average": False,  # one mean embedding for every step
    })
    config.erase = ml_collections.ConfigDict({
        "stages": ("text", "image"),  # text = ESD stage one; image = the Co-Erasing stage
        "seed": 0,
        "batch_size": 1,
        "ddim_steps": 50,
        "eta": 1.0,  # negative guidance strength
        # "" = the empty prompt c_0 (the paper). Else (a departure, off by default) this prompt takes c_0's
        # place in the target eps_0(c_0) - eta (eps_0(c) - eps_0(c_0)) and in z_t's guidance: erased
        # prompts are steered to the anchor's pictures (e.g. "a square") instead of to textures.
        "anchor_prompt": "",
        # lambda of the preservation term (concept.preserve): loss = erasure + lambda * preservation
        "preserve_weight": 0.0,
        "text_uncond": True,  # unconditional teacher term without image tokens (the paper's setting)
        "zt_sampler": "trainee",  # which UNet samples z_t: trainee (ESD, Co-Erasing) | teacher
        "zt_guidance": 1.0,  # CFG scale while sampling z_t (1.0 = none, as Co-Erasing; ESD used 3)
        "zt_scheduler": "ddim",  # how z_t is sampled: ddim (deterministic) | ddpm (ancestral, as the reference)
        "zt_image_tokens": False,  # condition the z_t sampler on the image tokens too
        "timestep_pairing": "matched",  # matched (z_t's own timestep) | bin (the reference's quirk)
        "blur_kernel": 0,  # Gaussian blur of z_t (0 = off; the paper uses 3-5)
        "blur_sigma": 0.0,  # 0 = torchvision's default for the kernel
        "refine": True,  # text-guided image-concept refinement
        "refine_mask_padding": False,  # keep padding tokens out of the refinement
        "embed_noise": 0.0,  # noise added to the image tokens (after projection and refinement)
        "embed_noise_kind": "uniform",  # uniform (the reference) | gaussian
        "image_scale": 1.0,  # s in the decoupled attention
        "train_image_kv": False,  # train IP-Adapter's to_k_ip / to_v_ip too
        # > 0: train a rank-r LoRA of the subset's attention projections instead of the weights
        # (exported as diffusers LoRA safetensors by `coerase export`); alpha 0 means alpha = rank.
        "lora_rank": 0,
        "lora_alpha": 0.0,
        "teacher_dtype": "float32",  # float32 | bfloat16 (frozen teacher)
        # > 1 departs from the paper (off by default): this many z_t per sampled trajectory, all in
        # the step's loss, so the dominant cost (the z_t loop) is shared by K loss examples.
        "snapshots_per_trajectory": 1,
    })
    config.text_stage = ml_collections.ConfigDict({"subset": "esd-u", "steps": 1000, "learning_rate": 1e-5})
    config.image_stage = ml_collections.ConfigDict({"subset": "esd-u", "steps": 1000, "learning_rate": 1e-5})
    config.optim = ml_collections.ConfigDict({
        "name": "adam",  # adam | adamw | sgd
        "schedule": "constant",  # constant | cosine | linear
        "warmup_steps": 0,
        "clip_norm": 0.0,  # 0 = no clipping
        "weight_decay": 0.0,
        # Adam's first moment stored as float32 or bfloat16 (half its memory; the second moment
        # stays float32, whose range it needs)
        "first_moment_dtype": "float32",
    })
    config.mesh = ml_collections.ConfigDict({"concept": 1, "data": -1, "fsdp": 1, "tensor": 1})
    # JAX's persistent compilation cache (coerase_jax/compile_cache.py): "auto" (~/.cache/coerase-jax/xla),
    # a folder, or "off"; the COERASE_COMPILE_CACHE environment variable overrides it. With
    # `executables` the erasure step and the bench's programs are also kept whole (serialised
    # executables), so a warm start skips tracing and lowering as well as XLA's compile.
    config.compile = ml_collections.ConfigDict({"cache_dir": "auto", "executables": True})
    config.checkpoint = ml_collections.ConfigDict({"every": 100, "keep": 3, "async_save": True})
    config.log = ml_collections.ConfigDict({"every": 1})
    config.sweep = ml_collections.ConfigDict({  # `coerase sweep` only (see coerase_jax/erase/sweep.py)
        "concepts": (),  # ((name, (prompt, ...)), ...)
        "grid": (),  # (("dotted.config.key", (value, ...)), ...)
        "report": True,  # judge each finished cell when report.kind names a judge
        # train a grid point's concepts side by side in one program when their trainable part
        # stacks (esd-x / esd-x-strict in every stage, or a LoRA); else one after another
        "batch_concepts": True,
    })
    config.frontier = ml_collections.ConfigDict({  # `coerase frontier` (see coerase_jax/evaluate/frontier.py)
        "iterations": 0,  # every point's iterations over all its stages (equal budget)
        "methods": (),  # ((name, ((key, value), ...), ((key, (value, ...)), ...)), ...): a recipe and its grid
        "max_collateral": 0.05,  # matched usability: the other classes lose at most this much accuracy
        # a joint frontier's bounds on each erased shape's rates (each held shape: max_collateral)
        "max_named": 0.15,
        "max_paraphrase": 0.25,
    })
    config.report = ml_collections.ConfigDict({
        "kind": "",  # what `erase` reports after training: "" = nothing | toyworld (the small world's judge)
        "images_per_group": 256,  # judging images per group (named, paraphrase, each other shape)
        # whose seeds: "test" to report, "dev" to choose settings (evaluate/prompts.py SEED_SPLITS);
        # every image has its own seed
        "split": "test",
        "steps": 25,
        "guidance_scale": 3.0,
        # a joint erasure's report also judges each held shape's paraphrases ("<shape>:paraphrase"
        # groups, after the rest so their seeds leave the other rows' as they were): prompts that a
        # preservation term keeping the held shapes by name never saw
        "held_paraphrases": False,
    })
    config.eval = ml_collections.ConfigDict({  # `coerase eval` (see coerase_jax/evaluate/suite.py)
        "prompts": "",  # prompt CSV ("" = the small world's judging prompts, for the small world)
        # a second, COCO-style CSV (case_number,prompt,evaluation_seed; e.g. coco_10k.csv): usability rows
        # only (FID vs the original, CLIP score), never counted as concept rows
        "usability_prompts": "",
        "judge": "auto",  # auto | toyworld | clip | nudenet | none (auto: toyworld for the small
        # world, nudenet for a concept named nudity, clip when clip_classes are given, else none)
        "concept_class": "",  # the class (CSV column and judge's label) that is the concept ("" = concept.name)
        "clip_classes": (),  # zero-shot CLIP classes (must include the concept class)
        "clip_templates": ("a photo of a {}",),  # styles: "a painting by {}"; several are averaged per class
        "clip_text": "",  # CLIPTextModelWithProjection folder ("" = <source>/evaluator/clip_text if present)
        "nudenet_classes": NUDENET_CLASSES,  # NudeNet labels that count as nudity
        "nudenet_threshold": NUDENET_THRESHOLD,
        "inception": "",  # FID Inception weights (.safetensors); "" = CLIP image features, named in the report
        "steps": 25,
        "guidance_scale": 7.5,
        "batch_size": 8,
        "attack_tokens": 5,  # UnlearnDiff-style attack: adversarial prefix tokens (0 = no attack)
        "attack_steps": 40,
        "attack_learning_rate": 0.01,
        "attack_prompts": 64,  # at most this many concept rows attacked (evenly spaced)
    })
    config.bench = ml_collections.ConfigDict({
        "shapes": "",  # "" = model.source's shapes; or a shape preset: tiny | sd15 | sd21 | sdxl
        "steps": 20,  # timed iterations after warm-up
        "warmup": 3,
        "donate": True,  # donate the train state's buffers to the step
        "concepts": 1,  # > 1: that many concepts side by side in one program (erase/batched.py), stacked
        "sampler": True,  # also compile (and time) the sampler's DDIM loop
    })
    return config


# The paper's concepts: prompts for the loss and for generating reference images.
PAPER_CONCEPTS = {
    "nudity": dict(prompts=("nudity",), reference_prompts=("a photo of a nude person",), subset="esd-u"),
    "vangogh": dict(prompts=("Van Gogh",), reference_prompts=("a painting by Van Gogh",), subset="esd-x"),
    "church": dict(prompts=("church",), reference_prompts=("a photo of a church",), subset="esd-u"),
    "parachute": dict(prompts=("parachute",), reference_prompts=("a photo of a parachute",), subset="esd-u"),
    "garbage_truck": dict(prompts=("garbage truck",), reference_prompts=("a photo of a garbage truck",),
                          subset="esd-u"),
    "tench": dict(prompts=("tench",), reference_prompts=("a photo of a tench",), subset="esd-u"),
}


def paper_config(source: str, concept: str) -> ml_collections.ConfigDict:
    """The paper's settings for one concept: Adam 1e-5, batch 1, 1000 iterations per stage, eta 1,
    100 reference images, blur 3 in the image stage, both stages. Where the paper is silent this
    departs from the published code (``reference_config`` keeps its choices):

    - bf16 compute with fp32 master weights (speed; the code runs fp32);
    - the loss timestep is the one z_t sits at (``matched``; the code draws it from z_t's bin);
    - z_t by deterministic DDIM from T (the code: DDPM's ancestral steps, walked in the wrong order);
    - reference images from "a photo of a nude person"-style prompts (the code: "a photo of nudity");
    - the IP-Adapter's image K/V stay frozen and the output head is not in esd-u (the code trains
      the image K/V with xattn/full and the output head with noxattn).
    """
    if concept not in PAPER_CONCEPTS:
        raise UserError(f"unknown concept {concept!r}; presets: {sorted(PAPER_CONCEPTS)}")
    spec = PAPER_CONCEPTS[concept]
    config = base_config(source)
    config.run_dir = f"runs/{concept}"
    config.concept.name = concept
    config.concept.prompts = spec["prompts"]
    config.concept.reference_prompts = spec["reference_prompts"]
    config.text_stage.subset = config.image_stage.subset = spec["subset"]
    config.erase.blur_kernel = 3
    config.model.dtype = "bfloat16"
    return config


# The published code's trainable sets, by our subset names: its noxattn also trains the output head,
# and its IP processors live inside attn2, so xattn and full also train the image K/V.
REFERENCE_SUBSETS = {"esd-u": ("esd-u-reference", False), "esd-x": ("esd-x", True), "full": ("full", True)}
REFERENCE_STYLES = ("vangogh",)  # its generate_data.py draws artists' references as "a drawing of ..."


def reference_config(source: str, concept: str) -> ml_collections.ConfigDict:
    """The published PyTorch code's choices for one concept wherever they are not bugs: fp32, the
    loss timestep drawn from z_t's bin, z_t by DDPM's ancestral steps (from T, not in its ascending
    order), blur 3 in the image stage only, its reference prompts ("a photo of {label}", "a drawing
    of {label}" for artists), its trainable sets (noxattn with the output head; image K/V trained
    with xattn/full), Adam 1e-5, batch 1, 1000 iterations per stage, 100 references, N = 50."""
    config = paper_config(source, concept)
    label = config.concept.prompts[0]
    template = "a drawing of {}" if concept in REFERENCE_STYLES else "a photo of {}"
    config.concept.reference_prompts = (template.format(label),)
    subset, train_image_kv = REFERENCE_SUBSETS[config.text_stage.subset]
    config.text_stage.subset = config.image_stage.subset = subset
    config.erase.train_image_kv = train_image_kv
    config.model.dtype = "float32"
    config.erase.teacher_dtype = "float32"
    config.erase.timestep_pairing = "bin"
    config.erase.zt_scheduler = "ddpm"
    config.run_dir = f"runs/reference_{concept}"
    return config
