"""Routers: which logical experts each token uses, and with what weight.

softmax (Mixtral, Qwen2/3-MoE, OLMoE, DeepSeek-V2): top-k of the softmax scores, optionally
renormalised; with expert groups, only the best `topk_groups` groups (by their best score) count.
sigmoid (DeepSeek-V3): sigmoid scores; a correction bias picks the experts (and the groups, by
the sum of each group's two best biased scores) but the weights are the unbiased scores.
topk_softmax (gpt-oss): top-k of the logits, then a softmax over those k logits alone.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from models.config import ModelConfig
from models.fixed_order import fixed_order_softmax, fixed_order_sum


def _limit_to_best_groups(
    selection: Float[Array, "t e"], group_score: Float[Array, "t g"], keep: int
) -> Float[Array, "t e"]:
    t, e = selection.shape
    g = group_score.shape[-1]
    _, best = jax.lax.top_k(group_score, keep)
    group_mask = jnp.zeros((t, g), bool).at[jnp.arange(t)[:, None], best].set(True)
    expert_mask = jnp.repeat(group_mask, e // g, axis=-1)
    return jnp.where(expert_mask, selection, -jnp.inf)


def _row_sum(x: Float[Array, "t k"], invariant: bool) -> Float[Array, "t 1"]:
    return fixed_order_sum(x) if invariant else x.sum(-1, keepdims=True)


def route(
    logits: Float[Array, "t e"],
    cfg: ModelConfig,
    bias: Float[Array, " e"] | None = None,
    numerics: str = "invariant",
) -> tuple[Float[Array, "t k"], Int[Array, "t k"]]:
    """Top-k routing weights and logical expert ids, in float32.

    numerics "invariant": the softmax and the renormalisation sum in a fixed order
    (models.fixed_order); XLA's row reductions change bits with the number of rows (measured
    on an H200: a re-prefilled token's routing weights differed from its decode step's)."""
    invariant = numerics == "invariant"
    softmax = fixed_order_softmax if invariant else functools.partial(jax.nn.softmax, axis=-1)
    logits = logits.astype(jnp.float32)
    k, groups = cfg.experts_per_token, cfg.num_expert_groups
    t, e = logits.shape
    if cfg.router == "topk_softmax":
        top, experts = jax.lax.top_k(logits, k)
        weights = softmax(top)
    elif cfg.router == "sigmoid":
        scores = jax.nn.sigmoid(logits)
        selection = scores if bias is None else scores + bias.astype(jnp.float32)
        if groups > 1:
            per_group = selection.reshape(t, groups, e // groups)
            group_score = jax.lax.top_k(per_group, 2)[0].sum(-1)
            selection = _limit_to_best_groups(selection, group_score, cfg.topk_groups)
        _, experts = jax.lax.top_k(selection, k)
        weights = jnp.take_along_axis(scores, experts, axis=-1)
        if cfg.norm_topk_prob:
            weights = weights / (_row_sum(weights, invariant) + 1e-20)
    else:
        scores = softmax(logits)
        selection = scores
        if groups > 1:
            group_score = scores.reshape(t, groups, e // groups).max(-1)
            selection = _limit_to_best_groups(scores, group_score, cfg.topk_groups)
        _, experts = jax.lax.top_k(selection, k)
        weights = jnp.take_along_axis(scores, experts, axis=-1)
        if cfg.norm_topk_prob:
            weights = weights / _row_sum(weights, invariant)
    return weights * cfg.routed_scaling_factor, experts.astype(jnp.int32)
