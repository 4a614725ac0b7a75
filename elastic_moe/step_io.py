"""What a step program takes per row to sample, and what it returns."""

from __future__ import annotations

from typing import NamedTuple

from jaxtyping import Array, Float, Int, UInt32

from models.kv_cache import LayerCache


class Sampling(NamedTuple):
    """Per-row sampling state: `step` is the index of the token to produce in its request."""

    temperature: Float[Array, " b"]
    top_k: Int[Array, " b"]
    top_p: Float[Array, " b"]
    seed: UInt32[Array, " b"]
    step: Int[Array, " b"]


class StepOutput(NamedTuple):
    tokens: Int[Array, " b"]
    logprobs: Float[Array, " b"]
    logits: Float[Array, "b vocab"]
    cache: list[LayerCache]
    expert_load: Int[Array, "moe_layers experts"]
