"""Decode throughput and step time on N devices, against the HBM roofline.

  python benchmarks/bench_decode.py --preset tiny-mixtral --devices 8            # CPU
  python benchmarks/bench_decode.py --preset qwen3-30b-a3b --devices 4 --layers 12 \
      --batch-per-device 16 --max-seq-len 1024 --variants all                     # GPU

Variants (side by side, one process): redundancy 0 vs R = num_experts (primary and spread
replica routing) — the static cost of elasticity — and the same engine after losing one
device (throughput kept vs the ideal (N-1)/N). Real shapes get tiled random weights
(models.params.synthetic_params): the numbers are for timing only.

Columns: step ms, one full-batch decode step launched and waited for (the launch included;
tok/s and % roofline follow it); b2b ms, per step when steps are launched back to back and
waited for once (the device's rate when the host keeps ahead); engine tok/s, the engine's own
loop (steps, read-back, bookkeeping); touched, the share of (MoE layer, expert) pairs the timed
step routes a token to (its inputs: each request's own last token), which the floor counts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    back_to_back_ms,
    copy_gbs,
    decode_step_timer,
    full_batch_decode_inputs,
    model_to_time,
    simulate_devices_unless_gpu,
)


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny-mixtral")
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--layers", type=int, default=0, help="override num_layers (0 = preset's)")
    p.add_argument("--batch-per-device", type=int, default=8)
    p.add_argument("--max-seq-len", type=int, default=0, help="override (sizes the KV cache)")
    p.add_argument("--context", type=int, default=128, help="prompt length of each request")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--variants", default="basic", choices=["basic", "all"])
    p.add_argument(
        "--hbm-gbs",
        type=float,
        default=0.0,
        help="HBM copy GB/s for the roofline (0: measured on the first device, common.copy_gbs)",
    )
    p.add_argument("--json", default="", help="write the results here too")
    p.add_argument(
        "--mla-cache",
        default="",
        choices=["", "latent", "per_head"],
        help="KV cache form of multi-head latent attention (default: the config's, latent)",
    )
    p.add_argument(
        "--numerics",
        default="invariant",
        help="comma list of numerics modes: the R=0 variant runs in each, side by side "
        "(the other variants in the first)",
    )
    p.add_argument(
        "--attention",
        default="auto",
        help="comma list of ELASTIC_MOE_ATTENTION values (auto: the GPU kernel; xla): the R=0 "
        "variant runs with each, side by side",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="alternating rounds of --steps timed steps for the R=0 numerics modes",
    )
    p.add_argument(
        "--overlap-steps",
        action="store_true",
        help="also R=0 with overlap_steps (each step launched before the last is read back)",
    )
    p.add_argument(
        "--layer-programs",
        type=int,
        nargs="?",
        const=1,
        default=0,
        metavar="G",
        help="also R=0 with programs of G layers each (EngineOptions.layers_per_program; G "
        "defaults to 1; with --overlap-steps, overlapped): the launch cost of a chained step",
    )
    p.add_argument(
        "--profile-host",
        action="store_true",
        help="cProfile the engine steps of the first variant: where the host's time goes",
    )
    p.add_argument(
        "--profile-device",
        default="",
        metavar="DIR",
        help="trace the first variant's timed decode steps into DIR and print device time per "
        "named scope (attention, routing, dispatch, grouped_matmul, combine, ...)",
    )
    return p.parse_args()


def main() -> int:
    args = parse()
    if args.variants == "all" and args.devices < 2:
        print(
            "--variants all needs --devices 2 or more: a redundant copy lives on another device "
            "than its expert's primary, and the 'lose one' variant needs a survivor",
            file=sys.stderr,
        )
        return 2
    if args.profile_device:  # the HLO dump names each kernel's scopes; set before jax loads
        from device_profile import dump_flags

        dump = os.path.join(args.profile_device, "hlo")
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " " + dump_flags(dump)
    simulate_devices_unless_gpu(args.devices)
    import jax
    import numpy as np

    from elastic_moe import Engine, EngineOptions, Request
    from elastic_moe.coordinator import Coordinator

    t0 = time.perf_counter()
    cfg, params = model_to_time(args.preset, args.layers, args.max_seq_len)
    if args.mla_cache:  # the parameters are the same for both forms
        cfg = cfg.replace(mla_cache=args.mla_cache)
    print(f"# params ready in {time.perf_counter() - t0:.1f} s", flush=True)
    devices = jax.devices()[: args.devices]
    print(f"# {cfg.name} x{cfg.num_layers} layers on {len(devices)} x {devices[0].device_kind}")
    if cfg.attention == "mla":
        print(f"# MLA cache: {cfg.mla_cache}", flush=True)

    hbm_gbs = args.hbm_gbs or copy_gbs(devices[0])
    print(f"# roofline over {hbm_gbs:,.0f} GB/s copy ({'given' if args.hbm_gbs else 'measured'})")
    modes = args.numerics.split(",")
    attentions = args.attention.split(",")
    os.environ["ELASTIC_MOE_ATTENTION"] = attentions[0]

    def new_engine(redundant, routing, overlap=False, numerics=modes[0], per_program=0):
        options = EngineOptions(
            request_slots_per_device=args.batch_per_device,
            redundant_experts=redundant,
            replica_routing=routing,
            overlap_steps=overlap,
            numerics=numerics,
            layers_per_program=per_program,
        )
        return Engine(cfg, params, devices, options)

    def run_variant(name, redundant, routing, lose_one=False, overlap=False, layers=0):
        engine = new_engine(redundant, routing, overlap, per_program=layers)
        rows = [measure(engine, name)]
        if lose_one:
            coordinator = Coordinator(engine, standby=False)
            coordinator.fail([devices[-1].id])
            rows.append(measure(engine, f"{name}, 1 device lost"))
        del engine
        return rows

    def run_modes():
        """R=0 in every numerics mode and attention implementation, their device steps timed
        in alternating rounds (so a drift of the machine falls on all of them alike)."""
        configs = [(mode, attention) for attention in attentions for mode in modes]
        engines, timers = [], []
        for mode, attention in configs:
            os.environ["ELASTIC_MOE_ATTENTION"] = attention  # read while programs are traced
            engines.append(new_engine(0, "primary", numerics=mode))
            timers.append(prepare(engines[-1]))
        os.environ["ELASTIC_MOE_ATTENTION"] = attentions[0]
        times = [[] for _ in configs]
        for _ in range(args.rounds):
            for timer, collected in zip(timers, times, strict=True):
                collected.append(timer())
        rows = []
        for i, (engine, collected) in enumerate(zip(engines, times, strict=True)):
            mode, attention = configs[i]
            name = "R=0" if i == 0 else f"R=0, {mode}, attention {attention}"
            rows.append(measure(engine, name, device_ms=float(np.median(collected))))
        del engines, timers
        return rows

    profiled: list[str] = []
    traced_once: list[str] = []

    def prepare(engine):
        """Submit and prefill a full batch; returns a timer of decode steps alone (median ms
        of --steps steps, each waited for)."""
        rng = np.random.default_rng(0)
        geometry = engine.mesh.geometry
        b = geometry.num_request_slots
        # Requests are admitted prefill_rows_per_device per device and step, and each step
        # decodes those admitted before: none may finish before the timed engine steps end,
        # or those steps decode fewer rows (batch 256 once ran 1 in 5 rows busy).
        admission = -(-geometry.request_slots_per_device // geometry.prefill_rows_per_device)
        max_tokens = admission + args.steps * 3 + 8
        if args.context + max_tokens > cfg.max_seq_len:
            raise SystemExit(
                f"--context {args.context} + {max_tokens} tokens (admission of "
                f"{geometry.request_slots_per_device} slots per device, then --steps) exceed "
                f"max_seq_len {cfg.max_seq_len}: raise --max-seq-len or lower the batch"
            )
        for _ in range(b):
            prompt = rng.integers(0, cfg.vocab_size, size=args.context).tolist()
            engine.submit(Request(prompt, max_tokens=max_tokens))
        while engine.waiting:  # prefill everyone first
            engine.step()
        return decode_step_timer(engine, args.context, args.steps)

    def measure(engine, name, device_ms=None):
        if device_ms is None:
            device_ms = prepare(engine)()
        pipelined_ms = back_to_back_ms(engine, args.context, args.steps)
        touched = experts_touched(engine, args.context)  # with the timed step's inputs
        mesh = engine.mesh
        b = mesh.geometry.num_request_slots
        if args.profile_device and not traced_once:
            from device_profile import print_summary, traced

            traced_once.append(name)
            trace_dir = os.path.join(args.profile_device, "trace")
            inputs = full_batch_decode_inputs(engine, args.context)
            with traced(trace_dir):
                for _ in range(args.steps):
                    out = mesh.decode(*inputs)
                jax.block_until_ready(out.tokens)
            print(f"# device profile of {args.steps} decode steps, {name}:")
            print_summary(trace_dir, os.path.join(args.profile_device, "hlo"), args.steps)
        profiler = None
        if args.profile_host and not profiled:
            import cProfile

            profiler = cProfile.Profile()
            profiled.append(name)
        start = time.perf_counter()
        produced = 0
        if profiler is not None:
            profiler.enable()
        for _ in range(args.steps):
            produced += len(engine.step())
        engine.settle()  # the last step launched is read back too (overlap_steps)
        produced += len(engine.take_events())
        engine_s = time.perf_counter() - start
        if profiler is not None:
            import pstats

            profiler.disable()
            print(f"# host profile of {args.steps} engine steps, {name}:")
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(14)
        for rid in list(engine.running) + list(engine.waiting):
            engine.abort(rid)
        floor_ms = roofline_ms(cfg, engine, hbm_gbs, args.context + 1, touched)
        return dict(
            variant=name,
            devices=len(engine.mesh.devices),
            batch=b,
            step_ms=device_ms,
            back_to_back_ms=pipelined_ms,
            tokens_per_s=b / (device_ms / 1000),
            engine_tokens_per_s=produced / engine_s,
            floor_ms=floor_ms,
            roofline_pct=100 * floor_ms / device_ms,
            experts_touched_pct=100 * touched / (cfg.num_moe_layers * cfg.num_experts),
        )

    results = run_modes()
    if args.overlap_steps:
        results += run_variant("R=0, overlap_steps", 0, "primary", overlap=True)
    if args.layer_programs:
        overlap = args.overlap_steps
        name = f"R=0, {args.layer_programs} layers/program" + (", overlap" if overlap else "")
        results += run_variant(name, 0, "primary", overlap=overlap, layers=args.layer_programs)
    if args.variants == "all":
        e = cfg.num_experts
        results += run_variant(f"R={e} primary", e, "primary", lose_one=True)
        results += run_variant(f"R={e} spread", e, "spread")
    print_table(results)
    for row in results[1 : len(modes) * len(attentions)]:
        gain = 100 * (results[0]["tokens_per_s"] / row["tokens_per_s"] - 1)
        print(
            f"{results[0]['variant']} ({modes[0]}, attention {attentions[0]}): {gain:+.1f}% "
            f"decode tokens/s against {row['variant']}"
        )
    if args.variants == "all":
        extra = int(args.overlap_steps) + int(args.layer_programs > 0)
        first = len(modes) * len(attentions) + extra  # R=0 rows before
        base, red, lost = results[0], *results[first : first + 2]
        n = red["devices"]
        print(
            f"static cost of redundancy (R={cfg.num_experts}, primary routing): "
            f"{100 * (1 - red['tokens_per_s'] / base['tokens_per_s']):.1f}% of decode tokens/s"
        )
        kept = lost["tokens_per_s"] / red["tokens_per_s"]
        print(
            f"after losing 1 of {n}: {kept:.3f} of before (ideal {(n - 1) / n:.3f}, "
            f"target >= {0.95 * (n - 1) / n:.3f})"
        )
    if args.json:
        with open(args.json, "w") as f:
            summary = dict(config=cfg.name, layers=cfg.num_layers, mla_cache=cfg.mla_cache)
            json.dump(dict(summary, results=results), f, indent=1)
    return 0


def experts_touched(engine, position: int) -> int:
    """(layer, expert) pairs the timed decode step routes at least one token to, counted from
    the step's own expert loads: the synthetic weights route far from uniformly (on one H100,
    mixtral and deepseek-v3 shapes ran faster than a floor that assumed uniform routing)."""
    import numpy as np

    out = engine.mesh.decode(*full_batch_decode_inputs(engine, position))
    return int((np.asarray(out.expert_load) > 0).sum())


def roofline_ms(cfg, engine, hbm_gbs: float, live_tokens: int, touched: int) -> float:
    """Fewest bytes one device must read per decode step, over HBM bandwidth: replicated dense
    weights, its expert slots that tokens touch (`touched` (layer, expert) pairs in the step,
    experts_touched), and the live KV context of each request slot (`live_tokens` positions:
    what the GPU's attention kernel reads; the XLA path reads the whole max_seq_len window,
    which the floor does not grant it)."""
    import jax
    import numpy as np

    from models.kv_cache import kv_bytes_per_token
    from models.params import abstract_params, is_expert_path, path_keys

    itemsize = np.dtype(cfg.dtype).itemsize
    dense = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract_params(cfg)):
        if is_expert_path(path) or path_keys(path)[0] == "embed":
            continue
        dense += int(np.prod(leaf.shape)) * leaf.dtype.itemsize
    dense += engine.mesh.geometry.request_slots_per_device * cfg.d_model * itemsize  # embed rows
    geometry = engine.mesh.geometry
    # Slots a step reads: each touched expert's primary replica (primary routing), or about
    # every replica of it (spread routing).
    replicas = (
        1
        if engine.options.replica_routing in ("primary", "auto")
        else geometry.num_expert_slots / cfg.num_experts
    )
    expert_bytes = cfg.expert_bytes() * touched * replicas / geometry.num_devices
    kv = (
        geometry.request_slots_per_device
        * live_tokens
        * kv_bytes_per_token(cfg)  # the cache form's layout (MLA: latent or per head)
        * cfg.num_layers
    )
    return 1000 * (dense + expert_bytes + kv) / (hbm_gbs * 1e9)


def print_table(rows) -> None:
    head = (
        f"{'variant':28s} {'dev':>3s} {'batch':>5s} {'step ms':>8s} {'b2b ms':>7s} {'tok/s':>9s} "
        f"{'engine tok/s':>12s} {'touched':>7s} {'floor ms':>8s} {'% roofline':>10s}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['variant']:28s} {r['devices']:3d} {r['batch']:5d} {r['step_ms']:8.2f} "
            f"{r['back_to_back_ms']:7.2f} "
            f"{r['tokens_per_s']:9.0f} {r['engine_tokens_per_s']:12.0f} "
            f"{r['experts_touched_pct']:6.1f}% {r['floor_ms']:8.3f} "
            f"{r['roofline_pct']:9.1f}%"
        )


if __name__ == "__main__":
    sys.exit(main())
