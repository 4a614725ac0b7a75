"""Which operations give a row a result that depends on how many rows share the call?

  python benchmarks/probe_row_invariance.py            # the default backend (GPU if there)
  JAX_PLATFORMS=cpu python benchmarks/probe_row_invariance.py

For each operation at qwen3-30b-a3b shapes (d_model 2048, q_proj 4096 wide, vocab 151936, a
256-position KV window), the first rows are computed alone (1 row, or one query position) and
again among m rows; it prints the row counts whose first rows came out different, bit for bit.
An empty list means the operation is row-invariant at these sizes. This is what decides whether
a token's values can change between decode (a few rows per device) and a prefill or a
re-prefill (many), and between meshes that put another number of rows on a device.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Each is a compile per probe: keep them few. 4 and 32 are a prefill's and a decode's rows per
# device in probe_reprefill.py, where XLA's float32 LM head changed a row's bits on an H100
# while 1, 16 and 128 had not shown it.
ROWS = (1, 4, 16, 32, 128)


def main() -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from models import row_invariant
    from models.fixed_order import fixed_order_sum
    from models.grouped_matmul import grouped_matmul

    rng = np.random.default_rng(0)
    bf16, f32 = jnp.bfloat16, jnp.float32
    d, wide, vocab, t = 2048, 4096, 151936, 256
    x = jnp.asarray(rng.standard_normal((max(ROWS), d)), bf16)
    w = jnp.asarray(rng.standard_normal((d, wide)) * d**-0.5, bf16)
    head = jnp.asarray(rng.standard_normal((d, vocab)) * 0.02, bf16)
    logits = jnp.asarray(rng.standard_normal((max(ROWS), vocab)) * 3, f32)
    router = jnp.asarray(rng.standard_normal((d, 128)) * d**-0.5, f32)

    def served_head(a):
        with row_invariant.row_invariant_matmuls():
            return row_invariant.lm_head_logits(a, head.astype(f32))

    def differs(fn, data):
        first = np.asarray(fn(data[:1]))
        return [m for m in ROWS if not (np.asarray(fn(data[:m]))[:1] == first).all()]

    probes = {
        "bf16 matmul [m,2048]x[2048,4096]": (jax.jit(lambda a: a @ w), x),
        "f32 matmul [m,2048]x[2048,151936] (LM head)": (
            jax.jit(lambda a: a.astype(f32) @ head.astype(f32)),
            x,
        ),
        "bf16 matmul, f32 accumulate and output (LM head)": (
            jax.jit(lambda a: jnp.dot(a, head, preferred_element_type=f32)),
            x,
        ),
        "f32 matmul [m,2048]x[2048,128] (router)": (
            jax.jit(lambda a: a.astype(f32) @ router),
            x,
        ),
        "grouped_matmul, one group [m,2048]x[2048,4096]": (
            jax.jit(lambda a: grouped_matmul(a, w[None], jnp.array([a.shape[0]], jnp.int32))),
            x,
        ),
        "XLA row sum over 151936 (log-softmax)": (jax.jit(lambda a: a.sum(-1)), logits),
        "fixed_order_sum over 151936": (jax.jit(fixed_order_sum), logits),
        "XLA row sum over 2048 (RMSNorm)": (jax.jit(lambda a: (a.astype(f32) ** 2).sum(-1)), x),
        "fixed_order_sum over 2048": (jax.jit(lambda a: fixed_order_sum(a.astype(f32) ** 2)), x),
    }
    if jax.default_backend() == "gpu":  # on the CPU it is a fixed-order product: too big here
        probes["LM head as served (row_invariant.lm_head_logits)"] = (jax.jit(served_head), x)
    print(f"# backend {jax.default_backend()}, {jax.devices()[0].device_kind}", flush=True)
    for name, (fn, data) in probes.items():
        print(f"{name:52s} differs at rows {differs(fn, data)}", flush=True)

    # Attention scores and output: query positions 0..c-1 of one request over the KV window,
    # c = 1 (decode) against c > 1 (prefill). GQA as qwen3: 4 KV heads, 8 queries per head.
    hkv, g, hd = 4, 8, 128
    q = jnp.asarray(rng.standard_normal((1, 64, hkv, g, hd)), bf16)
    keys = jnp.asarray(rng.standard_normal((1, t, hkv, hd)), bf16)
    values = jnp.asarray(rng.standard_normal((1, t, hkv, hd)), bf16)

    @jax.jit
    def attention(q):
        s = jnp.einsum("bckgd,btkd->bkgct", q, keys, preferred_element_type=f32) * hd**-0.5
        p = jax.nn.softmax(s, axis=-1).astype(bf16)
        return jnp.einsum("bkgct,btkd->bckgd", p, values)

    first = np.asarray(attention(q[:, :1]))
    bad = [c for c in (1, 4, 16, 64) if not (np.asarray(attention(q[:, :c]))[:, :1] == first).all()]
    print(f"{'attention, c query positions at once':52s} differs at c {bad}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
