"""Compile seconds of one mesh's programs against the layer count (no weights needed).

  python benchmarks/bench_compile.py --preset qwen3-30b-a3b --devices 2 --layers 1,2,4,8
  python benchmarks/bench_compile.py --preset tiny-mixtral --devices 8 --layers 1,2,4

A mesh the standby compiles have not reached costs these seconds on the critical path of a
recovery, and each failure's standby set is one such compile per surviving mesh. For each
layer count this lowers and compiles, from abstract shapes, the decode program and the prefill
program at one prompt length, and prints trace+lower and compile seconds of each, then the
seconds each added layer costs (a least-squares slope). A program whose compile time grew with
depth would show here; a flat one (layers under a scan) would not.
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
    print("layers | decode lower s | decode compile s | prefill lower s | prefill compile s")
    counts, totals = [], []
    for layers in [int(n) for n in args.layers.split(",")]:
        changes = dict(num_layers=layers, max_seq_len=args.max_seq_len)
        if base.first_dense_layers >= layers:  # keep one MoE layer at least
            changes["first_dense_layers"] = layers - 1
        cfg = base.replace(**changes)
        geometry = StepGeometry(
            num_devices=len(devices),
            expert_slots_per_device=-(-cfg.num_experts // len(devices)),
            request_slots_per_device=args.batch_per_device,
            prefill_rows_per_device=args.prefill_rows_per_device,
            max_replicas=1,
            numerics=args.numerics,
        )
        programs = MeshPrograms(cfg, build_mesh(devices), geometry)
        start = time.perf_counter()
        lowered = programs.decode.lower(*programs.abstract_decode_args())
        decode_lower = time.perf_counter() - start
        start = time.perf_counter()
        lowered.compile()
        decode_compile = time.perf_counter() - start
        start = time.perf_counter()
        lowered = programs.prefill.lower(*programs.abstract_prefill_args(args.prompt_length))
        prefill_lower = time.perf_counter() - start
        start = time.perf_counter()
        lowered.compile()
        prefill_compile = time.perf_counter() - start
        print(
            f"{layers:6d} | {decode_lower:14.2f} | {decode_compile:16.2f} | "
            f"{prefill_lower:15.2f} | {prefill_compile:17.2f}",
            flush=True,
        )
        counts.append(layers)
        totals.append(decode_lower + decode_compile + prefill_lower + prefill_compile)
    if len(counts) > 1:
        slope, intercept = np.polyfit(counts, totals, 1)
        print(
            f"both programs: {intercept:.2f} s + {slope:.2f} s per layer "
            f"(at 61 layers, DeepSeek-V3's depth: {intercept + 61 * slope:.0f} s per mesh)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
