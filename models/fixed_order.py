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


def fixed_order_contract(
    lhs: Float[Array, "... n"], rhs: Float[Array, "... n"]
) -> Float[Array, "..."]:
    """sum(lhs * rhs, axis=-1) in float32 and in a fixed order: a contraction whose result for
    one query does not depend on how many queries share the call. XLA's CPU dot does depend on
    it: measured (JAX 0.12.0 and 0.12.1), an attention-scores einsum with 1, 2 or 4 query rows
    per head rounds differently from one with 16 or more, so a decoded token (1 row) and the
    same token re-prefilled (16+ rows) disagreed. Materialises the broadcast product, so it is
    for the small shapes of the XLA attention path off the GPU."""
    product = lhs.astype(jnp.float32) * rhs.astype(jnp.float32)
    return fixed_order_sum(product)[..., 0]


def fixed_order_matmul(x: Float[Array, "... k"], w: Float[Array, "k n"]) -> Float[Array, "... n"]:
    """x @ w with each output summed by `fixed_order_contract` (float32 math, x's dtype out):
    a row's result depends on that row alone. For the CPU (row_invariant.matmuls)."""
    out = fixed_order_contract(x[..., None, :], w.T)
    return out.astype(jnp.result_type(x.dtype, w.dtype))


def fixed_order_einsum(spec: str, x: Array, y: Array) -> Float[Array, "..."]:
    """jnp.einsum(spec, x, y) over one summed index, in float32 and fixed order: both operands
    are laid out as the output's indices then the summed one (size-1 axes where an operand
    lacks an index) and contracted with `fixed_order_contract`."""
    inputs, out = spec.split("->")
    x_letters, y_letters = inputs.split(",")
    summed = [letter for letter in x_letters if letter in y_letters and letter not in out]
    if len(summed) != 1 or not set(x_letters + y_letters) <= set(out + summed[0]):
        raise ValueError(f"fixed_order_einsum needs one summed index and no other: {spec!r}")
    order = out + summed[0]

    def lay_out(t: Array, letters: str) -> Array:
        perm = sorted(range(len(letters)), key=lambda i: order.index(letters[i]))
        t = jnp.transpose(t, perm)
        present = [letters[i] for i in perm]
        return t.reshape([t.shape[present.index(a)] if a in present else 1 for a in order])

    return fixed_order_contract(lay_out(x, x_letters), lay_out(y, y_letters))


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
