"""Dense projections whose rows do not depend on how many rows share the call.

On the GPU, XLA hands a dense matmul to cuBLAS or its own Triton GEMMs, which pick tiles and
split-K by the number of rows: measured on an H200 (benchmarks/probe_row_invariance.py), a row
of a bf16 [m, 2048] x [2048, 4096] product changes bits between m = 1 and m = 16, and so does
a float32 router product. So a token decoded in a step of 32 rows and the same token
re-prefilled in a step of 512 rows came out different. Inside `row_invariant_matmuls()` (the
model enters it for numerics="invariant"), `Dense` projections on the GPU run the project's
split-K Pallas kernel: one K tiling for every row count (K cut into splits set by K alone,
added in a fixed order; the row tile, which follows the row count, changes no bit), so a row's
bits depend only on the row and the weights. The LM head goes through it too.
Off the GPU the same context computes each product in a fixed order of elementwise adds
(models.fixed_order): XLA's CPU dots are not row-invariant either (measured, JAX 0.12.1, float32:
a [k, n] product's row changed bits between 1 row and 64 for most k <= 256 and n <= 96, among
them the router's [64, 8], so a re-prefilled token's logprob moved by an ulp). Shapes the GPU
kernel does not tile are a plain `x @ w`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from models.fixed_order import fixed_order_matmul
from models.grouped_matmul import (
    BLOCK_K,
    BLOCK_M,
    NUM_STAGES,
    NUM_WARPS,
    implementation,
    pad_to_row_tiles,
    row_tile,
    supported,
    varying_like,
)
from models.kernel_platform import interpreted, kernels_here

# Set while a program is traced: a trace-time choice, like the numerics argument it mirrors.
_ENABLED = contextvars.ContextVar("row_invariant_matmuls", default=False)
# One K tiling per weight shape, never per row count. A decode step has a few dozen rows per
# device, so a [k, n] weight gives only n / 64 column programs: too few to stream the weight at
# full bandwidth. K is therefore cut into a fixed number of splits (set by k alone), each split
# its own programs with a float32 output, and the partial products are added in split order:
# more programs, and still the same bits for a row whatever the row count. (This used to be the
# grouped kernel with one group per split: its tile schedule, row transpose and masking cost
# about five more kernel launches per projection, in a step the GPU spends waiting on launches.)
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


def _splits(k: int, split_width: int = SPLIT_K_WIDTH, max_splits: int = MAX_SPLITS) -> int:
    splits = max(1, min(max_splits, k // split_width))
    while k % splits or (k // splits) % BLOCK_K:
        splits -= 1
    return splits


def matmul(x: Float[Array, "... k"], w: Float[Array, "k n"]) -> Float[Array, "... n"]:
    """x @ w; inside `row_invariant_matmuls()` on the GPU, with a row-count-independent tiling."""
    return matmuls(x, [w])[0]


def matmuls(x: Float[Array, "... k"], weights: Sequence[Array], **tiling) -> list[Array]:
    """[x @ w for w in weights]; inside `row_invariant_matmuls()` on the GPU, one kernel call
    for all of them (q, k and v of one input: one launch instead of three); tiling: the
    kernel's keyword arguments (split_k_matmuls), where it runs."""
    if _use_kernel(x, weights):
        rows = x.reshape(-1, x.shape[-1])
        outs = split_k_matmuls(rows, weights, interpret=interpreted(), **tiling)
        return [out.reshape(*x.shape[:-1], out.shape[-1]) for out in outs]
    if _fixed_order_here():
        return [fixed_order_matmul(x, w) for w in weights]
    return [x @ w for w in weights]


def _fixed_order_here() -> bool:
    """Inside `row_invariant_matmuls()` off the GPU: products in a fixed order (module doc)."""
    return _ENABLED.get() and jax.default_backend() != "gpu"


def kernels_enabled() -> bool:
    """Inside `row_invariant_matmuls()` where the kernels run (models.kernel_platform; not with
    ELASTIC_MOE_GROUPED_MATMUL=ragged_dot: XLA)."""
    return _ENABLED.get() and kernels_here() and implementation() == "auto"


def _use_kernel(x: Array, weights: Sequence[Array]) -> bool:
    k = x.shape[-1]
    return (
        kernels_enabled()
        and all(w.dtype == x.dtype and w.shape[0] == k for w in weights)
        and all(supported((1, k), (1, *w.shape), DENSE_BLOCK_N) for w in weights)
    )


def split_k_matmul(
    rows: Float[Array, "m k"], w: Float[Array, "k n"], **tiling
) -> Float[Array, "m n"]:
    """rows @ w through `split_k_matmuls` (tiling: its keyword arguments)."""
    return split_k_matmuls(rows, [w], **tiling)[0]


def split_k_matmuls(
    rows: Float[Array, "m k"],
    weights: Sequence[Array],
    *,
    interpret: bool = False,
    block_n: int = DENSE_BLOCK_N,
    split_width: int = SPLIT_K_WIDTH,
    max_splits: int = MAX_SPLITS,
    num_warps: int = NUM_WARPS,
    num_stages: int = NUM_STAGES,
    block_m: int | None = None,
    precision: jax.lax.Precision | None = None,
) -> list[Array]:
    """[rows @ w for w in weights] ([m, k] x [k, n_i], one dtype) with the fixed tiling and K
    splits above, in one Pallas call: one program per (row tile, column block of the weights
    side by side, K split) writes its float32 partial; the partials are added in split order.
    The tiling arguments are for tuning and tests; serving uses the defaults. block_m: rows
    per tile, by default following m for 16-bit inputs (16 to 64 rows: the same bits for a
    row, measured on an H100, bench_dense_kernel.py --row-tiles) and 16 for float32 (not
    measured there). precision: float32 inputs default to HIGHEST (exact float32 products)."""
    m, k = rows.shape
    dtype = weights[0].dtype
    if block_m is None:
        block_m = BLOCK_M if dtype == jnp.float32 else row_tile(m, 1)
    if precision is None and dtype == jnp.float32:
        precision = jax.lax.Precision.HIGHEST
    splits = _splits(k, split_width, max_splits)
    x = pad_to_row_tiles(rows, block_m)
    padded = x.shape[0]
    widths = [int(w.shape[1]) for w in weights]
    starts = np.cumsum([0, *widths])  # [weights + 1] first output column of each
    first_block = starts // block_n
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plt

        compiler_params = plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)
    kernel = functools.partial(
        _split_k_kernel,
        width=k // splits,
        block_m=block_m,
        block_n=block_n,
        first_block=tuple(int(b) for b in first_block),
        precision=precision,
    )
    partial = pl.pallas_call(
        kernel,
        out_shape=varying_like(x, (splits, padded, sum(widths)), jnp.float32),
        grid=(padded // block_m, int(first_block[-1]), splits),
        interpret=interpret,
        compiler_params=compiler_params,
        name="split_k_matmul",
    )(x, *weights)
    total = partial[0]
    for s in range(1, splits):  # unrolled: a fixed order
        total = total + partial[s]
    total = total[:m].astype(rows.dtype)
    return [total[:, starts[i] : starts[i + 1]] for i in range(len(widths))]


def _split_k_kernel(x_ref, *refs, width: int, block_m: int, block_n: int, first_block, precision):
    """refs: the weights, then the output. Program (tile, col, split): the column block col of
    the weights side by side, over K values [split * width, (split + 1) * width)."""
    *w_refs, out_ref = refs
    tile, col, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = pl.ds(tile * block_m, block_m)

    def product(w_ref, local_col):
        cols = pl.ds(local_col * block_n, block_n)

        def body(i, acc):
            ks = pl.ds(split * width + i * BLOCK_K, BLOCK_K)
            return acc + jnp.dot(
                x_ref[rows, ks],
                w_ref[ks, cols],
                preferred_element_type=jnp.float32,
                precision=precision,
            )

        zero = jnp.zeros((block_m, block_n), jnp.float32)
        acc = jax.lax.fori_loop(0, width // BLOCK_K, body, zero)
        out_ref[split, rows, pl.ds(col * block_n, block_n)] = acc

    if len(w_refs) == 1:
        product(w_refs[0], col)
        return
    for w_ref, lo, hi in zip(w_refs, first_block[:-1], first_block[1:], strict=True):
        pl.when((col >= lo) & (col < hi))(functools.partial(product, w_ref, col - lo))


def lm_head_logits(
    x: Float[Array, "*rows d"], head: Float[Array, "d vocab"]
) -> Float[Array, "*rows vocab"]:
    """Logits in float32. Inside row_invariant_matmuls(): on the GPU through the split-K
    kernel in one split, its products in TF32 as XLA's default float32 dot on the GPU computes
    them (so the same numerics, on tensor cores): XLA's own GEMM gave a row other bits between
    4 and 32 rows on an H100 (probe_reprefill.py: 21 of 32 re-prefilled logprobs differed, the
    kernel 0), though not between 1, 16 and 128 (probe_row_invariance.py). Off the GPU in a
    fixed order (the module docstring says why)."""
    x, head = x.astype(jnp.float32), head.astype(jnp.float32)
    # One split: the vocabulary gives programs enough; no float32 partials to add.
    return matmuls(x, [head], max_splits=1, precision=jax.lax.Precision.DEFAULT)[0]
