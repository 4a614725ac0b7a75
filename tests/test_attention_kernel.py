"""The live-context attention kernel (models/attention_kernel.py), run interpreted: it is the
XLA attention, and a query's result does not depend on the other queries of its call (decode
vs prefill). Its speed and bits on the GPU are measured by benchmarks (RESULTS.md)."""

import jax.numpy as jnp
import numpy as np
import pytest

from models.attention import attend_whole_window
from models.attention_kernel import SPLIT_T, live_context_attention, supported


def inputs(b, c, hq, hkv, t, dk, dv, dtype, seed=0):
    rng = np.random.default_rng(seed)
    q = jnp.asarray(rng.standard_normal((b, c, hq, dk)), dtype)
    keys = jnp.asarray(rng.standard_normal((b, hkv, t, dk)), dtype)
    values = jnp.asarray(rng.standard_normal((b, hkv, t, dv)), dtype)
    return q, keys, values


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_is_causal_attention_over_the_cache(dtype):
    b, c, hq, hkv, t, dk, dv = 3, 5, 4, 2, 2 * SPLIT_T, 32, 16
    q, keys, values = inputs(b, c, hq, hkv, t, dk, dv, dtype)
    # Rows at the start, across the boundary of two splits, and at the end of the window.
    positions = jnp.asarray([[0, 1, 2, 3, 4], [252, 253, 254, 255, 256], [507, 508, 509, 510, 511]])
    want = attend_whole_window(q, keys, values, positions, dk**-0.5, "fast")
    got = live_context_attention(q, keys, values, positions, dk**-0.5, interpret=True)
    assert got.shape == (b, c, hq, dv) and got.dtype == dtype
    tol = 2e-5 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), tol, tol)


def test_a_query_gets_the_same_bits_in_decode_and_in_a_prefill():
    """Decode (one query position) and a prefill of 12 positions through the same cache: each
    position's output is bit-equal, though the prefill's tiles visit more key blocks."""
    b, c, hq, hkv, t, dk, dv = 2, 12, 8, 2, 2 * SPLIT_T, 32, 32
    q, keys, values = inputs(b, c, hq, hkv, t, dk, dv, jnp.bfloat16, seed=1)
    positions = jnp.asarray([np.arange(55, 67), np.arange(250, 262)])  # the second: 2 splits
    prefill = np.asarray(live_context_attention(q, keys, values, positions, 0.2, interpret=True))
    for j in range(c):
        one = live_context_attention(
            q[:, j : j + 1], keys, values, positions[:, j : j + 1], 0.2, interpret=True
        )
        assert (np.asarray(one)[:, 0] == prefill[:, j]).all(), j


def test_shapes_the_kernel_does_not_tile_are_refused():
    assert supported((1, 1, 8, 128), (1, 2, 1024, 128), (1, 2, 1024, 128))
    assert not supported((1, 1, 8, 128), (1, 2, 1000, 128), (1, 2, 1000, 128))  # partial split
    assert not supported((1, 1, 8, 72), (1, 2, 1024, 72), (1, 2, 1024, 72))  # head dim
