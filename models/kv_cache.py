"""The KV cache: per layer, keys and values for every request slot and position.

Request slots are the leading axis, so the cache shards over the same mesh axis as the batch
(data-parallel attention): a device holds the cache of its own requests only.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from models.config import ModelConfig


class LayerCache(NamedTuple):
    k: Float[Array, "slots seq kv_heads key_dim"]
    v: Float[Array, "slots seq kv_heads value_dim"]


def empty_cache(cfg: ModelConfig, num_slots: int, max_len: int | None = None) -> list[LayerCache]:
    """Zeroed cache for `num_slots` request slots (a host-side or abstract template)."""
    return [
        LayerCache(*(jnp.zeros(shape, dtype) for shape, dtype in layer))
        for layer in cache_shapes(cfg, num_slots, max_len)
    ]


def cache_shapes(cfg: ModelConfig, num_slots: int, max_len: int | None = None) -> list[LayerCache]:
    """Shapes of the cache, as (shape, dtype) pairs, without allocating."""
    t = max_len or cfg.max_seq_len
    k = ((num_slots, t, cfg.num_kv_heads, cfg.key_head_dim), jnp.dtype(cfg.dtype))
    v = ((num_slots, t, cfg.num_kv_heads, cfg.value_head_dim), jnp.dtype(cfg.dtype))
    return [LayerCache(k, v) for _ in range(cfg.num_layers)]


def write_layer_cache(
    cache: LayerCache,
    k: Float[Array, "b c kv_heads key_dim"],
    v: Float[Array, "b c kv_heads value_dim"],
    rows: Int[Array, " b"] | None,
    positions: Int[Array, "b c"],
) -> LayerCache:
    """Writes new keys/values at (row, position); out-of-range rows or positions are dropped,
    which is how padding tokens and empty prefill rows stay out of the cache."""
    if rows is None:
        rows = jnp.arange(k.shape[0])
    idx = (rows[:, None], positions)
    return LayerCache(
        k=cache.k.at[idx].set(k.astype(cache.k.dtype), mode="drop"),
        v=cache.v.at[idx].set(v.astype(cache.v.dtype), mode="drop"),
    )
