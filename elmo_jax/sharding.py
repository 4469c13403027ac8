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


def round_up(n: int, multiple: int) -> int:
    """The smallest multiple of ``multiple`` that is >= n (and >= multiple)."""
    return max(multiple, -(-n // multiple) * multiple)
