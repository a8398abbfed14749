"""Trainable subsets: ESD's names, as predicates over diffusers Flax UNet parameter paths.

| subset         | ESD name  | trains                                                                 |
|----------------|-----------|------------------------------------------------------------------------|
| full           | full      | every UNet parameter                                                   |
| esd-u          | noxattn   | all but cross-attention (attn2), the time embedding and the output     |
|                |           | head (conv_norm_out, conv_out — CompVis's ``out.``)                    |
| esd-u-reference| —         | noxattn as the published Co-Erasing code selects it on a diffusers     |
|                |           | UNet: its ``out.`` prefix never matches, so the output head trains too |
| esd-x          | xattn     | cross-attention (attn2: to_q, to_k, to_v, to_out)                      |
| esd-x-strict   | —         | cross-attention key/value projections only (attn2 to_k, to_v)           |
| selfattn       | selfattn  | self-attention (attn1)                                                 |
| notime         | notime    | all but the time embedding                                             |

IP-Adapter's image K/V (attn2 ``to_k_ip``/``to_v_ip``) follow ``train_image_kv`` alone, whatever
the subset: they are the image side's own projections, not part of the SD UNet. SDXL's
``add_embedding`` (pooled text and image size, added to the time embedding) counts as part of the
time embedding.
"""

from __future__ import annotations

from typing import Callable

from flax import traverse_util

from coerase_jax.errors import UserError

Path = tuple[str, ...]

IMAGE_KV = ("to_k_ip", "to_v_ip")
OUTPUT_HEAD = ("conv_norm_out", "conv_out")


def _in(path: Path, name: str) -> bool:
    return name in path


def _time(path: Path) -> bool:
    return _in(path, "time_embedding") or _in(path, "add_embedding")


SUBSETS: dict[str, Callable[[Path], bool]] = {
    "full": lambda p: True,
    "esd-u": lambda p: not (_in(p, "attn2") or _time(p) or p[0] in OUTPUT_HEAD),
    "esd-u-reference": lambda p: not (_in(p, "attn2") or _time(p)),
    "esd-x": lambda p: _in(p, "attn2"),
    "esd-x-strict": lambda p: _in(p, "attn2") and (_in(p, "to_k") or _in(p, "to_v")),
    "selfattn": lambda p: _in(p, "attn1"),
    "notime": lambda p: not _time(p),
}
ALIASES = {"noxattn": "esd-u", "xattn": "esd-x"}


def is_trainable(path: Path, subset: str, train_image_kv: bool) -> bool:
    if any(name in path for name in IMAGE_KV):
        return train_image_kv
    return SUBSETS[subset](path)


def resolve(subset: str) -> str:
    name = ALIASES.get(subset, subset)
    if name not in SUBSETS:
        raise UserError(f"unknown trainable subset {subset!r}; choose from {sorted(SUBSETS)} "
                        f"(or the ESD names {sorted(ALIASES)})")
    return name


def split(params: dict, subset: str, train_image_kv: bool = False) -> tuple[dict, dict]:
    """(trainable, frozen): two disjoint nested dicts whose union is ``params``.

    Only the trainable part gets optimizer state, so ``esd-x`` carries Adam moments for the
    cross-attention alone.
    """
    subset = resolve(subset)
    flat = traverse_util.flatten_dict(params)
    trainable = {p: v for p, v in flat.items() if is_trainable(p, subset, train_image_kv)}
    if not trainable:
        raise UserError(f"trainable subset {subset!r} selects no parameter of this UNet")
    frozen = {p: v for p, v in flat.items() if p not in trainable}
    return traverse_util.unflatten_dict(trainable), traverse_util.unflatten_dict(frozen)


def merge(trainable: dict, frozen: dict) -> dict:
    """The full parameter tree again (no copies of the leaves)."""
    flat = traverse_util.flatten_dict(frozen)
    flat.update(traverse_util.flatten_dict(trainable))
    return traverse_util.unflatten_dict(flat)
