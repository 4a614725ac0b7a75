"""Placement policies: how much redundancy follows load and how much buys cheap survival.

E experts, N devices of S slots, R = N*S - E redundant slots, cap = min(N, max_replicas).
A *lone* expert has one replica: losing its device means restoring it from the host copy.
An expert with two or more replicas (on distinct devices) survives any single loss. So the
host restore after losing device d is the number of lone experts on d, and

    worst single-loss restore (per layer) = max over devices of lone experts held.

Policies (`policy_counts`; `mesh.placement.place` / `repair` take `policy=`):
  * "survive": `mesh.placement.replica_counts` (every expert twice once R >= E; zero-copy
    single loss, but at R = E no slot is left to follow load).
  * "balance": pure EPLB: every slot beyond the first replica goes to the expert with the
    highest load / replicas. Lowest max load per replica; lone experts land anywhere.
  * "auto" (restore budget B, default 2 experts per layer): exactly u experts are lone (the u
    coldest, capped at one replica), the others get at least two, EPLB hands out the rest.
    u is taken from the candidates below, per layer the one with the lowest max load per
    replica (ties: fewer lone experts):
        lo = max(0, E - R)                    (two replicas for E - u experts must fit)
        hi = min(E, (E*cap - N*S) / (cap-1),   (the caps must fill every slot)
                 B*N + max(0, E - R))          (the allowance, see below)
        multiples of N in [lo, hi]; {lo, hi} if there is none.
    The allowance is a ramp: the first B*N redundant slots follow load; the next E - B*N go
    to second replicas until R = E; beyond, every slot follows load. `place` deals the lone
    experts after all others, so they fill whole rounds (one item per device per round).
    If S <= B a device cannot hold more than B experts: "auto" is "balance".

What "auto" promises (checked by tests/test_placement_policy.py):
  1. Restore: no device holds more than ceil(u / N) lone experts, so the worst single-loss
     restore is at most B + ceil(max(0, E - R) / N), i.e. at most B once R >= E (or S if
     that is smaller). `repair(policy="auto")` keeps the same allowance by swapping a lone
     expert with a replica of a shared one (two more copies per swap).
  2. Balance: max w = max load / replicas is the lowest any layout with u lone experts can
     have (EPLB's greedy is optimal for min max w under per-expert floors and caps; the u
     coldest are the best lone set). With u a multiple of N the lone experts fill whole
     rounds, each round is still dealt heaviest item to lightest device, and the bound of
     mesh/placement.py holds: max device load <= mean + max w. With the {lo, hi} fallback one
     round mixes both kinds: max device load - min device load <= 2 max w.
  3. No cliff: for fixed N, load and B, max w never grows with S. Going from S to S + 1
     (R + N), the best u at S is still allowed (u <= hi - N) and N more slots can only lower
     max w; otherwise u - N is allowed and the N slots give its N heaviest lone experts a
     second replica, which cannot raise max w either.

Primary routing (`mesh.placement.primary_first`): at decode the engine sends all of an
expert's tokens to its column-0 replica, so extra replicas of a hot expert only give the
greedy more devices to choose from, and no layout beats max(1, heaviest expert / mean device
load). `placement_figures` reports that floor beside the measured figure; which routing wins
at which batch size (reading each expert once vs splitting the hot ones) is a GPU measurement.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mesh.placement import (
    Placement,
    _counts_above_threshold,
    _greedy_counts,
    check_slots,
    device_load,
    orphaned_by_loss,
    primary_first,
    replica_counts,
)

POLICIES = ("auto", "balance", "survive")


def policy_counts(
    load: np.ndarray,
    num_devices: int,
    slots_per_device: int,
    cap: int,
    policy: str = "auto",
    restore_budget: int = 2,
) -> np.ndarray:
    """[layers, num_experts] int64 replica counts, each layer summing to N*S.

    load: [layers, num_experts] float, non-negative. cap: the most replicas one expert may
    get (the caller passes min(num_devices, max_replicas)). restore_budget: B, used by "auto".
    """
    n, s = int(num_devices), int(slots_per_device)
    layers, experts = load.shape
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if int(restore_budget) < 0:
        raise ValueError(f"restore_budget must be >= 0, got {restore_budget}")
    if policy == "survive":
        return replica_counts(load, n * s, cap)
    check_slots(n * s, experts, cap)
    if policy == "balance" or s <= restore_budget:
        return _eplb(load, n * s, np.ones(load.shape, dtype=np.int64), cap)
    best, best_w = None, None
    for lone in lone_choices(experts, n, s, cap, restore_budget):
        counts = counts_with_lone(load, n * s, cap, lone)
        w = (load / counts).max(axis=1)  # [layers] max load per replica
        if best is None:
            best, best_w = counts, w
            continue
        better = w < best_w * (1 - 1e-12)  # ties keep the fewer lone experts
        best[better], best_w[better] = counts[better], w[better]
    return best


def lone_choices(
    num_experts: int, num_devices: int, slots_per_device: int, cap: int, restore_budget: int
) -> list[int]:
    """Candidate numbers u of lone experts for "auto", smallest first (module docstring)."""
    e, n, s = int(num_experts), int(num_devices), int(slots_per_device)
    r = n * s - e
    lo = max(0, e - r)
    hi = e if cap < 2 else min(e, (e * cap - n * s) // (cap - 1))
    hi = min(hi, int(restore_budget) * n + max(0, e - r))
    aligned = list(range(-(-lo // n) * n, hi + 1, n))
    return aligned or sorted({lo, hi})


def counts_with_lone(load: np.ndarray, num_slots: int, cap: int, lone) -> np.ndarray:
    """[layers, num_experts] EPLB counts with exactly `lone` experts (the coldest) at one
    replica and every other at two or more.

    load: [layers, num_experts]; lone: int or [layers] int; ties: the higher index is colder.
    """
    layers, experts = load.shape
    index = np.broadcast_to(np.arange(experts), load.shape)
    order = np.lexsort((index, -load), axis=-1)  # heaviest first
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, index, axis=1)
    is_lone = rank >= experts - np.asarray(lone).reshape(-1, 1)
    floor = np.where(is_lone, 1, min(2, cap)).astype(np.int64)
    return _eplb(load, num_slots, floor, np.where(is_lone, 1, cap))


def _eplb(load, num_slots, floor, cap):
    """EPLB greedy from `floor` [layers, num_experts] up to num_slots, caps int or array."""
    counts = floor.copy()
    extra = num_slots - counts.sum(axis=1)
    if (extra < 0).any():
        raise ValueError(f"floors need {counts.sum(axis=1).max()} slots, have {num_slots}")
    if extra.any():
        counts += _counts_above_threshold(load, extra, counts, cap)
        counts = _greedy_counts(load, counts, num_slots, cap)
    return counts


def lone_allowance(counts: np.ndarray, num_devices: int) -> np.ndarray:
    """[layers] int: ceil(lone experts / num_devices), the most any device should hold.

    counts: [layers, num_experts] replica counts.
    """
    return -(-(counts == 1).sum(axis=1) // int(num_devices))


def spread_lone(
    phy: np.ndarray,
    counts: np.ndarray,
    weight: np.ndarray,
    num_devices: int,
    slots_per_device: int,
    allowance: np.ndarray,
) -> np.ndarray:
    """phy2log with no device holding more lone experts than `allowance` allows.

    A device over its allowance swaps a lone expert with a shared expert's replica on a device
    under it (one always exists: the over device has fewer shared experts than the under one,
    so some shared expert of the under device is not on the over device); of all such pairs
    the swap that leaves the two devices' larger load smallest. Counts are unchanged.
    phy: [layers, num_slots]; counts, weight: [layers, num_experts] (weight = load / counts);
    allowance: [layers] int, with sum of lone experts <= num_devices * allowance.
    Returns a new [layers, num_slots] array.
    """
    n, s = int(num_devices), int(slots_per_device)
    phy = np.array(phy, dtype=np.int64).reshape(phy.shape[0], n, s)
    lone = counts == 1
    for layer in range(phy.shape[0]):
        on = phy[layer]  # [n, s] view, edited in place
        is_lone = lone[layer][on]
        held = is_lone.sum(axis=1)
        limit = int(allowance[layer])
        if (held <= limit).all():
            continue
        dev_load = weight[layer][on].sum(axis=1)
        while (held > limit).any():
            over = int(np.argmax(held))
            under = np.flatnonzero(held < limit)  # [u]
            w1 = np.where(is_lone[over], weight[layer][on[over]], np.nan)  # [s]
            w2 = weight[layer][on[under]]  # [u, s]
            ok2 = ~is_lone[under] & ~np.isin(on[under], on[over])
            new_over = dev_load[over] - w1[None, :, None] + w2[:, None, :]  # [u, s, s]
            new_under = dev_load[under][:, None, None] + w1[None, :, None] - w2[:, None, :]
            score = np.where(ok2[:, None, :], np.maximum(new_over, new_under), np.inf)
            score = np.where(np.isnan(score), np.inf, score)
            k, q1, q2 = np.unravel_index(np.argmin(score), score.shape)
            d2 = int(under[k])
            dev_load[over], dev_load[d2] = new_over[k, q1, q2], new_under[k, q1, q2]
            on[over, q1], on[d2, q2] = on[d2, q2], on[over, q1]
            is_lone[over, q1], is_lone[d2, q2] = False, True
            held[over] -= 1
            held[d2] += 1
    return phy.reshape(phy.shape[0], n * s)


@dataclass(frozen=True)
class PlacementFigures:
    """What a placement costs, per layer.

    imbalance: [layers] max / mean device load, tokens split evenly over an expert's replicas.
    primary_imbalance: [layers] the same when `primary_first`'s column 0 serves every token.
    primary_floor: [layers] no layout does better under primary routing:
        max(1, heaviest expert / mean device load).
    worst_restore: [layers] int, the most experts a single device loss leaves with no replica.
    worst_restore_total: experts restored from the host after the worst single device loss,
        summed over layers (max over devices of the per-device sum).
    """

    imbalance: np.ndarray
    primary_imbalance: np.ndarray
    primary_floor: np.ndarray
    worst_restore: np.ndarray
    worst_restore_total: int


def placement_figures(p: Placement, load: np.ndarray) -> PlacementFigures:
    """Balance (spread and primary routing) and single-loss restore of a placement.

    load: [layers, num_experts] float, tokens per expert.
    """
    load = np.asarray(load, dtype=np.float64)
    mean = load.sum(axis=1) / p.num_devices  # [layers]
    safe = np.where(mean > 0, mean, 1.0)
    spread = device_load(p, load).max(axis=1) / safe
    first = primary_first(p, load)[:, :, 0] // p.slots_per_device  # [layers, experts]
    primary = np.zeros((p.num_layers, p.num_devices))
    np.add.at(primary, (np.arange(p.num_layers)[:, None], first), load)
    orphans = orphaned_by_loss(p)  # [layers, devices, experts]
    return PlacementFigures(
        imbalance=np.where(mean > 0, spread, 1.0),
        primary_imbalance=np.where(mean > 0, primary.max(axis=1) / safe, 1.0),
        primary_floor=np.where(mean > 0, np.maximum(1.0, load.max(axis=1) / safe), 1.0),
        worst_restore=orphans.sum(axis=2).max(axis=1),
        worst_restore_total=int(orphans.sum(axis=(0, 2)).max()),
    )
