"""A one-axis device mesh built from an explicit list of devices.

Experts and request slots are both split over the one axis `EXPERT_AXIS`: a device is a failure
domain that holds its expert slots and its requests' KV cache.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import numpy as np
from jax.sharding import Mesh

EXPERT_AXIS = "ep"


def build_mesh(devices: Sequence[jax.Device]) -> Mesh:
    """A mesh over `devices` in the given order (position i = device i of the list)."""
    if not devices:
        raise ValueError("a mesh needs at least one device")
    ids = [d.id for d in devices]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate devices in mesh: {ids}")
    return Mesh(np.array(list(devices)), (EXPERT_AXIS,))


def device_ids(mesh: Mesh) -> tuple[int, ...]:
    return tuple(int(d.id) for d in mesh.devices.flat)
