"""Weights between the HF/diffusers PyTorch layout (safetensors) and Flax parameter trees, no torch.

One rule set covers every component (UNet, VAE, CLIP text, CLIP vision + projection, IP-Adapter
image projection), because they differ only in module names:

* a Flax module list ``resnets_0`` is PyTorch's ``resnets.0`` (also ``down_blocks``, ``to_out``…);
* the VAE's Flax attention names ``query/key/value/proj_attn`` are PyTorch's ``to_q/to_k/to_v/to_out.0``
  (old files that still say ``query`` are read too);
* leaves: ``kernel`` is ``weight`` — a conv kernel HWIO is OIHW, a dense kernel (in, out) is
  (out, in); a norm ``scale`` and an ``embedding`` table are ``weight``; everything else keeps its name.

Loading walks the Flax tree the model expects (shapes from ``jax.eval_shape``), so a missing key
or a wrong shape is reported by name, never silently skipped.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from flax import traverse_util
from safetensors import safe_open
from safetensors.numpy import save_file

from coerase_jax.errors import UserError

_LIST_SEGMENT = re.compile(
    r"^(down_blocks|up_blocks|resnets|attentions|transformer_blocks|downsamplers|upsamplers|to_out|net)_(\d+)$")
_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}
_LEGACY_VAE_ATTENTION = {v: k for k, v in _VAE_ATTENTION.items()}
# Buffers some PyTorch files carry that are not parameters.
_IGNORED_TORCH_KEYS = re.compile(r"(^|\.)position_ids$")
PICKLE_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")


def torch_key(flax_path: tuple[str, ...]) -> str:
    """The PyTorch state-dict key of a Flax parameter path (module names + leaf name)."""
    *modules, leaf = flax_path
    names = []
    for segment in modules:
        match = _LIST_SEGMENT.match(segment)
        if match:
            names.append(f"{match.group(1)}.{match.group(2)}")
        else:
            names.append(_VAE_ATTENTION.get(segment, segment))
    names.append({"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf))
    return ".".join(names)


def _legacy_keys(key: str) -> list[str]:
    """Older spellings of a key that files in the wild still use (VAE attention before diffusers 0.14)."""
    parts = key.split(".")
    for i in range(len(parts) - 1):
        if parts[i] == "to_out" and parts[i + 1] == "0" and i + 2 == len(parts) - 1:
            return [".".join(parts[:i] + ["proj_attn"] + parts[i + 2:])]
        if parts[i] in _LEGACY_VAE_ATTENTION and i == len(parts) - 2:
            return [".".join(parts[:i] + [_LEGACY_VAE_ATTENTION[parts[i]]] + parts[i + 1:])]
    return []


def to_torch_array(flax_path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    value = np.asarray(value)
    if flax_path[-1] == "kernel":
        if value.ndim == 4:
            return np.ascontiguousarray(value.transpose(3, 2, 0, 1))  # HWIO -> OIHW
        if value.ndim == 2:
            return np.ascontiguousarray(value.T)  # (in, out) -> (out, in)
    return np.ascontiguousarray(value)


def to_flax_array(flax_path: tuple[str, ...], value: np.ndarray, expected_ndim: int) -> np.ndarray:
    if flax_path[-1] == "kernel":
        if value.ndim == 4 and expected_ndim == 2:
            value = value[:, :, 0, 0]  # 1x1 conv stored where a linear layer now is (old VAE files)
        if value.ndim == 4:
            return value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
        if value.ndim == 2:
            return value.T
    return value


def flax_to_torch_state(params: dict, prefix: str = "") -> dict[str, np.ndarray]:
    """A Flax parameter tree -> a PyTorch-layout state dict (numpy arrays)."""
    flat = traverse_util.flatten_dict(_as_dict(params))
    return {prefix + torch_key(path): to_torch_array(path, value) for path, value in flat.items()}


def torch_state_to_flax(state: dict[str, np.ndarray], expected: dict, component: str, prefix: str = "",
                        dtype=np.float32, strict: bool = True) -> dict:
    """A PyTorch-layout state dict -> the Flax tree ``expected`` describes (arrays or ShapeDtypeStructs).

    Every expected leaf must be present with the right shape; with ``strict``, keys left over
    (other than known buffers) are an error too, since they mean the config does not match the file.
    """
    flat_expected = traverse_util.flatten_dict(_as_dict(expected))
    used, out, problems = set(), {}, []
    for path, ref in flat_expected.items():
        key = prefix + torch_key(path)
        found = next((k for k in [key] + _legacy_keys(key) if k in state), None)
        if found is None:
            problems.append(f"missing {key}")
            continue
        used.add(found)
        value = to_flax_array(path, np.asarray(state[found]), len(ref.shape))
        if tuple(value.shape) != tuple(ref.shape):
            problems.append(f"{found}: file has shape {tuple(state[found].shape)}, the model config needs "
                            f"{tuple(to_torch_array(path, np.zeros(ref.shape, np.float32)).shape)}")
            continue
        out[path] = np.asarray(value, dtype=dtype)
    if strict:
        extra = sorted(k for k in state if k.startswith(prefix) and k not in used
                       and not _IGNORED_TORCH_KEYS.search(k))
        problems += [f"unexpected {k}" for k in extra]
    if problems:
        shown = "; ".join(problems[:6]) + (f"; … {len(problems) - 6} more" if len(problems) > 6 else "")
        raise UserError(f"{component}: weights do not match its config: {shown}")
    return traverse_util.unflatten_dict(out)


def _as_dict(tree: Any) -> dict:
    return tree.unfreeze() if hasattr(tree, "unfreeze") else dict(tree)


# --------------------------------------------------------------------------- files


def read_safetensors(path: str | os.PathLike, keys: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """All (or the named) tensors of a safetensors file as numpy arrays (bf16 via ml_dtypes)."""
    try:
        with safe_open(str(path), framework="flax") as f:
            names = list(f.keys()) if keys is None else list(keys)
            return {name: np.asarray(f.get_tensor(name)) for name in names}
    except UserError:
        raise
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise UserError(f"cannot read safetensors file {path}: {err}") from None


def write_safetensors(path: str | os.PathLike, state: dict[str, np.ndarray], dtype=None) -> None:
    """Writes atomically (temp file + rename), so an interrupted export never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {k: np.ascontiguousarray(v if dtype is None else np.asarray(v, dtype=dtype)) for k, v in state.items()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file(arrays, tmp, metadata={"format": "pt"})
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file ordinary permissions
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path: str | os.PathLike, data: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_torch_weights(folder: Path, stem: str, component: str, allow_pickle: bool) -> dict[str, np.ndarray]:
    """The state dict of a component folder: ``{stem}.safetensors`` (or a sharded index).

    Pickle files (``.bin``/``.pth``/``.ckpt``) can run arbitrary code when loaded, so they are
    refused unless ``allow_pickle``; then they need torch and we warn.
    """
    single = folder / f"{stem}.safetensors"
    if single.is_file():
        return read_safetensors(single)
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        state = {}
        for shard in sorted(set(weight_map.values())):
            state.update(read_safetensors(folder / shard))
        return state
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles and not allow_pickle:
        raise UserError(
            f"{component}: only a pickle checkpoint was found ({pickles[0]}); pickle files can run code when "
            f"loaded, so they are refused. Use the {stem}.safetensors file of the same model (the Hub "
            f"offers it for SD 1.x), or set --config.model.allow_pickle=true if you trust this file.")
    if pickles:
        return _read_pickle(pickles[0])
    if not folder.is_dir():
        raise UserError(f"{component}: folder {folder} does not exist")
    raise UserError(f"{component}: no {stem}.safetensors in {folder}")


def _read_pickle(path: Path) -> dict[str, np.ndarray]:
    warnings.warn(f"unpickling {path}: this runs code from the file; only do this for files you trust")
    try:
        import torch  # optional extra
    except ImportError:
        raise UserError(f"reading the pickle file {path} needs torch (pip install 'coerase-jax[torch]')") from None
    state = torch.load(str(path), map_location="cpu", weights_only=False)
    state = state.get("state_dict", state)
    return {k: v.float().numpy() for k, v in state.items() if hasattr(v, "numpy")}


# --------------------------------------------------------------------------- IP-Adapter


def ip_adapter_to_flax(state: dict[str, np.ndarray], attn2_paths: list[tuple[str, ...]], expected_proj: dict,
                       expected_kv_shape: dict[tuple[str, ...], tuple[int, int]], dtype=np.float32
                       ) -> tuple[dict, dict]:
    """``ip-adapter_sd15.safetensors`` -> (image projection params, {attn2 path: {to_k_ip, to_v_ip}}).

    ``ip_adapter.{k}`` numbers the cross-attention layers 1, 3, 5, … in diffusers' attention
    processor order (``attn2_paths`` is already in that order): odd numbers, one per attn2.
    """
    proj_state = {k[len("image_proj."):]: v for k, v in state.items() if k.startswith("image_proj.")}
    if not proj_state:
        raise UserError("IP-Adapter file: no image_proj.* tensors (is this an IP-Adapter safetensors file?)")
    image_proj = torch_state_to_flax(proj_state, expected_proj, "IP-Adapter image_proj", dtype=dtype)
    kv = {}
    expected_keys = set()
    for i, path in enumerate(attn2_paths):
        layer = {}
        for name in ("to_k_ip", "to_v_ip"):
            key = f"ip_adapter.{2 * i + 1}.{name}.weight"
            expected_keys.add(key)
            if key not in state:
                raise UserError(f"IP-Adapter file: missing {key} (the UNet has {len(attn2_paths)} "
                                f"cross-attention layers)")
            kernel = np.asarray(state[key], dtype=dtype).T
            if kernel.shape != tuple(expected_kv_shape[path]):
                raise UserError(f"IP-Adapter file: {key} has shape {state[key].shape}, the UNet needs "
                                f"{tuple(expected_kv_shape[path])[::-1]}")
            layer[name] = {"kernel": kernel}
        kv[path] = layer
    extra = sorted(k for k in state if k.startswith("ip_adapter.") and k not in expected_keys)
    if extra:
        raise UserError(f"IP-Adapter file: unexpected {extra[:3]} (it was made for a different UNet)")
    return image_proj, kv


def ip_adapter_from_flax(image_proj: dict, kv: dict[tuple[str, ...], dict],
                         attn2_paths: list[tuple[str, ...]]) -> dict[str, np.ndarray]:
    state = flax_to_torch_state(image_proj, prefix="image_proj.")
    for i, path in enumerate(attn2_paths):
        for name in ("to_k_ip", "to_v_ip"):
            state[f"ip_adapter.{2 * i + 1}.{name}.weight"] = to_torch_array(("kernel",), kv[path][name]["kernel"])
    return state
