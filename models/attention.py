"""Attention with a KV cache: grouped-query attention (GQA) and multi-head latent attention (MLA).

Both write the new keys and values into the cache first, then attend over the whole cache with
a position mask. Prefill and decode therefore run the same arithmetic per token, which keeps a
re-prefilled request on exactly the tokens it would have produced by decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from models.config import ModelConfig
from models.fixed_order import fixed_order_softmax, fixed_order_softmax_with_sink
from models.kv_cache import LayerCache, write_layer_cache
from models.layers import Dense, RMSNorm, apply_rope, rope_tables

# DeepSeek builds q_a_layernorm / kv_a_layernorm as `DeepseekV2RMSNorm(rank)`: eps is the class
# default 1e-6, whatever the config's rms_norm_eps says.
MLA_LATENT_NORM_EPS = 1e-6


def attend(
    q: Float[Array, "b c hq dk"],
    keys: Float[Array, "b t hkv dk"],
    values: Float[Array, "b t hkv dv"],
    q_positions: Int[Array, "b c"],
    scale: float,
    numerics: str = "invariant",
    *,
    window: int | None = None,
    sinks: Float[Array, " hq"] | None = None,
) -> Float[Array, "b c hq dv"]:
    """Causal attention of queries at `q_positions` over cached keys at positions 0..t-1.

    The context is always the whole cache (t = max_seq_len), so its split never depends on the
    batch; with "invariant" numerics the softmax's sum is in a fixed order as well.
    gpt-oss: `window` keeps only the query's own key and the window - 1 before it (the cache
    still holds every position: the window is a mask); `sinks` (one logit per query head)
    join each softmax's denominator, in float32, and take no value."""
    b, c, hq, dk = q.shape
    hkv = keys.shape[2]
    q = q.reshape(b, c, hkv, hq // hkv, dk)
    scores = jnp.einsum("bckgd,btkd->bkgct", q, keys, preferred_element_type=jnp.float32) * scale
    key_positions = jnp.arange(keys.shape[1])
    visible = key_positions[None, None, :] <= q_positions[:, :, None]  # [b, c, t]
    if window is not None:
        visible &= key_positions[None, None, :] > q_positions[:, :, None] - window
    scores = jnp.where(visible[:, None, None, :, :], scores, -jnp.inf)
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(1, hkv, hq // hkv, 1, 1)
        probs = _softmax_with_sink(scores, sink, numerics).astype(values.dtype)
    else:
        softmax = fixed_order_softmax if numerics == "invariant" else jax.nn.softmax
        probs = softmax(scores).astype(values.dtype)
    out = jnp.einsum("bkgct,btkd->bckgd", probs, values)
    return out.reshape(b, c, hq, values.shape[-1])


def _softmax_with_sink(
    scores: Float[Array, "b k g c t"], sink: Float[Array, "1 k g 1 1"], numerics: str
) -> Float[Array, "b k g c t"]:
    if numerics == "invariant":
        return fixed_order_softmax_with_sink(scores, sink)
    top = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sink)
    e = jnp.exp(scores - top)
    return e / (jnp.sum(e, axis=-1, keepdims=True) + jnp.exp(sink - top))


def _read(cache: LayerCache, rows: Int[Array, " b"] | None) -> LayerCache:
    if rows is None:
        return cache
    return LayerCache(k=cache.k[rows], v=cache.v[rows])


class GroupedQueryAttention(nnx.Module):
    """Mixtral, Qwen2/3-MoE and OLMoE attention; optional q/k norm and q/k/v bias."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, hkv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(rngs=rngs, dtype=cfg.dtype, bias=cfg.attention_bias)
        self.q_proj = Dense(d, h * hd, **kw)
        self.k_proj = Dense(d, hkv * hd, **kw)
        self.v_proj = Dense(d, hkv * hd, **kw)
        self.o_proj = Dense(h * hd, d, rngs=rngs, dtype=cfg.dtype)
        if cfg.qk_norm == "per_head":
            self.q_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=cfg.dtype)
            self.k_norm = RMSNorm(hd, eps=cfg.rms_norm_eps, dtype=cfg.dtype)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(h * hd, eps=cfg.rms_norm_eps, dtype=cfg.dtype)
            self.k_norm = RMSNorm(hkv * hd, eps=cfg.rms_norm_eps, dtype=cfg.dtype)

    def __call__(
        self,
        x: Float[Array, "b c d"],
        positions: Int[Array, "b c"],
        cache: LayerCache,
        rows: Int[Array, " b"] | None,
        numerics: str = "invariant",
    ) -> tuple[Float[Array, "b c d"], LayerCache]:
        cfg = self.cfg
        b, c, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q, numerics), self.k_norm(k, numerics)
        q = q.reshape(b, c, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, c, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, c, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "per_head":
            q, k = self.q_norm(q, numerics), self.k_norm(k, numerics)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache = write_layer_cache(cache, k, v, rows, positions)
        seen = _read(cache, rows)
        out = attend(q, seen.k, seen.v, positions, cfg.head_dim**-0.5, numerics)
        return self.o_proj(out.reshape(b, c, -1)), cache


class MultiHeadLatentAttention(nnx.Module):
    """DeepSeek-V2/V3 attention. The cache holds per-head keys and values (not the latent):
    simple and exact; the absorbed, latent-cache form is a later optimisation."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h = cfg.d_model, cfg.num_heads
        qk_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        kw = dict(rngs=rngs, dtype=cfg.dtype)
        if cfg.q_lora_rank:
            self.q_a_proj = Dense(d, cfg.q_lora_rank, **kw)
            self.q_a_norm = RMSNorm(cfg.q_lora_rank, eps=MLA_LATENT_NORM_EPS, dtype=cfg.dtype)
            self.q_b_proj = Dense(cfg.q_lora_rank, h * qk_dim, **kw)
        else:
            self.q_proj = Dense(d, h * qk_dim, **kw)
        self.kv_a_proj = Dense(d, cfg.kv_lora_rank + cfg.qk_rope_head_dim, **kw)
        self.kv_a_norm = RMSNorm(cfg.kv_lora_rank, eps=MLA_LATENT_NORM_EPS, dtype=cfg.dtype)
        self.kv_b_proj = Dense(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), **kw)
        self.o_proj = Dense(h * cfg.v_head_dim, d, **kw)

    def __call__(
        self,
        x: Float[Array, "b c d"],
        positions: Int[Array, "b c"],
        cache: LayerCache,
        rows: Int[Array, " b"] | None,
        numerics: str = "invariant",
    ) -> tuple[Float[Array, "b c d"], LayerCache]:
        cfg = self.cfg
        b, c, _ = x.shape
        h, nope, rope = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        if cfg.q_lora_rank:
            q = self.q_b_proj(self.q_a_norm(self.q_a_proj(x), numerics))
        else:
            q = self.q_proj(x)
        q = q.reshape(b, c, h, nope + rope)
        q_nope, q_rope = q[..., :nope], q[..., nope:]
        latent = self.kv_a_proj(x)
        kv = self.kv_b_proj(self.kv_a_norm(latent[..., : cfg.kv_lora_rank], numerics))
        kv = kv.reshape(b, c, h, nope + cfg.v_head_dim)
        k_nope, v = kv[..., :nope], kv[..., nope:]
        k_rope = latent[..., cfg.kv_lora_rank :].reshape(b, c, 1, rope)
        cos, sin = rope_tables(positions, rope, cfg.rope_theta)
        q_rope = apply_rope(q_rope, cos, sin, interleave=cfg.rope_interleave)
        k_rope = apply_rope(k_rope, cos, sin, interleave=cfg.rope_interleave)
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        k = jnp.concatenate([k_nope, jnp.broadcast_to(k_rope, (b, c, h, rope))], axis=-1)
        cache = write_layer_cache(cache, k, v, rows, positions)
        seen = _read(cache, rows)
        out = attend(q, seen.k, seen.v, positions, (nope + rope) ** -0.5, numerics)
        return self.o_proj(out.reshape(b, c, -1)), cache
