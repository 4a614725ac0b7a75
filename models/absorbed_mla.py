"""DeepSeek's absorbed MLA projections as row-invariant kernels reading kv_b_proj in place.

The latent cache form (models.attention: MultiHeadLatentAttention._latent) multiplies each
head's query by W_UK and each head's latent output by W_UV, two slices of kv_b_proj's kernel
[kv_lora, h * (nope + v)]. As XLA einsums these are batched GEMMs whose tiling follows the row
count: on an H200 a re-prefilled request's logprobs then differed from decode's (15 of 16
requests, up to 6.7e-6; benchmarks/probe_reprefill.py, RESULTS.md). Here each is one Pallas
program per (16-row tile, head, column block) with a fixed loop over K, reading the weight's
slices where they lie (no transposed copy of the weights in every step).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jaxtyping import Array, Float

from models.grouped_matmul import BLOCK_K, BLOCK_M, pad_to_row_tiles, varying_like

BLOCK_N = 64


def supported(nope: int, v: int, lora: int) -> bool:
    return nope % 16 == 0 and v % BLOCK_N == 0 and lora % BLOCK_N == 0 and lora % BLOCK_K == 0


def absorb_query(
    q_nope: Float[Array, "rows h nope"], w_kv: Float[Array, "lora hw"], v: int, *, interpret=False
) -> Float[Array, "rows h lora"]:
    """out[r, h] = W_UK[h] q_nope[r, h]: w_kv[l, h * (nope + v) + n] summed over n."""
    rows, h, nope = q_nope.shape
    lora = w_kv.shape[0]
    kernel = functools.partial(_absorb_kernel, nope=nope, stride=nope + v)
    return _call(kernel, q_nope, w_kv, (h, lora), interpret)


def expand_output(
    latent: Float[Array, "rows h lora"], w_kv: Float[Array, "lora hw"], v: int, *, interpret=False
) -> Float[Array, "rows h v"]:
    """out[r, h] = W_UV[h]^T latent[r, h]: summed over the latent dimension l."""
    rows, h, lora = latent.shape
    nope = w_kv.shape[1] // h - v
    kernel = functools.partial(_expand_kernel, lora=lora, offset=nope, stride=nope + v)
    return _call(kernel, latent, w_kv, (h, v), interpret)


def _call(kernel, x, w_kv, out_dims: tuple[int, int], interpret: bool):
    rows = x.shape[0]
    h, n = out_dims
    x = pad_to_row_tiles(x)
    padded = x.shape[0]
    compiler_params = None
    if not interpret:
        from jax.experimental.pallas import triton as plt

        compiler_params = plt.CompilerParams(num_warps=4, num_stages=2)
    out = pl.pallas_call(
        kernel,
        out_shape=varying_like(x, (padded, h, n), x.dtype),
        grid=(padded // BLOCK_M, h, n // BLOCK_N),
        interpret=interpret,
        compiler_params=compiler_params,
        name="absorbed_mla",
    )(x, w_kv)
    return out[:rows]


def _absorb_kernel(x_ref, w_ref, out_ref, *, nope: int, stride: int):
    tile, head, col = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = pl.ds(tile * BLOCK_M, BLOCK_M)
    x = x_ref[rows, head, :]  # [BLOCK_M, nope]
    w = w_ref[pl.ds(col * BLOCK_N, BLOCK_N), pl.ds(head * stride, nope)]  # [BLOCK_N, nope]
    acc = jax.lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    out_ref[rows, head, pl.ds(col * BLOCK_N, BLOCK_N)] = acc.astype(out_ref.dtype)


def _expand_kernel(x_ref, w_ref, out_ref, *, lora: int, offset: int, stride: int):
    tile, head, col = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    rows = pl.ds(tile * BLOCK_M, BLOCK_M)
    cols = pl.ds(head * stride + offset + col * BLOCK_N, BLOCK_N)

    def body(i, acc):
        ks = pl.ds(i * BLOCK_K, BLOCK_K)
        x = x_ref[rows, head, ks]  # [BLOCK_M, BLOCK_K]
        return acc + jnp.dot(x, w_ref[ks, cols], preferred_element_type=jnp.float32)

    zero = jnp.zeros((BLOCK_M, BLOCK_N), jnp.float32)
    acc = jax.lax.fori_loop(0, lora // BLOCK_K, body, zero)
    out_ref[rows, head, pl.ds(col * BLOCK_N, BLOCK_N)] = acc.astype(out_ref.dtype)
