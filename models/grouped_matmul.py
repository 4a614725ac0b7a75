"""A grouped matmul whose cost follows the groups that receive rows (the MoE FFN's experts).

`jax.lax.ragged_dot` on GPU streams the weights of every group, so an expert replica that no
token chose still costs its full read (measured: 32, 64 and 128 local slots cost 122, 211 and
393 us whether 16 or 32 of them get rows). This Pallas (Triton) kernel schedules one program
per (row tile of a group, column block): a group without rows has no tile, and its weights are
never read.

Numerics: every output element is one tile's dot products over K in fixed BLOCK_K chunks,
accumulated in float32 in the same order whatever the number of rows, groups or devices (no
split-K, one tiling for prefill and decode), so a row's result does not depend on which rows
share its step: the kernel is batch-invariant by construction.

`grouped_matmul` picks the kernel on GPU and `jax.lax.ragged_dot` elsewhere (CPU, or shapes
the kernel does not tile); `interpret=True` runs the kernel on any backend, for tests.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

BLOCK_M = 16  # rows per tile: decode sends a few rows per expert
BLOCK_N = 64
BLOCK_K = 64


class TileSchedule:
    """Which rows each program multiplies by which group's weights.

    tiles_max = ceil(m / BLOCK_M) + groups bounds the tiles of any group sizes (each non-empty
    group adds at most one partial tile); the tiles after the last real one have zero rows and
    their programs return at once."""

    def __init__(self, group_sizes: Int[Array, " g"], m: int):
        g = group_sizes.shape[0]
        self.tiles_max = pl.cdiv(m, BLOCK_M) + g
        ends = jnp.cumsum(group_sizes)
        starts = ends - group_sizes
        tiles = (group_sizes + BLOCK_M - 1) // BLOCK_M  # 0 for an empty group
        t = jnp.arange(self.tiles_max, dtype=jnp.int32)
        group = jnp.repeat(
            jnp.arange(g, dtype=jnp.int32), tiles, total_repeat_length=self.tiles_max
        )
        first_tile = jnp.cumsum(tiles) - tiles
        row_start = starts[group] + (t - first_tile[group]) * BLOCK_M
        rows = jnp.clip(ends[group] - row_start, 0, BLOCK_M)
        rows = jnp.where(t < tiles.sum(), rows, 0)
        self.group = group.astype(jnp.int32)
        self.row_start = jnp.where(rows > 0, row_start, 0).astype(jnp.int32)
        self.rows = rows.astype(jnp.int32)


def _kernel(group_ref, start_ref, rows_ref, x_ref, w_ref, out_ref, *, k: int):
    from jax.experimental.pallas import triton as plt

    tile, col = pl.program_id(0), pl.program_id(1)
    rows = rows_ref[tile]

    @pl.when(rows > 0)
    def _():
        group, start = group_ref[tile], start_ref[tile]
        row_mask = jnp.arange(BLOCK_M) < rows
        cols = pl.ds(col * BLOCK_N, BLOCK_N)

        def body(i, acc):
            ks = pl.ds(i * BLOCK_K, BLOCK_K)
            x = plt.load(x_ref.at[pl.ds(start, BLOCK_M), ks], mask=row_mask[:, None], other=0.0)
            w = plt.load(w_ref.at[group, ks, cols])
            return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, k // BLOCK_K, body, jnp.zeros((BLOCK_M, BLOCK_N), jnp.float32))
        plt.store(
            out_ref.at[pl.ds(start, BLOCK_M), cols],
            acc.astype(out_ref.dtype),
            mask=row_mask[:, None],
        )


def supported(x_shape: tuple[int, ...], w_shape: tuple[int, ...]) -> bool:
    """Shapes the kernel tiles exactly (K and N whole blocks, at least one row tile)."""
    (_, k), (_, k2, n) = x_shape, w_shape
    return k == k2 and k % BLOCK_K == 0 and n % BLOCK_N == 0


@functools.partial(jax.jit, static_argnames=("interpret",))
def grouped_matmul_kernel(
    x: Float[Array, "m k"],
    w: Float[Array, "g k n"],
    group_sizes: Int[Array, " g"],
    *,
    interpret: bool = False,
) -> Float[Array, "m n"]:
    """out[r] = x[r] @ w[group of r] for rows in a group (groups are consecutive runs of rows,
    in order); rows after the last group are 0."""
    m, k = x.shape
    n = w.shape[2]
    schedule = TileSchedule(group_sizes.astype(jnp.int32), m)
    # A tile's last rows may lie past the end: Triton's masked loads and stores never touch
    # them, but the interpreter slices first (clamping the start), so it gets padding.
    pad = BLOCK_M if interpret else 0
    out = pl.pallas_call(
        functools.partial(_kernel, k=k),
        out_shape=jax.ShapeDtypeStruct((m + pad, n), x.dtype),
        grid=(schedule.tiles_max, n // BLOCK_N),
        interpret=interpret,
        name="grouped_matmul",
    )(schedule.group, schedule.row_start, schedule.rows, jnp.pad(x, ((0, pad), (0, 0))), w)
    out = out[:m]
    # Rows no tile wrote hold whatever the buffer held.
    covered = jnp.arange(m) < group_sizes.sum()
    return jnp.where(covered[:, None], out, 0)


def grouped_matmul(
    x: Float[Array, "m k"], w: Float[Array, "g k n"], group_sizes: Int[Array, " g"]
) -> Float[Array, "m n"]:
    """`jax.lax.ragged_dot(x, w, group_sizes)`, reading only the groups that have rows on GPU."""
    if jax.default_backend() == "gpu" and supported(x.shape, w.shape):
        return grouped_matmul_kernel(x, w, group_sizes)
    return jax.lax.ragged_dot(x, w, group_sizes)
