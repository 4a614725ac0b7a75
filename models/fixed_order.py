"""Sums over the last axis in an order the program fixes, not the compiler.

XLA picks how to reduce by the shape of the whole operation: measured on the CPU backend
(JAX 0.12), a float32 row sum of 256 values rounds differently once the array holds 16 rows or
more (4,096 elements), so a token's RMSNorm, softmax or log-softmax changed with how many other
tokens shared its step: prefill vs decode, or another batch. Here the order is spelled out in
elementwise adds, which XLA never reassociates: the result of a row depends on that row alone.

The row (zero-padded to a multiple of LANES) is cut into chunks of LANES values; the chunks are
added pairwise, halving their number each round (each round is LANES-wide, so a GPU keeps
rows x LANES threads busy), then the LANES partial sums are added pairwise the same way.
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

LANES = 32


def _halve(x: Float[Array, "... n w"]) -> Float[Array, "... w"]:
    """Pairwise sum over axis -2: [..., n, w] -> [..., w], n padded to a power of two."""
    n = x.shape[-2]
    size = 1 << max(n - 1, 0).bit_length()
    if size != n:
        x = jnp.concatenate([x, jnp.zeros((*x.shape[:-2], size - n, x.shape[-1]), x.dtype)], -2)
    while x.shape[-2] > 1:
        half = x.shape[-2] // 2
        x = x[..., :half, :] + x[..., half:, :]
    return x[..., 0, :]


def fixed_order_sum(x: Float[Array, "... n"]) -> Float[Array, "... 1"]:
    """sum(x, axis=-1, keepdims=True), each row summed in the same order whatever its batch."""
    n = x.shape[-1]
    chunks = -(-n // LANES)
    if chunks * LANES != n:
        x = jnp.concatenate([x, jnp.zeros((*x.shape[:-1], chunks * LANES - n), x.dtype)], -1)
    partial = _halve(x.reshape(*x.shape[:-1], chunks, LANES))  # [..., LANES]
    return _halve(partial[..., :, None])  # [..., 1]


def fixed_order_logsumexp(x: Float[Array, "... n"]) -> Float[Array, "... 1"]:
    """log(sum(exp(x))) over the last axis, stably (the max is exact in any order)."""
    top = jnp.max(x, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0)
    return top + jnp.log(fixed_order_sum(jnp.exp(x - top)))


def fixed_order_softmax(x: Float[Array, "... n"]) -> Float[Array, "... n"]:
    top = jnp.max(x, axis=-1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0)
    e = jnp.exp(x - top)
    return e / fixed_order_sum(e)


def fixed_order_softmax_with_sink(
    x: Float[Array, "... n"], sink: Float[Array, "... 1"]
) -> Float[Array, "... n"]:
    """softmax over [x, sink] without the sink's own entry (gpt-oss's attention sinks): the
    sink joins the denominator only, added after the fixed-order sum of the row."""
    top = jnp.maximum(jnp.max(x, axis=-1, keepdims=True), sink)  # finite: the sink is
    e = jnp.exp(x - top)
    return e / (fixed_order_sum(e) + jnp.exp(sink - top))
