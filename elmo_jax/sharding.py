"""The device mesh and batch sharding shared by embedding and training: one axis, "data"."""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def data_mesh(devices=None) -> Mesh:
    """A 1-D mesh over ``devices`` (default: all local devices) with axis name "data"."""
    devices = list(devices) if devices is not None else jax.local_devices()
    if not devices:
        raise ValueError("no devices to build a mesh on")
    return Mesh(devices, ("data",))


def by_batch(mesh: Mesh) -> NamedSharding:
    """Arrays split along their first axis across the mesh."""
    return NamedSharding(mesh, PartitionSpec("data"))


def replicated(mesh: Mesh) -> NamedSharding:
    """Arrays copied whole to every device of the mesh."""
    return NamedSharding(mesh, PartitionSpec())


def put_global(tree, sharding: NamedSharding):
    """Host values (numpy or local arrays, the same on every process) -> global jax.Arrays with ``sharding``.

    Each process fills only its own devices' pieces (``jax.make_array_from_callback``), so this works for a
    mesh over several processes' devices, where ``jax.device_put`` of a host value may not.
    """
    import numpy as np

    def put(value):
        value = np.asarray(value)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(put, tree)


def varying_like(tree, x: jax.Array):
    """``tree`` plus a zero derived from ``x``: the same numbers, typed as varying over devices as ``x`` is.

    Inside ``shard_map`` a value made of constants or replicated inputs is the same on every device, while one
    computed from per-device inputs varies. A ``lax.scan`` refuses a carry that starts invariant and becomes
    varying, and the gradient of an invariant input comes out already summed over the devices; adding this
    zero gives ``tree`` the inputs' variance. A no-op under jit or pmap. ``x`` must not be empty.
    """
    import jax.numpy as jnp

    zero = jnp.zeros_like(x, jnp.float32).reshape(-1)[0]  # () float32, x's device variance
    return jax.tree.map(lambda a: a + zero.astype(a.dtype), tree)


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= n (and >= multiple)."""
    return max(multiple, -(-n // multiple) * multiple)
