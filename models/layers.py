"""Small building blocks: a dense projection, RMSNorm and the SwiGLU MLP (rotary embeddings:
models.rope, re-exported here).

Every parameter carries `logical_axes` metadata; `mesh.sharding` maps logical axes to mesh axes.
Weights are stored as [in, out] so that a projection is `x @ kernel`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from models.fixed_order import fixed_order_sum
from models.row_invariant import matmul, matmuls


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias). kernel: [d_in, d_out]."""

    def __init__(
        self,
        d_in: int,
        d_out: int,
        *,
        rngs: nnx.Rngs,
        dtype: str = "float32",
        bias: bool = False,
        logical_axes: tuple[str | None, str | None] = (None, None),
    ):
        init = jax.nn.initializers.normal(stddev=d_in**-0.5)
        self.kernel = nnx.Param(
            init(rngs.params(), (d_in, d_out), dtype_of(dtype)), logical_axes=logical_axes
        )
        self.bias = (
            nnx.Param(jnp.zeros((d_out,), dtype_of(dtype)), logical_axes=(logical_axes[1],))
            if bias
            else None
        )

    def __call__(self, x: Float[Array, "... d_in"]) -> Float[Array, "... d_out"]:
        y = matmul(x, self.kernel[...])
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def project(x: Float[Array, "... d_in"], *denses: Dense) -> list[Array]:
    """[dense(x) for dense in denses]: projections of one input (q, k and v), computed together
    (one kernel launch in the row-invariant mode on the GPU)."""
    outs = matmuls(x, [dense.kernel[...] for dense in denses])
    return [y if d.bias is None else y + d.bias[...] for y, d in zip(outs, denses, strict=True)]


class RMSNorm(nnx.Module):
    """Root-mean-square norm computed in float32, as Hugging Face does."""

    def __init__(self, dim: int, *, eps: float, dtype: str = "float32"):
        self.eps = eps
        self.scale = nnx.Param(jnp.ones((dim,), dtype_of(dtype)), logical_axes=(None,))

    def __call__(
        self, x: Float[Array, "... dim"], numerics: str = "invariant"
    ) -> Float[Array, "... dim"]:
        """numerics "invariant": the mean of squares in a fixed order (models.fixed_order), so
        a row's result does not depend on how many rows are normalised with it."""
        x32 = x.astype(jnp.float32)
        if numerics == "invariant":
            mean_square = fixed_order_sum(x32 * x32) / x.shape[-1]
        else:
            mean_square = jnp.mean(x32 * x32, axis=-1, keepdims=True)
        normed = x32 * jax.lax.rsqrt(mean_square + self.eps)
        return self.scale[...] * normed.astype(x.dtype)


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)): the dense MLP, shared experts and dense first layers."""

    def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs, dtype: str = "float32"):
        self.gate = Dense(d_model, d_ff, rngs=rngs, dtype=dtype)
        self.up = Dense(d_model, d_ff, rngs=rngs, dtype=dtype)
        self.down = Dense(d_ff, d_model, rngs=rngs, dtype=dtype)

    def __call__(self, x: Float[Array, "... d_model"]) -> Float[Array, "... d_model"]:
        gate, up = project(x, self.gate, self.up)
        return self.down(jax.nn.silu(gate) * up)
