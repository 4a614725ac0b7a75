"""gpt-oss attention: grouped-query attention with biases on q/k/v/o, attention sinks, and a
sliding window on some layers.

A sink is a learned logit per query head that joins the softmax's denominator and is then
dropped (transformers' GptOssAttention concatenates it to the scores, softmaxes and slices it
off), so a head can attend to "nothing" instead of spreading its weight over the keys. The
window layers keep the whole-cache layout of every other layer and mask keys older than the
window (models.attention.attend), so prefill and decode still run the same arithmetic.
"""

from __future__ import annotations

import jax
from flax import nnx
from jaxtyping import Array, Float, Int

from models.attention import _read, attend
from models.config import ModelConfig
from models.kv_cache import LayerCache, write_layer_cache
from models.layers import Dense, dtype_of
from models.rope import apply_rope, rope_tables


class SinkAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, window: int | None, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.window = window
        d, h, hkv, hd = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(rngs=rngs, dtype=cfg.dtype, bias=cfg.attention_bias)
        self.q_proj = Dense(d, h * hd, **kw)
        self.k_proj = Dense(d, hkv * hd, **kw)
        self.v_proj = Dense(d, hkv * hd, **kw)
        self.o_proj = Dense(h * hd, d, rngs=rngs, dtype=cfg.dtype, bias=cfg.o_proj_bias)
        sinks = jax.random.normal(rngs.params(), (h,), dtype_of(cfg.dtype))
        self.sinks = nnx.Param(sinks, logical_axes=(None,))

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
        q = self.q_proj(x).reshape(b, c, cfg.num_heads, cfg.head_dim)
        k = self.k_proj(x).reshape(b, c, cfg.num_kv_heads, cfg.head_dim)
        v = self.v_proj(x).reshape(b, c, cfg.num_kv_heads, cfg.head_dim)
        cos, sin = rope_tables(positions, cfg.head_dim, cfg)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        cache = write_layer_cache(cache, k, v, rows, positions)
        seen = _read(cache, rows)
        out = attend(
            q,
            seen.k,
            seen.v,
            positions,
            cfg.head_dim**-0.5,
            numerics,
            window=self.window,
            sinks=self.sinks[...],
        )
        return self.o_proj(out.reshape(b, c, -1)), cache
