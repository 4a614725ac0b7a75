"""The Pallas grouped matmul (run interpreted on the CPU): the same products as ragged_dot,
empty groups and rows of no group handled, and a row's result independent of the other rows."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.grouped_matmul import (
    BLOCK_K,
    BLOCK_M,
    BLOCK_N,
    ROW_TILES,
    TileSchedule,
    grouped_matmul,
    grouped_matmul_kernel,
    row_tile,
    supported,
)

K, N = 2 * BLOCK_K, 2 * BLOCK_N


def operands(seed, sizes, extra_rows=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    m = int(sum(sizes)) + extra_rows
    x = jnp.asarray(rng.normal(size=(m, K)), dtype)
    w = jnp.asarray(rng.normal(size=(len(sizes), K, N)) * K**-0.5, dtype)
    return x, w, jnp.asarray(sizes, jnp.int32)


@pytest.mark.parametrize(
    "sizes, extra_rows",
    [
        ([5, 0, 17, 0, 3, 10], 0),  # empty groups between, tiles split mid-group
        ([0, 0, 2 * BLOCK_M + 1, 0], 5),  # one group over three tiles, rows of no group
        ([0, 0, 0], 7),  # no rows in any group
        ([BLOCK_M, BLOCK_M, 0, BLOCK_M], 0),  # tile-aligned groups
        ([1, 0, 0, 1, 0, 1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0], 0),  # more groups than rows
    ],
)
def test_matches_ragged_dot(sizes, extra_rows):
    x, w, g = operands(0, sizes, extra_rows)
    want = jax.lax.ragged_dot(x, w, g, precision=jax.lax.Precision.HIGHEST)
    got = grouped_matmul_kernel(x, w, g, interpret=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(got)[sum(sizes) :] == 0)


def test_a_rows_result_does_not_depend_on_the_other_rows():
    """Batch invariance, in bf16: group 2's rows alone give the same bits as with the rest."""
    sizes = [7, 0, 9, 20]
    x, w, g = operands(1, sizes, dtype=jnp.bfloat16)
    together = grouped_matmul_kernel(x, w, g, interpret=True)
    alone = grouped_matmul_kernel(x[7:16], w, jnp.asarray([0, 0, 9, 0], jnp.int32), interpret=True)
    assert np.array_equal(np.asarray(alone), np.asarray(together[7:16]))


def test_every_row_tile_gives_a_row_the_same_bits():
    """The row tile follows the batch (row_tile), so it must not move a bit: checked here on
    whatever backend runs the tests (the kernel itself on a GPU), in bf16."""
    sizes = [3, 0, 70, 1, 33, 0, 17]
    x, w, g = operands(3, sizes, extra_rows=2, dtype=jnp.bfloat16)
    interpret = jax.default_backend() != "gpu"
    outs = [
        np.asarray(grouped_matmul_kernel(x, w, g, block_m=t, interpret=interpret))
        for t in ROW_TILES
    ]
    for tile, out in zip(ROW_TILES[1:], outs[1:], strict=True):
        assert np.array_equal(out.view(np.uint16), outs[0].view(np.uint16)), tile


def test_row_tile_follows_the_rows_per_group():
    assert row_tile(512, 128) == 16  # decode: 4 rows per expert
    assert row_tile(2048, 128) == 32
    assert row_tile(512, 8) == 64  # mixtral at batch 256: 64 rows per expert
    assert row_tile(10**6, 8) == 64  # never above the largest tile
    assert row_tile(0, 0) == 16


def test_schedule_covers_every_row_once_and_no_empty_group():
    sizes = jnp.asarray([3, 0, 40, 0, 0, 16, 1], jnp.int32)
    schedule = TileSchedule(sizes, int(sizes.sum()))
    rows, starts, groups = (
        np.asarray(a) for a in (schedule.rows, schedule.row_start, schedule.group)
    )
    covered = np.zeros(int(sizes.sum()), int)
    for r, s, grp in zip(rows, starts, groups, strict=True):
        if r:
            covered[s : s + r] += 1
            ends = np.cumsum(sizes)
            assert ends[grp] - int(sizes[grp]) <= s and s + r <= ends[grp]
    assert np.all(covered == 1)
    assert set(groups[rows > 0].tolist()) == {0, 2, 5, 6}


def test_falls_back_to_ragged_dot_off_gpu_and_for_untiled_shapes():
    x, w, g = operands(2, [4, 4])
    assert jax.default_backend() == "cpu"
    np.testing.assert_array_equal(grouped_matmul(x, w, g), jax.lax.ragged_dot(x, w, g))
    assert supported(x.shape, w.shape)
    assert not supported((8, K + 1), (2, K + 1, N))
    assert not supported((8, K), (2, K, N + 3))
