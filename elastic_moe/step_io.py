"""What a step program takes per row to sample, what it returns, and its tokens' global ids."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, UInt32

from mesh.device_mesh import EXPERT_AXIS
from models.kv_cache import LayerCache


class Sampling(NamedTuple):
    """Per-row sampling state: `step` is the index of the token to produce in its request."""

    temperature: Float[Array, " b"]
    top_k: Int[Array, " b"]
    top_p: Float[Array, " b"]
    seed: UInt32[Array, " b"]
    step: Int[Array, " b"]


class StepOutput(NamedTuple):
    tokens: Int[Array, " b"]
    logprobs: Float[Array, " b"]
    logits: Float[Array, "b vocab"]
    cache: list[LayerCache]
    expert_load: Int[Array, "moe_layers experts"]


def global_token_ids(b: int, c: int) -> Int[Array, " bc"]:
    """Inside shard_map over EXPERT_AXIS: a mesh-wide index for each of this device's b x c
    tokens (the MoE layers spread tokens over an expert's replicas by it)."""
    first = jax.lax.axis_index(EXPERT_AXIS) * b * c
    return first + jnp.arange(b * c, dtype=jnp.int32)
