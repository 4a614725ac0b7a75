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
    Per layer u is the fewest in [lo, hi] whose max load per replica is within 1% of the
    mean device load of the lowest any u in [lo, hi] gives (`best_lone`):
        lo = max(0, E - R)                    (two replicas for E - u experts must fit)
        hi = min(E, (E*cap - N*S) / (cap-1),   (the caps must fill every slot)
                 B*N + max(0, E - R))          (the allowance, see below)
    The allowance is a ramp: the first B*N redundant slots follow load; the next E - B*N go
    to second replicas until R = E; beyond, every slot follows load. `pack_auto` deals the
    replicas twice, per layer keeping the layout with the lower max device load: lone experts
    after all others (they fill the last rounds, one item per device per round: no device
    gets more than ceil(u / N)), and the plain order of mesh/placement.py followed by
    `spread_lone` swaps down to max(B, ceil(u / N)) lone experts per device.
    If S <= B a device cannot hold more than B experts: "auto" is "balance".

What "auto" promises (checked by tests/test_placement_policy.py):
  1. Restore: no device holds more than max(B, ceil(u / N)) lone experts (u <= hi), so the
     worst single-loss restore is at most B + ceil(max(0, E - R) / N), i.e. at most B once
     R >= E (or S if that is smaller). `repair(policy="auto")` keeps the same allowance by
     swapping a lone expert with a replica of a shared one (two more copies per swap).
  2. Balance: max w <= w* + 0.01 * mean device load, where w* is the lowest max w of any
     layout with at most hi lone experts (EPLB's greedy is optimal for min max w under
     per-expert floors and caps, the u coldest are the best lone set, and `best_lone` finds
     the best u). Dealt lone-last with u a multiple of N, the lone experts fill whole rounds,
     each round is still dealt heaviest item to lightest device, and the bound of
     mesh/placement.py holds: max device load <= mean + max w. Otherwise one round mixes both
     kinds, which can widen the gap once by max w: max device load <= mean + 2 max w.
     `pack_auto` keeps the lone-last layout unless the other one has a lower max, so the
     bound holds for what it returns.
  3. No cliff: for fixed N, load and B, w* never grows with S, so neither does the promise
     w* + 0.01 * mean. Going from S to S + 1 (R + N), hi and lo fall by at most N, so u - N is
     allowed for the best u at S, and the N more slots can give its N heaviest lone experts a
     second replica: the lowest max w cannot rise.

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
    _pack,
    check_slots,
    device_load,
    orphaned_by_loss,
    primary_first,
    replica_counts,
)

POLICIES = ("auto", "balance", "survive")
BALANCE_SLACK = 0.01  # auto trades up to 1% of a mean device load (in the bound) for survival


def policy_counts(
    load: np.ndarray,
    num_devices: int,
    slots_per_device: int,
    cap: int,
    policy: str = "auto",
    restore_budget: int = 2,
    balance_slack: float = BALANCE_SLACK,
) -> np.ndarray:
    """[layers, num_experts] int64 replica counts, each layer summing to N*S.

    load: [layers, num_experts] float, non-negative. cap: the most replicas one expert may
    get (the caller passes min(num_devices, max_replicas)). restore_budget: B, and
    balance_slack: how much max w may give up for fewer lone experts, as a share of the mean
    device load; both used by "auto".
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
    lo, hi = lone_range(experts, n, s, cap, restore_budget)
    slack = balance_slack * load.sum(axis=1) / n  # a share of the mean device load
    return best_lone(load, n * s, cap, lo, hi, slack)[1]


def lone_range(
    num_experts: int, num_devices: int, slots_per_device: int, cap: int, restore_budget: int
) -> tuple[int, int]:
    """(lo, hi): the numbers of lone experts "auto" may choose from (module docstring)."""
    e, n, s = int(num_experts), int(num_devices), int(slots_per_device)
    r = n * s - e
    lo = max(0, e - r)
    hi = e if cap < 2 else min(e, (e * cap - n * s) // (cap - 1))
    return lo, max(lo, min(hi, int(restore_budget) * n + max(0, e - r)))


def best_lone(
    load: np.ndarray,
    num_slots: int,
    cap: int,
    lo: int,
    hi: int,
    slack: np.ndarray | float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Per layer the fewest lone experts u in [lo, hi] whose max w is within `slack` of the
    lowest, and the counts for it.

    max w(u) = max(A(u), B(u)): A, the heaviest lone expert's load, never falls as u grows;
    B, the max load per replica of the others, never rises (one more lone expert frees at
    least one slot for fewer experts). B(u) <= v exactly when v is feasible for the others:
    each needs max(2, ceil(L / v)) replicas, at most cap, and together at most num_slots - u.
    So bisect the first u with A(u) >= B(u): the lowest max w is at u or u - 1. Then bisect
    the first u with B(u) <= that + slack (A is below it for every smaller u).
    load: [layers, num_experts]; slack: float or [layers], in load units.
    Returns ([layers] int, [layers, num_experts] int64 counts).
    """
    layers, experts = load.shape
    rows = np.arange(layers)
    heaviest_first = -np.sort(-load, axis=1)  # [layers, experts]
    rank = np.arange(experts)

    def others_fit(u, v):  # [layers] bool: B(u) <= v
        others = rank < (experts - u)[:, None]
        ratio = heaviest_first / np.where(v > 0, v, 1.0)[:, None]
        ratio = np.where(heaviest_first > 0, np.where(v[:, None] > 0, ratio, np.inf), 0.0)
        need = np.maximum(2, np.ceil(ratio * (1 - 1e-9)))  # 1e-9: float rounding of L / v
        fits = ((need <= cap) | ~others).all(axis=1)
        return fits & (np.where(others, need, 0).sum(axis=1) + u <= num_slots)

    def first(pred, left, right):  # [layers]: smallest u in [left, right) with pred, or right
        left, right = left.copy(), right.copy()
        while (left < right).any():
            mid = np.minimum((left + right) // 2, right - 1)
            ok = pred(np.maximum(mid, left)) & (left < right)
            right = np.where(ok, mid, right)
            left = np.where(~ok & (left < right), mid + 1, left)
        return left

    def heaviest_lone(u):
        return np.where(u > 0, heaviest_first[rows, np.clip(experts - u, 0, experts - 1)], 0.0)

    cross = first(
        lambda u: others_fit(u, heaviest_lone(u)), np.full(layers, lo), np.full(layers, hi + 1)
    )
    upper = np.minimum(cross, hi)
    lower = np.maximum(upper - 1, lo)
    c_up, c_low = (counts_with_lone(load, num_slots, cap, u) for u in (upper, lower))
    w_up, w_low = (load / c_up).max(axis=1), (load / c_low).max(axis=1)
    take_low = w_low <= w_up * (1 + 1e-12)
    u_best = np.where(take_low, lower, upper)
    best = np.where(take_low[:, None], c_low, c_up)
    limit = np.minimum(w_low, w_up) + slack
    if not (np.asarray(slack) > 0).any():
        return u_best, best
    fewer = first(lambda u: others_fit(u, limit), np.full(layers, lo), u_best)
    c_few = counts_with_lone(load, num_slots, cap, fewer)
    ok = (load / c_few).max(axis=1) <= limit * (1 + 1e-9)  # else keep the best
    return np.where(ok, fewer, u_best), np.where(ok[:, None], c_few, best)


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


def pack_auto(
    load: np.ndarray,
    counts: np.ndarray,
    num_devices: int,
    slots_per_device: int,
    restore_budget: int,
) -> np.ndarray:
    """[layers, num_slots] phy2log for "auto" counts (module docstring).

    load, counts: [layers, num_experts].
    """
    n, s = int(num_devices), int(slots_per_device)
    weight = load / counts
    if s <= restore_budget:  # no device can hold more than the budget: plain EPLB packing
        return _pack(weight, counts, n, s)
    lone_last = _pack(weight, counts, n, s, lone_last=True)
    plain = _pack(weight, counts, n, s)

    def peak(phy, w):  # [rows] max device load
        return np.take_along_axis(w, phy, axis=1).reshape(len(phy), n, s).sum(axis=2).max(axis=1)

    best = peak(lone_last, weight)
    # Swaps only where the plain order starts ahead (they can only lose some of that lead).
    rows = np.flatnonzero(peak(plain, weight) < best)
    if rows.size:
        allowance = lone_allowance(counts[rows], n, restore_budget)
        swapped = spread_lone(plain[rows], counts[rows], weight[rows], n, s, allowance)
        better = peak(swapped, weight[rows]) < best[rows]
        lone_last[rows[better]] = swapped[better]
    return lone_last


def lone_allowance(counts: np.ndarray, num_devices: int, restore_budget: int) -> np.ndarray:
    """[layers] int: max(B, ceil(lone experts / N)), the most lone experts a device may hold
    under "auto" (promise 1 of the module docstring).

    counts: [layers, num_experts] replica counts.
    """
    lone = (counts == 1).sum(axis=1)
    return np.maximum(int(restore_budget), -(-lone // int(num_devices)))


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
    so some shared expert of the under device is not on the over device); of the pairs on
    the 8 lightest such devices, the swap that leaves the two devices' larger load smallest.
    Counts are unchanged.
    phy: [layers, num_slots]; counts, weight: [layers, num_experts] (weight = load / counts);
    allowance: [layers] int, with sum of lone experts <= num_devices * allowance.
    Returns a new [layers, num_slots] array.
    """
    n, s = int(num_devices), int(slots_per_device)
    layers = phy.shape[0]
    phy = np.array(phy, dtype=np.int64).reshape(layers, n, s)
    is_lone = np.take_along_axis(counts == 1, phy.reshape(layers, -1), 1).reshape(layers, n, s)
    w_slot = np.take_along_axis(weight, phy.reshape(layers, -1), 1).reshape(layers, n, s)
    held = is_lone.sum(axis=2)  # [layers, n]
    dev_load = w_slot.sum(axis=2)
    limit = np.asarray(allowance)[:, None]
    # One swap per layer over its allowance at a time, every such layer at once.
    while (active := np.flatnonzero((held > limit).any(axis=1))).size:
        r = active
        a = np.arange(r.size)
        over = np.argmax(held[r], axis=1)  # [a]
        on_over = phy[r, over]  # [a, s]
        w1 = np.where(is_lone[r, over], w_slot[r, over], np.nan)  # [a, s]: lone ones leave
        # Candidates: the 8 lightest devices under the allowance (enough to choose well).
        room = np.where(held[r] < limit[r], dev_load[r], np.inf)
        cand = np.argsort(room, axis=1, kind="stable")[:, : min(n, 8)]  # [a, k]
        on_cand = np.take_along_axis(phy[r], cand[..., None], axis=1)  # [a, k, s]
        w2 = np.take_along_axis(w_slot[r], cand[..., None], axis=1)
        ok2 = ~np.take_along_axis(is_lone[r], cand[..., None], axis=1)
        ok2 &= ~(on_cand[..., None] == on_over[:, None, None, :]).any(axis=3)
        ok2 &= np.isfinite(np.take_along_axis(room, cand, axis=1))[..., None]
        new_over = dev_load[r, over][:, None, None, None] - w1[:, None, :, None]
        new_over = new_over + w2[:, :, None, :]  # [a, k, s (lone q1), s (shared q2)]
        base = np.take_along_axis(dev_load[r], cand, axis=1)
        new_under = base[..., None, None] + w1[:, None, :, None] - w2[:, :, None, :]
        score = np.where(ok2[:, :, None, :], np.maximum(new_over, new_under), np.inf)
        score = np.where(np.isnan(score), np.inf, score).reshape(r.size, -1)
        k, q1, q2 = np.unravel_index(np.argmin(score, axis=1), (cand.shape[1], s, s))
        d2 = cand[a, k]
        dev_load[r, over] = new_over[a, k, q1, q2]
        dev_load[r, d2] = new_under[a, k, q1, q2]
        x1, x2 = phy[r, over, q1], phy[r, d2, q2]
        phy[r, over, q1], phy[r, d2, q2] = x2, x1
        w_slot[r, over, q1], w_slot[r, d2, q2] = w_slot[r, d2, q2], w_slot[r, over, q1]
        is_lone[r, over, q1], is_lone[r, d2, q2] = False, True
        held[r, over] -= 1
        held[r, d2] += 1
    return phy.reshape(layers, n * s)


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
