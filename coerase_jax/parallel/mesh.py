"""The device mesh and how arrays are laid out on it.

Axes: ``concept`` (independent erasures trained side by side, see ``erase/batched.py``; 1 for a
single run), ``data`` (batch), ``fsdp`` (batch, and parameter/optimizer-state shards), ``tensor``
(parameter output features). A config gives each axis a size, ``-1`` meaning "the devices left".

Parameters are placed by a small rules table: the first rule whose regex matches the
"/"-joined parameter path wins, and a dimension is only sharded over an axis whose size divides
it (otherwise that dimension stays replicated). Optimizer moments live under paths that end with
their parameter's path, so the same table places them.
"""

from __future__ import annotations

import re
from typing import Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from coerase_jax.errors import UserError

AXES = ("concept", "data", "fsdp", "tensor")  # outermost first: concept spans hosts, tensor stays inside one
BATCH_AXES = ("data", "fsdp")

# (regex on the parameter path, rank, mesh axis of each dimension); anything unmatched (biases,
# norm scales, step counters) is replicated.
PARAM_RULES: tuple[tuple[str, int, tuple], ...] = (
    (r"(^|/)kernel$", 4, (None, None, "fsdp", "tensor")),  # conv HWIO: in-features on fsdp, out on tensor
    (r"(^|/)kernel$", 2, ("fsdp", "tensor")),  # dense (in, out)
)


def make_mesh(axis_sizes: dict[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(axis_sizes.get(axis, 1)) for axis in AXES]
    unknown = [i for i, s in enumerate(sizes) if s == -1]
    if len(unknown) > 1:
        raise UserError("at most one mesh axis may be -1")
    known = int(np.prod([s for s in sizes if s != -1]))
    if unknown:
        if len(devices) % known:
            raise UserError(f"{len(devices)} devices do not divide into mesh axes {dict(zip(AXES, sizes))}")
        sizes[unknown[0]] = len(devices) // known
    if int(np.prod(sizes)) != len(devices):
        raise UserError(f"mesh {dict(zip(AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                        f"{len(devices)} are available")
    return Mesh(np.asarray(devices).reshape(sizes), AXES)


def _path_string(path) -> str:
    parts = []
    for key in path:
        name = getattr(key, "key", None) or getattr(key, "name", None) or getattr(key, "idx", None)
        parts.append(str(name))
    return "/".join(parts)


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    for pattern, rank, axes in PARAM_RULES:
        if len(shape) == rank and re.search(pattern, path):
            return P(*[axis if axis and mesh.shape[axis] > 1 and shape[i] % mesh.shape[axis] == 0 else None
                       for i, axis in enumerate(axes)])
    return P()


def tree_shardings(tree, mesh: Mesh):
    """NamedShardings for every leaf of a (possibly abstract) tree, by the rules table."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: NamedSharding(mesh, param_spec(_path_string(path), tuple(leaf.shape), mesh)), tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over data x fsdp."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_size_per_replica_check(batch: int, mesh: Mesh) -> None:
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    if batch % shards:
        raise UserError(f"batch size {batch} does not divide over data x fsdp = {shards} devices")
