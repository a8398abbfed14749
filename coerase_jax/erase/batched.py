"""K independent erasures in one program: the step vmapped over a leading concept axis.

Each concept k has its own trainable parameters, optimizer state and batch (its prompts, its
reference embeddings); the frozen rest of the UNet, the teacher and the image projection are one
shared copy. The stacked state and batches are split over the mesh's ``concept`` axis, so with
``concept = K`` devices each device trains one concept and nothing crosses between them; the
shared weights follow the usual rules table (FSDP over ``fsdp``).

Meant for subsets small enough to stack K times (``esd-x``, ``esd-x-strict``, LoRA). A concept's
result is ``unstack(state.trainable)[k]``, merged with the frozen rest as in a single run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from coerase_jax.errors import UserError
from coerase_jax.parallel import mesh as mesh_lib


def stack(trees: list):
    """K pytrees of one structure -> one pytree whose leaves have a leading axis of size K."""
    if not trees:
        raise UserError("no concepts to stack")
    return jax.tree_util.tree_map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack(tree, count: int) -> list:
    return [jax.tree_util.tree_map(lambda leaf, k=k: leaf[k], tree) for k in range(count)]


def to_global(tree, shardings):
    """Host values, the same on every process -> global arrays laid out by ``shardings``; each
    process fills only its own devices' shards (the concept axis may span hosts)."""
    def put(leaf, sharding):
        host = np.asarray(leaf)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    return jax.tree_util.tree_map(put, tree, shardings)


def batched_step(step_fn, compose_teacher=None, compose_frozen=None):
    """(stacked state, frozen, teacher, proj_params, stacked batch) -> (stacked state, stacked metrics).

    ``step_fn`` must be built without a mesh (its sharding constraints are per concept). With
    ``compose_teacher``, each concept has its own teacher: ``teacher`` is then a pair (stacked own
    part, shared rest) joined by ``compose_teacher(own, rest)`` — a later stage's teacher is that
    concept's earlier result, which differs from the others only in the trained subset.
    ``compose_frozen`` does the same for the frozen weights (a later LoRA stage trains on top of each
    concept's earlier LoRA)."""

    def per_concept(state, frozen, teacher, proj_params, batch):
        if compose_frozen is not None:
            frozen = compose_frozen(*frozen)
        if compose_teacher is not None:
            teacher = compose_teacher(*teacher)
        return step_fn(state, frozen, teacher, proj_params, batch)

    own_and_shared = lambda compose: None if compose is None else (0, None)
    return jax.vmap(per_concept, in_axes=(0, own_and_shared(compose_frozen), own_and_shared(compose_teacher),
                                          None, 0))


def concept_sharding(mesh, rank: int) -> NamedSharding:
    """A stacked leaf: its concept axis over ``concept``, every other dimension whole."""
    return NamedSharding(mesh, P("concept", *([None] * (rank - 1))))


def concept_batch_sharding(mesh, rank: int) -> NamedSharding:
    """A stacked batch leaf (K, B, ...): concepts over ``concept``, each one's examples over data x fsdp."""
    return NamedSharding(mesh, P("concept", mesh_lib.BATCH_AXES, *([None] * (rank - 2))))


def jit_batched_step(step, mesh, state, frozen, teacher, proj_params, batch, donate: bool = True,
                     teacher_per_concept: bool = False, frozen_per_concept: bool = False):
    """``jax.jit`` of ``batched_step(...)`` with explicit shardings; shapes only are read from the
    arguments (arrays or ShapeDtypeStructs). ``teacher_per_concept`` / ``frozen_per_concept``: that
    argument is a pair (stacked own part, shared rest), as ``batched_step(..., compose_teacher /
    compose_frozen)`` takes it."""
    count = jax.tree_util.tree_leaves(state)[0].shape[0]
    if count % mesh.shape["concept"]:
        raise UserError(f"{count} concepts do not divide over the mesh's concept axis ({mesh.shape['concept']})")
    stacked = lambda tree: jax.tree_util.tree_map(lambda leaf: concept_sharding(mesh, leaf.ndim), tree)
    # The batch: concepts over ``concept``, each concept's examples over data x fsdp.
    batch_sh = jax.tree_util.tree_map(lambda leaf: concept_batch_sharding(mesh, leaf.ndim), batch)
    metrics_sh = NamedSharding(mesh, P("concept"))
    own_and_shared = lambda tree, per_concept: ((stacked(tree[0]), mesh_lib.tree_shardings(tree[1], mesh))
                                                if per_concept else mesh_lib.tree_shardings(tree, mesh))
    in_shardings = (stacked(state), own_and_shared(frozen, frozen_per_concept),
                    own_and_shared(teacher, teacher_per_concept), mesh_lib.tree_shardings(proj_params, mesh), batch_sh)
    return jax.jit(step, in_shardings=in_shardings, out_shardings=(stacked(state), metrics_sh),
                   donate_argnums=(0,) if donate else ())
