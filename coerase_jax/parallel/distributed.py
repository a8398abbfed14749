"""Multi-host start-up and the few cross-host operations the run needs.

One program runs on every host (a TPU pod's workers, a SLURM job's nodes, or local processes).
``initialize`` joins them into one JAX runtime before anything touches a device:

* explicit: ``COERASE_COORDINATOR`` (host:port of process 0), ``COERASE_NUM_PROCESSES`` and
  ``COERASE_PROCESS_ID`` — what ``launch/local.sh`` and ``launch/slurm.sh`` set;
* ``COERASE_MULTIHOST=auto`` (what ``launch/tpu_pod.sh`` sets), a SLURM job with more than one
  task, or ``TPU_WORKER_HOSTNAMES`` listing more than one worker: JAX's own cluster detection
  supplies all three (a TPU VM pod reads them from its metadata);
* otherwise a single process, and nothing happens.

``COERASE_HEARTBEAT_S`` (default 100) is how long the coordinator waits on a silent process before
it stops every other one: a dead worker ends the whole job instead of leaving it hung.
"""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from coerase_jax.errors import UserError

ENV_COORDINATOR, ENV_COUNT, ENV_ID, ENV_HEARTBEAT, ENV_AUTO = (
    "COERASE_COORDINATOR", "COERASE_NUM_PROCESSES", "COERASE_PROCESS_ID", "COERASE_HEARTBEAT_S", "COERASE_MULTIHOST")


def detect(environ=os.environ) -> str:
    """Which multi-host set-up the environment describes: "explicit", "auto", "slurm", "tpu" or "single"."""
    if environ.get(ENV_COORDINATOR) or environ.get(ENV_COUNT):
        return "explicit"
    if environ.get(ENV_AUTO) == "auto":
        return "auto"
    if int(environ.get("SLURM_NTASKS", "1") or 1) > 1 and environ.get("SLURM_JOB_ID"):
        return "slurm"
    if len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]) > 1:
        return "tpu"
    return "single"


def initialize(environ=os.environ) -> str:
    """Joins the hosts of a multi-host run (see the module doc); returns the set-up detected."""
    kind = detect(environ)
    if kind == "single":
        return kind
    heartbeat = int(environ.get(ENV_HEARTBEAT, "100"))
    if kind == "explicit":
        missing = [name for name in (ENV_COORDINATOR, ENV_COUNT, ENV_ID) if not environ.get(name)]
        if missing:
            raise UserError(f"multi-host run: {', '.join(missing)} not set (all of {ENV_COORDINATOR}, "
                            f"{ENV_COUNT}, {ENV_ID} are needed)")
        try:
            count, index = int(environ[ENV_COUNT]), int(environ[ENV_ID])
        except ValueError:
            raise UserError(f"{ENV_COUNT} and {ENV_ID} must be integers") from None
        if not 0 <= index < count:
            raise UserError(f"{ENV_ID}={index} is outside 0..{count - 1}")
        jax.distributed.initialize(environ[ENV_COORDINATOR], count, index, heartbeat_timeout_seconds=heartbeat)
    else:  # JAX reads the coordinator, count and id from the cluster (TPU metadata, SLURM variables)
        jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat)
    return kind


def is_leader() -> bool:
    """Process 0 writes logs, manifests, reports and exports; the others only compute."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Every process waits here until all arrive (a no-op on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def my_slice(count: int, processes: int | None = None, index: int | None = None) -> slice:
    """This process's contiguous share of ``count`` items (the last ones may get fewer)."""
    n = jax.process_count() if processes is None else processes
    i = jax.process_index() if index is None else index
    per = -(-count // n)
    return slice(min(count, i * per), min(count, (i + 1) * per))


def gather_rows(local: np.ndarray, count: int) -> np.ndarray:
    """Concatenates every process's ``my_slice(count)`` rows, in process order, on every process."""
    if jax.process_count() == 1:
        return np.asarray(local)
    per = -(-count // jax.process_count())
    padded = np.zeros((per,) + local.shape[1:], local.dtype)
    padded[:len(local)] = local
    everything = np.asarray(multihost_utils.process_allgather(padded, tiled=False))  # (processes, per, ...)
    return everything.reshape((-1,) + local.shape[1:])[:count]


def fetch(tree):
    """Global arrays (possibly spread over hosts) -> numpy on every process."""
    def one(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            if x.is_fully_replicated:  # every host holds all of it: no collective needed
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return np.asarray(x)

    return jax.tree_util.tree_map(one, tree)
