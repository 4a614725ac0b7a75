"""The three scaling questions of elastic expert parallelism, on simulated placements.

    python benchmarks/bench_scaling.py [--quick]

Pure numpy on the CPU; nothing is transferred, transfer times come from a link model:
every device has its own links and they run in parallel, so a transfer takes the busiest
device's bytes over the link bandwidth (NVLink 450 GB/s per direction, PCIe 5 55 GB/s).
Expert size: a DeepSeek-V3 / Kimi-K2 routed expert, 3 x 7168 x 2048 parameters in FP8.
Loads: tokens per expert drawn from Zipf(s) or lognormal(sigma) shares of 524,288 routed
tokens per layer, a random expert order per layer (seed 0). max_replicas follows the engine:
min(N, R + 1).

Sections (SCALING.md reads them):
  targets   R = E, 256 experts x 58 layers on 32..256 devices: balance and restore per policy
  no-cliff  balance as R grows, 32 and 64 devices (auto vs survive)
  Q1        what one loss costs to redistribute: critical path, then budgeted background steps
  Q2        several devices lost at once: what each R survives without a host restore
  Q3        where the scaling limit is, up to 1,024 devices and 384 experts
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from mesh.move_budget import copies_per_step, repair_in_steps, restore_orphans
from mesh.placement import orphaned_after, place, repair, survivors_only
from mesh.placement_policy import placement_figures
from mesh.transfer_plan import plan_transfers

BYTES_PER_EXPERT = 3 * 7168 * 2048  # 44.0 MB in FP8, block scales ignored
NVLINK, PCIE = 450e9, 55e9  # bytes/s per device and direction
TOKENS_PER_LAYER = 65536 * 8
MODELS = {256: 58, 384: 60}  # experts: MoE layers (DeepSeek-V3, Kimi K2)
POLICIES = ("survive", "balance", "auto")


def make_load(kind: str, experts: int, layers: int, rng: np.random.Generator) -> np.ndarray:
    """[layers, experts] tokens per expert. kind: "zipf1", "zipf0.6" or "lognormal0.8"."""
    if kind.startswith("zipf"):
        base = 1.0 / np.arange(1, experts + 1) ** float(kind[4:])
        shares = [rng.permutation(base) for _ in range(layers)]
    else:
        shares = [rng.lognormal(0.0, float(kind[9:]), experts) for _ in range(layers)]
    return np.stack([rng.multinomial(TOKENS_PER_LAYER, p / p.sum()) for p in shares]).astype(float)


def mesh_shape(experts: int, devices: int, redundant: int) -> tuple[int, int, int]:
    """(S, R, max_replicas): S slots per device holding E + R (R rounded up to whole slots)."""
    s = max(1, -(-(experts + redundant) // devices))
    r = devices * s - experts
    return s, r, min(devices, r + 1)


def timed(fn, *args, repeats=1, **kwargs):
    """(result, best ms of `repeats` runs)."""
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        best = min(best, time.perf_counter() - t0)
    return out, best * 1e3


def link_ms(plan, new) -> tuple[float, float, float, float]:
    """(host GB, host ms over PCIe, d2d GB, d2d ms over NVLink) of a transfer plan: the
    busiest device's bytes (received from the host; sent or received between devices)."""
    s, n = new.slots_per_device, new.num_devices
    dst = np.broadcast_to(np.arange(new.num_slots) // s, plan.from_host.shape)
    host = np.bincount(dst[plan.from_host], minlength=n)
    copied = plan.source_slot >= 0
    recv = np.bincount(dst[copied], minlength=n)
    send = np.bincount(plan.source_slot[copied] // s, minlength=n)
    busiest = max(int(np.maximum(recv, send).max()), 0)
    b = BYTES_PER_EXPERT
    return (
        host.sum() * b / 1e9,
        host.max() * b / PCIE * 1e3,
        copied.sum() * b / 1e9,
        busiest * b / NVLINK * 1e3,
    )


def after_loss(old, lost, load, max_replicas):
    """(placement serving every expert on the survivors, keep, ms): zero-copy if possible,
    else the orphans restored from the host (the critical path of a loss)."""
    keep = [d for d in range(old.num_devices) if d not in set(lost)]
    t0 = time.perf_counter()
    now = survivors_only(old, keep, max_replicas)
    if now is None:
        now = restore_orphans(old, keep, load, max_replicas)
    return now, keep, (time.perf_counter() - t0) * 1e3


def section_targets(rng, repeats):
    print("\n== targets: R = E, 256 experts x 58 MoE layers ==")
    print(
        "imbalance: max/mean device load, worst layer; primary: the same under primary routing "
        "(floor: the heaviest expert alone);\nrestore: most experts one device loss leaves with "
        "no replica (worst layer), GB: restored from the host after the worst single loss"
    )
    head = (
        f"{'load':>13} {'N':>4} {'S':>3} {'policy':>8} {'imbalance':>9} {'primary':>8} "
        f"{'floor':>6} {'restore':>7} {'GB':>5} {'place ms':>8} {'meets':>5}"
    )
    print(head)
    print("-" * len(head))
    for kind in ("zipf1", "zipf0.6", "lognormal0.8"):
        load = make_load(kind, 256, 58, rng)
        for n in (32, 64, 128, 256):
            s, _, cap = mesh_shape(256, n, 256)
            for policy in POLICIES:
                p, ms = timed(place, load, n, s, cap, policy=policy, repeats=repeats)
                f = placement_figures(p, load)
                ok = f.imbalance.max() <= 1.3 and f.worst_restore.max() <= 2
                gb = f.worst_restore_total * BYTES_PER_EXPERT / 1e9
                print(
                    f"{kind:>13} {n:>4} {s:>3} {policy:>8} {f.imbalance.max():>9.3f} "
                    f"{f.primary_imbalance.max():>8.2f} {f.primary_floor.max():>6.2f} "
                    f"{f.worst_restore.max():>7} {gb:>5.1f} "
                    f"{ms:>8.1f} {'yes' if ok else 'no':>5}"
                )
    load = make_load("zipf1", 256, 58, rng)
    p = place(load, 256, 2, 32, policy="auto")
    f = placement_figures(p, load)
    print(
        f"with max_replicas=32 (bench_placement.py's fixed table width) at 256 devices, Zipf(1): "
        f"imbalance {f.imbalance.max():.3f}; the heaviest expert's share over 32 replicas is "
        f"{(load.max(axis=1) / 32 / (load.sum(axis=1) / 256)).max():.2f} x the mean device load"
    )


def section_no_cliff(rng):
    print("\n== no cliff: balance as R grows (Zipf(1), 256 experts x 58 layers) ==")
    load = make_load("zipf1", 256, 58, rng)
    head = f"{'N':>4} {'S':>3} {'R':>5} {'survive':>8} {'auto':>7} {'auto restore':>12}"
    print(head)
    print("-" * len(head))
    for n in (32, 64):
        for s in range(256 // n, 3 * 256 // n + 1, max(1, 32 // n)):
            cap = min(n, n * s - 256 + 1)
            row = f"{n:>4} {s:>3} {n * s - 256:>5}"
            for policy in ("survive", "auto"):
                f = placement_figures(place(load, n, s, cap, policy=policy), load)
                row += f" {f.imbalance.max():>7.3f}"
            print(row + f" {f.worst_restore.max():>12}")


def section_q1(rng, budget_gb):
    print("\n== Q1: what one device loss costs to redistribute (Zipf(1), R = E) ==")
    print(
        "critical: before serving again (zero-copy survivors, else host restores of orphans); "
        "background: the repair to full balance and redundancy, device to device"
    )
    head = (
        f"{'E':>4} {'N':>5} {'policy':>8} {'crit ms':>7} {'host GB':>7} {'PCIe ms':>7} "
        f"{'bg copies':>9} {'bg GB':>6} {'NVLink ms':>9} {'steps':>5} {'plan ms':>7} "
        f"{'imb: loss':>9} {'1/4':>6} {'1/2':>6} {'end':>6} {'restore':>7}"
    )
    print(head)
    print("-" * len(head))
    per_step = copies_per_step(budget_gb * 1e9, BYTES_PER_EXPERT)
    for experts, layers in MODELS.items():
        load = make_load("zipf1", experts, layers, rng)
        for n in (32, 64, 128, 256, 1024):
            s, _, cap = mesh_shape(experts, n, experts)
            for policy in ("survive", "auto"):
                old = place(load, n, s, cap, policy=policy)
                lost = [int(rng.integers(n))]
                now, keep, crit_ms = after_loss(old, lost, load, cap)
                host_gb, host_ms, _, _ = link_ms(plan_transfers(old, now, keep), now)
                ident = list(range(n - 1))
                t0 = time.perf_counter()
                target = repair(now, ident, load, cap, policy=policy)
                steps = repair_in_steps(now, target, load, per_step)
                plan_ms = (time.perf_counter() - t0) * 1e3
                _, _, bg_gb, bg_ms = link_ms(plan_transfers(now, target, ident), target)
                curve = [now, *steps]
                imb = [
                    placement_figures(curve[i], load).imbalance.max()
                    for i in (0, len(steps) // 4, len(steps) // 2, len(steps))
                ]
                end = placement_figures(curve[-1], load)
                copies = int((now.phy2log != target.phy2log).sum())
                print(
                    f"{experts:>4} {n:>5} {policy:>8} {crit_ms:>7.1f} {host_gb:>7.2f} "
                    f"{host_ms:>7.1f} {copies:>9} {bg_gb:>6.1f} {bg_ms:>9.1f} {len(steps):>5} "
                    f"{plan_ms:>7.0f} {imb[0]:>9.3f} {imb[1]:>6.3f} {imb[2]:>6.3f} "
                    f"{imb[3]:>6.3f} {end.worst_restore.max():>7}"
                )
    print(
        f"steps: background repair cut into steps of at most {per_step} copies "
        f"({budget_gb:g} GB); imb: max/mean device load right after the loss, after 1/4 and 1/2 "
        "of the steps, at the end; restore: worst single-loss restore per layer at the end"
    )


def section_q2(rng, draws):
    print("\n== Q2: several devices lost at once (Zipf(1), 256 experts x 58 layers) ==")
    print(
        "sure: losses survived without a host restore whichever devices die (min replicas - 1); "
        f"random k: share of {draws} random draws with no host restore, then mean / max GB "
        "restored and the PCIe ms of the worst draw"
    )
    load = make_load("zipf1", 256, 58, rng)
    ks = (1, 2, 4, 8, 16)
    head = f"{'N':>4} {'R':>4} {'policy':>8} {'sure':>4} " + " ".join(
        f"{f'k={k}: ok  GB mean/max   ms':>27}" for k in ks
    )
    print(head)
    print("-" * len(head))
    for n in (64, 256):
        shapes = {mesh_shape(256, n, redundant) for redundant in (128, 256, 512)}
        for s, r, cap in sorted(shapes):  # R rounds up to whole slots: one row per S
            for policy in ("survive", "auto"):
                old = place(load, n, s, cap, policy=policy)
                row = f"{n:>4} {r:>4} {policy:>8} {int(old.replica_count.min()) - 1:>4} "
                for k in ks:
                    if (n - k) * s < 256:
                        row += f"{'too few slots':>27} "
                        continue
                    gb, ms = [], []
                    for _ in range(draws):
                        lost = rng.choice(n, k, replace=False).tolist()
                        orphans = int(orphaned_after(old, lost).sum())
                        if orphans:
                            now, keep, _ = after_loss(old, lost, load, cap)
                            host_gb, host_ms, _, _ = link_ms(plan_transfers(old, now, keep), now)
                        else:
                            host_gb, host_ms = 0.0, 0.0
                        gb.append(host_gb)
                        ms.append(host_ms)
                    ok = np.mean(np.array(gb) == 0)
                    row += f"{ok:>8.0%} {np.mean(gb):>6.1f}/{max(gb):>5.1f} {max(ms):>5.0f} "
                print(row)


def section_q3(rng, repeats):
    print("\n== Q3: where the scaling limit is (auto policy, Zipf(1), R = E) ==")
    print(
        "place ms: fresh placement (best of 3); loss ms: critical plan of one loss (survivors or "
        "orphans restored + transfer plan);\nbg plan ms: background target repair + budgeted "
        "steps (5 GB); host / bg NVLink ms: the loss's transfers, busiest device;\n"
        "standby: executables compiled ahead, one per single-failure mesh (N); compile s: not "
        "measurable on this CPU, to fill from GPU runs"
    )
    head = (
        f"{'E':>4} {'N':>5} {'S':>3} {'R':>5} {'place ms':>8} {'loss ms':>7} {'bg plan ms':>10} "
        f"{'imbalance':>9} {'restore':>7} {'host ms':>7} {'bg NVLink ms':>12} {'standby':>7} "
        f"{'compile s':>9}"
    )
    print(head)
    print("-" * len(head))
    per_step = copies_per_step(5e9, BYTES_PER_EXPERT)
    for experts, layers in MODELS.items():
        load = make_load("zipf1", experts, layers, rng)
        for n in (32, 64, 128, 256, 512, 1024):
            s, r, cap = mesh_shape(experts, n, experts)
            old, place_ms = timed(place, load, n, s, cap, policy="auto", repeats=repeats)
            f = placement_figures(old, load)
            lost = [int(rng.integers(n))]
            t0 = time.perf_counter()
            now, keep, _ = after_loss(old, lost, load, cap)
            crit = plan_transfers(old, now, keep)
            loss_ms = (time.perf_counter() - t0) * 1e3
            _, host_ms, _, _ = link_ms(crit, now)
            ident = list(range(n - 1))
            t0 = time.perf_counter()
            target = repair(now, ident, load, cap, policy="auto")
            repair_in_steps(now, target, load, per_step)
            repair_ms = (time.perf_counter() - t0) * 1e3
            _, _, _, bg_ms = link_ms(plan_transfers(now, target, ident), target)
            print(
                f"{experts:>4} {n:>5} {s:>3} {r:>5} {place_ms:>8.0f} {loss_ms:>7.0f} "
                f"{repair_ms:>10.0f} {f.imbalance.max():>9.3f} {f.worst_restore.max():>7} "
                f"{host_ms:>7.1f} {bg_ms:>12.1f} {n:>7} {'-':>9}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer draws and timing runs")
    parser.add_argument("--budget-gb", type=float, default=5.0, help="bytes per repair step")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs")
    print(
        f"expert: 3 x 7168 x 2048 params, fp8 = {BYTES_PER_EXPERT / 1e6:.1f} MB; links: "
        f"NVLink {NVLINK / 1e9:.0f} GB/s, PCIe 5 {PCIE / 1e9:.0f} GB/s per device and direction"
    )
    section_targets(rng, repeats=1 if args.quick else 3)
    section_no_cliff(rng)
    section_q1(rng, args.budget_gb)
    section_q2(rng, draws=5 if args.quick else 20)
    section_q3(rng, repeats=1 if args.quick else 3)


if __name__ == "__main__":
    main()
