"""Dense projections whose rows do not depend on how many rows share the call.

On the GPU, XLA hands a dense matmul to cuBLAS or its own Triton GEMMs, which pick tiles and
split-K by the number of rows: measured on an H200 (benchmarks/probe_row_invariance.py), a row
of a bf16 [m, 2048] x [2048, 4096] product changes bits between m = 1 and m = 16, and so does
a float32 router product. So a token decoded in a step of 32 rows and the same token
re-prefilled in a step of 512 rows came out different. Inside `row_invariant_matmuls()` (the
model enters it for numerics="invariant"), `Dense` projections on the GPU run the project's
grouped-matmul kernel with a single group: one fixed tiling for every row count (no split-K),
so a row's bits depend only on the row and the weights. Elsewhere (CPU, where XLA's dots were
measured row-invariant, or shapes the kernel does not tile) it is a plain `x @ w`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from models.grouped_matmul import BLOCK_K, grouped_matmul_kernel, implementation, supported

# Set while a program is traced: a trace-time choice, like the numerics argument it mirrors.
_ENABLED = contextvars.ContextVar("row_invariant_matmuls", default=False)
# One tiling per weight shape, never per row count. A decode step has a few dozen rows per
# device, so a [k, n] weight gives only n / 64 column programs: too few to stream the weight at
# full bandwidth. K is therefore cut into a fixed number of splits (set by k alone), each split
# a group of the grouped kernel with a float32 output, and the partial products are added in
# split order: more programs, and still the same bits for a row whatever the row count.
DENSE_BLOCK_N = 64
SPLIT_K_WIDTH = 512  # K values per split; k // 512 splits (at least 1)
MAX_SPLITS = 8


@contextlib.contextmanager
def row_invariant_matmuls(enabled: bool = True):
    token = _ENABLED.set(enabled)
    try:
        yield
    finally:
        _ENABLED.reset(token)


def row_invariant_when_asked(call):
    """Decorates a model's __call__: its dense projections are row-invariant while it runs with
    numerics="invariant" (the default)."""
    signature = inspect.signature(call)

    @functools.wraps(call)
    def wrapped(*args, **kwargs):
        numerics = signature.bind(*args, **kwargs).arguments.get("numerics", "invariant")
        with row_invariant_matmuls(numerics == "invariant"):
            return call(*args, **kwargs)

    return wrapped


def _splits(k: int) -> int:
    splits = max(1, min(MAX_SPLITS, k // SPLIT_K_WIDTH))
    while k % splits or (k // splits) % BLOCK_K:
        splits -= 1
    return splits


def matmul(x: Float[Array, "... k"], w: Float[Array, "k n"]) -> Float[Array, "... n"]:
    """x @ w; inside `row_invariant_matmuls()` on the GPU, with a row-count-independent tiling."""
    k, n = w.shape
    use_kernel = (
        _ENABLED.get()
        and jax.default_backend() == "gpu"
        and implementation() == "auto"
        and x.dtype == w.dtype
        and supported((1, k), (1, k, n), DENSE_BLOCK_N)
    )
    if not use_kernel:
        return x @ w
    return split_k_matmul(x.reshape(-1, k), w).reshape(*x.shape[:-1], n)


def split_k_matmul(
    rows: Float[Array, "m k"], w: Float[Array, "k n"], *, interpret: bool = False
) -> Float[Array, "m n"]:
    """rows @ w with the fixed tiling and K splits above (exposed for tests: interpret=True)."""
    (m, k), n = rows.shape, w.shape[1]
    splits = _splits(k)
    width = k // splits
    # Split s of every row is row s * m + r of one grouped call, against weight group s.
    stacked = rows.reshape(m, splits, width).transpose(1, 0, 2).reshape(splits * m, width)
    partial = grouped_matmul_kernel(
        stacked,
        w.reshape(splits, width, n),
        jnp.full((splits,), m, jnp.int32),
        interpret=interpret,
        block_n=DENSE_BLOCK_N,
        precision=jax.lax.Precision.HIGHEST if w.dtype == jnp.float32 else None,
        out_dtype=jnp.float32,
    ).reshape(splits, m, n)
    total = partial[0]
    for s in range(1, splits):  # unrolled: a fixed order
        total = total + partial[s]
    return total.astype(rows.dtype)


def lm_head_logits(
    x: Float[Array, "*rows d"], head: Float[Array, "d vocab"]
) -> Float[Array, "*rows vocab"]:
    """Logits in float32. XLA's float32 GEMM kept each row's bits for 1, 16 and 128 rows on an
    H200 (probe_row_invariance.py), and a re-prefill matched decode with the LM head through
    the kernel or not (probe_reprefill.py), so the LM head stays an XLA dot."""
    return x.astype(jnp.float32) @ head.astype(jnp.float32)
