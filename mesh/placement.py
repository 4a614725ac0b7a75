"""Failure-aware expert placement: which logical expert each physical slot holds.

Each of `num_devices` (N) devices hosts `slots_per_device` (S) expert slots per MoE layer;
physical slot p lives on device position p // S. A placement is three tables per layer (see
`Placement`) that the compiled step takes as data, so a new placement never forces a recompile.

Rules every placement obeys (checked by `Placement.validate`):
  * every logical expert has at least one slot, and every slot holds an expert;
  * replicas of one expert sit on distinct devices (so a count is <= N and <= max_replicas);
  * each device has exactly S slots.

Replica counts (`replica_counts`, E experts, R = N*S - E redundant slots). First the failure-
aware floor: every expert gets a second replica once R >= E (then no single device loss orphans
an expert); none get one for R <= E/2; in between the 2R - E heaviest do, so that one lost
device changes few counts. The rest follows DeepSeek EPLB: each further slot goes to the
expert with the highest load / replicas (ties: fewer replicas, then lower index). That is the
"survive" policy, the default of `place` and `repair`; "balance" (pure EPLB) and "auto" (balance
first, within a budget of experts to restore from the host after any single loss) are in
mesh/placement_policy.py, with what they promise.

Packing (`place`) deals the replicas, heaviest first (ties: lower expert id), in S rounds of N:
in each round the heaviest replica goes to the least-loaded device, the next to the next
least-loaded, and so on. Only one expert can straddle two rounds; its items at the head of the
next round go to the least-loaded devices that do not hold it yet, the rest of that round is
dealt as before.

Balance bound (checked by tests/test_placement.py): with `w = load / replica_count` the load a
replica carries and a device's load the sum of `w` over its slots, in every layer

    max device load - min device load <= max w,   hence   max device load <= mean + max w.

Proof: by induction over rounds, the gap between any two devices stays <= max w (items lie in
[0, max w]). When the lighter device gets the heavier (or an equal) item, the new gap is within
the old gap or the difference of two items. The skip makes the only other case: v takes a head
item of the straddler x while a lighter u, which holds x, takes less. u got x in the previous
round as one of the last (lightest) items dealt, so v, which did not, was no heavier than u
before that round, or took the previous straddler's head there; unrolling, new v - new u =
(v - u before some round t, <= 0) + (v's item in t) - (u's item now) <= max w.

`repair` (fail, rejoin, rebalance) recomputes the counts from the load, then moves as few
slots as those counts allow: it keeps every surviving slot whose expert is still wanted (up to
its count; a replica too many is evicted from the device with the fewest free slots so far,
then the most loaded) and fills the free slots, expert missing the most replicas first, then
heaviest, each on the least-loaded device with a free slot and no replica of it. Then moves =
replicas that must be created. If the fill gets stuck (the distinct-device rule; dense layouts,
E near S, max_replicas binding) it finishes along augmenting paths and then cancels negative
cycles, which is exactly the fewest moves (a min-cost circulation); it never fails when a valid
layout exists, i.e. when E <= num_slots <= E * min(N, max_replicas). Repair promises fewest
moves, not the balance bound: call `place` for a full re-pack.

Everything is deterministic: ties are broken by index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


class PlacementError(ValueError):
    """The experts cannot all be kept served by the requested layout."""


@dataclass(frozen=True, eq=False)
class Placement:
    """Where each logical expert lives, per MoE layer.

    phy2log: [layers, num_slots] int32, logical expert held by each physical slot.
    log2phy: [layers, num_experts, max_replicas] int32, slots holding each expert, valid entries
        first (in slot order), padded with -1.
    replica_count: [layers, num_experts] int32, number of valid entries of log2phy.
    slots_per_device: S; slot p lives on device position p // S.
    """

    phy2log: np.ndarray
    log2phy: np.ndarray
    replica_count: np.ndarray
    slots_per_device: int

    def __post_init__(self):
        # Tables are shared with compiled steps and plans: make them immutable.
        for name in ("phy2log", "log2phy", "replica_count"):
            table = np.array(getattr(self, name), dtype=np.int32)
            table.setflags(write=False)
            object.__setattr__(self, name, table)
        object.__setattr__(self, "slots_per_device", int(self.slots_per_device))

    @property
    def num_layers(self) -> int:
        return self.phy2log.shape[0]

    @property
    def num_experts(self) -> int:
        return self.log2phy.shape[1]

    @property
    def num_slots(self) -> int:
        return self.phy2log.shape[1]

    @property
    def num_devices(self) -> int:
        return self.num_slots // self.slots_per_device

    @property
    def max_replicas(self) -> int:
        return self.log2phy.shape[2]

    def device_of_slot(self, slot):
        """Device position of a physical slot (int or int array)."""
        return slot // self.slots_per_device

    def experts_on_device(self, layer: int, device: int) -> np.ndarray:
        """[slots_per_device] logical experts held by `device` in `layer`, in slot order."""
        s = self.slots_per_device
        return self.phy2log[layer, device * s : (device + 1) * s]

    def validate(self) -> None:
        """Raise ValueError naming the first broken rule."""
        p2l, l2p, count, s = self.phy2log, self.log2phy, self.replica_count, self.slots_per_device
        if p2l.ndim != 2 or l2p.ndim != 3 or count.ndim != 2:
            raise ValueError(
                f"table ranks: phy2log {p2l.shape}, log2phy {l2p.shape}, "
                f"replica_count {count.shape}; want 2, 3, 2"
            )
        layers, num_slots = p2l.shape
        if l2p.shape[0] != layers or count.shape != l2p.shape[:2]:
            raise ValueError(
                f"shapes disagree: phy2log {p2l.shape}, log2phy {l2p.shape}, "
                f"replica_count {count.shape}"
            )
        if s < 1 or num_slots % s:
            raise ValueError(f"{num_slots} slots is not a multiple of slots_per_device={s}")
        experts = l2p.shape[1]
        if p2l.size and (p2l.min() < 0 or p2l.max() >= experts):
            raise ValueError(f"phy2log holds ids outside [0, {experts})")
        actual = _bincount_rows(p2l, experts)
        if not np.array_equal(actual, count):
            layer, expert = np.argwhere(actual != count)[0]
            raise ValueError(
                f"layer {layer} expert {expert}: replica_count says {count[layer, expert]}, "
                f"phy2log has {actual[layer, expert]} slots"
            )
        if (count < 1).any():
            layer, expert = np.argwhere(count < 1)[0]
            raise ValueError(f"layer {layer} expert {expert} has no slot")
        if (count > l2p.shape[2]).any():
            raise ValueError(f"a replica count exceeds max_replicas={l2p.shape[2]}")
        valid = np.arange(l2p.shape[2]) < count[..., None]
        if (l2p[~valid] != -1).any() or ((l2p < 0) | (l2p >= num_slots))[valid].any():
            raise ValueError("log2phy must list valid slots first and pad with -1")
        layer_of = np.broadcast_to(np.arange(layers)[:, None, None], l2p.shape)
        if not (p2l[layer_of[valid], l2p[valid]] == np.nonzero(valid)[1]).all():
            raise ValueError("log2phy lists a slot whose phy2log entry is another expert")
        seen = _bincount_rows(np.where(valid, l2p, num_slots).reshape(layers, -1), num_slots + 1)
        if (seen[:, :num_slots] != 1).any():
            raise ValueError("log2phy must list every slot exactly once")
        devices = np.sort(np.where(valid, l2p // s, -1 - np.arange(l2p.shape[2])), axis=-1)
        if (np.diff(devices, axis=-1) == 0).any():
            layer, expert, _ = np.argwhere(np.diff(devices, axis=-1) == 0)[0]
            raise ValueError(f"layer {layer} expert {expert} has two replicas on one device")


def replica_counts(load: np.ndarray, num_slots: int, max_replicas: int) -> np.ndarray:
    """How many slots each expert gets (EPLB, with a failure-aware floor).

    load: [layers, num_experts] float, non-negative.
    max_replicas: cap on one expert's count (the caller passes min(num_devices, max_replicas)).
    Returns [layers, num_experts] int64 summing to num_slots in every layer.
    """
    layers, experts = load.shape
    check_slots(num_slots, experts, max_replicas)
    counts = np.ones((layers, experts), dtype=np.int64)
    counts[_heaviest(load, _guaranteed_second(num_slots, experts, max_replicas))] = 2
    extra = num_slots - counts.sum(axis=1)
    if not extra.any():
        return counts
    counts += _counts_above_threshold(load, extra, counts, max_replicas)
    return _greedy_counts(load, counts, num_slots, max_replicas)


def check_slots(num_slots: int, num_experts: int, max_replicas: int) -> None:
    """Raise PlacementError unless E <= num_slots <= E * max_replicas (a valid layout exists)."""
    if num_slots < num_experts:
        raise PlacementError(f"{num_slots} slots cannot hold {num_experts} experts")
    if num_slots > num_experts * max_replicas:
        raise PlacementError(
            f"{num_slots} slots exceed {num_experts} experts x {max_replicas} replicas each: "
            "raise max_replicas or use fewer slots"
        )


def _guaranteed_second(num_slots, num_experts, max_replicas):
    """How many experts get a second replica before EPLB hands out the rest.

    All of them once the redundant slots R = num_slots - num_experts reach num_experts (then no
    single device loss orphans an expert), none below R = num_experts / 2 (pure EPLB, best
    balance), linear in between so that losing or adding one device changes few counts.
    """
    if max_replicas < 2:
        return 0
    return int(np.clip(2 * (num_slots - num_experts) - num_experts, 0, num_experts))


def _heaviest(load, k):
    """Index pair selecting the k heaviest experts of each layer (ties: lower index)."""
    layers, experts = load.shape
    order = np.lexsort((np.broadcast_to(np.arange(experts), load.shape), -load), axis=-1)
    return np.arange(layers)[:, None], order[:, :k]


def _counts_above_threshold(load, extra, floor, cap):
    """[layers, num_experts] extra replicas surely among the greedy's first `extra` picks.

    extra: [layers] slots left to hand out; floor: [layers, num_experts] counts so far;
    cap: int or [layers, num_experts] int, the most replicas each expert may get.
    The greedy's picks are the `extra` largest priorities load / c (c = floor, ..., cap - 1);
    load / c > t for ceil(load / t) - floor of them. Bisect a per-layer t at which at most
    `extra` priorities exceed t (rounded up): all of those are picks. `_greedy_counts` finishes.
    """
    eps = 1e-9  # far above float rounding, far below any meaningful load ratio
    top = cap - floor
    hi = load.max(axis=1)
    lo = np.zeros_like(hi)
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(40):
            mid = (lo + hi) / 2
            above = np.ceil(load / mid[:, None] * (1 + eps)) - floor
            over = np.clip(above, 0, top).sum(axis=1) > extra
            lo = np.where(over, mid, lo)
            hi = np.where(over, hi, mid)
        sure = np.ceil(load / hi[:, None] * (1 - eps)) - floor
    sure = np.where(hi[:, None] > 0, sure, 0)
    return np.clip(sure, 0, top).astype(np.int64)


def _greedy_counts(load, counts, num_slots, cap):
    """Finish EPLB: next slot to the highest load / count (ties: fewer replicas, lower index).

    One-at-a-time greedy picks the `remaining` smallest keys (-load / c, c, expert) over every
    expert's next counts c; each layer takes them at once from the next `k` counts per expert,
    and doubles `k` in the rare case an expert might want more than `k`.
    load, counts: [layers, num_experts]; counts is edited and returned.
    cap: int or [layers, num_experts] int, the most replicas each expert may get.
    """
    layers, experts = load.shape
    remaining = num_slots - counts.sum(axis=1)
    cap = np.broadcast_to(cap, load.shape)
    for layer in np.flatnonzero(remaining):
        m = int(remaining[layer])
        k = 4 + m // experts  # enough candidates for m picks
        cap_l = cap[layer]
        while True:
            c = counts[layer][:, None] + np.arange(k)  # [num_experts, k]
            with np.errstate(divide="ignore", invalid="ignore"):
                prio = np.where(c < cap_l[:, None], load[layer][:, None] / c, -np.inf).ravel()
            v = np.partition(-prio, m - 1)[m - 1]  # minus the m-th largest priority
            picked = -prio < v
            ties = np.flatnonzero(-prio == v)
            ties = ties[np.lexsort((ties // k, c.ravel()[ties]))][: m - picked.sum()]
            picked[ties] = True
            taken = picked.reshape(experts, k).sum(axis=1)
            if not ((taken == k) & (c[:, -1] + 1 < cap_l)).any():
                break
            k *= 2  # an expert took all k: its next count might also belong
        counts[layer] += taken
    return counts


def place(
    load: np.ndarray,
    num_devices: int,
    slots_per_device: int,
    max_replicas: int,
    *,
    policy: str = "survive",
    restore_budget: int = 2,
) -> Placement:
    """Fresh placement.

    load: [layers, num_experts] float, observed tokens per expert (uniform ones if unknown).
    policy: "survive" (this module's failure-aware floor: every expert twice once R >= E),
        "balance" (pure EPLB) or "auto" (balance first, with at most `restore_budget` experts
        per layer to restore from the host after any single loss once R >= E); see
        mesh/placement_policy.py.
    Returns a Placement with num_devices * slots_per_device slots per layer; raises
    PlacementError when the slots cannot hold the experts.
    """
    load = _check_load(load)
    num_devices, slots_per_device = _check_mesh(num_devices, slots_per_device)
    cap = min(num_devices, int(max_replicas))
    if policy != "survive":
        # placement_policy builds on this module's helpers, hence the late import.
        from mesh.placement_policy import pack_auto, policy_counts

        counts = policy_counts(load, num_devices, slots_per_device, cap, policy, restore_budget)
        if policy == "auto":
            phy2log = pack_auto(load, counts, num_devices, slots_per_device, restore_budget)
        else:
            phy2log = _pack(load / counts, counts, num_devices, slots_per_device)
        return _from_phy2log(phy2log, load.shape[1], slots_per_device, max_replicas)
    counts = replica_counts(load, num_devices * slots_per_device, cap)
    weight = load / counts
    phy2log = _pack(weight, counts, num_devices, slots_per_device)
    return _from_phy2log(phy2log, load.shape[1], slots_per_device, max_replicas)


def _pack(weight, counts, num_devices, slots_per_device, lone_last=False):
    """[layers, num_slots] phy2log dealing replicas in rounds (see the module docstring).

    weight: [layers, num_experts] load of one replica; counts: [layers, num_experts].
    lone_last: deal the experts with one replica after all others (each in weight order), so
    they fill the last rounds and no device gets more than ceil(lone / num_devices) of them.
    """
    layers, experts = weight.shape
    n = num_devices
    keys = (-weight, counts == 1) if lone_last else (-weight,)
    items = _repeat_in_order(counts, *keys).reshape(layers, -1)  # [layers, num_slots]
    item_w = np.take_along_axis(weight, items, axis=1)
    phy = np.empty((layers, n, slots_per_device), dtype=np.int64)
    device_load = np.zeros((layers, n))
    on_device = np.full((layers, n), -1, dtype=np.int64)
    for r in range(slots_per_device):
        it, w = items[:, r * n : (r + 1) * n], item_w[:, r * n : (r + 1) * n]
        if r:
            # The expert straddling the round boundary must skip devices that hold it.
            straddler = items[:, r * n - 1]
            k = np.cumprod(it == straddler[:, None], axis=1).sum(axis=1)
            holds = on_device == straddler[:, None]
        else:
            k, holds = np.zeros(layers, dtype=np.int64), np.zeros((layers, n), dtype=bool)
        lightest = np.argsort(device_load, axis=1, kind="stable")
        holds_sorted = np.take_along_axis(holds, lightest, axis=1)
        free_rank = np.cumsum(~holds_sorted, axis=1) - 1
        head = ~holds_sorted & (free_rank < k[:, None])
        target = np.take_along_axis(lightest, np.argsort(~head, axis=1, kind="stable"), axis=1)
        np.put_along_axis(on_device, target, it, axis=1)
        phy[:, :, r] = on_device
        added = np.empty_like(device_load)
        np.put_along_axis(added, target, w, axis=1)
        device_load += added
    return phy.reshape(layers, n * slots_per_device)


def repair(
    old: Placement,
    keep: Sequence[int | None],
    load: np.ndarray,
    max_replicas: int,
    *,
    policy: str = "survive",
    restore_budget: int = 2,
) -> Placement:
    """New placement on a new device list, moving as few slots as possible.

    old: the current placement. keep: [new_num_devices] new device j was old device keep[j],
    or is an empty/new device when keep[j] is None. That covers fail (keep = survivors' old
    positions), rejoin (survivors + None entries) and rebalance (keep = identity, new load).
    load: [layers, num_experts] float. Slots already holding an expert that the new counts
    still want stay put; raises PlacementError when the new devices cannot serve every expert.
    policy, restore_budget: as in `place`. Under "auto" the fewest-moves layout is followed by
    swaps (two copies each) until no device holds more lone experts than the policy allows.
    """
    load = _check_load(load)
    if load.shape != (old.num_layers, old.num_experts):
        raise ValueError(f"load has shape {load.shape}, placement has {old.replica_count.shape}")
    old_dev = old_positions(keep, old.num_devices)
    s = old.slots_per_device
    n = len(old_dev)
    if n == 0:
        raise PlacementError("no devices left to hold the experts")
    cap = min(n, int(max_replicas))
    if policy == "survive":
        counts = replica_counts(load, n * s, cap)
    else:
        from mesh.placement_policy import policy_counts  # see place()

        counts = policy_counts(load, n, s, cap, policy, restore_budget)
    weight = load / counts
    survivors = survivor_view(old.phy2log, old_dev, s)
    kept = _select_kept(survivors, counts, weight, n, s)
    phy = _fill(np.where(kept, survivors, -1), survivors, counts, weight, n, s)
    if policy == "auto" and s > restore_budget:
        from mesh.placement_policy import lone_allowance, spread_lone

        allowance = lone_allowance(counts, n, restore_budget)
        phy = spread_lone(phy, counts, weight, n, s, allowance)
    return _from_phy2log(phy, old.num_experts, s, max_replicas)


def survivors_only(
    old: Placement, keep: Sequence[int | None], max_replicas: int
) -> Placement | None:
    """The survivors' slots exactly as they are, or None when some expert lost every replica.

    The zero-copy answer to a device loss: with enough redundancy nothing has to move on the
    critical path; `repair` (a later rebalance) restores the lost replicas.
    keep: [new_num_devices] old position of each new device (no new devices allowed here).
    """
    old_dev = old_positions(keep, old.num_devices)
    if (old_dev < 0).any() or len(old_dev) == 0:
        return None
    phy = survivor_view(old.phy2log, old_dev, old.slots_per_device)
    held = np.zeros((old.num_layers, old.num_experts), dtype=bool)
    np.put_along_axis(held, phy, True, axis=1)
    if not held.all():
        return None
    return _from_phy2log(phy, old.num_experts, old.slots_per_device, max_replicas)


def survivor_view(phy2log: np.ndarray, old_dev: np.ndarray, slots_per_device: int) -> np.ndarray:
    """[layers, new_num_slots] expert in each new slot before any move; -1 on new devices.

    phy2log: [layers, old_num_slots]; old_dev: [new_num_devices] old position or -1.
    """
    s = slots_per_device
    old_slot = (np.maximum(old_dev, 0)[:, None] * s + np.arange(s)).ravel()
    fresh = np.repeat(old_dev < 0, s)
    return np.where(fresh, -1, phy2log[:, old_slot]).astype(np.int64)


def _select_kept(survivors, counts, weight, num_devices, slots_per_device):
    """[layers, num_slots] bool: surviving slots to keep, at most counts[e] per expert.

    Each replica too many is evicted from the device with the fewest free slots so far (then
    the most loaded one): free slots spread over many devices, so the fill finds a device
    without the expert for every missing replica.
    survivors: [layers, num_slots] expert per slot, -1 on new devices.
    """
    layers, num_slots = survivors.shape
    n, s = num_devices, slots_per_device
    experts = counts.shape[1]
    kept = survivors >= 0
    surviving = _bincount_rows(np.where(kept, survivors, experts), experts + 1)[:, :experts]
    excess = np.maximum(surviving - counts, 0)
    if not excess.any():
        return kept
    units = _ragged(_repeat_in_order(excess, -weight), excess.sum(axis=1))
    slot_w = np.where(kept, np.take_along_axis(weight, np.maximum(survivors, 0), axis=1), 0.0)
    device_load = slot_w.reshape(layers, n, s).sum(axis=2)
    free = (~kept).reshape(layers, n, s).sum(axis=2)
    rows = np.arange(layers)
    for i in range(units.shape[1]):
        e = units[:, i]
        holder = kept & (survivors == e[:, None])  # no match where e = -1 (layer done)
        dev_score = free * (device_load.max() + 1.0) - device_load  # fewest free, then heaviest
        score = np.where(holder, np.repeat(dev_score, s, axis=1), np.inf)
        slot = np.argmin(score, axis=1)
        r = rows[e >= 0]
        slot = slot[r]
        kept[r, slot] = False
        free[r, slot // s] += 1
        device_load[r, slot // s] -= weight[r, e[r]]
    return kept


def _fill(phy, survivors, counts, weight, num_devices, slots_per_device):
    """Fill free slots (-1) of phy [layers, num_slots] with the missing replicas.

    Expert missing the most replicas first, then heaviest, each to the least-loaded device with
    a free slot and no replica of that expert; stuck layers finish by augmenting paths.
    """
    layers, num_slots = phy.shape
    n, s = num_devices, slots_per_device
    experts = counts.shape[1]
    rows = np.arange(layers)
    missing = counts - _bincount_rows(np.where(phy >= 0, phy, experts), experts + 1)[:, :experts]
    if not missing.any():
        return phy
    # Most constrained first (an expert missing many replicas needs many devices), then heaviest.
    items = _ragged(_repeat_in_order(missing, -weight, -missing), missing.sum(axis=1))
    slot_w = np.where(phy >= 0, np.take_along_axis(weight, np.maximum(phy, 0), axis=1), 0.0)
    device_load = slot_w.reshape(layers, n, s).sum(axis=2)
    free = (phy < 0).reshape(layers, n, s)
    free_count = free.sum(axis=2)
    phy3 = phy.reshape(layers, n, s)
    stuck: list[tuple[int, int]] = []
    for i in range(items.shape[1]):
        e = items[:, i]
        active = e >= 0
        holds = (phy3 == e[:, None, None]).any(axis=2)
        ok_dev = active[:, None] & (free_count > 0) & ~holds
        d = np.argmin(np.where(ok_dev, device_load, np.inf), axis=1)
        ok = ok_dev[rows, d]
        q = np.argmax(free[rows, d], axis=1)
        r, d, q, e_ok = rows[ok], d[ok], q[ok], e[ok]
        phy3[r, d, q] = e_ok
        free[r, d, q] = False
        free_count[r, d] -= 1
        device_load[r, d] += weight[r, e_ok]
        stuck += zip(rows[active & ~ok].tolist(), e[active & ~ok].tolist(), strict=True)
    by_layer: dict[int, list[int]] = {}
    for layer, e in stuck:
        by_layer.setdefault(layer, []).append(e)
    for layer, pending in by_layer.items():
        _finish_layer(phy[layer], survivors[layer], pending, n, s, experts)
        surviving = np.bincount(survivors[layer][survivors[layer] >= 0], minlength=experts)
        if (phy[layer] != survivors[layer]).sum() > np.maximum(counts[layer] - surviving, 0).sum():
            _fewest_moves(phy[layer], survivors[layer], n, s, experts)
    return phy


def _repeat_in_order(counts, *keys):
    """[sum(counts)] flat expert ids, layer by layer, sorted by keys (last is primary, then
    expert id), each repeated counts times. counts and keys: [layers, num_experts]."""
    index = np.broadcast_to(np.arange(counts.shape[1]), counts.shape)
    order = np.lexsort((index, *keys), axis=-1)
    return np.repeat(order.ravel(), np.take_along_axis(counts, order, axis=1).ravel())


def _ragged(flat, lengths):
    """[layers, max(lengths)] rows of flat (concatenated rows of given lengths), -1 padded."""
    out = np.full((len(lengths), max(int(lengths.max()), 0)), -1, dtype=np.int64)
    layer = np.repeat(np.arange(len(lengths)), lengths)
    start = np.cumsum(lengths) - lengths
    out[layer, np.arange(flat.size) - start[layer]] = flat
    return out


def _finish_layer(phy, survivors, pending, num_devices, slots_per_device, num_experts):
    """Place stuck replicas of one layer by augmenting paths; phy: [num_slots], edited."""
    s = slots_per_device
    slot_dev = np.arange(phy.size) // s
    hold = np.zeros((num_experts, num_devices), dtype=bool)
    hold[phy[phy >= 0], slot_dev[phy >= 0]] = True
    was = np.zeros((num_experts, num_devices), dtype=bool)
    was[survivors[survivors >= 0], slot_dev[survivors >= 0]] = True
    while pending:
        for e in pending:
            if _augment(phy, survivors, hold, was, e, s):
                pending.remove(e)
                break
        else:
            raise PlacementError(f"cannot place {len(pending)} replicas: no valid layout")


def _augment(phy, survivors, hold, was, expert, slots_per_device):
    """Give `expert` one more device along a cheapest augmenting path; False if none.

    The path alternates expert -> device (one not holding it) -> an expert evicted from that
    (full) device -> ... -> a device with a free slot. Cost: +1 for evicting an expert from its
    surviving slot, -1 for ending in a free slot that held the entering expert before (it comes
    back). Shortest paths by vectorised Bellman-Ford over the expert/device graph.
    phy, survivors: [num_slots]; hold, was: [num_experts, num_devices] bool (now / before);
    phy and hold are edited.
    """
    s = slots_per_device
    num_experts, n = hold.shape
    free = (phy.reshape(n, s) < 0).any(axis=1)
    enter = np.where(hold, np.inf, 0.0)  # [expert, device]
    evict = np.where(hold & ~free, was.astype(float), np.inf)  # [expert, device]
    dist_e, dist_d = np.full(num_experts, np.inf), np.full(n, np.inf)
    dist_e[expert] = 0.0
    parent_e = np.full(num_experts, -1)  # device the expert is evicted from
    parent_d = np.full(n, -1)  # expert that enters the device
    for _ in range(num_experts + n):
        via = dist_e[:, None] + enter
        best = via.argmin(axis=0)
        better_d = via[best, np.arange(n)] < dist_d
        dist_d[better_d], parent_d[better_d] = via[best, np.arange(n)][better_d], best[better_d]
        via = dist_d[None, :] + evict
        best = via.argmin(axis=1)
        better_e = via[np.arange(num_experts), best] < dist_e
        dist_e[better_e] = via[np.arange(num_experts), best][better_e]
        parent_e[better_e] = best[better_e]
        if not better_d.any() and not better_e.any():
            break
    free_slots = np.flatnonzero(phy < 0)
    back = np.zeros((num_experts, n))
    came_back = survivors[free_slots] >= 0
    back[survivors[free_slots][came_back], free_slots[came_back] // s] = 1.0
    end = np.where(free[None, :], dist_e[:, None] + enter - back, np.inf)
    e, d = np.unravel_index(np.argmin(end), end.shape)
    if not np.isfinite(end[e, d]):
        return False
    slot = free_slots[free_slots // s == d]
    slot = int(slot[survivors[slot] == e][0]) if back[e, d] else int(slot[0])
    while True:  # e enters `slot`; it leaves the device it was evicted from, if any
        phy[slot] = e
        hold[e, slot // s] = True
        leaves = int(parent_e[e]) if e != expert else -1
        if leaves < 0:
            return True
        hold[e, leaves] = False
        slot = leaves * s + int(np.flatnonzero(phy[leaves * s : (leaves + 1) * s] == e)[0])
        e = int(parent_d[leaves])


def _fewest_moves(phy, survivors, num_devices, slots_per_device, num_experts):
    """Rearrange one layer to the fewest moved slots, keeping every replica count.

    Which expert sits on which device is a min-cost circulation: adding expert e to device d
    saves a move when d held e before. Cancel negative cycles e -> d -> e' -> d' -> ... -> e
    (add e to d, drop e' from d, add e' to d', ...) until none is left, then put every expert
    that a device held before back in its old local slot.
    phy, survivors: [num_slots]; phy is edited.
    """
    s = slots_per_device
    slot_dev = np.arange(phy.size) // s
    hold = np.zeros((num_experts, num_devices), dtype=bool)
    hold[phy, slot_dev] = True
    was = np.zeros((num_experts, num_devices), dtype=bool)
    was[survivors[survivors >= 0], slot_dev[survivors >= 0]] = True
    while (cycle := _negative_cycle(hold, was)) is not None:
        for e, d, dropped in cycle:
            hold[e, d], hold[dropped, d] = True, False
    for d in range(num_devices):
        on = set(np.flatnonzero(hold[:, d]).tolist())
        old = survivors[d * s : (d + 1) * s].tolist()
        back = [x if x in on else -1 for x in old]  # kept experts stay in their slots
        rest = iter(sorted(on - set(back)))
        phy[d * s : (d + 1) * s] = [x if x >= 0 else next(rest) for x in back]


def _negative_cycle(hold, was):
    """A negative cycle [(e, d, dropped), ...] of the move-cost graph, or None (Bellman-Ford).

    Edge e -> d (e not on d) costs -1 if d held e before, else 0; edge d -> x (x on d, dropped)
    costs +1 if d held x before, else 0. hold, was: [num_experts, num_devices] bool.
    """
    num_experts, n = hold.shape
    add = np.where(hold, np.inf, -was.astype(float))  # e -> d
    drop = np.where(hold, was.astype(float), np.inf)  # d -> x
    dist_e, dist_d = np.zeros(num_experts), np.zeros(n)
    parent_e = np.full(num_experts, -1)  # device an expert was dropped from
    parent_d = np.full(n, -1)  # expert added to a device
    for _ in range(num_experts + n + 1):
        via = dist_e[:, None] + add
        best = via.argmin(axis=0)
        better_d = via[best, np.arange(n)] < dist_d
        dist_d[better_d], parent_d[better_d] = via[best, np.arange(n)][better_d], best[better_d]
        via = dist_d[None, :] + drop
        best = via.argmin(axis=1)
        better_e = via[np.arange(num_experts), best] < dist_e
        dist_e[better_e] = via[np.arange(num_experts), best][better_e]
        parent_e[better_e] = best[better_e]
        if not better_e.any() and not better_d.any():
            return None
    x = int(np.flatnonzero(better_e)[0]) if better_e.any() else int(parent_d[better_d][0])
    for _ in range(num_experts + n):  # walk back into the cycle
        x = int(parent_d[parent_e[x]])
    cycle, y = [], x
    while True:
        d = int(parent_e[y])
        e = int(parent_d[d])
        cycle.append((e, d, y))
        y = e
        if y == x:
            return cycle


def orphaned_by_loss(p: Placement) -> np.ndarray:
    """[layers, num_devices, num_experts] bool: experts left with no replica if that device
    alone were lost."""
    out = np.zeros((p.num_layers, p.num_devices, p.num_experts), dtype=bool)
    layer, expert = np.nonzero(p.replica_count == 1)
    out[layer, p.log2phy[layer, expert, 0] // p.slots_per_device, expert] = True
    return out


def orphaned_after(p: Placement, lost_devices: Sequence[int]) -> np.ndarray:
    """[layers, num_experts] bool: experts with every replica on `lost_devices`."""
    lost = np.zeros(p.num_devices + 1, dtype=bool)  # last entry: padding (-1) is never lost
    lost[np.asarray(list(lost_devices), dtype=np.int64)] = True
    device = np.where(p.log2phy >= 0, p.log2phy // p.slots_per_device, p.num_devices)
    return (lost[device] | (p.log2phy < 0)).all(axis=2)


def device_load(p: Placement, load: np.ndarray) -> np.ndarray:
    """[layers, num_devices] float: sum over a device's slots of load / replica_count.

    load: [layers, num_experts].
    """
    weight = np.asarray(load, dtype=np.float64) / p.replica_count
    slot_w = np.take_along_axis(weight, p.phy2log.astype(np.int64), axis=1)
    return slot_w.reshape(p.num_layers, p.num_devices, p.slots_per_device).sum(axis=2)


def _from_phy2log(phy2log, num_experts, slots_per_device, max_replicas) -> Placement:
    """Placement with log2phy and replica_count derived from phy2log [layers, num_slots]."""
    layers, num_slots = phy2log.shape
    width = int(max_replicas)
    key = (phy2log + num_experts * np.arange(layers)[:, None]).ravel()
    order = np.argsort(key, kind="stable")
    counts = np.bincount(key, minlength=layers * num_experts)
    if counts.max() > width:
        raise PlacementError(f"an expert needs {counts.max()} replicas, max_replicas={width}")
    start = np.cumsum(counts) - counts
    rank = np.arange(key.size) - start[key[order]]
    log2phy = np.full((layers * num_experts, width), -1, dtype=np.int32)
    log2phy[key[order], rank] = order % num_slots
    return Placement(
        phy2log=phy2log,
        log2phy=log2phy.reshape(layers, num_experts, width),
        replica_count=counts.reshape(layers, num_experts),
        slots_per_device=slots_per_device,
    )


def _bincount_rows(x, width):
    """[rows, width] counts of each value in each row of x [rows, cols] (values in [0, width))."""
    rows = x.shape[0]
    flat = (x.astype(np.int64) + width * np.arange(rows)[:, None]).ravel()
    return np.bincount(flat, minlength=rows * width).reshape(rows, width)


def _check_load(load) -> np.ndarray:
    load = np.asarray(load, dtype=np.float64)
    if load.ndim != 2:
        raise ValueError(f"load must be [layers, num_experts], got shape {load.shape}")
    if not np.isfinite(load).all() or (load < 0).any():
        raise ValueError("load must be finite and non-negative")
    return load


def _check_mesh(num_devices, slots_per_device):
    if int(num_devices) < 1 or int(slots_per_device) < 1:
        raise PlacementError(
            f"need at least one device and one slot, got {num_devices} x {slots_per_device}"
        )
    return int(num_devices), int(slots_per_device)


def old_positions(keep: Sequence[int | None], old_num_devices: int) -> np.ndarray:
    """[new_num_devices] int64 old position of each new device, -1 for a new one (None)."""
    old_dev = np.array([-1 if k is None else int(k) for k in keep], dtype=np.int64)
    used = old_dev[old_dev >= 0]
    if (used >= old_num_devices).any():
        raise ValueError(f"keep names old devices outside [0, {old_num_devices}): {keep}")
    if len(np.unique(used)) != len(used):
        raise ValueError(f"keep names an old device twice: {keep}")
    return old_dev


def primary_first(p: Placement, load: np.ndarray | None = None) -> np.ndarray:
    """log2phy with each expert's replicas reordered so that column 0 (the replica that serves
    every token under primary routing) spreads load evenly over the devices.

    load: [layers, num_experts] or None (uniform). Greedy, heaviest expert first: its primary
    is the replica on the device with the least primary load so far (ties: lower slot).
    Returns [layers, num_experts, max_replicas] int32.
    """
    load = np.ones(p.replica_count.shape) if load is None else _check_load(load)
    log2phy = p.log2phy.copy()
    s = p.slots_per_device
    layers = np.arange(p.num_layers)
    valid = np.arange(p.max_replicas) < p.replica_count[..., None]
    device_load = np.zeros((p.num_layers, p.num_devices))
    # One expert rank at a time, every layer at once (the same greedy as one layer at a time).
    for expert in np.argsort(-load, axis=1, kind="stable").T:
        slots = log2phy[layers, expert]  # [layers, max_replicas]
        dev = np.maximum(slots, 0) // s
        on = np.where(valid[layers, expert], np.take_along_axis(device_load, dev, 1), np.inf)
        best = np.argmin(on, axis=1)
        device_load[layers, dev[layers, best]] += load[layers, expert]
        first = slots[:, 0].copy()
        log2phy[layers, expert, 0] = slots[layers, best]
        log2phy[layers, expert, best] = first
    return log2phy
