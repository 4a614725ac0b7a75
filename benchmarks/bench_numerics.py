"""Do a failure, a rejoin, a smaller mesh or a restart change any token? Both numerics modes.

  python benchmarks/bench_numerics.py --preset qwen3-30b-a3b --layers 4 --devices 2   # GPU
  python benchmarks/bench_numerics.py --preset tiny-deepseek-v3 --devices 2 \\
      --requests 8 --max-tokens 16                                                   # CPU

For each mode ("invariant", "fast") the same requests run, in bf16, as: a failure-free
baseline; the same run again; the submit order reversed (other slots, other devices); one
device instead of N; device N-1 failed before step --fail-at and rejoined before step
--rejoin-at; and (--restart) a fresh process. Each is compared with the baseline: requests
whose tokens changed, and the max |logprob difference| over the requests whose tokens did not
change. Every variant runs twice: all greedy, and a mix where every other request samples with
its own seed (the restart row: invariant mode only). Then the decode step time of both modes at
the full batch (median of --steps).
Real shapes get tiled random weights (models.params.synthetic_params).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import decode_step_timer, model_to_time, simulate_devices_unless_gpu  # noqa: E402

MODES = ("invariant", "fast")
MIXES = ("greedy", "sampled")


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny-deepseek-v3")
    p.add_argument("--layers", type=int, default=0, help="override num_layers (0 = preset's)")
    p.add_argument("--max-seq-len", type=int, default=256, help="override (sizes the KV cache)")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--fail-at", type=int, default=10)
    p.add_argument("--rejoin-at", type=int, default=30)
    p.add_argument("--steps", type=int, default=20, help="decode steps timed per mode")
    p.add_argument("--modes", default="invariant,fast")
    p.add_argument("--no-restart", dest="restart", action="store_false")
    p.add_argument("--child", default="", help=argparse.SUPPRESS)  # restart: write results here
    p.add_argument("--json", default="", help="write the results here too")
    return p.parse_args(argv)


def workload(cfg, args, mix: str) -> list:
    """Prompts of 4 to 16 tokens; in the sampled mix every other request samples (seed i)."""
    import numpy as np

    from elastic_moe import Request, SamplingParams

    rng = np.random.default_rng(11)
    requests = []
    for i in range(args.requests):
        prompt = rng.integers(0, cfg.vocab_size, size=int(rng.integers(4, 17))).tolist()
        sampling = SamplingParams()
        if mix == "sampled" and i % 2 == 1:
            sampling = SamplingParams(temperature=0.8, top_p=0.95, seed=i)
        requests.append(Request(prompt, max_tokens=args.max_tokens, sampling=sampling))
    return requests


def new_engine(cfg, params, devices, args, mode):
    from elastic_moe import Engine, EngineOptions

    options = EngineOptions(
        request_slots_per_device=-(-args.requests // args.devices),
        prefill_rows_per_device=4,
        redundant_experts=cfg.num_experts if len(devices) > 1 else 0,
        numerics=mode,
    )
    return Engine(cfg, params, devices, options)


def run(engine, cfg, args, mix, reverse=False, script=None):
    """[(tokens, logprobs)] in workload order; script(step, coordinator) acts before each step."""
    from elastic_moe.coordinator import Coordinator

    coordinator = Coordinator(engine, standby=False) if script else None
    requests = workload(cfg, args, mix)
    for r in reversed(requests) if reverse else requests:
        engine.submit(r)
    step = 0
    while engine.has_work():
        if script is not None:
            script(step, coordinator)
        engine.step()
        step += 1
    return [(list(r.generated), list(r.logprobs)) for r in requests]


def compare(base, got) -> tuple[int, float]:
    """(requests whose tokens changed, max |logprob difference| over the others)."""
    changed, worst = 0, 0.0
    for (t0, l0), (t1, l1) in zip(base, got, strict=True):
        if t0 != t1:
            changed += 1
        else:
            worst = max([worst, *(abs(a - b) for a, b in zip(l0, l1, strict=True))])
    return changed, worst


def decode_ms(engine, cfg, args) -> float:
    """Median decode step at the full batch (every request slot busy)."""
    return decode_step_timer(engine, 32, args.steps, token=1)()


def restart(args, mode) -> dict:
    """The baselines of `mode`, computed by a fresh process."""
    path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"bench_numerics_{os.getpid()}.json")
    argv, rest = [], iter(sys.argv[1:])
    for a in rest:  # drop "--modes X" and "--modes=X": the child runs `mode` only
        if a == "--modes":
            next(rest, None)
        elif not a.startswith("--modes="):
            argv.append(a)
    command = [sys.executable, os.path.abspath(__file__), *argv, "--modes", mode, "--child", path]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    with open(path) as f:
        return json.load(f)


def main(argv=None) -> int:
    args = parse(argv)
    simulate_devices_unless_gpu(max(args.devices, 1))
    import jax

    from elastic_moe.executables import enable_persistent_cache

    enable_persistent_cache()
    cfg, params = model_to_time(args.preset, args.layers, args.max_seq_len)
    cfg = cfg.replace(dtype="bfloat16")
    if args.preset.startswith("tiny"):
        from models.params import init_params

        params = init_params(cfg)
    devices = jax.devices()[: args.devices]
    modes = args.modes.split(",")
    if args.child:  # a fresh process: only the baselines
        engine = new_engine(cfg, params, devices, args, modes[0])
        with open(args.child, "w") as f:
            json.dump({mix: run(engine, cfg, args, mix) for mix in MIXES}, f)
        return 0

    print(
        f"# {cfg.name} x{cfg.num_layers} layers, bf16, on {len(devices)} x "
        f"{devices[0].device_kind}; {args.requests} requests x {args.max_tokens} tokens; "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}",
        flush=True,
    )
    print(f"{'mode':9s} {'variant':34s} {'mix':7s} {'changed':>9s} {'max |dlogprob|':>14s}")
    rows, speed = [], {}
    n = len(devices)
    for mode in modes:
        engine = new_engine(cfg, params, devices, args, mode)
        started = time.perf_counter()
        base = {mix: run(engine, cfg, args, mix) for mix in MIXES}
        print(f"# {mode}: baselines in {time.perf_counter() - started:.1f} s", flush=True)

        def report(variant, mix, got, mode=mode, base=base):
            changed, worst = compare(base[mix], got)
            rows.append(dict(mode=mode, variant=variant, mix=mix, changed=changed, dlogprob=worst))
            print(
                f"{mode:9s} {variant:34s} {mix:7s} {changed:4d}/{args.requests:<4d} {worst:14.3g}",
                flush=True,
            )

        for mix in MIXES:
            report("the same run again", mix, run(engine, cfg, args, mix))
        for mix in MIXES:
            report("submit order reversed", mix, run(engine, cfg, args, mix, reverse=True))
        speed[mode] = decode_ms(engine, cfg, args)
        print(f"# {mode}: decode step {speed[mode]:.2f} ms at batch {args.requests}", flush=True)
        if n > 1:
            lone = device = devices[-1]

            def script(step, coordinator, device=device):
                if step == args.fail_at:
                    coordinator.fail([device.id], reason="bench_numerics")
                if step == args.rejoin_at:
                    coordinator.rejoin([device.id])

            for mix in MIXES:
                variant = f"fail dev {lone.id} @{args.fail_at}, rejoin @{args.rejoin_at}"
                report(variant, mix, run(engine, cfg, args, mix, script=script))
            del engine
            one = new_engine(cfg, params, devices[:1], args, mode)
            for mix in MIXES:
                report(f"1 device instead of {n}", mix, run(one, cfg, args, mix))
            del one
        if args.restart and mode == "invariant":  # fast makes no promise here
            fresh = restart(args, mode)
            for mix in MIXES:
                report("a fresh process (restart)", mix, [tuple(r) for r in fresh[mix]])
    if len(speed) == 2:
        inv, fast = speed["invariant"], speed["fast"]
        print(
            f"decode tokens/s at batch {args.requests}: invariant {args.requests / inv * 1000:.0f}"
            f" ({inv:.2f} ms), fast {args.requests / fast * 1000:.0f} ({fast:.2f} ms): "
            f"invariant costs {100 * (inv / fast - 1):.1f}%"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config=cfg.name, rows=rows, decode_ms=speed), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
