"""On real accelerators: the sharded model equals the one-device float32 reference, and a
failure + rejoin changes no token. Run before timing anything on a new machine.

  python benchmarks/gpu_check.py --devices 4
"""

from __future__ import annotations

import argparse
import sys


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--devices", type=int, default=4)
    args = p.parse_args()
    import jax
    import jax.numpy as jnp
    import numpy as np

    from elastic_moe import Engine, EngineOptions, Request, SamplingParams
    from elastic_moe.coordinator import Coordinator
    from models.params import init_params
    from models.presets import get_preset
    from models.reference import forward_logits

    jax.config.update("jax_default_matmul_precision", "highest")
    devices = jax.devices()[: args.devices]
    print(f"devices: {len(devices)} x {devices[0].device_kind}")
    ok = True
    for preset in ("tiny-mixtral", "tiny-qwen3-moe", "tiny-deepseek-v3"):
        cfg = get_preset(preset)
        params = init_params(cfg)
        rng = np.random.default_rng(0)
        prompts = [rng.integers(0, cfg.vocab_size, size=int(n)).tolist() for n in (5, 17, 30, 9)]
        options = EngineOptions(request_slots_per_device=2, redundant_experts=cfg.num_experts)

        def run(fail: bool, cfg=cfg, params=params, options=options, prompts=prompts):
            engine = Engine(cfg, params, devices, options)
            coordinator = Coordinator(engine, standby=False)
            reqs = [
                engine.submit(Request(q, 16, SamplingParams(temperature=0.7 * (i % 2), seed=i)))
                for i, q in enumerate(prompts)
            ]
            step = 0
            while engine.has_work():
                if fail and step == 3:
                    coordinator.fail([devices[1].id])
                if fail and step == 8:
                    coordinator.rejoin([devices[1].id])
                engine.step()
                step += 1
            return reqs

        base = run(False)
        after = run(True)
        same = [r.generated for r in base] == [r.generated for r in after]
        padded = np.zeros((len(base), 64), np.int32)
        for i, r in enumerate(base):
            padded[i, : len(r.context)] = r.context
        ref = np.asarray(forward_logits(cfg, jax.tree.map(jnp.asarray, params), padded))
        worst = 0.0
        for i, r in enumerate(base):
            logp = jax.nn.log_softmax(ref[i], axis=-1)
            for t, (tok, lp) in enumerate(zip(r.generated, r.logprobs, strict=True)):
                want = float(logp[len(r.prompt) - 1 + t, tok])
                worst = max(worst, abs(lp - want) / max(1.0, abs(want)))
        good = same and worst < 1e-4
        ok &= good
        print(
            f"{preset:18s} failure+rejoin tokens equal: {same}; "
            f"logprob vs 1-device ref: {worst:.2e}"
        )
    print("GPU CHECK", "PASSED" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
