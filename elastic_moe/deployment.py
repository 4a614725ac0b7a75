"""Parameters placed on a mesh: dense weights replicated, routed experts gathered into slots.

Each device's expert shard is built from the host copy of the logical experts by its own slots'
`phy2log` entries, so no device ever holds more than its S slots.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding
from jaxtyping import Int

from models.config import ModelConfig
from models.params import Params, expert_weights, is_expert_path, iter_expert_paths


def expert_slot_array(
    logical: np.ndarray, phy2log: Int[np.ndarray, " slots"], sharding: NamedSharding
) -> jax.Array:
    """[slots, ...] device array whose slot p holds logical expert phy2log[p]."""
    shape = (len(phy2log), *logical.shape[1:])
    return jax.make_array_from_callback(shape, sharding, lambda idx: logical[phy2log[idx[0]]])


def place_params(
    cfg: ModelConfig,
    host_params: Params,
    phy2log: Int[np.ndarray, "moe_layers slots"],
    shardings: Any,
) -> Params:
    """Device parameters: dense leaves copied with their sharding, experts built per slot."""

    def put(path, leaf, sharding):
        if is_expert_path(path):
            return None  # filled below, slot by slot
        return jax.device_put(leaf, sharding)

    placed = jax.tree_util.tree_map_with_path(put, host_params, shardings)
    for j, i, name in iter_expert_paths(cfg):
        sharding = expert_weights(shardings, i)[name]
        logical = expert_weights(host_params, i)[name]
        expert_weights(placed, i)[name] = expert_slot_array(logical, phy2log[j], sharding)
    return placed
