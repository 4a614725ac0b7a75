"""Decode attention: the live-context kernel (models/attention_kernel.py) against XLA's path.

  python benchmarks/bench_attention.py          # GPU: checks, then times per context length

At qwen3-30b-a3b's attention shapes (32 query heads, 4 kv heads, head dim 128, a 1,024-position
cache, 32 request rows per device), for each live context: the kernel's largest difference from
XLA's attention (float32 reference), whether a query's output is bit-equal in a decode and in a
16-position prefill, and microseconds per call of each (8 layers' calls in one program).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import median_ms  # noqa: E402

LAYERS = 8


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rows", type=int, default=32, help="request rows (batch per device)")
    p.add_argument("--window", type=int, default=1024, help="cache positions (max_seq_len)")
    p.add_argument("--contexts", default="64,256,1024")
    p.add_argument("--iters", type=int, default=20)
    return p.parse_args()


def main() -> int:
    args = parse()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from models.attention import attend_whole_window
    from models.attention_kernel import live_context_attention

    b, hq, hkv, t, d = args.rows, 32, 4, args.window, 128
    rng = np.random.default_rng(0)
    bf16 = jnp.bfloat16
    # One array per layer, as the model's caches are (a slice of a stacked array would be
    # copied for the kernel's call, not for XLA's fused path).
    keys = [jnp.asarray(rng.standard_normal((b, hkv, t, d)), bf16) for _ in range(LAYERS)]
    values = [jnp.asarray(rng.standard_normal((b, hkv, t, d)), bf16) for _ in range(LAYERS)]
    q = jnp.asarray(rng.standard_normal((LAYERS, b, 16, hq, d)), bf16)
    scale = d**-0.5
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
    kernel = jax.jit(lambda q, k, v, p: live_context_attention(q, k, v, p, scale))
    xla = jax.jit(lambda q, k, v, p: attend_whole_window(q, k, v, p, scale, "fast"))
    exact = jax.jit(
        lambda q, k, v, p: attend_whole_window(
            q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32), p, scale, "fast"
        )
    )
    print("context | max |kernel - f32| | max |xla - f32| | decode == prefill | kernel us | xla us")
    for context in [int(c) for c in args.contexts.split(",")]:
        positions = jnp.full((b, 1), context - 1, jnp.int32)
        one = q[0, :, :1]
        with jax.default_matmul_precision("highest"):
            ref = np.asarray(exact(one, keys[0], values[0], positions), np.float32)
        err_kernel = np.abs(
            np.asarray(kernel(one, keys[0], values[0], positions), np.float32) - ref
        )
        err_xla = np.abs(np.asarray(xla(one, keys[0], values[0], positions), np.float32) - ref)
        # The same query as the last of 16 prefill positions.
        many = jnp.arange(context - 16, context, dtype=jnp.int32)[None].repeat(b, 0)
        prefill_q = q[0, :, :16].at[:, 15].set(one[:, 0])
        prefill = np.asarray(kernel(prefill_q, keys[0], values[0], many))[:, 15]
        decode = np.asarray(kernel(one, keys[0], values[0], positions))[:, 0]
        same = "yes" if (prefill == decode).all() else "NO"
        us_kernel = timed(live_context_attention, q, keys, values, positions, scale, args)
        us_xla = timed(
            lambda *a: attend_whole_window(*a, "fast"), q, keys, values, positions, scale, args
        )
        print(
            f"{context:7d} | {err_kernel.max():.2e} | {err_xla.max():.2e} | {same:>5s} | "
            f"{us_kernel:8.1f} | {us_xla:8.1f}",
            flush=True,
        )
    return 0


def timed(fn, q, keys, values, positions, scale, args) -> float:
    """Microseconds per layer: LAYERS calls (their own caches) in one program."""
    import jax

    @jax.jit
    def step(q, keys, values, positions):
        return [fn(q[i, :, :1], keys[i], values[i], positions, scale) for i in range(LAYERS)]

    return 1e3 * median_ms(lambda: step(q, keys, values, positions), args.iters) / LAYERS


if __name__ == "__main__":
    sys.exit(main())
