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
    if isinstance(current, str) or current is None and not text[:1] in "([{-0123456789'\"":
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if current is None:
            return text
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
    return config
