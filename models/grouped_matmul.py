"""A grouped matmul whose cost follows the groups that receive rows (the MoE FFN's experts).

`jax.lax.ragged_dot` on GPU streams the weights of every group, so an expert replica that no
token chose still costs its full read (measured: 32, 64 and 128 local slots cost 122, 211 and
393 us whether 16 or 32 of them get rows). This Pallas (Triton) kernel schedules one program
per (row tile of a group, column block): a group without rows has no tile, and its weights are
never read.

Numerics: every output element is one tile's dot products over K in fixed BLOCK_K chunks,
accumulated in float32 in the same order whatever the number of rows, groups or devices (no
split-K, one K and column tiling for prefill and decode), so a row's result does not depend on
which rows share its step: the kernel is batch-invariant by construction. The row tile follows
the rows a group is expected to get (`row_tile`: 16 at decode, up to 64 at large batches and
prefill, where a 16-row tile re-reads an expert's weights every 16 rows): it changes how many
rows share one tensor-core product, not the K order of any element, and gave every row the
same bits at 16, 32, 64 and 128 rows on an H100 (`bench_grouped_matmul.py --row-tiles`,
benchmarks/RESULTS.md); tests/test_grouped_matmul.py checks it on whatever runs the tests.

`grouped_matmul` picks the kernel where kernels run (the GPU, or interpreted on request:
models.kernel_platform) and `jax.lax.ragged_dot` elsewhere (CPU, or shapes the kernel does not
tile); `interpret=True` runs the kernel on any backend, for tests. The
environment variable ELASTIC_MOE_GROUPED_MATMUL=ragged_dot forces ragged_dot everywhere (read
when a program is traced), for side-by-side benchmarks.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float, Int

from models.kernel_platform import interpreted, kernels_here

BLOCK_M = 16  # rows per tile at decode, where a few rows go to each expert
ROW_TILES = (16, 32, 64)
# Picked by `bench_grouped_matmul.py --sweep` on an H200 (RESULTS.md, 2026-11-30).
BLOCK_N = 128
BLOCK_K = 64
NUM_WARPS = 4
NUM_STAGES = 2


class TileSchedule:
    """Which rows each program multiplies by which group's weights.

    tiles_max = ceil(m / BLOCK_M) + min(groups, m) bounds the tiles of any group sizes (each
    non-empty group adds at most one partial tile, and at most m groups are non-empty); the
    tiles after the last real one have zero rows and their programs return at once."""

    def __init__(self, group_sizes: Int[Array, " g"], m: int, block_m: int = BLOCK_M):
        g = group_sizes.shape[0]
        self.tiles_max = pl.cdiv(m, block_m) + min(g, m)  # at most m groups have rows
        ends = jnp.cumsum(group_sizes)
        starts = ends - group_sizes
        tiles = (group_sizes + block_m - 1) // block_m  # 0 for an empty group
        t = jnp.arange(self.tiles_max, dtype=jnp.int32)
        group = jnp.repeat(
            jnp.arange(g, dtype=jnp.int32), tiles, total_repeat_length=self.tiles_max
        )
        first_tile = jnp.cumsum(tiles) - tiles
        row_start = starts[group] + (t - first_tile[group]) * block_m
        rows = jnp.clip(ends[group] - row_start, 0, block_m)
        rows = jnp.where(t < tiles.sum(), rows, 0)
        self.group = group.astype(jnp.int32)
        self.row_start = jnp.where(rows > 0, row_start, 0).astype(jnp.int32)
        self.rows = rows.astype(jnp.int32)


def _kernel(
    group_ref,
    start_ref,
    rows_ref,
    x_ref,
    w_ref,
    out_ref,
    *,
    k: int,
    block_m: int,
    block_n: int,
    block_k: int,
    precision: jax.lax.Precision | None,
):
    from jax.experimental.pallas import triton as plt

    tile, col = pl.program_id(0), pl.program_id(1)
    rows = rows_ref[tile]

    @pl.when(rows > 0)
    def _():
        group, start = group_ref[tile], start_ref[tile]
        row_mask = jnp.arange(block_m) < rows
        cols = pl.ds(col * block_n, block_n)

        def body(i, acc):
            ks = pl.ds(i * block_k, block_k)
            x = plt.load(x_ref.at[pl.ds(start, block_m), ks], mask=row_mask[:, None], other=0.0)
            w = plt.load(w_ref.at[group, ks, cols])
            return acc + jnp.dot(x, w, preferred_element_type=jnp.float32, precision=precision)

        acc = jax.lax.fori_loop(0, k // block_k, body, jnp.zeros((block_m, block_n), jnp.float32))
        plt.store(
            out_ref.at[pl.ds(start, block_m), cols],
            acc.astype(out_ref.dtype),
            mask=row_mask[:, None],
        )


def varying_like(x: jax.Array, shape: tuple[int, ...], dtype=None) -> jax.ShapeDtypeStruct:
    """An output shape that varies over the same mesh axes as x (inside shard_map, Pallas
    needs to be told)."""
    dtype = x.dtype if dtype is None else dtype
    mat = getattr(jax.typeof(x), "mat", None)
    if mat is None:
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


def pad_to_row_tiles(x: jax.Array, block: int = BLOCK_M) -> jax.Array:
    """x with zero rows appended (axis 0) up to whole tiles of `block` rows: every tile then
    runs the same code, unmasked, so a row's bits never depend on its neighbours."""
    padded = pl.cdiv(x.shape[0], block) * block
    if padded == x.shape[0]:
        return x
    return jnp.pad(x, ((0, padded - x.shape[0]),) + ((0, 0),) * (x.ndim - 1))


def row_tile(expected_rows: int, groups: int) -> int:
    """Rows per tile for `expected_rows` rows spread over `groups` groups: the smallest tile
    above a group's average share, at most 64 (on an H100, 64 rows per expert ran 1.6x faster
    in 64-row tiles than in 16-row ones, 16 rows 1.1x faster in 32-row tiles; at a few rows per
    expert the tiles tie: bench_grouped_matmul.py --row-tiles)."""
    per_group = expected_rows / max(groups, 1)
    return next((t for t in ROW_TILES if per_group < t), ROW_TILES[-1])


def supported(x_shape: tuple[int, ...], w_shape: tuple[int, ...], block_n: int = BLOCK_N) -> bool:
    """Shapes the kernel tiles exactly (K and N whole blocks, at least one row tile)."""
    (_, k), (_, k2, n) = x_shape, w_shape
    return k == k2 and k % BLOCK_K == 0 and n % block_n == 0


@functools.partial(
    jax.jit,
    static_argnames=(
        "interpret",
        "block_m",
        "block_n",
        "block_k",
        "num_warps",
        "num_stages",
        "precision",
        "out_dtype",
    ),
)
def grouped_matmul_kernel(
    x: Float[Array, "m k"],
    w: Float[Array, "g k n"],
    group_sizes: Int[Array, " g"],
    *,
    interpret: bool = False,
    block_m: int = BLOCK_M,
    block_n: int = BLOCK_N,
    block_k: int = BLOCK_K,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
    precision: jax.lax.Precision | None = None,
    out_dtype=None,
) -> Float[Array, "m n"]:
    """out[r] = x[r] @ w[group of r] for rows in a group (groups are consecutive runs of rows,
    in order); rows after the last group are 0. The tiling arguments are for tuning: the
    serving path uses one fixed tiling everywhere (a row's bits depend on it). precision:
    HIGHEST makes float32 products exact float32 (IEEE) instead of TF32. out_dtype: x's dtype
    unless given (float32 keeps the accumulator unrounded)."""
    m, k = x.shape
    n = w.shape[2]
    schedule = TileSchedule(group_sizes.astype(jnp.int32), m, block_m)
    # A tile's last rows may lie past the end: Triton's masked loads and stores never touch
    # them, but the interpreter slices first (clamping the start), so it gets padding.
    pad = block_m if interpret else 0
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plt

        compiler_params = plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    out = pl.pallas_call(
        functools.partial(
            _kernel, k=k, block_m=block_m, block_n=block_n, block_k=block_k, precision=precision
        ),
        out_shape=varying_like(x, (m + pad, n), out_dtype),
        grid=(schedule.tiles_max, n // block_n),
        interpret=interpret,
        compiler_params=compiler_params,
        name="grouped_matmul",
    )(schedule.group, schedule.row_start, schedule.rows, jnp.pad(x, ((0, pad), (0, 0))), w)
    out = out[:m]
    # Rows no tile wrote hold whatever the buffer held.
    covered = jnp.arange(m) < group_sizes.sum()
    return jnp.where(covered[:, None], out, 0)


IMPLEMENTATIONS = ("auto", "ragged_dot")


def implementation() -> str:
    choice = os.environ.get("ELASTIC_MOE_GROUPED_MATMUL", "auto")
    if choice not in IMPLEMENTATIONS:
        raise ValueError(
            f"ELASTIC_MOE_GROUPED_MATMUL must be one of {IMPLEMENTATIONS}, got {choice!r}"
        )
    return choice


def grouped_matmul(
    x: Float[Array, "m k"],
    w: Float[Array, "g k n"],
    group_sizes: Int[Array, " g"],
    expected_rows: int | None = None,
) -> Float[Array, "m n"]:
    """`jax.lax.ragged_dot(x, w, group_sizes)`, reading only the groups that have rows on GPU.
    expected_rows: how many of x's rows are likely in a group (default all of them; a device
    of an expert-parallel mesh gets about m / devices): picks the row tile, never the bits."""
    if kernels_here() and implementation() == "auto" and supported(x.shape, w.shape):
        rows = x.shape[0] if expected_rows is None else expected_rows
        tile = row_tile(rows, w.shape[0])
        return grouped_matmul_kernel(x, w, group_sizes, block_m=tile, interpret=interpreted())
    return jax.lax.ragged_dot(x, w, group_sizes)
