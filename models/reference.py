"""A single-device forward pass over whole sequences: the reference the sharded runtime and the
Hugging Face checks compare against. Each expert sits in slot e (identity placement)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from models.config import ModelConfig
from models.kv_cache import empty_cache
from models.params import Params, model_graph


def identity_tables(cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    """log2phy [moe_layers, experts, 1], replica_count [moe_layers, experts]: expert e in slot e."""
    moe, e = cfg.num_moe_layers, cfg.num_experts
    log2phy = np.broadcast_to(np.arange(e, dtype=np.int32)[None, :, None], (moe, e, 1)).copy()
    return log2phy, np.ones((moe, e), np.int32)


def forward_logits(
    cfg: ModelConfig, params: Params, tokens: Int[Array | np.ndarray, "b c"]
) -> Float[Array, "b c vocab"]:
    """Logits of every position of every sequence, computed on one device in one pass."""
    tokens = jnp.asarray(tokens, jnp.int32)
    params = jax.tree.map(jnp.asarray, params)
    b, c = tokens.shape
    if c > cfg.max_seq_len:
        raise ValueError(f"sequence of {c} tokens exceeds max_seq_len {cfg.max_seq_len}")
    model = nnx.merge(model_graph(cfg), params)
    log2phy, counts = identity_tables(cfg)
    positions = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
    logits, _, _ = jax.jit(model.__call__, static_argnames=("axis_name",))(
        tokens,
        positions,
        empty_cache(cfg, b, c),
        None,
        log2phy,
        counts,
        jnp.arange(b * c, dtype=jnp.int32),
        None,
    )
    return logits
