"""The decoder-only MoE transformer (Flax NNX).

One forward serves prefill and decode: `tokens [b, c]` at `positions [b, c]` are written into
cache rows `rows [b]` (None = row i for token row i, the decode case) and attend over the cache.
Under `shard_map` over `axis_name`, b is this device's share of the request slots and the experts
are this device's slots; without an axis name the same code runs on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from models.attention import GroupedQueryAttention, MultiHeadLatentAttention
from models.attention_sinks import SinkAttention
from models.config import ModelConfig
from models.kv_cache import LayerCache
from models.layers import Dense, RMSNorm, SwiGLU, dtype_of
from models.moe import ExpertTables, MoEBlock
from models.row_invariant import lm_head_logits, row_invariant_when_asked


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, index: int, num_slots: int, *, rngs: nnx.Rngs):
        self.is_moe = index >= cfg.first_dense_layers
        self.attn_norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps, dtype=cfg.dtype)
        attention = MultiHeadLatentAttention if cfg.attention == "mla" else GroupedQueryAttention
        if cfg.attention_sinks:  # gpt-oss
            self.attn = SinkAttention(cfg, cfg.window_of_layer(index), rngs=rngs)
        else:
            self.attn = attention(cfg, rngs=rngs)
        self.mlp_norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps, dtype=cfg.dtype)
        if self.is_moe:
            self.mlp = MoEBlock(cfg, num_slots, rngs=rngs)
        else:
            self.mlp = SwiGLU(cfg.d_model, cfg.dense_d_ff, rngs=rngs, dtype=cfg.dtype)

    def __call__(
        self,
        x: Float[Array, "b c d"],
        positions: Int[Array, "b c"],
        cache: LayerCache,
        rows: Int[Array, " b"] | None,
        tables: ExpertTables | None,
        token_ids: Int[Array, " bc"],
        axis_name: str | None,
        numerics: str,
    ) -> tuple[Float[Array, "b c d"], LayerCache, Int[Array, " experts"] | None]:
        """The residual stream after this layer, its updated cache and (MoE layers) the
        expert loads. `tables` places this layer's experts (None for a dense layer)."""
        b, c, _ = x.shape
        with jax.named_scope("norm"):
            h = self.attn_norm(x, numerics)
        with jax.named_scope("attention"):
            h, cache = self.attn(h, positions, cache, rows, numerics)
        x = x + h
        with jax.named_scope("norm"):
            h = self.mlp_norm(x, numerics)
        if not self.is_moe:
            return x + self.mlp(h), cache, None
        valid: Bool[Array, " bc"] = (positions < cache.k.shape[2]).reshape(-1)
        flat, load = self.mlp(h.reshape(b * c, -1), tables, token_ids, valid, axis_name, numerics)
        return x + flat.reshape(b, c, -1), cache, load


class MoETransformer(nnx.Module):
    """Embedding, decoder layers (dense first layers, then MoE), final norm and LM head."""

    def __init__(self, cfg: ModelConfig, num_slots: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Param(
            jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model), dtype_of(cfg.dtype)),
            logical_axes=(None, None),
        )
        self.layers = nnx.List(
            [DecoderLayer(cfg, i, num_slots, rngs=rngs) for i in range(cfg.num_layers)]
        )
        self.final_norm = RMSNorm(cfg.d_model, eps=cfg.rms_norm_eps, dtype=cfg.dtype)
        self.lm_head = None if cfg.tie_embeddings else Dense(cfg.d_model, cfg.vocab_size, rngs=rngs)

    @row_invariant_when_asked
    def __call__(
        self,
        tokens: Int[Array, "b c"],
        positions: Int[Array, "b c"],
        cache: list[LayerCache],
        rows: Int[Array, " b"] | None,
        log2phy: Int[Array, "moe_layers experts max_replicas"],
        replica_count: Int[Array, "moe_layers experts"],
        token_ids: Int[Array, " bc"],
        last_index: Int[Array, " b"] | None,
        axis_name: str | None = None,
        numerics: str = "invariant",
    ) -> tuple[Float[Array, "b ..."], list[LayerCache], Int[Array, "moe_layers experts"]]:
        """Logits of token `last_index[i]` of each row ([b, vocab]; every token's, [b, c, vocab],
        when last_index is None), the updated cache and expert loads.

        token_ids: a global index per token, used to spread tokens over expert replicas.
        numerics: "invariant" gives every token the same bits whatever the mesh and whatever
        shares its step (the MoE combine of models.moe, and norms and softmax in a fixed order,
        models.fixed_order, and dense projections with one tiling for any row count on the
        GPU, models.row_invariant); "fast" sums expert outputs across devices and lets XLA order
        every reduction.
        Tokens at positions >= max_seq_len are padding: they are not cached or counted.
        """
        x = self.embed_tokens(tokens)
        new_cache, loads = [], []
        for i, layer in enumerate(self.layers):
            j = i - self.cfg.first_dense_layers
            tables = ExpertTables(log2phy[j], replica_count[j]) if layer.is_moe else None
            x, layer_cache, load = layer(
                x, positions, cache[i], rows, tables, token_ids, axis_name, numerics
            )
            new_cache.append(layer_cache)
            if load is not None:
                loads.append(load)
        return self.head(x, last_index, numerics), new_cache, jnp.stack(loads)

    def embed_tokens(self, tokens: Int[Array, "b c"]) -> Float[Array, "b c d"]:
        return jnp.take(self.embed[...], tokens, axis=0)

    def head(
        self, x: Float[Array, "b c d"], last_index: Int[Array, " b"] | None, numerics: str
    ) -> Float[Array, "b ..."]:
        head = self.embed[...].T if self.lm_head is None else self.lm_head.kernel[...]
        return output_logits(self.final_norm, head, x, last_index, numerics)


def output_logits(
    final_norm: RMSNorm,
    head: Float[Array, "d vocab"],
    x: Float[Array, "b c d"],
    last_index: Int[Array, " b"] | None,
    numerics: str,
) -> Float[Array, "b ..."]:
    """Logits of token `last_index[i]` of each row ([b, vocab]), or of every token (None)."""
    if last_index is not None:
        x = jnp.take_along_axis(x, last_index[:, None, None], axis=1)[:, 0]
    with jax.named_scope("norm"):
        last = final_norm(x, numerics)
    with jax.named_scope("lm_head"):
        return lm_head_logits(last, head)
