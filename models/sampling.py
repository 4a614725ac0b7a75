"""Token sampling: greedy, or seeded temperature / top-k / top-p.

Each row's randomness comes from (seed, index of the token in its request) alone, so a request
gets the same tokens whatever its batch row, mesh or reconfigurations.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, UInt32

from models.fixed_order import fixed_order_logsumexp, fixed_order_softmax


def _sample_row(
    logits: Float[Array, " v"],
    temperature: Float[Array, ""],
    top_k: Int[Array, ""],
    top_p: Float[Array, ""],
    seed: UInt32[Array, ""],
    step: Int[Array, ""],
    numerics: str = "invariant",
) -> Int[Array, ""]:
    key = jax.random.fold_in(jax.random.key(seed), step)
    scaled = logits / jnp.maximum(temperature, 1e-6)
    order = jnp.argsort(-scaled)
    ranked = scaled[order]
    keep = jnp.ones_like(ranked, dtype=bool)
    keep &= jnp.where(top_k > 0, jnp.arange(ranked.shape[0]) < top_k, True)
    probs = fixed_order_softmax(ranked) if numerics == "invariant" else jax.nn.softmax(ranked)
    before = jnp.cumsum(probs) - probs  # mass of the better tokens
    keep &= jnp.where(top_p > 0, before < top_p, True)
    keep = keep.at[0].set(True)
    choice = jax.random.categorical(key, jnp.where(keep, ranked, -jnp.inf))
    return order[choice]


def sample(
    logits: Float[Array, "b v"],
    temperature: Float[Array, " b"],
    top_k: Int[Array, " b"],
    top_p: Float[Array, " b"],
    seed: UInt32[Array, " b"],
    step: Int[Array, " b"],
    numerics: str = "invariant",
    *,
    draw: bool = True,
) -> tuple[Int[Array, " b"], Float[Array, " b"]]:
    """Next token of each row and its log-probability under the model (temperature 1).

    draw=False: every row greedy (no vocabulary sort). The serving programs run that, and a
    second program draws the sampled rows only in steps that have any (elastic_moe.steps): a
    `lax.cond` choosing between the two inside the step made XLA's GPU runtime copy its
    predicate to the host and wait for it, so launching a step returned only once the step
    was done. Rows with temperature <= 0 are greedy either way, with the same bits.
    numerics "invariant": the log-softmax's sum in a fixed order (models.fixed_order), so a
    row's logprob does not depend on how many rows share the step."""
    tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if draw:
        row = functools.partial(_sample_row, numerics=numerics)
        drawn = jax.vmap(row)(logits, temperature, top_k, top_p, seed, step)
        tokens = jnp.where(temperature <= 0, tokens, drawn.astype(jnp.int32))
    if numerics == "invariant":
        logprobs = logits - fixed_order_logsumexp(logits)
    else:
        logprobs = jax.nn.log_softmax(logits, axis=-1)
    return tokens, jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
