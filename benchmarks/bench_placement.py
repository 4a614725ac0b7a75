"""Placement planning on a DeepSeek-V3-like layout: how long a repair takes and what it moves.

    python benchmarks/bench_placement.py [--quick] [--policy survive|balance|auto]

For 256 experts x 58 MoE layers on 32..256 devices with 0..256 redundant slots, lose 1, 2 or 8
random devices and time the whole plan: repair() + plan_transfers() + schedule_rounds().
Pure numpy on the CPU; nothing is transferred.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from mesh.placement import PlacementError, device_load, orphaned_after, place, repair
from mesh.transfer_plan import plan_transfers, schedule_rounds

EXPERTS, LAYERS = 256, 58
DEVICES = (32, 64, 128, 256)
REDUNDANT = (0, 32, 64, 256)
LOSSES = (1, 2, 8)
MAX_REPLICAS = 32  # fixed per model: log2phy is [58, 256, 32] on every mesh
# DeepSeek-V3 routed expert: gate, up and down projections of 7168 x 2048, fp8 (1 byte/param),
# block scales ignored.
BYTES_PER_EXPERT = 3 * 7168 * 2048
ZIPF_EXPONENT = 1.0
TOKENS_PER_LAYER = 65536 * 8  # 65,536 tokens, top-8 routing


def zipf_load(rng: np.random.Generator) -> np.ndarray:
    """[layers, experts] tokens per expert: Zipf popularity, a random expert order per layer."""
    p = 1.0 / np.arange(1, EXPERTS + 1) ** ZIPF_EXPONENT
    p /= p.sum()
    return np.stack([rng.multinomial(TOKENS_PER_LAYER, rng.permutation(p)) for _ in range(LAYERS)])


def imbalance(p, load) -> float:
    """Max over layers of max / mean device load."""
    per_device = device_load(p, load)
    return float((per_device.max(axis=1) / per_device.mean(axis=1)).max())


def plan_once(old, keep, load, policy):
    t0 = time.perf_counter()
    new = repair(old, keep, load, MAX_REPLICAS, policy=policy)
    plan = plan_transfers(old, new, keep)
    rounds = schedule_rounds(plan, new.num_devices, new.slots_per_device)
    return time.perf_counter() - t0, new, plan, rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one timing run per row")
    parser.add_argument(
        "--policy", default="survive", choices=("survive", "balance", "auto"), help="placement"
    )
    args = parser.parse_args()
    repeats = 1 if args.quick else 5
    rng = np.random.default_rng(0)
    load = zipf_load(rng)

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(
        f"layout: {EXPERTS} experts x {LAYERS} MoE layers, max_replicas={MAX_REPLICAS}, "
        f"Zipf(s={ZIPF_EXPONENT}) load from {TOKENS_PER_LAYER} routed tokens per layer (seed 0), "
        f"policy {args.policy}"
    )
    print(
        f"bytes: 1 expert = 3 x 7168 x 2048 params x 1 byte (fp8, scales ignored) = "
        f"{BYTES_PER_EXPERT / 1e6:.1f} MB; GB moved = (device copies + host restores) x that"
    )
    print(f"plan ms = repair + plan_transfers + schedule_rounds, best of {repeats}\n")
    header = (
        f"{'N':>4} {'S':>3} {'R':>4} {'lost':>4} {'plan ms':>8} {'d2d':>6} {'host':>5} "
        f"{'GB moved':>9} {'orphaned':>8} {'rounds':>6} {'imbalance':>16}"
    )
    print(header)
    print("-" * len(header))
    seen = set()
    for n in DEVICES:
        for r in REDUNDANT:
            s = -(-(EXPERTS + r) // n)
            if (n, s) in seen:  # R rounds up to the same S: same layout
                continue
            seen.add((n, s))
            old = place(load, n, s, MAX_REPLICAS, policy=args.policy)
            before = imbalance(old, load)
            for lost_count in LOSSES:
                lost = rng.choice(n, lost_count, replace=False)
                keep = [d for d in range(n) if d not in set(lost.tolist())]
                orphaned = int(orphaned_after(old, lost).sum())
                row = f"{n:>4} {s:>3} {n * s - EXPERTS:>4} {lost_count:>4} "
                try:
                    times = []
                    for _ in range(repeats):
                        elapsed, new, plan, rounds = plan_once(old, keep, load, args.policy)
                        times.append(elapsed)
                except PlacementError as err:
                    print(row + f"{'refused':>8}   {err}")
                    continue
                moved_gb = plan.bytes_moved(BYTES_PER_EXPERT) / 1e9
                print(
                    row + f"{min(times) * 1e3:>8.1f} {plan.experts_copied:>6} "
                    f"{plan.experts_from_host:>5} {moved_gb:>9.1f} {orphaned:>8} "
                    f"{rounds.num_rounds:>6} {before:>7.2f} -> {imbalance(new, load):<6.2f}"
                )
    print(
        "\nd2d: experts copied device to device (summed over layers); host: restored from the "
        "host copy;\norphaned: lost experts with no surviving replica (layer x expert pairs); "
        "imbalance: max/mean device load, before -> after repair (worst layer)"
    )
    if args.policy == "survive":
        print(
            "R >= E gives every expert two replicas (no single loss orphans an expert); at R = E "
            "that leaves\nno slot for load-following replicas, so Zipf(1) load is badly balanced "
            "until a loss brings R below E\n(--policy auto: balance first, at most 2 experts per "
            "layer to restore; see SCALING.md)."
        )


if __name__ == "__main__":
    main()
