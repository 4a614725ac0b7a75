"""The MoE grouped matmul alone: `jax.lax.ragged_dot` against the project's Pallas kernel
(models/grouped_matmul.py), side by side in one process, at an expert's shapes.

  python benchmarks/bench_grouped_matmul.py                     # GPU: the table below
  python benchmarks/bench_grouped_matmul.py --interpret --quick # CPU: correctness only

For each (local slots S, rows, slots that receive rows): both implementations' time, the bytes
the slots with rows must read (the floor: weights of used slots + rows in and out) and the
kernel's GB/s against it. Checks first: the kernel matches ragged_dot (bf16, relative error),
rows of no group are 0, and a row's result is bit for bit the same whatever rows share the call
(batch invariance).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--d-model", type=int, default=2048, help="K of gate/up (qwen3-30b-a3b)")
    p.add_argument("--d-ff", type=int, default=768, help="N of gate/up (qwen3-30b-a3b)")
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--interpret", action="store_true", help="run the kernel interpreted (CPU)")
    p.add_argument("--quick", action="store_true", help="small shapes, checks only")
    p.add_argument("--sweep", action="store_true", help="time tilings (block_n, block_k, warps)")
    p.add_argument(
        "--row-tiles",
        action="store_true",
        help="time row tiles (block_m) at decode, large-batch and prefill shapes of qwen3 and "
        "mixtral, and check each gives every row the bits of the 16-row tile",
    )
    return p.parse_args()


def sizes_for(rng, rows: int, slots: int, used: int):
    import numpy as np

    chosen = rng.choice(slots, size=used, replace=False)
    counts = np.bincount(rng.choice(chosen, size=rows), minlength=slots)
    return counts.astype(np.int32)


def timed(fn, iters: int) -> float:
    """Median seconds of one call (after a warm-up call)."""
    import jax

    jax.block_until_ready(fn())
    samples = []
    for _ in range(iters):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        samples.append(time.perf_counter() - t)
    samples.sort()
    return samples[len(samples) // 2]


def main() -> int:
    args = parse()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from models.grouped_matmul import grouped_matmul_kernel

    k, n = (128, 128) if args.quick else (args.d_model, args.d_ff)
    rng = np.random.default_rng(0)
    kernel = jax.jit(lambda x, w, g: grouped_matmul_kernel(x, w, g, interpret=args.interpret))
    ragged = jax.jit(jax.lax.ragged_dot)
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, K={k} N={n}, bf16", flush=True)

    # ---- checks ----
    for rows, slots, used in [(40, 8, 3), (128, 32, 16)] if args.quick else [(512, 128, 64)]:
        x = jnp.asarray(rng.normal(size=(rows, k)), jnp.bfloat16)
        w = jnp.asarray(rng.normal(size=(slots, k, n)) * k**-0.5, jnp.bfloat16)
        g = jnp.asarray(sizes_for(rng, rows - 3, slots, used))  # 3 rows in no group
        want = jax.lax.ragged_dot(
            x.astype(jnp.float32), w.astype(jnp.float32), g, precision="highest"
        )
        got = kernel(x, w, g).astype(jnp.float32)
        err = float(jnp.abs(got - want).max() / jnp.abs(want).max())
        tail_zero = bool(jnp.all(got[rows - 3 :] == 0))
        # The first group's rows alone, then with every other row: bit for bit the same.
        first = int(np.flatnonzero(np.asarray(g))[0])
        alone = np.zeros(slots, np.int32)
        alone[first] = int(g[first])
        start = int(np.asarray(g)[:first].sum())
        only = kernel(x[start:], w, jnp.asarray(alone))[: int(g[first])]
        same = bool(jnp.all(only == got[start : start + int(g[first])].astype(only.dtype)))
        print(
            f"check rows={rows} slots={slots} used={used}: max rel err {err:.2e}, "
            f"rows of no group zero {tail_zero}, batch-invariant {same}",
            flush=True,
        )
        if err > 2e-2 or not tail_zero or not same:
            print("CHECK FAILED", flush=True)
            return 1
    if not args.interpret:
        check_under_shard_map(k, n, rng)
    if args.quick:
        return 0

    if args.sweep:
        sweep(args, k, n, rng)
        return 0
    if args.row_tiles:
        row_tiles(args, rng)
        return 0

    # ---- timing ----
    print(
        "| slots S | rows | slots with rows | ragged_dot us | kernel us | kernel / ragged | "
        "floor MB | kernel GB/s |"
    )
    print("|---|---|---|---|---|---|---|---|", flush=True)
    for slots in (32, 64, 128):
        w = jnp.asarray(rng.normal(size=(slots, k, n)) * k**-0.5, jnp.bfloat16)
        for rows in (64, 128, 512):
            for used in sorted({slots // 4, slots // 2, slots}):
                x = jnp.asarray(rng.normal(size=(rows, k)), jnp.bfloat16)
                g = jnp.asarray(sizes_for(rng, rows, slots, used))
                live = int((np.asarray(g) > 0).sum())
                t_ragged = timed(lambda x=x, w=w, g=g: ragged(x, w, g), args.iters)
                t_kernel = timed(lambda x=x, w=w, g=g: kernel(x, w, g), args.iters)
                floor = (live * k * n + rows * k + rows * n) * 2
                print(
                    f"| {slots} | {rows} | {live} | {1e6 * t_ragged:.0f} | "
                    f"{1e6 * t_kernel:.0f} | {t_kernel / t_ragged:.2f} | {floor / 1e6:.1f} | "
                    f"{floor / t_kernel / 1e9:.0f} |",
                    flush=True,
                )
    return 0


def check_under_shard_map(k: int, n: int, rng) -> None:
    """The kernel inside shard_map over every device (as the model calls it) equals the kernel
    on one device, shard by shard."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from models.grouped_matmul import grouped_matmul_kernel

    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("d",), devices=devices)
    rows, slots = 64, 8
    x = jnp.asarray(rng.normal(size=(len(devices) * rows, k)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(len(devices) * slots, k, n)) * k**-0.5, jnp.bfloat16)
    g = jnp.asarray([sizes_for(rng, rows, slots, 3) for _ in devices])
    sharded = jax.jit(
        jax.shard_map(
            lambda x, w, g: grouped_matmul_kernel(x, w, g[0]),
            mesh=mesh,
            in_specs=(P("d"), P("d"), P("d")),
            out_specs=P("d"),
        )
    )
    spec = NamedSharding(mesh, P("d"))
    got = np.asarray(sharded(*(jax.device_put(a, spec) for a in (x, w, g))))
    same = all(
        np.array_equal(
            got[i * rows : (i + 1) * rows],
            np.asarray(
                grouped_matmul_kernel(
                    x[i * rows : (i + 1) * rows], w[i * slots : (i + 1) * slots], g[i]
                )
            ),
        )
        for i in range(len(devices))
    )
    print(
        f"check under shard_map over {len(devices)} devices: same bits as alone {same}", flush=True
    )


def sweep(args, k: int, n: int, rng) -> None:
    """Kernel time per tiling at three decode shapes (slots, rows, slots with rows)."""
    import itertools

    import jax.numpy as jnp

    from models.grouped_matmul import grouped_matmul_kernel

    shapes = [(32, 128, 16), (128, 512, 32), (128, 512, 127)]
    cases = []
    for slots, rows, used in shapes:
        w = jnp.asarray(rng.normal(size=(slots, k, n)) * k**-0.5, jnp.bfloat16)
        x = jnp.asarray(rng.normal(size=(rows, k)), jnp.bfloat16)
        cases.append((x, w, jnp.asarray(sizes_for(rng, rows, slots, used))))
    print(
        "| block_n | block_k | warps | stages | "
        + " | ".join(f"{s}/{r}/{u} us" for s, r, u in shapes)
        + " |"
    )
    print("|---|---|---|---|" + "---|" * len(shapes), flush=True)
    for block_n, block_k, warps, stages in itertools.product(
        (64, 128), (64, 128, 256), (4, 8), (2, 4)
    ):
        if n % block_n or k % block_k:
            continue
        times = []
        for x, w, g in cases:
            tiling = dict(block_n=block_n, block_k=block_k, num_warps=warps, num_stages=stages)

            def call(x=x, w=w, g=g, tiling=tiling):
                return grouped_matmul_kernel(x, w, g, **tiling)

            try:
                times.append(f"{1e6 * timed(call, args.iters):.0f}")
            except Exception as error:  # a tiling Triton cannot compile (shared memory)
                times.append(type(error).__name__)
        print(
            f"| {block_n} | {block_k} | {warps} | {stages} | " + " | ".join(times) + " |",
            flush=True,
        )


# (name, K, N, local slots, rows, slots with rows): one device's gate (or down) product.
ROW_TILE_SHAPES = [
    ("qwen3 gate, batch 8", 2048, 768, 128, 64, 50),
    ("qwen3 gate, batch 64", 2048, 768, 128, 512, 72),
    ("qwen3 gate, batch 256", 2048, 768, 128, 2048, 100),
    ("qwen3 gate, prefill 2048", 2048, 768, 128, 16384, 128),
    ("mixtral gate, batch 8", 4096, 14336, 8, 16, 8),
    ("mixtral gate, batch 64", 4096, 14336, 8, 128, 8),
    ("mixtral gate, batch 256", 4096, 14336, 8, 512, 8),
    ("mixtral down, batch 256", 14336, 4096, 8, 512, 8),
]
# (block_m, num_warps)
ROW_TILINGS = [(16, 4), (32, 4), (64, 4), (64, 8), (128, 8)]


def row_tiles(args, rng) -> None:
    """Kernel time per row tile, and whether a row's bits stay those of the 16-row tile (if
    they do, the tile may follow the rows per call without breaking batch invariance)."""
    import jax.numpy as jnp
    import numpy as np

    from models.grouped_matmul import grouped_matmul_kernel

    tilings = ROW_TILINGS
    print(
        "| shape | rows | floor MB | "
        + " | ".join(f"block_m {m}, {w} warps us (same bits)" for m, w in tilings)
        + " |"
    )
    print("|---|---|---|" + "---|" * len(tilings), flush=True)
    for name, k, n, slots, rows, used in ROW_TILE_SHAPES:
        w = jnp.asarray(rng.normal(size=(slots, k, n)) * k**-0.5, jnp.bfloat16)
        x = jnp.asarray(rng.normal(size=(rows, k)), jnp.bfloat16)
        g = jnp.asarray(sizes_for(rng, rows, slots, used))
        live = int((np.asarray(g) > 0).sum())
        floor = (live * k * n + rows * k + rows * n) * 2
        reference = None
        cells = []
        for block_m, warps in tilings:

            def call(x=x, w=w, g=g, block_m=block_m, warps=warps):
                return grouped_matmul_kernel(
                    x, w, g, block_m=block_m, num_warps=warps, interpret=args.interpret
                )

            try:
                out = np.asarray(call())
                if reference is None:
                    reference = out
                same = np.array_equal(out.view(np.uint16), reference.view(np.uint16))
                cells.append(f"{1e6 * timed(call, args.iters):.0f} ({'yes' if same else 'NO'})")
            except Exception as error:  # a tiling Triton cannot compile (shared memory)
                cells.append(type(error).__name__)
        print(f"| {name} | {rows} | {floor / 1e6:.0f} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
