"""The KV cache: per layer, keys and values for every request slot, head and position.

Request slots are the leading axis, so the cache shards over the same mesh axis as the batch
(data-parallel attention): a device holds the cache of its own requests only. Heads come
before positions ([slots, heads, seq, dim]) so that attention's batched products (batch dims
slot and head) read the cache in place: stored [slots, seq, heads, dim], XLA copied the whole
cache into that order in every layer of every decode step (measured on an H200, RESULTS.md).

Multi-head latent attention (DeepSeek) with `mla_cache="latent"` caches, per token and layer,
the normalised compressed KV c (kv_lora_rank) and the rotated rope key shared by all heads
(qk_rope_head_dim): 576 values for DeepSeek-V3 against 128 heads x (192 + 128) per head. The
absorbed attention is multi-query attention whose value is c and whose key is [c | k_rope], so
`v` holds c ([slots, 1, seq, kv_lora_rank]) and `k` only what the key adds to it, k_rope
([slots, 1, seq, qk_rope_head_dim]). Why this layout: storing the key whole would duplicate c
(512 of its 576 columns); a zero-width `v` leaf next to a whole key was tried, and jit gives a
zero-size output a replicated sharding, not the request-slot one. Two non-empty leaves with
request slots leading keep the same pytree, so every user that only walks the tree (sharding
over slots, the empty cache, moving shards to a new mesh, poisoning a lost device, donation,
the AOT arguments, the workers) works for both forms unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from models.config import ModelConfig


class LayerCache(NamedTuple):
    k: Float[Array, "slots kv_heads seq key_dim"]
    v: Float[Array, "slots kv_heads seq value_dim"]


class CacheLayout(NamedTuple):
    """Per token and layer: `heads` cached heads of keys `key_dim` wide and values `value_dim`."""

    heads: int
    key_dim: int
    value_dim: int


def cache_layout(cfg: ModelConfig) -> CacheLayout:
    if cfg.attention == "mla" and cfg.mla_cache == "latent":
        return CacheLayout(1, cfg.qk_rope_head_dim, cfg.kv_lora_rank)
    return CacheLayout(cfg.num_kv_heads, cfg.key_head_dim, cfg.value_head_dim)


def kv_bytes_per_token(cfg: ModelConfig) -> int:
    """Bytes one token's keys and values take in the cache of one layer."""
    heads, key_dim, value_dim = cache_layout(cfg)
    return heads * (key_dim + value_dim) * jnp.dtype(cfg.dtype).itemsize


def empty_cache(cfg: ModelConfig, num_slots: int, max_len: int | None = None) -> list[LayerCache]:
    """Zeroed cache for `num_slots` request slots (a host-side or abstract template)."""
    return [
        LayerCache(*(jnp.zeros(shape, dtype) for shape, dtype in layer))
        for layer in cache_shapes(cfg, num_slots, max_len)
    ]


def cache_shapes(cfg: ModelConfig, num_slots: int, max_len: int | None = None) -> list[LayerCache]:
    """Shapes of the cache, as (shape, dtype) pairs, without allocating."""
    t = max_len or cfg.max_seq_len
    heads, key_dim, value_dim = cache_layout(cfg)
    k = ((num_slots, heads, t, key_dim), jnp.dtype(cfg.dtype))
    v = ((num_slots, heads, t, value_dim), jnp.dtype(cfg.dtype))
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
    heads = jnp.arange(k.shape[2])
    idx = (rows[:, None, None], heads[None, :, None], positions[:, None, :])  # [b, h, c]
    return LayerCache(
        k=cache.k.at[idx].set(k.transpose(0, 2, 1, 3).astype(cache.k.dtype), mode="drop"),
        v=cache.v.at[idx].set(v.transpose(0, 2, 1, 3).astype(cache.v.dtype), mode="drop"),
    )
