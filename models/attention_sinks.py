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

from models.attention import GroupedQueryAttention, attend
from models.config import ModelConfig
from models.kv_cache import LayerCache
from models.layers import dtype_of


class SinkAttention(GroupedQueryAttention):
    """Grouped-query attention (its projections, biases and rope) whose softmax has a sink per
    query head, and keys masked to the last `window` positions on the window layers."""

    def __init__(self, cfg: ModelConfig, window: int | None, *, rngs: nnx.Rngs):
        super().__init__(cfg, rngs=rngs)
        self.window = window
        sinks = jax.random.normal(rngs.params(), (cfg.num_heads,), dtype_of(cfg.dtype))
        self.sinks = nnx.Param(sinks, logical_axes=(None,))

    def _attend(
        self,
        q: Float[Array, "b c hq dk"],
        seen: LayerCache,
        positions: Int[Array, "b c"],
        numerics: str,
    ) -> Float[Array, "b c hq dv"]:
        return attend(
            q,
            seen.k,
            seen.v,
            positions,
            self.cfg.head_dim**-0.5,
            numerics,
            window=self.window,
            sinks=self.sinks[...],
        )
