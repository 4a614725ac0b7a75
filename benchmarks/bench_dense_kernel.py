"""The row-invariant dense projection (models/row_invariant.py) against XLA's dot, per shape.

  python benchmarks/bench_dense_kernel.py                 # GPU: times tilings, checks bits
  python benchmarks/bench_dense_kernel.py --interpret     # CPU: checks only (slow, no timing)

Shapes are qwen3-30b-a3b's attention and router projections at decode (16 and 32 rows per
device). Each time is one of 16 distinct weights multiplied in one program (so launches from
Python do not count), per product, in microseconds; "GB/s" is the weight bytes over that time.
Each tiling is also checked row-invariant: a row's bits alone equal its bits among 128 rows.
"grouped" is the previous form (the grouped-matmul kernel, one group per K split). The last
rows put q, k and v of one input through XLA (3 dots), the kernel 3 times, and the kernel once.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_ms  # noqa: E402

# (name, k, n, dtype): qwen3-30b-a3b's q, k (= v), o projections and its float32 router.
SHAPES = (
    ("q_proj", 2048, 4096, "bfloat16"),
    ("k_proj", 2048, 512, "bfloat16"),
    ("o_proj", 4096, 2048, "bfloat16"),
    ("router", 2048, 128, "float32"),
)
# (block_n, split_width, max_splits, num_warps, num_stages); the first is the default.
TILINGS = (
    (64, 512, 8, 4, 2),
    (32, 512, 8, 4, 2),
    (64, 256, 16, 4, 2),
    (64, 512, 8, 2, 2),
)
WEIGHTS = 16


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", default="16,32", help="rows per call (decode rows per device)")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--interpret", action="store_true", help="run the kernel interpreted (CPU)")
    p.add_argument(
        "--row-tiles",
        action="store_true",
        help="time row tiles (block_m) at decode and prefill row counts instead, and check each "
        "gives every row the bits of the 16-row tile",
    )
    return p.parse_args()


def main() -> int:
    args = parse()
    if args.row_tiles:
        row_tiles(args)
        return 0
    import jax
    import jax.numpy as jnp
    import numpy as np

    from models.row_invariant import DENSE_BLOCK_N, split_k_matmul, split_k_matmuls

    rng = np.random.default_rng(0)
    print(
        f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, default block_n {DENSE_BLOCK_N}",
        flush=True,
    )
    tilings = TILINGS[:2] if args.interpret else TILINGS
    shapes = SHAPES[1:2] if args.interpret else SHAPES
    for name, k, n, dtype in shapes:
        w = jnp.asarray(rng.standard_normal((WEIGHTS, k, n)) * k**-0.5, dtype)
        x_all = jnp.asarray(rng.standard_normal((128, k)), dtype)
        weight_mb = k * n * w.dtype.itemsize / 1e6
        for m in [int(r) for r in args.rows.split(",")]:
            x = x_all[:m]
            row = [f"{name:7s} [{m},{k}]x[{k},{n}] {dtype[:4]:4s} {weight_mb:6.1f} MB"]
            us = timed(lambda x, w: x @ w, x, w, args)
            row.append(f"xla {us:7.1f} us" if us else "xla -")
            for tiling in tilings:
                b, width, most, warps, stages = tiling
                if n % b:
                    continue

                def product(x, w, b=b, width=width, most=most, warps=warps, stages=stages):
                    return split_k_matmul(
                        x,
                        w,
                        interpret=args.interpret,
                        block_n=b,
                        split_width=width,
                        max_splits=most,
                        num_warps=warps,
                        num_stages=stages,
                    )

                one = jax.jit(product)
                alone = np.asarray(one(x_all[:1], w[0]))
                among = np.asarray(one(x_all, w[0]))[:1]
                invariant = "=" if (alone == among).all() else "DIFFERS"
                us = timed(product, x, w, args)
                gbs = f"{weight_mb / 1e3 / (us * 1e-6):5.0f} GB/s" if us else ""
                label = f"{b}/{width}/{most}/{warps}/{stages}"
                row.append(
                    f"{label} {us:7.1f} us {gbs} {invariant}" if us else f"{label} {invariant}"
                )
            us = timed(grouped_split_k, x, w, args)
            row.append(f"grouped {us:7.1f} us" if us else "grouped -")
            print(" | ".join(row), flush=True)
    if not args.interpret:
        qkv = [
            jnp.asarray(rng.standard_normal((WEIGHTS, 2048, n)) * 0.02, jnp.bfloat16)
            for n in (4096, 512, 512)
        ]
        for m in [int(r) for r in args.rows.split(",")]:
            x = jnp.asarray(rng.standard_normal((m, 2048)), jnp.bfloat16)
            xla = timed_many(lambda x, ws: [x @ w for w in ws], x, qkv, args)
            apart = timed_many(lambda x, ws: [split_k_matmul(x, w) for w in ws], x, qkv, args)
            together = timed_many(split_k_matmuls, x, qkv, args)
            print(
                f"q+k+v   [{m},2048] | xla 3 dots {xla:7.1f} us | kernel x3 {apart:7.1f} us | "
                f"kernel once {together:7.1f} us",
                flush=True,
            )
    return 0


ROW_TILE_ROWS = (8, 64, 256, 2048)
ROW_TILES = (16, 32, 64)


def row_tiles(args) -> None:
    """us per product for each row tile at decode and prefill row counts (q_proj and o_proj),
    and whether a row keeps the bits of the 16-row tile."""
    import jax.numpy as jnp
    import numpy as np

    from models.row_invariant import split_k_matmul

    rng = np.random.default_rng(1)
    print(
        "| product | rows | " + " | ".join(f"block_m {t} us (same bits)" for t in ROW_TILES) + " |"
    )
    print("|---|---|" + "---|" * len(ROW_TILES), flush=True)
    for name, k, n, dtype in SHAPES[::2]:
        w = jnp.asarray(rng.normal(size=(WEIGHTS, k, n)) * k**-0.5, dtype)
        for m in ROW_TILE_ROWS:
            x = jnp.asarray(rng.normal(size=(m, k)), dtype)
            reference, cells = None, []
            for tile in ROW_TILES:

                def product(x, w, tile=tile):
                    return split_k_matmul(x, w, block_m=tile, interpret=args.interpret)

                out = np.asarray(product(x, w[0]).astype(jnp.float32))
                reference = out if reference is None else reference
                same = "yes" if np.array_equal(out, reference) else "NO"
                cells.append(f"{timed(product, x, w, args):.1f} ({same})")
            print(f"| {name} | {m} | " + " | ".join(cells) + " |", flush=True)


def grouped_split_k(x, w):
    """The previous row-invariant projection: K splits as groups of the grouped kernel."""
    import jax
    import jax.numpy as jnp

    from models.grouped_matmul import grouped_matmul_kernel
    from models.row_invariant import _splits

    (m, k), n = x.shape, w.shape[1]
    splits = _splits(k)
    width = k // splits
    stacked = x.reshape(m, splits, width).transpose(1, 0, 2).reshape(splits * m, width)
    partial = grouped_matmul_kernel(
        stacked,
        w.reshape(splits, width, n),
        jnp.full((splits,), m, jnp.int32),
        block_n=64,
        precision=jax.lax.Precision.HIGHEST if w.dtype == jnp.float32 else None,
        out_dtype=jnp.float32,
    ).reshape(splits, m, n)
    total = partial[0]
    for s in range(1, splits):
        total = total + partial[s]
    return total.astype(x.dtype)


def timed_many(product, x, weights, args) -> float:
    """Microseconds per set of products (one weight of each stack): WEIGHTS sets in one
    program, median of --iters calls."""
    import jax

    if args.interpret:
        return 0.0
    many = jax.jit(lambda x, ws: [product(x, [w[i] for w in ws]) for i in range(WEIGHTS)])
    return 1e3 * median_ms(lambda: many(x, weights), args.iters) / WEIGHTS


def timed(product, x, w, args) -> float:
    """Microseconds per product (`timed_many` of one weight stack)."""
    return timed_many(lambda x, ws: product(x, ws[0]), x, [w], args)


if __name__ == "__main__":
    sys.exit(main())
