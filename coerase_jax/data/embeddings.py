"""CLIP image embeddings of the reference images, computed once and cached beside them.

The cache (``clip_embeds.npz``) records the file names and sizes it was made from, plus a
fingerprint of the image encoder's weights; any change recomputes it. The reference code
re-encodes a random image on every step; we never do.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from coerase_jax.data.images import list_images, load_image
from coerase_jax.models.bundle import Bundle
from coerase_jax.parallel import distributed

CACHE_NAME = "clip_embeds.npz"


def encoder_fingerprint(bundle: Bundle) -> str:
    leaves = jax.tree_util.tree_leaves(bundle.image.encoder_params)
    digest = hashlib.sha1()
    for leaf in leaves[:8] + leaves[-8:]:
        digest.update(np.asarray(leaf, np.float32).tobytes()[:4096])
    digest.update(repr(bundle.image.preprocess).encode())
    return digest.hexdigest()[:16]


def _files_key(files: list[Path]) -> str:
    digest = hashlib.sha1()
    for f in files:
        digest.update(f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def encode_images(bundle: Bundle, images: list[np.ndarray], batch_size: int = 16) -> np.ndarray:
    """(N, E) image embeddings; images of one size are encoded together in jitted batches."""
    encode = jax.jit(bundle.encode_images)
    out: list[np.ndarray | None] = [None] * len(images)
    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    for indices in by_shape.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            pixels = jnp.asarray(np.stack([images[i] for i in chunk]), jnp.float32) / 255.0
            for i, embed in zip(chunk, np.asarray(encode(pixels))):
                out[i] = embed
    return np.stack(out)


def folder_embeddings(bundle: Bundle, folder: str | Path) -> np.ndarray:
    """Embeddings of every image in ``folder``, from the cache when it is still valid.

    On several hosts each one reads and encodes only its share of the images; the embeddings are
    then gathered on every host, and process 0 writes the cache."""
    folder = Path(folder)
    files = list_images(folder)
    key = f"{_files_key(files)}-{encoder_fingerprint(bundle)}"
    cache = folder / CACHE_NAME
    if cache.is_file():
        with np.load(cache) as data:
            if str(data["key"]) == key:
                return data["embeds"]
    mine = files[distributed.my_slice(len(files))]
    if mine:
        local = encode_images(bundle, [load_image(path) for path in mine])
    else:  # more hosts than images
        local = np.zeros((0, bundle.image.encoder.config.projection_dim), np.float32)
    embeds = distributed.gather_rows(local, len(files))
    if distributed.is_leader():
        tmp = folder / f".{CACHE_NAME}.tmp.npz"
        np.savez(tmp, embeds=embeds, key=np.asarray(key))
        tmp.replace(cache)
    distributed.barrier("reference embeddings cached")
    return embeds


def contrastive_embeddings(bundle: Bundle, folder: str | Path, how: str, average: bool) -> np.ndarray:
    """Concept embeddings from pairs: ``folder/<pair>/positive.png`` (with the concept) and
    ``negative.png`` (without): diff = pos - neg, l1 = |pos - neg|, l2 = (pos - neg)^2; with
    ``average`` the mean over pairs is the one embedding every step uses."""
    from coerase_jax.data.images import load_image
    from coerase_jax.erase.method import contrastive_embedding
    from coerase_jax.errors import UserError

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"contrastive image folder {folder} does not exist")
    pairs = sorted(p for p in folder.iterdir() if p.is_dir())
    if not pairs:
        raise UserError(f"contrastive image folder {folder} holds no pair folders (each with positive.png "
                        f"and negative.png)")
    positives, negatives = [], []
    for pair in pairs:
        for name, sink in (("positive.png", positives), ("negative.png", negatives)):
            if not (pair / name).is_file():
                raise UserError(f"contrastive pair {pair} has no {name}")
            sink.append(load_image(pair / name))
    embeds = np.asarray(contrastive_embedding(jnp.asarray(encode_images(bundle, positives)),
                                              jnp.asarray(encode_images(bundle, negatives)), how))
    return embeds.mean(axis=0, keepdims=True) if average else embeds
