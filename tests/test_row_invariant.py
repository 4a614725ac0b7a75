"""Row-invariant dense projections (models.row_invariant): the single-group kernel path is a
correct matmul for any row count, and the model switches it on exactly for invariant numerics.
The kernel runs interpreted here; its bit-for-bit row invariance on the GPU is measured by
benchmarks/probe_row_invariance.py and benchmarks/bench_numerics.py (RESULTS.md)."""

import jax.numpy as jnp
import numpy as np
import pytest

from models import row_invariant


@pytest.mark.parametrize("rows", [1, 5, 16, 33])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_split_k_kernel_is_the_matmul_for_any_row_count(rows, dtype):
    rng = np.random.default_rng(rows)
    k = 2 * row_invariant.SPLIT_K_WIDTH  # two K splits
    x = jnp.asarray(rng.standard_normal((rows, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, 192)) * 0.05, dtype)
    assert row_invariant._splits(k) == 2
    out = row_invariant.split_k_matmul(x, w, interpret=True)
    assert out.dtype == dtype
    want = np.asarray(x, np.float32) @ np.asarray(w, np.float32)
    tol = 1e-4 if dtype == jnp.float32 else 3e-2
    np.testing.assert_allclose(np.asarray(out, np.float32), want, rtol=tol, atol=tol)
    alone = row_invariant.split_k_matmul(x[:1], w, interpret=True)
    assert (np.asarray(alone[0]) == np.asarray(out[0])).all()


def test_splits_divide_k_into_whole_blocks():
    assert row_invariant._splits(64) == 1
    assert row_invariant._splits(2048) == 4
    assert row_invariant._splits(4096) == row_invariant.MAX_SPLITS
    assert row_invariant._splits(1536) == 3
    for k in (64, 192, 576, 1408, 7168):
        s = row_invariant._splits(k)
        assert k % s == 0 and (k // s) % 64 == 0


def test_the_model_asks_for_row_invariance_only_with_invariant_numerics():
    seen = []

    class Model:
        @row_invariant.row_invariant_when_asked
        def __call__(self, x, numerics: str = "invariant"):
            seen.append(row_invariant._ENABLED.get())
            return x

    Model()(1)
    Model()(1, numerics="fast")
    Model()(1, "invariant")
    assert seen == [True, False, True]
    assert row_invariant._ENABLED.get() is False  # restored after each call


def test_off_the_gpu_matmul_is_plain_xla():
    x = jnp.ones((3, 128), jnp.float32)
    w = jnp.full((128, 64), 0.5, jnp.float32)
    with row_invariant.row_invariant_matmuls():
        out = row_invariant.matmul(x, w)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x @ w))


def test_projections_of_one_input_in_one_call_are_each_projection():
    """q, k and v side by side in one kernel call: each output column is computed as alone."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((7, 512)), jnp.bfloat16)
    weights = [jnp.asarray(rng.standard_normal((512, n)) * 0.05, jnp.bfloat16) for n in (192, 64)]
    together = row_invariant.split_k_matmuls(x, weights, interpret=True)
    for w, out in zip(weights, together, strict=True):
        alone = row_invariant.split_k_matmul(x, w, interpret=True)
        assert out.shape == alone.shape
        assert (np.asarray(out) == np.asarray(alone)).all()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_every_row_tile_gives_a_row_the_same_bits(dtype):
    """16-bit inputs take a row tile that follows the row count: it must move no bit (on the
    GPU measured by bench_dense_kernel.py --row-tiles; here the kernel runs interpreted)."""
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((70, 1024)), dtype)
    w = jnp.asarray(rng.standard_normal((1024, 128)) * 0.05, dtype)
    outs = [row_invariant.split_k_matmul(x, w, block_m=t, interpret=True) for t in (16, 32, 64)]
    for out in outs[1:]:
        assert (np.asarray(out) == np.asarray(outs[0])).all()


def test_the_lm_head_goes_through_the_kernel_where_kernels_run(monkeypatch):
    """Where kernels run (here: interpreted, ELASTIC_MOE_KERNELS=interpret) the LM head is the
    kernel's product, in one split, and a row's logits do not depend on how many rows share
    the call."""
    calls = []
    kernel = row_invariant.split_k_matmuls

    def recorded(*args, **kwargs):
        calls.append(kwargs)
        return kernel(*args, **kwargs)

    monkeypatch.setenv("ELASTIC_MOE_KERNELS", "interpret")
    monkeypatch.setattr(row_invariant, "split_k_matmuls", recorded)
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((2, 16, 256)), jnp.float32)
    head = jnp.asarray(rng.standard_normal((256, 320)) * 0.05, jnp.float32)
    with row_invariant.row_invariant_matmuls():
        logits = row_invariant.lm_head_logits(x, head)
        first = row_invariant.lm_head_logits(x[:1, :4], head)
    assert logits.shape == (2, 16, 320) and logits.dtype == jnp.float32
    assert calls and all(c["max_splits"] == 1 and c["interpret"] for c in calls)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(x) @ np.asarray(head), rtol=2e-3)
    assert (np.asarray(first) == np.asarray(logits[:1, :4])).all()
