"""Fixed-order reductions (models.fixed_order): the einsum of the XLA attention path gives a
query the same bits whatever the number of queries beside it, and is the einsum it replaces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models.fixed_order import fixed_order_einsum

SPECS = [
    "bckgd,bktd->bkgct",  # GQA scores
    "bkgct,bktd->bckgd",  # GQA probabilities x values
    "bchn,lhn->bchl",  # MLA query absorbed by W_UK
    "bhct,btl->bchl",  # latent MLA output
    "cbkgd,bktd->cbkgt",  # scores with the queries first: XLA's CPU einsum (JAX 0.12.0 and
    # 0.12.1) gave 1, 2 or 4 queries other bits than 16 or more here
]


def operands(spec: str, rows: int, rng) -> list[jnp.ndarray]:
    sizes = dict(b=2, c=rows, k=2, g=2, d=32, t=64, h=3, n=16, l=20)
    letters = spec.split("->")[0].split(",")
    return [jnp.asarray(rng.standard_normal([sizes[a] for a in x]), jnp.bfloat16) for x in letters]


@pytest.mark.parametrize("spec", SPECS)
def test_is_the_einsum(spec):
    x, y = operands(spec, 5, np.random.default_rng(0))
    want = jnp.einsum(spec, x.astype(jnp.float32), y.astype(jnp.float32))
    np.testing.assert_allclose(fixed_order_einsum(spec, x, y), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec", SPECS)
def test_a_query_keeps_its_bits_among_more_queries(spec):
    """The c index is the queries of a request: 1 in a decode step, 16 or more in a prefill."""
    x, y = operands(spec, 32, np.random.default_rng(1))
    c = spec.split(",")[0].index("c")
    alone = jax.jit(lambda x, y: fixed_order_einsum(spec, x, y))
    out_c = spec.split("->")[1].index("c")
    full = np.asarray(alone(x, y))
    for rows in (1, 2, 4, 16):
        part = np.asarray(alone(jax.lax.slice_in_dim(x, 0, rows, axis=c), y))
        np.testing.assert_array_equal(part, full.take(range(rows), axis=out_c))


def test_rejects_what_it_cannot_order():
    x = jnp.ones((2, 3))
    with pytest.raises(ValueError, match="one summed index"):
        fixed_order_einsum("ab,ab->", x, x)  # two summed indices


# Dense projections off the GPU (models.row_invariant.matmuls): XLA's CPU float32 dot gave a row
# other bits among 64 rows than alone for the router's [64, 8] (JAX 0.12.1), which moved a
# re-prefilled token's logprob by an ulp.
@pytest.mark.parametrize("k,n", [(64, 8), (32, 96), (64, 256)])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_a_dense_row_keeps_its_bits_among_more_rows(k, n, dtype):
    from models.row_invariant import lm_head_logits, matmul, row_invariant_matmuls

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.standard_normal((128, k)), dtype)
    w = jnp.asarray(rng.standard_normal((k, n)), dtype)

    def project(x, w):
        with row_invariant_matmuls():
            return matmul(x, w), lm_head_logits(x, w)

    run = jax.jit(project)
    alone = [np.asarray(out[0]) for out in run(x[:1], w)]
    for rows in (3, 16, 64, 128):
        for got, want in zip(run(x[:rows], w), alone, strict=True):
            assert np.array_equal(np.asarray(got)[0], want), rows
    np.testing.assert_allclose(
        np.asarray(run(x, w)[0], np.float32),
        np.asarray(x.astype(jnp.float32) @ w.astype(jnp.float32)),
        rtol=2e-2 if dtype == jnp.bfloat16 else 1e-5,
        atol=2e-2 if dtype == jnp.bfloat16 else 1e-5,
    )
