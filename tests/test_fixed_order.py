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
