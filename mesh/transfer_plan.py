"""Which expert weights move where when the placement changes, and in which rounds.

A reconfiguration maps old device keep_devices[j] to new device j (None: a new, empty device;
old devices not named are lost and never read). Every new slot is then one of:
  * kept: it already holds the right expert (same device, same local slot);
  * copied device to device from a `source_slot` (new numbering) that holds the expert before
    the move: preferably a kept slot (it never changes); only when no kept slot holds the expert,
    a surviving slot that is about to be overwritten (a "volatile" source, read no later than it
    is written);
  * restored from the host copy of all expert weights, when no surviving slot held the expert.
    One exception: volatile copies that must run in one round (a cycle, e.g. two slots of one
    device swapping experts) but need one (sender, shift) pair twice; one of them is restored
    from the host. Plans from repair() read volatile slots only when its fewest-moves step
    moves a kept replica, and in the tests never needed that fallback.

Copies run in rounds (`schedule_rounds`): in round r device d sends at most one slot per layer
to each device (d + s) % N, s = 0..N-1 (s = 0: a copy inside the device), so one compiled
collective (a ppermute per shift) serves every plan of a mesh.

The order inside a round is the compiled program's (`mesh.reshard.SlotTransfer`): the shifts
run one after another, s = 0 first; within one shift every sender reads its slot before any
receiver writes (one ppermute), and a shift sees what the shifts before it wrote. So a copy that
reads a volatile slot runs in an earlier round than the copy that overwrites that slot, or in
the same round with a shift no larger. Host restores are applied after the last round (they may
overwrite a volatile source).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mesh.placement import Placement, old_positions, survivor_view


@dataclass(frozen=True, eq=False)
class TransferPlan:
    """How each new slot gets its expert.

    source_slot: [layers, new_num_slots] int32, new-numbering slot to copy from, or -1.
    from_host: [layers, new_num_slots] bool, restore this slot from the host copy.
    keep: [layers, new_num_slots] bool, the slot already holds the right expert.
    Exactly one of (source_slot >= 0, from_host, keep) holds for each slot.
    """

    source_slot: np.ndarray
    from_host: np.ndarray
    keep: np.ndarray

    @property
    def experts_copied(self) -> int:
        """Device-to-device (and within-device) copies, summed over layers."""
        return int((self.source_slot >= 0).sum())

    @property
    def experts_from_host(self) -> int:
        return int(self.from_host.sum())

    def bytes_moved(self, bytes_per_expert: int) -> int:
        """Bytes written into slots: copies plus host restores."""
        return (self.experts_copied + self.experts_from_host) * int(bytes_per_expert)


def plan_transfers(
    old: Placement, new: Placement, keep_devices: Sequence[int | None]
) -> TransferPlan:
    """Plan how `new` is reached from `old` on the devices that survive.

    keep_devices: [new_num_devices], as in repair(): new device j was old device
    keep_devices[j], or is empty when None. A new slot whose expert lived on a surviving slot is
    copied from there (a kept slot first; else an overwritten one, on the same device first;
    spreading copies over senders); only if no survivor held it is it restored from the host.
    """
    s = old.slots_per_device
    if new.slots_per_device != s or (new.num_layers, new.num_experts) != (
        old.num_layers,
        old.num_experts,
    ):
        raise ValueError("old and new placements differ in slots_per_device, layers or experts")
    if len(keep_devices) != new.num_devices:
        raise ValueError(f"keep_devices has {len(keep_devices)} entries, want {new.num_devices}")
    old_dev = old_positions(keep_devices, old.num_devices)
    before = survivor_view(old.phy2log, old_dev, s)  # [layers, new_num_slots], -1 = empty
    after = new.phy2log.astype(np.int64)
    layers = after.shape[0]
    keep = before == after
    present = np.zeros((layers, old.num_experts + 1), dtype=bool)
    present[np.arange(layers)[:, None], np.where(before >= 0, before, old.num_experts)] = True
    from_host = ~keep & ~np.take_along_axis(present, after, axis=1)
    source = _choose_sources(before, after, keep, from_host, new)
    reads_volatile = (source >= 0) & ~np.take_along_axis(keep, np.maximum(source, 0), axis=1)
    for layer in np.unique(np.nonzero(reads_volatile)[0]).tolist():
        _break_cycles(source[layer], keep[layer], from_host[layer], new.num_devices, s)
    return TransferPlan(source_slot=source.astype(np.int32), from_host=from_host, keep=keep)


def _choose_sources(before, after, keep, from_host, new):
    """[layers, num_slots] source slot of every copied slot, -1 elsewhere.

    A copy with a single kept replica to read has no choice (most of them, vectorised). The
    others pick, in slot order, the kept replica whose (sender, shift) pair then sender has the
    fewest copies so far; with no kept replica, a volatile one, on the same device if possible.
    before, after: [layers, num_slots] expert per slot before / after; keep, from_host: bool.
    """
    s = new.slots_per_device
    source = np.full(after.shape, -1, dtype=np.int64)
    layer, dst = np.nonzero(~keep & ~from_host)
    cands = new.log2phy[layer, after[layer, dst]].astype(np.int64)  # [copies, max_replicas]
    stable = (cands >= 0) & keep[layer[:, None], np.maximum(cands, 0)]
    forced = stable.sum(axis=1) == 1
    source[layer[forced], dst[forced]] = cands[forced, np.argmax(stable[forced], axis=1)]
    # Copies so far per (layer, sender, receiver) and per (layer, sender), for the choices.
    f_layer, f_dst = layer[forced], dst[forced]
    sender = (source[f_layer, f_dst] // s).tolist()
    pair = Counter(zip(f_layer.tolist(), sender, (f_dst // s).tolist(), strict=True))
    sends = Counter(zip(f_layer.tolist(), sender, strict=True))
    for i in np.flatnonzero(~forced).tolist():
        ly, d_dst = int(layer[i]), int(dst[i])
        options = cands[i][stable[i]]
        if options.size == 0:  # no kept copy: read one that is about to be overwritten
            options = np.flatnonzero((before[ly] == after[ly, d_dst]) & ~keep[ly])
            same = options[options // s == d_dst // s]
            options = same if same.size else options
        busy = [
            (pair[ly, src // s, d_dst // s], sends[ly, src // s], src) for src in options.tolist()
        ]
        src = min(busy)[2]
        source[ly, d_dst] = src
        pair[ly, src // s, d_dst // s] += 1
        sends[ly, src // s] += 1
    return source


def _break_cycles(source, keep, from_host, num_devices, slots_per_device):
    """Turn one copy of each unschedulable read-before-write cycle into a host restore.

    A copy reading a volatile slot must run no later than the copy that overwrites that slot
    (earlier round, or same round and shift no larger). Each copy reads one slot, so these
    constraints form a functional graph; a cycle must run as one shift of one round, which
    works only when all its copies have the same shift (and so distinct senders).
    source, from_host: [num_slots], edited; keep: [num_slots] bool.
    """
    s, n = slots_per_device, num_devices
    must_precede = {}  # copy c runs no later than must_precede[c], which overwrites its source
    for c in np.flatnonzero(source >= 0).tolist():
        x = int(source[c])
        if not keep[x] and source[x] >= 0:
            must_precede[c] = x
    done: set[int] = set()
    for start in must_precede:
        path, c = [], start
        while c in must_precede and c not in done and c not in path:
            path.append(c)
            c = must_precede[c]
        if c in path:
            cycle = path[path.index(c) :]
            pairs = {(source[x] // s, (x // s - source[x] // s) % n) for x in cycle}
            shifts = {shift for _, shift in pairs}
            if len(pairs) < len(cycle) or len(shifts) > 1:
                source[cycle[0]] = -1
                from_host[cycle[0]] = True
        done.update(path)


@dataclass(frozen=True, eq=False)
class TransferRounds:
    """Copies packed into rounds of one slot per (layer, sender, shift).

    send_slot: [rounds, layers, num_devices, num_devices] int32; send_slot[r, l, d, s] is the
        local slot device d sends to device (d + s) % N in round r (s = 0: within d), or -1.
    recv_slot: [rounds, layers, num_devices, num_devices] int32; recv_slot[r, l, d, s] is the
        local slot on device d where the buffer from device (d - s) % N lands, or -1.
    """

    send_slot: np.ndarray
    recv_slot: np.ndarray

    @property
    def num_rounds(self) -> int:
        return self.send_slot.shape[0]


def schedule_rounds(plan: TransferPlan, num_devices: int, slots_per_device: int) -> TransferRounds:
    """Pack the plan's copies into as few rounds as the greedy finds.

    Each copy takes the first round, no earlier than the copies that must read its destination
    first, in which its (layer, sender, shift) pair is free. With only kept sources (what
    repair() produces) nothing constrains the order and the result is optimal: the most copies
    on one (layer, sender, shift) pair.
    """
    n, s = num_devices, slots_per_device
    layers, num_slots = plan.source_slot.shape
    if num_slots != n * s:
        raise ValueError(f"plan has {num_slots} slots, mesh has {n} x {s}")
    layer, dst = np.nonzero(plan.source_slot >= 0)
    src = plan.source_slot[layer, dst].astype(np.int64)
    sender, shift = src // s, (dst // s - src // s) % n
    if plan.keep[layer, src].all():
        rnd = _rank_in_group((layer * n + sender) * n + shift)
    else:
        rnd = _rounds_with_order(layer, dst, src, sender, shift, plan)
    rounds = int(rnd.max()) + 1 if rnd.size else 0
    send = np.full((rounds, layers, n, n), -1, dtype=np.int32)
    recv = np.full((rounds, layers, n, n), -1, dtype=np.int32)
    send[rnd, layer, sender, shift] = src % s
    recv[rnd, layer, dst // s, shift] = dst % s
    return TransferRounds(send_slot=send, recv_slot=recv)


def _rank_in_group(key):
    """[copies] position of each copy among those with the same key (in input order)."""
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    start = np.r_[0, np.flatnonzero(np.diff(sorted_key)) + 1]
    rank = np.arange(key.size) - np.repeat(start, np.diff(np.r_[start, key.size]))
    out = np.empty_like(rank)
    out[order] = rank
    return out


def _rounds_with_order(layer, dst, src, sender, shift, plan):
    """[copies] rounds when some copies read volatile slots (read no later than written).

    Kahn's order over "reader before writer" edges: a writer goes in the reader's round when
    its shift is no smaller (the shifts of a round run in order), else in a later one. What is
    left are cycles, which plan_transfers leaves only when all their copies share one shift;
    each takes one round.
    """
    rnd = np.full(dst.size, -1, dtype=np.int64)
    writer = {
        (ly, d): i for i, (ly, d) in enumerate(zip(layer.tolist(), dst.tolist(), strict=True))
    }
    waits_for = np.full(dst.size, -1, dtype=np.int64)  # copy that must not run before me
    for i in range(dst.size):
        if not plan.keep[layer[i], src[i]]:
            waits_for[i] = writer.get((int(layer[i]), int(src[i])), -1)
    # Here waits_for[i] = j means round[i] <= round[j]: process i before j.
    indegree = np.bincount(waits_for[waits_for >= 0], minlength=dst.size)
    earliest = np.zeros(dst.size, dtype=np.int64)
    used: set[tuple[int, int, int, int]] = set()

    def first_free(keys, lo):
        r = lo
        while any((r, *k) in used for k in keys):
            r += 1
        for k in keys:
            used.add((r, *k))
        return r

    ready = [i for i in range(dst.size) if indegree[i] == 0]
    while ready:
        i = ready.pop()
        rnd[i] = first_free([(int(layer[i]), int(sender[i]), int(shift[i]))], earliest[i])
        j = waits_for[i]
        if j >= 0:
            # j overwrites what i reads: same round only if j's shift runs no earlier.
            earliest[j] = max(earliest[j], rnd[i] + int(shift[j] < shift[i]))
            indegree[j] -= 1
            if indegree[j] == 0:
                ready.append(j)
    for i in np.flatnonzero(rnd < 0).tolist():  # cycles: schedule each cycle as a unit
        if rnd[i] >= 0:
            continue
        cycle, j = [i], int(waits_for[i])
        while j != i:
            cycle.append(j)
            j = int(waits_for[j])
        keys = [(int(layer[c]), int(sender[c]), int(shift[c])) for c in cycle]
        if len(set(keys)) < len(keys) or len({k[2] for k in keys}) > 1:
            raise ValueError(
                "a read-before-write cycle spans several shifts or needs one (sender, shift)"
                " pair twice"
            )
        r = first_free(keys, int(max(earliest[c] for c in cycle)))
        rnd[cycle] = r
    return rnd
