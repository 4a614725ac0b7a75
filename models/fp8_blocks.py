"""DeepSeek's FP8 block-quantized weights, dequantized on the host while a checkpoint loads.

Published DeepSeek-V3 / R1 / Kimi K2 checkpoints (`quantization_config: {quant_method: fp8,
fmt: e4m3, activation_scheme: dynamic, weight_block_size: [128, 128]}`) store every linear
weight of the decoder layers as `<name>.weight`, float8 e4m3 [out, in], with
`<name>.weight_scale_inv`, float32 [ceil(out / 128), ceil(in / 128)]:

    W[i, j] = float32(weight[i, j]) * weight_scale_inv[i // 128, j // 128]

(the last row and column blocks are ragged when out or in is not a multiple of 128, e.g.
kv_a_proj_with_mqa [576, 7168]). This is DeepSeek's own `weight_dequant`; the result is cast
to the model's dtype. One band of 128 rows is dequantized at a time, so a load holds at most one
float32 band besides the params: the model is never materialised twice. Keeping the experts in
FP8 on the device (and dequantizing inside the grouped matmul) is a later step.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
from jaxtyping import Float, Shaped

# float32 value of each of the 256 e4m3fn bytes (0x7F and 0xFF are NaN): a table lookup is
# several times faster than ml_dtypes' element-wise conversion.
E4M3_TABLE = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)


def scale_grid_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """The shape weight_scale_inv must have for a weight of `shape` [out, in]."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def dequantize_fp8_blocks_into(
    dest: Shaped[np.ndarray, "out in"],
    weight: Shaped[np.ndarray, "out in"],
    scale_inv: Float[np.ndarray, "row_blocks col_blocks"],
    block: tuple[int, int],
) -> None:
    """dest[...] = weight * scale_inv per block (see the module docstring), in dest's dtype.

    dest: any float array or view [out, in] (a transposed view of a [in, out] kernel works);
    weight: float8_e4m3fn (or its uint8 bytes) [out, in]. Raises FloatingPointError when a
    value is NaN or infinite after the cast (a NaN byte, an infinite scale, a float16
    overflow): such a weight would silently turn every output into NaN."""
    out_dim, in_dim = weight.shape
    if scale_inv.shape != scale_grid_shape(weight.shape, block):
        raise ValueError(
            f"weight_scale_inv has shape {list(scale_inv.shape)}, a weight of shape "
            f"{[out_dim, in_dim]} in {list(block)} blocks needs "
            f"{list(scale_grid_shape(weight.shape, block))}"
        )
    codes = weight.view(np.uint8)
    scales = scale_inv.astype(np.float32)
    if not np.isfinite(scales).all():
        i, j = np.argwhere(~np.isfinite(scales))[0]
        raise FloatingPointError(
            f"NaN or infinite value after dequantization at [{i * block[0]}, {j * block[1]}] "
            "(an infinite or NaN scale)"
        )
    # |W| <= 448 * |scale|: when that bound is below the dtype's largest value no element can
    # round to infinity, and the NaN bytes are the only non-finite values (checked on the bytes).
    bound = 448.0 * float(np.abs(scales).max(initial=0.0))
    check_output = not bound < float(ml_dtypes.finfo(dest.dtype).max)
    # Exactly float32(weight) * scale: e4m3 bits << 7 are float16 bits of weight / 256 (normal
    # and subnormal alike), and * 256 is exact, so the product rounds as the lookup table's did.
    scaled = scales * np.float32(256.0)
    premultiplied = bool(np.isfinite(scaled).all())
    transposed = dest.T.flags.c_contiguous  # a [in, out] kernel: work on [in, rows] bands
    for i in range(scales.shape[0]):
        rows = slice(i * block[0], min((i + 1) * block[0], out_dim))
        band_codes = codes[rows]
        nan = (band_codes & 0x7F) == 0x7F
        if nan.any():
            bad = np.argwhere(nan)[0]
            raise FloatingPointError(
                f"NaN or infinite value after dequantization at [{rows.start + bad[0]}, {bad[1]}]"
            )
        if transposed:
            band_codes = band_codes.T
        half = np.left_shift(band_codes, 7, dtype=np.uint16)
        sign = np.bitwise_and(half, 0x4000)
        np.bitwise_and(half, 0x3F80, out=half)
        np.bitwise_or(half, np.left_shift(sign, 1, out=sign), out=half)
        band = half.view(np.float16).astype(np.float32)
        column_scale = np.repeat(scaled[i] if premultiplied else scales[i], block[1])[:in_dim]
        if not premultiplied:
            band *= np.float32(256.0)
        band *= column_scale[:, None] if transposed else column_scale
        target = dest.T[:, rows] if transposed else dest[rows]
        np.copyto(target, band, casting="unsafe")
        if check_output and not np.isfinite(target.astype(np.float32)).all():
            bad = np.argwhere(~np.isfinite(target.astype(np.float32).T if transposed else target))[
                0
            ]
            raise FloatingPointError(
                f"NaN or infinite value after dequantization at [{rows.start + bad[0]}, {bad[1]}]"
            )
