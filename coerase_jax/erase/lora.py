"""LoRA: train a rank-r update of the attention projections instead of the projections themselves.

For a Dense kernel W (in, out) of an attention projection (to_q, to_k, to_v, to_out.0) that the
stage's subset selects:

    W' = W + (alpha / r) · A B,     A: (in, r) ~ N(0, 1/in),  B: (r, out) = 0

so training starts at the original model, only A and B carry optimizer state, and a concept's
result is the (A, B) pairs — megabytes, not the UNet's gigabytes. ``export_lora`` writes them in the
PEFT layout diffusers' ``load_lora_weights`` reads (``unet.<module>.lora_A.weight`` (r, in),
``lora_B.weight`` (out, r)), with the alpha/r scale folded into B so that no alpha is needed.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from coerase_jax.erase import subsets
from coerase_jax.errors import UserError
from coerase_jax.models import convert

PROJECTIONS = ("to_q", "to_k", "to_v", "to_out_0")
LORA_FILE = "pytorch_lora_weights.safetensors"
PREFIX = "unet."


def _key(path: tuple[str, ...]) -> str:
    return "/".join(path)


def target_paths(params: dict, subset: str) -> list[tuple[str, ...]]:
    """Kernel paths of the attention projections inside ``subset`` (image K/V never)."""
    subset = subsets.resolve(subset)
    paths = [p for p in traverse_util.flatten_dict(params)
             if p[-1] == "kernel" and len(p) >= 2 and p[-2] in PROJECTIONS and subsets.SUBSETS[subset](p)]
    if not paths:
        raise UserError(f"LoRA: subset {subset!r} holds no attention projection ({', '.join(PROJECTIONS)}) of "
                        f"this UNet")
    return sorted(paths)


def init_lora(params: dict, subset: str, rank: int, key: jax.Array) -> dict:
    """{"<kernel path>": {"A": (in, r), "B": (r, out)}} with B = 0: the update starts at zero."""
    if rank < 1:
        raise UserError(f"LoRA rank must be positive, got {rank}")
    flat = traverse_util.flatten_dict(params)
    lora = {}
    for i, path in enumerate(target_paths(params, subset)):
        d_in, d_out = flat[path].shape
        a = jax.random.normal(jax.random.fold_in(key, i), (d_in, rank), jnp.float32) / np.sqrt(d_in)
        lora[_key(path)] = {"A": a, "B": jnp.zeros((rank, d_out), jnp.float32)}
    return lora


def apply_lora(params: dict, lora: dict, scale: float) -> dict:
    """``params`` with W + scale · A B at every LoRA path (the other leaves shared, not copied)."""
    flat = traverse_util.flatten_dict(params)
    for key, factors in lora.items():
        path = tuple(key.split("/"))
        if path not in flat:
            raise UserError(f"LoRA weight for {key} has no matching UNet parameter")
        kernel = flat[path]
        flat[path] = kernel + (scale * (factors["A"] @ factors["B"])).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


def scaled(lora: dict, scale: float) -> dict:
    """The same update with the scale folded into B (then applied with scale 1)."""
    return {key: {"A": f["A"], "B": scale * np.asarray(f["B"])} for key, f in lora.items()}


def concatenate(loras: list[dict]) -> dict:
    """One LoRA equal to the sum of several (scale 1 each): [A1 A2] [B1; B2] = A1 B1 + A2 B2."""
    out: dict[str, dict] = {}
    for one in loras:
        for key, f in one.items():
            if key in out:
                out[key] = {"A": np.concatenate([out[key]["A"], np.asarray(f["A"])], axis=1),
                            "B": np.concatenate([out[key]["B"], np.asarray(f["B"])], axis=0)}
            else:
                out[key] = {"A": np.asarray(f["A"]), "B": np.asarray(f["B"])}
    return out


def export_lora(lora: dict, scale: float, out_dir: str | Path) -> Path:
    """Writes ``out_dir/pytorch_lora_weights.safetensors`` (PEFT layout, diffusers' names)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {}
    for key, factors in lora.items():
        module = convert.torch_key(tuple(key.split("/"))).removesuffix(".weight")
        state[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(np.asarray(factors["A"], np.float32).T)
        state[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(
            (scale * np.asarray(factors["B"], np.float32)).T)
    convert.write_safetensors(out_dir / LORA_FILE, state)
    return out_dir / LORA_FILE


def read_lora(path: str | Path, params: dict) -> dict:
    """A LoRA file written by ``export_lora`` (or any PEFT-layout UNet LoRA) -> factors with scale 1."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"LoRA file {path} does not exist")
    state = convert.read_safetensors(path)
    modules = {convert.torch_key(p).removesuffix(".weight"): p
               for p in traverse_util.flatten_dict(params) if p[-1] == "kernel"}
    lora = {}
    for name, value in state.items():
        if not name.startswith(PREFIX) or not name.endswith(".lora_A.weight"):
            continue
        module = name[len(PREFIX):-len(".lora_A.weight")]
        up = state.get(f"{PREFIX}{module}.lora_B.weight")
        if module not in modules or up is None:
            raise UserError(f"{path}: {name} matches no UNet projection (or has no lora_B)")
        lora[_key(modules[module])] = {"A": np.asarray(value).T, "B": np.asarray(up).T}
    if not lora:
        raise UserError(f"{path} holds no UNet LoRA weights ({PREFIX}<module>.lora_A.weight)")
    return lora
