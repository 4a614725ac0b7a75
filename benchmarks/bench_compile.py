"""Compile seconds of one mesh's programs against the layer count (no weights needed).

  python benchmarks/bench_compile.py --preset qwen3-30b-a3b --devices 2 --layers 1,2,4,8
  python benchmarks/bench_compile.py --preset deepseek-v3 --devices 2 --layers 4,16,61 \
      --modes layer
  python benchmarks/bench_compile.py --preset tiny-mixtral --devices 8 --layers 1,2,4

A mesh the standby compiles have not reached costs these seconds on the critical path of a
recovery, and each failure's standby set is one such compile per surviving mesh. For each
layer count and each program form (`--modes`: "step", one program with every layer unrolled;
"layer", programs of --layers-per-program layers chained per step,
elastic_moe/layer_programs.py) this
builds, from abstract shapes, what a mesh compiles before it serves: the decode program and
the prefill program at one prompt length (with their sampling programs), and prints the
seconds of each (trace, lower and compile), then the seconds each added layer costs (a
least-squares slope). The unrolled form grows with depth; the chained one should not.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import simulate_devices_unless_gpu  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="tiny-mixtral")
    p.add_argument("--devices", type=int, default=2)
    p.add_argument("--layers", default="1,2,4")
    p.add_argument("--batch-per-device", type=int, default=16)
    p.add_argument("--prefill-rows-per-device", type=int, default=4)
    p.add_argument("--prompt-length", type=int, default=32, help="the prefill program's length")
    p.add_argument("--max-seq-len", type=int, default=1024)
    p.add_argument("--numerics", default="invariant", choices=["invariant", "fast"])
    p.add_argument("--modes", default="step,layer", help="comma list of step, layer")
    p.add_argument(
        "--layers-per-program", type=int, default=1, help="layers per program of the layer mode"
    )
    return p.parse_args()


def main() -> int:
    args = parse()
    simulate_devices_unless_gpu(args.devices)
    import jax
    import numpy as np

    from elastic_moe.steps import MeshPrograms, StepGeometry
    from mesh.device_mesh import build_mesh
    from models.presets import get_preset

    devices = jax.devices()[: args.devices]
    base = get_preset(args.preset)
    print(f"# {base.name} on {len(devices)} x {devices[0].device_kind}, jax {jax.__version__}")
    modes = args.modes.split(",")
    if set(modes) - {"step", "layer"}:
        raise SystemExit(f"--modes takes step and layer, got {args.modes!r}")
    print("mode  | layers | decode s | prefill s | both s")
    counts: dict[str, list[int]] = {m: [] for m in modes}
    totals: dict[str, list[float]] = {m: [] for m in modes}
    for layers in [int(n) for n in args.layers.split(",")]:
        changes = dict(num_layers=layers, max_seq_len=args.max_seq_len)
        if base.first_dense_layers >= layers:  # keep one MoE layer at least
            changes["first_dense_layers"] = layers - 1
        cfg = base.replace(**changes)
        for mode in modes:
            geometry = StepGeometry(
                num_devices=len(devices),
                expert_slots_per_device=-(-cfg.num_experts // len(devices)),
                request_slots_per_device=args.batch_per_device,
                prefill_rows_per_device=args.prefill_rows_per_device,
                max_replicas=1,
                numerics=args.numerics,
                layers_per_program=args.layers_per_program if mode == "layer" else 0,
            )
            programs = MeshPrograms(cfg, build_mesh(devices), geometry)
            start = time.perf_counter()
            programs.compile_decode()
            decode = time.perf_counter() - start
            start = time.perf_counter()
            programs.compile_prefill(args.prompt_length)
            prefill = time.perf_counter() - start
            both = decode + prefill
            row = f"{mode:5} | {layers:6d} | {decode:8.2f} | {prefill:9.2f} | {both:6.2f}"
            print(row, flush=True)
            counts[mode].append(layers)
            totals[mode].append(decode + prefill)
    for mode in modes:
        if len(counts[mode]) > 1:
            slope, intercept = np.polyfit(counts[mode], totals[mode], 1)
            print(
                f"{mode}: both programs {intercept:.2f} s + {slope:.3f} s per layer "
                f"(at 61 layers, DeepSeek-V3's depth: {intercept + 61 * slope:.0f} s per mesh)"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
