"""Does a re-prefilled request continue with exactly the bits its decode steps had?

  python benchmarks/probe_reprefill.py --layers 4        # one GPU (or CPU: --devices 1)

Greedy requests are decoded step by step; then each is submitted again as prompt + its first
`--at` generated tokens with max_tokens=1, so its next token comes out of a prefill. The token
and the logprob must equal the decode's bit for bit (invariant numerics). Variants patch one
piece of the model at a time to find which op makes a prefill differ from decode:
- "as built";
- "attention elementwise": scores and outputs as products summed in a fixed order
  (models.fixed_order), not XLA dots;
- "... + LM head kernel": the float32 LM head through the row-invariant kernel in exact
  float32 (HIGHEST), with K in splits (as built it runs the kernel in TF32 in one split).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import model_to_time, simulate_devices_unless_gpu  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=24)
    p.add_argument("--at", type=int, default=16, help="re-prefill after this many tokens")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--variants", default="as built,attention elementwise,+ LM head kernel")
    return p.parse_args()


def attend_elementwise(q, keys, values, q_positions, scale, numerics="invariant"):
    import jax.numpy as jnp

    from models.fixed_order import fixed_order_softmax, fixed_order_sum

    b, c, hq, dk = q.shape
    hkv = keys.shape[1]
    q = q.reshape(b, c, hkv, hq // hkv, 1, dk).astype(jnp.float32)
    k = keys[:, None, :, None].astype(jnp.float32)  # b 1 k 1 t d
    scores = fixed_order_sum(q * k)[..., 0] * scale  # b c k g t
    visible = jnp.arange(keys.shape[2])[None, None, :] <= q_positions[:, :, None]
    scores = jnp.where(visible[:, :, None, None, :], scores, -jnp.inf)
    probs = fixed_order_softmax(scores).astype(values.dtype).astype(jnp.float32)
    v = values.transpose(0, 1, 3, 2)[:, None, :, None].astype(jnp.float32)  # b 1 k 1 dv t
    out = fixed_order_sum(probs[..., None, :] * v)[..., 0]  # b c k g dv
    return out.astype(values.dtype).reshape(b, c, hq, values.shape[-1])


def lm_head_kernel(x, head):
    import jax.numpy as jnp

    from models import row_invariant

    with row_invariant.row_invariant_matmuls():
        return row_invariant.matmul(x.astype(jnp.float32), head.astype(jnp.float32))


def main() -> int:
    args = parse()
    simulate_devices_unless_gpu(args.devices)
    import jax
    import numpy as np

    import models.attention
    import models.transformer
    from elastic_moe import Engine, EngineOptions, Request

    cfg, params = model_to_time(args.preset, args.layers, args.max_seq_len)
    devices = jax.devices()[: args.devices]
    print(f"# {cfg.name} x{cfg.num_layers}, {cfg.dtype}, {len(devices)} x {devices[0].device_kind}")
    rng = np.random.default_rng(5)
    prompts = [
        rng.integers(0, cfg.vocab_size, size=int(rng.integers(4, 17))).tolist()
        for _ in range(args.requests)
    ]
    options = EngineOptions(
        request_slots_per_device=-(-args.requests // args.devices), prefill_rows_per_device=4
    )

    def generate(engine, requests):
        for r in requests:
            engine.submit(r)
        while engine.has_work():
            engine.step()
        return [(list(r.generated), list(r.logprobs)) for r in requests]

    for variant in args.variants.split(","):
        if "elementwise" in variant or variant.startswith("+"):
            models.attention.attend = attend_elementwise
        if "LM head" in variant:
            models.transformer.lm_head_logits = lm_head_kernel
        start = time.perf_counter()
        engine = Engine(cfg, params, devices, options)
        decoded = generate(engine, [Request(p, max_tokens=args.max_tokens) for p in prompts])
        pairs = list(zip(prompts, decoded, strict=True))
        again = generate(engine, [Request(p + t[: args.at], max_tokens=1) for p, (t, _) in pairs])
        rows = [
            (t[0], lp[0], d[args.at], dl[args.at])
            for (t, lp), (_, (d, dl)) in zip(again, pairs, strict=True)
        ]
        tokens = sum(a != b for a, _, b, _ in rows)
        bits = sum(a != b for _, a, _, b in rows)
        worst = max(abs(a - b) for _, a, _, b in rows)
        seconds = time.perf_counter() - start
        print(
            f"{variant:32s} token differs {tokens}/{len(prompts)}, logprob bits differ "
            f"{bits}/{len(prompts)}, max |dlogprob| {worst:.3g} ({seconds:.0f} s)",
            flush=True,
        )
        del engine
    return 0


if __name__ == "__main__":
    sys.exit(main())
