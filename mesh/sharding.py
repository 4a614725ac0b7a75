"""Sharding rules as data: logical axis name -> mesh axis.

Expert slots and request slots (with their KV cache) split over the expert axis; everything
else (attention, norms, embeddings, shared experts, routers) is replicated.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mesh.device_mesh import EXPERT_AXIS

RULES: dict[str, str | None] = {
    "slots": EXPERT_AXIS,  # physical expert slots
    "batch": EXPERT_AXIS,  # request slots and their KV cache
}


def spec_for(axes: tuple[str | None, ...]) -> P:
    return P(*(RULES.get(a) if a else None for a in axes))


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def param_specs(logical_axes: Any) -> Any:
    """The PartitionSpec tree for a tree of logical-axes tuples."""
    return jax.tree.map(spec_for, logical_axes, is_leaf=_is_axes)


def named(mesh: Mesh, specs: Any) -> Any:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


BATCH = P(EXPERT_AXIS)
REPLICATED = P()
