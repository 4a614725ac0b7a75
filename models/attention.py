"""Attention with a KV cache: grouped-query attention (GQA) and multi-head latent attention (MLA).

Both write the new keys and values into the cache first, then attend over it: on the GPU with
one kernel that reads each query's live context only (models/attention_kernel.py), elsewhere
over the whole cache with a position mask. Prefill and decode run the same arithmetic per token
either way, which keeps a re-prefilled request on exactly the tokens it would have produced by
decoding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from models import absorbed_mla, attention_kernel, row_invariant
from models.config import ModelConfig
from models.fixed_order import (
    fixed_order_einsum,
    fixed_order_softmax,
    fixed_order_softmax_with_sink,
)
from models.kernel_platform import interpreted
from models.kv_cache import LayerCache, write_layer_cache
from models.layers import Dense, RMSNorm, project
from models.rope import apply_partial_rope, apply_rope, mla_softmax_scale, rope_tables

# DeepSeek builds q_a_layernorm / kv_a_layernorm as `DeepseekV2RMSNorm(rank)`: eps is the class
# default 1e-6, whatever the config's rms_norm_eps says.
MLA_LATENT_NORM_EPS = 1e-6


def attend(
    q: Float[Array, "b c hq dk"],
    keys: Float[Array, "b hkv t dk"],
    values: Float[Array, "b hkv t dv"],
    q_positions: Int[Array, "b c"],
    scale: float,
    numerics: str = "invariant",
    *,
    window: int | None = None,
    sinks: Float[Array, " hq"] | None = None,
) -> Float[Array, "b c hq dv"]:
    """Causal attention of queries at `q_positions` over cached keys at positions 0..t-1.

    On the GPU this is one kernel over each query's live context (models.attention_kernel).
    Elsewhere the context is the whole cache (t = max_seq_len), so its split never depends on
    the batch; with "invariant" numerics the softmax's sum is in a fixed order as well.
    gpt-oss: `window` keeps only the query's own key and the window - 1 before it (the cache
    still holds every position: the window is a mask); `sinks` (one logit per query head)
    join each softmax's denominator, in float32, and take no value."""
    if sinks is None and window is None and attention_kernel.use_kernel(q, keys, values):
        return attention_kernel.live_context_attention(
            q, keys, values, q_positions, scale, interpret=interpreted()
        )
    return attend_whole_window(q, keys, values, q_positions, scale, numerics, window, sinks)


def attend_whole_window(
    q: Float[Array, "b c hq dk"],
    keys: Float[Array, "b hkv t dk"],
    values: Float[Array, "b hkv t dv"],
    q_positions: Int[Array, "b c"],
    scale: float,
    numerics: str = "invariant",
    window: int | None = None,
    sinks: Float[Array, " hq"] | None = None,
) -> Float[Array, "b c hq dv"]:
    """`attend` in XLA ops over the whole cache (masked): CPU, gpt-oss's sinks and windows."""
    b, c, hq, dk = q.shape
    hkv = keys.shape[1]
    q = q.reshape(b, c, hkv, hq // hkv, dk)
    scores = einsum("bckgd,bktd->bkgct", q, keys, numerics, jnp.float32) * scale
    if sinks is not None:
        sink = sinks.astype(jnp.float32).reshape(1, hkv, hq // hkv, 1, 1)
        scores = mask_unseen(scores, q_positions, window)
        probs = _softmax_with_sink(scores, sink, numerics).astype(values.dtype)
    else:
        probs = causal_softmax(scores, q_positions, numerics, window=window).astype(values.dtype)
    out = einsum("bkgct,bktd->bckgd", probs, values, numerics)
    return out.reshape(b, c, hq, values.shape[-1])


def einsum(spec: str, x: Array, y: Array, numerics: str, out_dtype=None) -> Array:
    """jnp.einsum for the XLA attention path. With invariant numerics off the GPU, in a fixed
    order (models.fixed_order_einsum): XLA's CPU dot rounds a query's scores differently when
    a head has fewer than 16 query rows (a decode step) than with more (a prefill). On the GPU
    these einsums were measured row-invariant at the probed shapes (benchmarks/RESULTS.md), and
    the fixed-order form would materialise every query's products over the whole window."""
    out_dtype = out_dtype or jnp.result_type(x, y)
    if numerics == "invariant" and jax.default_backend() != "gpu":
        return fixed_order_einsum(spec, x, y).astype(out_dtype)
    return jnp.einsum(spec, x, y, preferred_element_type=out_dtype)


def mask_unseen(
    scores: Float[Array, "b *heads c t"], q_positions: Int[Array, "b c"], window: int | None
) -> Float[Array, "b *heads c t"]:
    """-inf on the keys a query may not see: later positions, and with a `window` the keys
    window or more positions before it."""
    key_positions = jnp.arange(scores.shape[-1])
    visible = key_positions[None, None, :] <= q_positions[:, :, None]  # [b, c, t]
    if window is not None:
        visible &= key_positions[None, None, :] > q_positions[:, :, None] - window
    visible = visible.reshape(visible.shape[0], *[1] * (scores.ndim - 3), *visible.shape[1:])
    return jnp.where(visible, scores, -jnp.inf)


def causal_softmax(
    scores: Float[Array, "b *heads c t"],
    q_positions: Int[Array, "b c"],
    numerics: str,
    *,
    window: int | None = None,
) -> Float[Array, "b *heads c t"]:
    """Softmax over the cached positions a query may see (0..its own), in float32."""
    scores = mask_unseen(scores, q_positions, window)
    softmax = fixed_order_softmax if numerics == "invariant" else jax.nn.softmax
    return softmax(scores)


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
    """Mixtral, Qwen2/3-MoE, OLMoE and GLM-4.5 attention; optional q/k norm, q/k/v bias and
    partial RoPE."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, hkv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(rngs=rngs, dtype=cfg.dtype, bias=cfg.attention_bias)
        self.q_proj = Dense(d, h * hd, **kw)
        self.k_proj = Dense(d, hkv * hd, **kw)
        self.v_proj = Dense(d, hkv * hd, **kw)
        self.o_proj = Dense(h * hd, d, rngs=rngs, dtype=cfg.dtype, bias=cfg.o_proj_bias)
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
        q, k, v = project(x, self.q_proj, self.k_proj, self.v_proj)
        if cfg.qk_norm == "full":
            q, k = self.q_norm(q, numerics), self.k_norm(k, numerics)
        q = q.reshape(b, c, cfg.num_heads, cfg.head_dim)
        k = k.reshape(b, c, cfg.num_kv_heads, cfg.head_dim)
        v = v.reshape(b, c, cfg.num_kv_heads, cfg.head_dim)
        if cfg.qk_norm == "per_head":
            q, k = self.q_norm(q, numerics), self.k_norm(k, numerics)
        cos, sin = rope_tables(positions, cfg.rope_dim, cfg)
        q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
        cache = write_layer_cache(cache, k, v, rows, positions)
        out = self._attend(q, _read(cache, rows), positions, numerics)
        return self.o_proj(out.reshape(b, c, -1)), cache

    def _attend(
        self,
        q: Float[Array, "b c hq dk"],
        seen: LayerCache,
        positions: Int[Array, "b c"],
        numerics: str,
    ) -> Float[Array, "b c hq dv"]:
        return attend(q, seen.k, seen.v, positions, self.cfg.head_dim**-0.5, numerics)


class MultiHeadLatentAttention(nnx.Module):
    """DeepSeek-V2/V3 attention, with the cache form `cfg.mla_cache` picks.

    "latent" (the absorbed form of DeepSeek's inference code): the cache holds, per token, the
    normalised compressed KV c (kv_lora_rank) and the rotated rope key shared by all heads. With
    kv_b_proj split per head into W_UK [kv_lora, h, nope] and W_UV [kv_lora, h, v], the nope
    part of a score is q_nope . (W_UK c) = (W_UK^T q_nope) . c, and the output is
    W_UV^T (sum_t p_t c_t): the per-head keys and values are never built. It is multi-query
    attention whose one value head is c and whose one key head is [c | k_rope]; the cache's `v`
    holds c and its `k` only what the key adds, k_rope (models.kv_cache says why).
    "per_head": keys and values expanded per head and cached, as Hugging Face computes them.
    """

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
            q_a, latent = project(x, self.q_a_proj, self.kv_a_proj)
            q = self.q_b_proj(self.q_a_norm(q_a, numerics))
        else:
            q, latent = project(x, self.q_proj, self.kv_a_proj)
        q = q.reshape(b, c, h, nope + rope)
        q_nope, q_rope = q[..., :nope], q[..., nope:]
        c_kv = self.kv_a_norm(latent[..., : cfg.kv_lora_rank], numerics)
        k_rope = latent[..., cfg.kv_lora_rank :].reshape(b, c, 1, rope)
        cos, sin = rope_tables(positions, rope, cfg)
        q_rope = apply_rope(q_rope, cos, sin, interleave=cfg.rope_interleave)
        k_rope = apply_rope(k_rope, cos, sin, interleave=cfg.rope_interleave)
        scale = mla_softmax_scale(cfg)
        attend_form = self._latent if cfg.mla_cache == "latent" else self._per_head
        out, cache = attend_form(
            q_nope, q_rope, c_kv, k_rope, positions, cache, rows, scale, numerics
        )
        return self.o_proj(out.reshape(b, c, -1)), cache

    def _per_head(
        self,
        q_nope: Float[Array, "b c h nope"],
        q_rope: Float[Array, "b c h rope"],
        c_kv: Float[Array, "b c kv_lora"],
        k_rope: Float[Array, "b c 1 rope"],
        positions: Int[Array, "b c"],
        cache: LayerCache,
        rows: Int[Array, " b"] | None,
        scale: float,
        numerics: str,
    ) -> tuple[Float[Array, "b c h v"], LayerCache]:
        cfg = self.cfg
        b, c, h, nope = q_nope.shape
        kv = self.kv_b_proj(c_kv).reshape(b, c, h, nope + cfg.v_head_dim)
        k_nope, v = kv[..., :nope], kv[..., nope:]
        q = jnp.concatenate([q_nope, q_rope], axis=-1)
        k_rope = jnp.broadcast_to(k_rope, (b, c, h, k_rope.shape[-1]))
        k = jnp.concatenate([k_nope, k_rope], axis=-1)
        cache = write_layer_cache(cache, k, v, rows, positions)
        seen = _read(cache, rows)
        return attend(q, seen.k, seen.v, positions, scale, numerics), cache

    def _latent(
        self,
        q_nope: Float[Array, "b c h nope"],
        q_rope: Float[Array, "b c h rope"],
        c_kv: Float[Array, "b c kv_lora"],
        k_rope: Float[Array, "b c 1 rope"],
        positions: Int[Array, "b c"],
        cache: LayerCache,
        rows: Int[Array, " b"] | None,
        scale: float,
        numerics: str,
    ) -> tuple[Float[Array, "b c h v"], LayerCache]:
        cfg = self.cfg
        h, nope = q_nope.shape[2:]
        lora = cfg.kv_lora_rank
        # kv_b_proj's output is grouped per head, [nope | v] each (its kernel is [in, out]).
        w_kv = self.kv_b_proj.kernel[...].reshape(lora, h, nope + cfg.v_head_dim)
        w_uk, w_uv = w_kv[..., :nope], w_kv[..., nope:]  # [lora, h, nope], [lora, h, v]
        b, c = q_nope.shape[:2]
        absorbed = row_invariant.kernels_enabled() and absorbed_mla.supported(
            nope, cfg.v_head_dim, lora
        )
        # Contractions over one token's own vectors only: no sum spans rows of the batch.
        if absorbed:  # GPU, invariant numerics: a fixed tiling whatever the row count
            w = self.kv_b_proj.kernel[...]
            q_flat = q_nope.reshape(b * c, h, nope)
            q_latent = absorbed_mla.absorb_query(
                q_flat, w, cfg.v_head_dim, interpret=interpreted()
            ).reshape(b, c, h, lora)
        else:
            q_latent = einsum("bchn,lhn->bchl", q_nope, w_uk, numerics)
        cache = write_layer_cache(cache, k_rope, c_kv[:, :, None, :], rows, positions)
        seen = _read(cache, rows)  # k: [b, 1, t, rope] rope keys; v: [b, 1, t, lora] latents
        if attention_kernel.use_kernel(q_latent, seen.v, seen.v):
            out_latent = attention_kernel.live_context_attention(
                q_latent,
                seen.v,
                seen.v,
                positions,
                scale,
                q_extra=q_rope,
                keys_extra=seen.k,
                interpret=interpreted(),
            )
            if absorbed:
                flat = out_latent.reshape(b * c, h, lora)
                w = self.kv_b_proj.kernel[...]
                out = absorbed_mla.expand_output(flat, w, cfg.v_head_dim, interpret=interpreted())
                return out.reshape(b, c, h, cfg.v_head_dim), cache
            return einsum("bchl,lhv->bchv", out_latent, w_uv, numerics), cache
        f32 = jnp.float32
        scores = einsum("bchl,btl->bhct", q_latent, seen.v[:, 0], numerics, f32)
        scores += einsum("bchr,btr->bhct", q_rope, seen.k[:, 0], numerics, f32)
        probs = causal_softmax(scores * scale, positions, numerics).astype(seen.v.dtype)
        out_latent = einsum("bhct,btl->bchl", probs, seen.v[:, 0], numerics)
        return einsum("bchl,lhv->bchv", out_latent, w_uv, numerics), cache
