"""Causal attention over the live context only, as one Pallas (Triton) kernel.

The XLA path (`models.attention.attend`) reads the whole max_seq_len window of the cache in
every step and runs as about a dozen kernels per layer (scores, mask, softmax, output, the
fixed-order sums). Here one program per (request row, kv head, tile of 16 query rows, split of
the window) walks its keys in blocks of BLOCK_T positions, up to the block holding the tile's
last query position, with an online softmax (the flash-attention recurrence) in float32: a
decode step at context 64 reads 64 positions of the cache, not 1,024.

Numerics: a query row's result depends only on the row, its keys and values and its position:
the blocks are visited in the same order from position 0, each block's products and sums have
the same shapes whatever the rows beside it (tiles are always 16 rows), and the blocks a tile
visits past a row's own position are fully masked, which leaves that row's running max, sum and
output exactly unchanged (alpha = exp(0) = 1, p = 0). The window is cut into fixed splits of
SPLIT_T positions (programs side by side), whose partial results are combined in split order;
a split past a row's position adds exact zeros. So decode (1 query position) and a
(re-)prefill (many) give a token the same bits: the kernel serves both.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from models.grouped_matmul import implementation, varying_like
from models.kernel_platform import kernels_here

BLOCK_T = 64  # key positions per loop step
BLOCK_R = 16  # query rows per program: tl.dot's smallest tile
# Key positions per program: the window's splits run side by side (flash-decoding), each a
# short loop, and are combined in a fixed order, so a long context is not one long serial loop.
SPLIT_T = 256


def supported(q_shape: tuple[int, ...], k_shape: tuple[int, ...], v_shape: tuple[int, ...]):
    """Shapes the kernel tiles: whole key blocks, head dims the tensor cores take."""
    (_, _, hq, dk), (_, hkv, t, dk2), dv = q_shape, k_shape, v_shape[-1]
    return dk == dk2 and hq % hkv == 0 and t % SPLIT_T == 0 and dk % 16 == 0 and dv % 16 == 0


IMPLEMENTATIONS = ("auto", "xla")


def use_kernel(q, keys, values) -> bool:
    """Where the kernels run (models.kernel_platform), unless ELASTIC_MOE_ATTENTION=xla (or
    ELASTIC_MOE_GROUPED_MATMUL=ragged_dot, XLA everywhere) asks otherwise; read when a program
    is traced, for side-by-side runs."""
    choice = os.environ.get("ELASTIC_MOE_ATTENTION", "auto")
    if choice not in IMPLEMENTATIONS:
        raise ValueError(f"ELASTIC_MOE_ATTENTION must be one of {IMPLEMENTATIONS}, got {choice!r}")
    return (
        choice == "auto"
        and kernels_here()
        and implementation() == "auto"
        and supported(q.shape, keys.shape, values.shape)
    )


def live_context_attention(
    q: Float[Array, "b c hq dk"],
    keys: Float[Array, "b hkv t dk"],
    values: Float[Array, "b hkv t dv"],
    q_positions: Int[Array, "b c"],
    scale: float,
    *,
    q_extra: Float[Array, "b c hq de"] | None = None,
    keys_extra: Float[Array, "b hkv t de"] | None = None,
    interpret: bool = False,
) -> Float[Array, "b c hq dv"]:
    """softmax(q k^T * scale, keys at positions <= the query's) v, in float32, cast to v's
    dtype; keys at 0..t-1 of each row's cache. A query at a negative position sees nothing
    (its output is undefined: padding). q_extra / keys_extra: a second part of each query and
    key whose products add to the scores (MLA's rotary part: q_latent . c + q_rope . k_rope);
    values may be `keys` itself (MLA's latent c), read once per block then."""
    b, c, hq, dk = q.shape
    hkv, t, dv = keys.shape[1], keys.shape[2], values.shape[-1]
    g = hq // hkv
    rows = c * g  # per (request row, kv head): query positions x the heads sharing a kv head
    padded = pl.cdiv(rows, BLOCK_R) * BLOCK_R
    splits = pl.cdiv(t, SPLIT_T)

    def query_rows(x):  # [b, c, hq, d] -> [b, hkv, padded, d], rows ordered (position, head)
        d = x.shape[-1]
        x = x.reshape(b, c, hkv, g, d).transpose(0, 2, 1, 3, 4).reshape(b, hkv, rows, d)
        return jnp.pad(x, ((0, 0), (0, 0), (0, padded - rows), (0, 0)))

    shared = values is keys
    operands = [query_rows(q), keys] + ([] if shared else [values])
    if q_extra is not None:
        operands += [query_rows(q_extra), keys_extra]
    row_positions = jnp.repeat(q_positions.astype(jnp.int32), g, axis=1)  # [b, rows]
    row_positions = jnp.pad(row_positions, ((0, 0), (0, padded - rows)), constant_values=-1)
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plt

        compiler_params = plt.CompilerParams(num_warps=4, num_stages=2)
    f32 = jnp.float32
    top, total, acc = pl.pallas_call(
        functools.partial(
            _kernel,
            scale=scale,
            blocks_in_window=t // BLOCK_T,
            shared_values=shared,
            extra=q_extra is not None,
        ),
        out_shape=(
            varying_like(q, (b, hkv, splits, padded), f32),
            varying_like(q, (b, hkv, splits, padded), f32),
            varying_like(q, (b, hkv, splits, padded, dv), f32),
        ),
        grid=(b, hkv, padded // BLOCK_R, splits),
        interpret=interpret,
        compiler_params=compiler_params,
        name="live_context_attention",
    )(row_positions, *operands)
    # The splits' partial softmaxes, combined in split order (a split past a row's position
    # has top -inf and adds exact zeros).
    best = jnp.max(top, axis=2)  # exact in any order
    best = jnp.where(best == -jnp.inf, 0.0, best)
    weight = jnp.exp(top - best[:, :, None])  # [b, hkv, splits, padded]
    norm, out = total[:, :, 0] * weight[:, :, 0], acc[:, :, 0] * weight[:, :, 0, :, None]
    for s in range(1, splits):  # unrolled: a fixed order
        norm = norm + total[:, :, s] * weight[:, :, s]
        out = out + acc[:, :, s] * weight[:, :, s, :, None]
    out = (out / norm[..., None]).astype(values.dtype)
    out = out[:, :, :rows].reshape(b, hkv, c, g, dv).transpose(0, 2, 1, 3, 4)
    return out.reshape(b, c, hq, dv)


def _kernel(pos_ref, *refs, scale, blocks_in_window, shared_values: bool, extra: bool):
    """Program (row, head, tile, split): the partial softmax of 16 query rows over the key
    blocks of one split of the window that hold positions up to the tile's last query.
    refs: q, keys, [values unless shared], [q_extra, keys_extra], then the three outputs."""
    refs = list(refs)
    q_ref, k_ref = refs.pop(0), refs.pop(0)
    v_ref = k_ref if shared_values else refs.pop(0)
    qe_ref, ke_ref = (refs.pop(0), refs.pop(0)) if extra else (None, None)
    top_ref, total_ref, acc_ref = refs
    row, head, tile, split = (pl.program_id(i) for i in range(4))
    tile_rows = pl.ds(tile * BLOCK_R, BLOCK_R)
    query = q_ref[row, head, tile_rows, :]  # [BLOCK_R, dk]
    query_extra = qe_ref[row, head, tile_rows, :] if extra else None
    position = pos_ref[row, tile_rows]  # [BLOCK_R]
    last = jnp.max(position)
    live = jnp.where(last < 0, 0, jnp.minimum(last // BLOCK_T + 1, blocks_in_window))
    per_split = SPLIT_T // BLOCK_T
    first = split * per_split
    end = jnp.minimum(first + per_split, live)  # no block at all past the live context

    def body(i, carry):
        top, total, acc = carry
        span = pl.ds(i * BLOCK_T, BLOCK_T)
        keys = k_ref[row, head, span, :]  # [BLOCK_T, dk]
        scores = _dot(query, keys, ((1,), (1,)))  # [BLOCK_R, BLOCK_T], float32
        if extra:
            scores = scores + _dot(query_extra, ke_ref[row, head, span, :], ((1,), (1,)))
        scores = scores * scale
        key_position = i * BLOCK_T + jnp.arange(BLOCK_T)
        scores = jnp.where(key_position[None, :] <= position[:, None], scores, -jnp.inf)
        new_top = jnp.maximum(top, jnp.max(scores, axis=1))
        shift = jnp.where(new_top == -jnp.inf, 0.0, new_top)  # a row that has seen nothing yet
        alpha = jnp.exp(top - shift)
        p = jnp.exp(scores - shift[:, None])
        total = total * alpha + jnp.sum(p, axis=1)
        values = keys if shared_values else v_ref[row, head, span, :]
        acc = acc * alpha[:, None] + _dot(p.astype(values.dtype), values, ((1,), (0,)))
        return new_top, total, acc

    dv = acc_ref.shape[-1]
    start = (
        jnp.full((BLOCK_R,), -jnp.inf, jnp.float32),
        jnp.zeros((BLOCK_R,), jnp.float32),
        jnp.zeros((BLOCK_R, dv), jnp.float32),
    )
    top, total, acc = jax.lax.fori_loop(first, end, body, start)
    top_ref[row, head, split, tile_rows] = top
    total_ref[row, head, split, tile_rows] = total
    acc_ref[row, head, split, tile_rows, :] = acc


def _dot(a, b, contracting):
    """a . b over the given dimensions, accumulated and returned in float32."""
    return jax.lax.dot_general(a, b, (contracting, ((), ())), preferred_element_type=jnp.float32)
