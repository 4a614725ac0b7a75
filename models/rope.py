"""Rotary position embeddings: plain, linear-scaled and yarn, and DeepSeek's yarn softmax scale.

Exactly what transformers 5.24 computes (`modeling_rope_utils.py`,
`_compute_linear_scaling_rope_parameters` and `_compute_yarn_parameters`; the attention of
`modeling_deepseek_v3.py` / `modeling_deepseek_v2.py` for `yarn_apply_mscale`):

* plain:  inv_freq[i] = 1 / theta^(2i/d), i = 0 .. d/2-1 (d = the rotary dim).
* linear: inv_freq / factor (positions divided by factor), nothing else.
* yarn:   each frequency is blended between itself ("extrapolation") and itself / factor
  ("interpolation") by a ramp over the dims, computed against original_max_position_embeddings:

      low, high = floor(corr(beta_fast)), ceil(corr(beta_slow)), clipped to [0, d-1]
      corr(r)   = d * ln(original_max / (2 pi r)) / (2 ln theta)   (the dim rotating r times)
      ramp[i]   = clip((i - low) / (high - low), 0, 1)             (high += 0.001 if equal)
      inv_freq  = inv_freq / factor * ramp + inv_freq * (1 - ramp)

  high-frequency dims (many rotations within the original context) keep their frequency, low ones
  are interpolated. cos and sin are multiplied by an attention factor: `attention_factor` if set,
  else mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set and nonzero,
  else mscale(factor, 1), with mscale(s, m) = 0.1 m ln(s) + 1 for s > 1, 1 otherwise.
  (DeepSeek-V3 sets mscale = mscale_all_dim, so the factor is 1.)
* DeepSeek multiplies its softmax scale (nope + rope)^-0.5 by mscale(factor, mscale_all_dim)^2
  whenever the rope is scaled and mscale_all_dim is nonzero (`mla_softmax_scale`).
* gpt-oss (its published yarn: factor 32, truncate false, no mscale keys): the ramp bounds stay
  fractional, cos/sin carry mscale(32, 1) = 0.1 ln 32 + 1, and its softmax scale is
  head_dim^-0.5, untouched (`mla_softmax_scale` is MLA's alone).

The tables depend on the config alone, so they are computed once in NumPy float32 (what torch
does) and enter the compiled program as constants.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from models.config import ModelConfig


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """DeepSeek's / yarn's magnitude correction for a context stretched `factor` times."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def yarn_attention_factor(cfg: ModelConfig) -> float:
    """The factor yarn applies to cos and sin (1.0 for DeepSeek's published configs)."""
    if cfg.rope_attention_factor is not None:
        return cfg.rope_attention_factor
    factor = cfg.rope_factor
    if cfg.rope_mscale and cfg.rope_mscale_all_dim:
        return yarn_mscale(factor, cfg.rope_mscale) / yarn_mscale(factor, cfg.rope_mscale_all_dim)
    return yarn_mscale(factor)


def yarn_ramp_bounds(cfg: ModelConfig, rope_dim: int) -> tuple[int | float, int | float]:
    """(low, high): dims below low keep their frequency, dims above high are interpolated
    (integers when rope_truncate, as in every published config)."""

    def dim_of(rotations: float) -> float:
        original = cfg.rope_original_max_positions
        return (rope_dim * math.log(original / (rotations * 2 * math.pi))) / (
            2 * math.log(cfg.rope_theta)
        )

    low, high = dim_of(cfg.rope_beta_fast), dim_of(cfg.rope_beta_slow)
    if cfg.rope_truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, rope_dim - 1)


def inverse_frequencies(cfg: ModelConfig, rope_dim: int) -> Float[np.ndarray, " half"]:
    """inv_freq [rope_dim / 2] (float32) of the config's rope scaling."""
    exponents = np.arange(0, rope_dim, 2).astype(np.float32) / np.float32(rope_dim)
    pos_freqs = np.float32(cfg.rope_theta) ** exponents
    if cfg.rope_scaling == "none":
        return (1.0 / pos_freqs).astype(np.float32)
    factor = np.float32(cfg.rope_factor)
    if cfg.rope_scaling == "linear":
        return (1.0 / pos_freqs / factor).astype(np.float32)
    low, high = yarn_ramp_bounds(cfg, rope_dim)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    ramp = np.clip((np.arange(rope_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    keep = (1 - ramp).astype(np.float32)  # transformers' inv_freq_extrapolation_factor
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    return (interpolation * (1 - keep) + extrapolation * keep).astype(np.float32)


def rope_tables(
    positions: Int[Array, "batch seq"], rope_dim: int, rope: ModelConfig | float
) -> tuple[Float[Array, "batch seq half"], Float[Array, "batch seq half"]]:
    """cos and sin of each position times each inverse frequency, times the attention factor.

    rope: the model config (its theta and scaling), or a bare theta for plain rope (the
    signature models.layers callers have always used)."""
    if not isinstance(rope, ModelConfig):
        inv_freq = 1.0 / (rope ** (jnp.arange(0, rope_dim, 2, dtype=jnp.float32) / rope_dim))
        angles = positions.astype(jnp.float32)[..., None] * inv_freq
        return jnp.cos(angles), jnp.sin(angles)
    if rope.rope_scaling == "none":  # bit-for-bit the plain tables above
        return rope_tables(positions, rope_dim, rope.rope_theta)
    inv_freq = jnp.asarray(inverse_frequencies(rope, rope_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if rope.rope_scaling == "yarn":
        factor = jnp.float32(yarn_attention_factor(rope))
        cos, sin = cos * factor, sin * factor
    return cos, sin


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """DeepSeek's attention scale: (qk_nope + qk_rope)^-0.5, times mscale(factor,
    mscale_all_dim)^2 when the rope is scaled (transformers' `yarn_apply_mscale`)."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    if cfg.rope_scaling != "none" and cfg.rope_mscale_all_dim:
        mscale = yarn_mscale(cfg.rope_factor, cfg.rope_mscale_all_dim)
        scale = scale * mscale * mscale
    return scale


def apply_rope(
    x: Float[Array, "batch seq heads dim"],
    cos: Float[Array, "batch seq half"],
    sin: Float[Array, "batch seq half"],
    *,
    interleave: bool = False,
) -> Float[Array, "batch seq heads dim"]:
    """Rotary embedding in the rotate-half layout.

    With `interleave` the pairs are (0, 1), (2, 3), ... as in DeepSeek's checkpoints; they are
    first gathered into halves, which is what Hugging Face does too (queries and keys alike, so
    their dot products are unchanged).
    """
    if interleave:
        x = jnp.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def apply_partial_rope(
    x: Float[Array, "batch seq heads dim"],
    cos: Float[Array, "batch seq half"],
    sin: Float[Array, "batch seq half"],
) -> Float[Array, "batch seq heads dim"]:
    """Rotate-half RoPE on the first 2 * half dims of each head, the rest unchanged (GLM's
    partial_rotary_factor; transformers' apply_rotary_pos_emb slices q[..., :rotary_dim] so)."""
    rotary_dim = 2 * cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return apply_rope(x, cos, sin)
    rotated = apply_rope(x[..., :rotary_dim], cos, sin)
    return jnp.concatenate([rotated, x[..., rotary_dim:]], axis=-1)
