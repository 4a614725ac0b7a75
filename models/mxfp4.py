"""MXFP4, the format gpt-oss publishes its expert weights in, and its dequantization.

Each row of a weight ([out, in], PyTorch orientation) is cut into groups of 32 values; a group
is 16 bytes of 4-bit codes (`*_blocks`, uint8 [..., in / 32, 16]; the low nibble of byte j is
value 2 j, the high nibble value 2 j + 1) and one shared power-of-two exponent (`*_scales`,
uint8 [..., in / 32], biased by 127). A code is an E2M1 float: FP4_VALUES below. This is
transformers' `integrations.mxfp4.convert_moe_packed_tensors`. We dequantize at load: every
value is a 2-bit mantissa times a power of two, so float32 holds it exactly and the cast to
bfloat16 is exact as well (both have float32's exponent range).
"""

from __future__ import annotations

import numpy as np
from jaxtyping import Float, UInt8

BLOCK = 32  # values per scale
FP4_VALUES = np.array(
    [
        +0.0,
        +0.5,
        +1.0,
        +1.5,
        +2.0,
        +3.0,
        +4.0,
        +6.0,
        -0.0,
        -0.5,
        -1.0,
        -1.5,
        -2.0,
        -3.0,
        -4.0,
        -6.0,
    ],
    np.float32,
)
SCALE_BIAS = 127


def dequantize_mxfp4(
    blocks: UInt8[np.ndarray, "*rows groups 16"], scales: UInt8[np.ndarray, "*rows groups"]
) -> Float[np.ndarray, "*rows values"]:
    """float32 [..., groups * 32]: each row's values in order (not yet transposed)."""
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BLOCK // 2:
        raise ValueError(
            f"MXFP4 blocks {list(blocks.shape)} and scales {list(scales.shape)} do not match "
            f"(expected blocks [..., groups, {BLOCK // 2}] and scales [..., groups])"
        )
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1)  # [..., groups, 16, 2]
    values = FP4_VALUES[codes].reshape(*scales.shape, BLOCK)
    exponents = scales.astype(np.int32)[..., None] - SCALE_BIAS
    with np.errstate(over="ignore"):  # inf, as transformers gives; the loader refuses it by name
        return np.ldexp(values, exponents).reshape(*scales.shape[:-1], -1)
