"""The MoE block: router, routed experts stored as physical slots, optional shared experts.

Expert weights are [num_slots, ...]; which logical expert a slot holds is data (the placement
tables), so a new placement never recompiles. Under `shard_map` each device holds S local slots
and its own tokens: tokens are all-gathered, each device runs only the (token, expert) pairs that
land on its slots with a grouped matmul (models.grouped_matmul: a Pallas kernel on GPU,
`ragged_dot` elsewhere), and the results go back to each token's device. Only the chosen
experts are computed (dropless).

Two ways back (`numerics`):
- "fast": each device sums the scaled outputs of its pairs per token and a reduce-scatter adds
  the devices' partial sums. The order and split of that sum follow the mesh (which experts
  share a device), so in bf16 a token's output changes with the mesh size.
- "invariant": each (token, k) output goes back unsummed to the token's device (all-to-all),
  which scales and sums the k outputs in float32, in k order. A token's output is then the same
  operations on the same numbers whatever the mesh: a failure, a rejoin or a smaller mesh
  changes no bit. This relies on each row of the grouped matmul not depending on the other
  rows (which rows share a device, how many there are): the GPU kernel is batch-invariant by
  construction, and XLA's CPU ragged_dot and bf16 dots were measured to be
  (tests/test_invariant_numerics.py checks the whole model).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from models.config import ModelConfig
from models.grouped_matmul import grouped_matmul
from models.layers import Dense, SwiGLU, dtype_of
from models.router import route
from models.row_invariant import matmul

NUMERICS_MODES = ("invariant", "fast")


class ExpertBiases(NamedTuple):
    """gpt-oss's per-expert biases, stored in the slots beside the weights."""

    b_gate: Float[Array, "s f"]
    b_up: Float[Array, "s f"]
    b_down: Float[Array, "s d"]


def clamped_swiglu(
    gate: Float[Array, "n f"], up: Float[Array, "n f"], alpha: float, limit: float
) -> Float[Array, "n f"]:
    """gpt-oss's expert activation: (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)
    with g = min(gate, limit) (transformers' GptOssExperts._apply_gate)."""
    gate = jnp.minimum(gate, limit)
    up = jnp.clip(up, -limit, limit)
    return (up + 1) * (gate * jax.nn.sigmoid(alpha * gate))


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
    numerics: str = "invariant",
    biases: ExpertBiases | None = None,
    swiglu_limit: float = 0.0,
    swiglu_alpha: float = 1.702,
) -> Float[Array, "t d"]:
    """sum_k weights[t, k] * expert_{slots[t, k]}(x[t]) for this device's tokens.

    `w_*` are this device's slots; with `axis_name`, slot p lives on device p // s.
    numerics: "invariant" returns float32, summed per token in k order whatever the mesh;
    "fast" returns x's dtype, summed across devices by a reduce-scatter (see the module doc).
    gpt-oss: `biases` (this device's slots) are added after each projection, gathered per row
    by its slot; swiglu_limit > 0 selects clamped_swiglu instead of silu(gate) * up.
    """
    if numerics not in NUMERICS_MODES:
        raise ValueError(f"numerics must be one of {NUMERICS_MODES}, got {numerics!r}")
    t, k = slots.shape
    s = w_gate.shape[0]
    home_slots, home_weights = slots, weights
    with jax.named_scope("dispatch"):
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
        # Each sorted row's local slot; rows of other devices' slots (group s) read slot s - 1,
        # and their outputs are never used.
        row_slot = jnp.minimum(group[order], s - 1)
    # About this device's share of the pairs: picks the kernel's row tile (no bit changes).
    local_rows = rows.shape[0] // (jax.lax.axis_size(axis_name) if axis_name is not None else 1)
    with jax.named_scope("grouped_matmul"):
        gate = grouped_matmul(rows, w_gate, group_sizes, local_rows)
        up = grouped_matmul(rows, w_up, group_sizes, local_rows)
        if biases is not None:
            gate = gate + biases.b_gate[row_slot].astype(gate.dtype)
            up = up + biases.b_up[row_slot].astype(up.dtype)
        if swiglu_limit > 0:
            hidden = clamped_swiglu(gate, up, swiglu_alpha, swiglu_limit)
        else:
            hidden = jax.nn.silu(gate) * up
        out = grouped_matmul(hidden, w_down, group_sizes, local_rows)
        if biases is not None:
            out = out + biases.b_down[row_slot].astype(out.dtype)
    if numerics == "invariant":
        with jax.named_scope("combine_invariant"):
            pairs = jnp.zeros_like(out).at[order].set(out)  # [(devices t) k, d], pair order
            return _combine_at_home(pairs, home_slots, home_weights, s, axis_name)
    with jax.named_scope("combine_fast"):
        scale = weights.reshape(-1)[order].astype(out.dtype)
        out = jnp.where(mine[order][:, None], out * scale[:, None], 0)
        y = jnp.zeros_like(out).at[order].set(out).reshape(-1, k, out.shape[-1]).sum(axis=1)
        if axis_name is not None:
            y = jax.lax.psum_scatter(y, axis_name, scatter_dimension=0, tiled=True)
    return y


def _combine_at_home(
    pairs: Float[Array, "pairs d"],
    slots: Int[Array, "t k"],
    weights: Float[Array, "t k"],
    slots_per_device: int,
    axis_name: str | None,
) -> Float[Array, "t d"]:
    """Each of this device's (token, k) outputs, taken from the device that computed it, then
    sum_k weights[t, k] * output[t, k] in float32, k = 0, 1, ... in turn.

    pairs: every device's [devices * t * k, d] outputs in (token, k) order; rows of pairs this
    device did not compute are never read. The all-to-all moves, and selects, but adds nothing.
    """
    t, k = slots.shape
    if axis_name is not None:
        n = jax.lax.axis_size(axis_name)
        received = jax.lax.all_to_all(pairs, axis_name, 0, 0, tiled=True)
        received = received.reshape(n, t * k, -1)  # [computed on device i, my pairs, d]
        owner = slots.reshape(-1) // slots_per_device
        pairs = received[owner, jnp.arange(t * k)]
    outputs = pairs.reshape(t, k, -1).astype(jnp.float32)
    weights = weights.astype(jnp.float32)
    y = weights[:, 0, None] * outputs[:, 0]
    for i in range(1, k):  # unrolled: a fixed order, whatever XLA does with reductions
        y = y + weights[:, i, None] * outputs[:, i]
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
        if cfg.expert_bias:  # gpt-oss; names in models.params.EXPERT_BIASES
            bias = jax.nn.initializers.normal(0.1)
            self.b_gate = nnx.Param(bias(rngs.params(), (num_slots, f), dt), logical_axes=axes[:2])
            self.b_up = nnx.Param(bias(rngs.params(), (num_slots, f), dt), logical_axes=axes[:2])
            self.b_down = nnx.Param(bias(rngs.params(), (num_slots, d), dt), logical_axes=axes[:2])

    def biases(self) -> ExpertBiases | None:
        if not hasattr(self, "b_gate"):
            return None
        return ExpertBiases(self.b_gate[...], self.b_up[...], self.b_down[...])


class MoEBlock(nnx.Module):
    def __init__(self, cfg: ModelConfig, num_slots: int, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.router = Dense(
            cfg.d_model, cfg.num_experts, rngs=rngs, dtype="float32", bias=cfg.router_logit_bias
        )
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
        numerics: str = "invariant",
    ) -> tuple[Float[Array, "t d"], Int[Array, " experts"]]:
        """Returns the block output and how many valid tokens chose each logical expert.

        With "invariant" numerics the routed and shared outputs are added in float32 and
        rounded once to x's dtype."""
        with jax.named_scope("routing"):
            logits = matmul(x.astype(jnp.float32), self.router.kernel[...].astype(jnp.float32))
            if self.router.bias is not None:  # gpt-oss: a bias on the logits themselves
                logits = logits + self.router.bias[...].astype(jnp.float32)
            bias = None if self.router_bias is None else self.router_bias[...]
            weights, experts = route(logits, self.cfg, bias, numerics)
            slots = physical_slots(experts, tables, token_ids)
        e = self.experts
        y = expert_parallel_ffn(
            x,
            slots,
            weights,
            e.w_gate[...],
            e.w_up[...],
            e.w_down[...],
            axis_name,
            numerics,
            biases=e.biases(),
            swiglu_limit=self.cfg.swiglu_limit,
            swiglu_alpha=self.cfg.swiglu_alpha,
        )
        if self.shared is not None:
            with jax.named_scope("shared_expert"):
                shared = self.shared(x)
                if self.shared_gate is not None:
                    shared = jax.nn.sigmoid(self.shared_gate(x)) * shared
                y = y + shared.astype(y.dtype)
        chosen = jnp.zeros((self.cfg.num_experts,), jnp.int32)
        chosen = chosen.at[experts].add(valid[:, None].astype(jnp.int32))
        if axis_name is not None:
            chosen = jax.lax.psum(chosen, axis_name)
        return y.astype(x.dtype), chosen
