"""The MoE block: router, routed experts stored as physical slots, optional shared experts.

Expert weights are [num_slots, ...]; which logical expert a slot holds is data (the placement
tables), so a new placement never recompiles. Under `shard_map` each device holds S local slots
and its own tokens: tokens are all-gathered, each device runs only the (token, expert) pairs that
land on its slots with a grouped matmul (`ragged_dot`), and a reduce-scatter returns each device
the sum for its own tokens. Only the chosen experts are computed (dropless).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from models.config import ModelConfig
from models.layers import Dense, SwiGLU, dtype_of
from models.router import route


class ExpertTables(NamedTuple):
    """One layer's placement, as arrays fed to the compiled step."""

    log2phy: Int[Array, "experts max_replicas"]
    replica_count: Int[Array, " experts"]


def physical_slots(
    experts: Int[Array, "t k"], tables: ExpertTables, token_ids: Int[Array, " t"]
) -> Int[Array, "t k"]:
    """Spreads tokens over an expert's replicas by token id; replicas hold equal weights."""
    replica = token_ids[:, None] % tables.replica_count[experts]
    return tables.log2phy[experts, replica]


def expert_parallel_ffn(
    x: Float[Array, "t d"],
    slots: Int[Array, "t k"],
    weights: Float[Array, "t k"],
    w_gate: Float[Array, "s d f"],
    w_up: Float[Array, "s d f"],
    w_down: Float[Array, "s f d"],
    axis_name: str | None,
) -> Float[Array, "t d"]:
    """sum_k weights[t, k] * expert_{slots[t, k]}(x[t]) for this device's tokens.

    `w_*` are this device's slots; with `axis_name`, slot p lives on device p // s.
    """
    t, k = slots.shape
    s = w_gate.shape[0]
    if axis_name is not None:
        x_all = jax.lax.all_gather(x, axis_name, tiled=True)
        slots = jax.lax.all_gather(slots, axis_name, tiled=True)
        weights = jax.lax.all_gather(weights, axis_name, tiled=True)
        first_slot = jax.lax.axis_index(axis_name) * s
    else:
        x_all, first_slot = x, 0
    local = (slots - first_slot).reshape(-1)
    mine = (local >= 0) & (local < s)
    group = jnp.where(mine, local, s)
    order = jnp.argsort(group, stable=True)
    rows = x_all[order // k]
    group_sizes = jnp.bincount(group, length=s + 1)[:s].astype(jnp.int32)
    gate = jax.lax.ragged_dot(rows, w_gate, group_sizes)
    up = jax.lax.ragged_dot(rows, w_up, group_sizes)
    out = jax.lax.ragged_dot(jax.nn.silu(gate) * up, w_down, group_sizes)
    scale = weights.reshape(-1)[order].astype(out.dtype)
    out = jnp.where(mine[order][:, None], out * scale[:, None], 0)
    y = jnp.zeros_like(out).at[order].set(out).reshape(-1, k, out.shape[-1]).sum(axis=1)
    if axis_name is not None:
        y = jax.lax.psum_scatter(y, axis_name, scatter_dimension=0, tiled=True)
    return y


class RoutedExperts(nnx.Module):
    """SwiGLU experts over physical slots: w_gate/w_up [slots, d, f], w_down [slots, f, d]."""

    def __init__(self, cfg: ModelConfig, num_slots: int, *, rngs: nnx.Rngs):
        d, f, dt = cfg.d_model, cfg.moe_d_ff, dtype_of(cfg.dtype)
        axes = ("slots", None, None)
        self.w_gate = nnx.Param(
            jax.nn.initializers.normal(d**-0.5)(rngs.params(), (num_slots, d, f), dt),
            logical_axes=axes,
        )
        self.w_up = nnx.Param(
            jax.nn.initializers.normal(d**-0.5)(rngs.params(), (num_slots, d, f), dt),
            logical_axes=axes,
        )
        self.w_down = nnx.Param(
            jax.nn.initializers.normal(f**-0.5)(rngs.params(), (num_slots, f, d), dt),
            logical_axes=axes,
        )


class MoEBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, num_slots: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.router = Dense(cfg.d_model, cfg.num_experts, rngs=rngs, dtype="float32")
        self.router_bias = (
            nnx.Param(
                0.1 * jax.random.normal(rngs.params(), (cfg.num_experts,)), logical_axes=(None,)
            )
            if cfg.router_bias
            else None
        )
        self.experts = RoutedExperts(cfg, num_slots, rngs=rngs)
        self.shared = (
            SwiGLU(cfg.d_model, cfg.shared_d_ff, rngs=rngs, dtype=cfg.dtype)
            if cfg.num_shared_experts
            else None
        )
        self.shared_gate = (
            Dense(cfg.d_model, 1, rngs=rngs, dtype=cfg.dtype) if cfg.shared_expert_gate else None
        )

    def __call__(
        self,
        x: Float[Array, "t d"],
        tables: ExpertTables,
        token_ids: Int[Array, " t"],
        valid: Bool[Array, " t"],
        axis_name: str | None,
    ) -> tuple[Float[Array, "t d"], Int[Array, " experts"]]:
        """Returns the block output and how many valid tokens chose each logical expert."""
        logits = x.astype(jnp.float32) @ self.router.kernel[...].astype(jnp.float32)
        bias = None if self.router_bias is None else self.router_bias[...]
        weights, experts = route(logits, self.cfg, bias)
        slots = physical_slots(experts, tables, token_ids)
        e = self.experts
        y = expert_parallel_ffn(
            x, slots, weights, e.w_gate[...], e.w_up[...], e.w_down[...], axis_name
        )
        if self.shared is not None:
            shared = self.shared(x)
            if self.shared_gate is not None:
                shared = jax.nn.sigmoid(self.shared_gate(x)) * shared
            y = y + shared
        chosen = jnp.zeros((self.cfg.num_experts,), jnp.int32)
        chosen = chosen.at[experts].add(valid[:, None].astype(jnp.int32))
        if axis_name is not None:
            chosen = jax.lax.psum(chosen, axis_name)
        return y.astype(x.dtype), chosen
