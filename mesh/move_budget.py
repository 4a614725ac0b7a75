"""A repair spread over time: the host restores a loss cannot avoid, then budgeted steps.

After a device loss the critical path should move only what it must. `restore_orphans` keeps
every surviving slot and writes each expert that lost every replica (an orphan) from the host
copy into a slot of an expert that still has two or more; nothing else moves, and the result
serves every expert. The rest of a repair (second replicas back, load-following replicas
rebuilt) then runs in the background, `repair_in_steps` cutting it into steps of at most
`max_copies` expert copies (summed over layers; a byte budget divided by an expert's bytes).

Rules of `repair_in_steps(current, target, ...)` (same mesh, same slots):
  * a move writes target[layer, q] into slot q; every move is a slot that differs, so the
    steps together make the moves of `plan_transfers(current, target)`, with one exception
    (the detours below);
  * every step's placement passes `Placement.validate`: every expert keeps a replica, never
    two on one device, never more than max_replicas;
  * each copy reads a slot that holds its expert at the step's start and that the step does
    not overwrite, so no step needs the host or an order among its copies (two lone experts
    swapping slots take two steps, via a second replica);
  * moves are taken most useful first, scored against the placement at the step's start:
    one point for giving a lone expert (one replica, the target wants more) its second
    replica, plus the cut in its layer's max device load, in units of the mean device load
    (tokens split evenly over replicas). A restore is worth a whole mean device load, so the
    lone experts, each a host restore if its device dies next, come back first; then balance.
    Moves that are not valid on their own yet (the last replica of an expert, a device that
    still holds the incoming expert) wait for the moves they need;
  * when no pending move is valid on its own (lone experts trading slots: a cycle of moves
    that need each other, which `repair` targets can make; Hypothesis found them, 2026-12-07),
    a detour breaks it: one step copies the lone expert of the best blocked move into a slot
    of an expert that has two or more replicas (one whose slot is pending anyway, if any), so
    that move becomes valid; that slot is written again later. Each detour costs one copy or
    two, and every step stays within max_copies and reads no host copy. Only when no detour
    helps (no move blocked by loneness alone, no slot to spare, or every detour would return
    to a placement already passed through, as when two lone experts trade places between the
    only two devices) are the moves of a cycle taken together in one step, which may exceed
    max_copies and read the host copy.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mesh.placement import (
    Placement,
    PlacementError,
    _bincount_rows,
    _check_load,
    _from_phy2log,
    old_positions,
    survivor_view,
)


def copies_per_step(budget_bytes: float | int, bytes_per_expert: int) -> int:
    """Expert copies that fit a byte budget per interval (at least one)."""
    return max(1, int(budget_bytes // int(bytes_per_expert)))


def restore_orphans(
    old: Placement, keep: Sequence[int], load: np.ndarray, max_replicas: int
) -> Placement:
    """The survivors' slots, plus each orphaned expert restored from the host copy.

    keep: [new_num_devices] old position of each surviving device (no new devices).
    load: [layers, num_experts] float. Orphans go heaviest first, each over a replica of the
    expert with the most replicas on the device with the fewest lone experts (then the most
    loaded one), so the survivors stay spread. Equals `survivors_only` when nothing was
    orphaned; raises PlacementError when the survivors have fewer slots than experts.
    """
    load = _check_load(load)
    old_dev = old_positions(keep, old.num_devices)
    if (old_dev < 0).any():
        raise ValueError("restore_orphans keeps surviving devices only (no None in keep)")
    s, n, experts = old.slots_per_device, len(old_dev), old.num_experts
    if n * s < experts:
        raise PlacementError(f"{n * s} slots cannot hold {experts} experts")
    phy = survivor_view(old.phy2log, old_dev, s)  # [layers, n * s]
    counts = _bincount_rows(phy, experts)
    for layer in np.flatnonzero((counts == 0).any(axis=1)):
        row, count = phy[layer], counts[layer]
        for orphan in sorted(np.flatnonzero(count == 0), key=lambda e: -load[layer, e]):
            weight = load[layer] / np.maximum(count, 1)
            dev_load = weight[row].reshape(n, s).sum(axis=1)
            lone_on = (count[row] == 1).reshape(n, s).sum(axis=1)
            shared = np.flatnonzero(count[row] >= 2)
            dev = shared // s
            pick = shared[np.lexsort((-dev_load[dev], -count[row[shared]], lone_on[dev]))[0]]
            count[row[pick]] -= 1
            row[pick], count[orphan] = orphan, 1
    return _from_phy2log(phy, experts, s, max_replicas)


def repair_in_steps(
    current: Placement, target: Placement, load: np.ndarray, max_copies: int
) -> list[Placement]:
    """Valid placements from `current` to `target`, each at most max_copies copies further.

    current, target: Placements on the same devices and slots (e.g. target = repair(current,
    range(num_devices), load, ...)). load: [layers, num_experts] float, for the scores.
    Returns the steps in order, the last equal to target; [] when nothing differs.
    """
    load = _check_load(load)
    if current.phy2log.shape != target.phy2log.shape or (
        current.slots_per_device != target.slots_per_device
        or current.num_experts != target.num_experts
    ):
        raise ValueError("current and target must have the same layers, experts and slots")
    if int(max_copies) < 1:
        raise ValueError(f"max_copies must be >= 1, got {max_copies}")
    width = target.max_replicas
    s, n, experts = current.slots_per_device, current.num_devices, current.num_experts
    state = current.phy2log.astype(np.int64)
    goal = target.phy2log.astype(np.int64)
    want = target.replica_count.astype(np.int64)
    steps: list[Placement] = []
    first: tuple[int, int] | None = None  # (layer, slot) a detour made valid: taken next
    seen = {state.tobytes()}  # placements passed through: a detour never returns to one
    while (pending := np.argwhere(state != goal)).size:
        layer, slot = pending[:, 0], pending[:, 1]
        counts = _bincount_rows(state, experts)
        order = np.argsort(-_scores(state, counts, want, load, layer, slot, goal, n, s))
        if first is not None:  # before anything that would undo the detour
            ahead = np.flatnonzero((layer[order] == first[0]) & (slot[order] == first[1]))
            order = np.concatenate([order[ahead], np.delete(order, ahead)])
            first = None
        hold = np.zeros((state.shape[0], experts, n), dtype=bool)
        lay = np.repeat(np.arange(state.shape[0]), n * s)
        hold[lay, state.ravel(), np.tile(np.arange(n * s) // s, state.shape[0])] = True
        # Copies read the step's start state: each needs a source slot the step keeps.
        sources = counts.copy()  # [layers, experts] start replicas not overwritten yet
        brought = np.zeros_like(hold[:, :, 0])  # [layers, experts] a chosen move reads it
        chosen = []
        for m in order:  # most useful first, each checked against the moves before it
            if len(chosen) == max_copies:
                break
            lm, q = layer[m], slot[m]
            a, b, d = state[lm, q], goal[lm, q], q // s
            valid = counts[lm, a] >= 2 and not hold[lm, b, d] and counts[lm, b] < width
            readable = sources[lm, b] >= 1 and (sources[lm, a] >= 2 or not brought[lm, a])
            if valid and readable:
                counts[lm, a] -= 1
                counts[lm, b] += 1
                sources[lm, a] -= 1
                brought[lm, b] = True
                hold[lm, a, d], hold[lm, b, d] = False, True
                chosen.append(m)
        if not chosen:  # every move needs another: a detour, or the best one with its needs
            detour = _detour(state, goal, counts, hold, layer, slot, order, s, width, seen)
            if detour is not None:
                lm, spare, expert, first = detour
                state[lm, spare] = expert
                seen.add(state.tobytes())
                steps.append(_from_phy2log(state.copy(), experts, s, width))
                continue
            chosen = _cycle(state, goal, layer, slot, order[0], n, s, width, experts)
        state[layer[chosen], slot[chosen]] = goal[layer[chosen], slot[chosen]]
        seen.add(state.tobytes())
        steps.append(_from_phy2log(state.copy(), experts, s, width))
    return steps


def _scores(state, counts, want, load, layer, slot, goal, n, s, chunk=4096):
    """[moves] usefulness of each move alone (module docstring); -inf when it would take an
    expert's last replica (it waits for the move that brings one elsewhere).

    state, goal: [layers, num_slots]; counts, want, load: [layers, num_experts];
    layer, slot: [moves] the moves' layer and slot.
    """
    weight = load / np.maximum(counts, 1)
    dev_load = weight[np.arange(state.shape[0])[:, None], state].reshape(-1, n, s).sum(axis=2)
    mean = np.maximum(load.sum(axis=1) / n, 1e-300)
    out = np.empty(len(layer))
    for lo in range(0, len(layer), chunk):
        lm, q = layer[lo : lo + chunk], slot[lo : lo + chunk]
        a, b, d = state[lm, q], goal[lm, q], q // s
        ca, cb = counts[lm, a], counts[lm, b]
        valid = ca >= 2
        wa = load[lm, a] / np.where(valid, ca - 1, 1)  # scored -inf below when not valid
        wb = load[lm, b] / (cb + 1)
        row = state[lm].reshape(len(lm), n, s)  # holders of a and b, per device
        has_a, has_b = (row == a[:, None, None]).any(axis=2), (row == b[:, None, None]).any(axis=2)
        after = dev_load[lm] + has_a * (wa - weight[lm, a])[:, None]
        after += has_b * (wb - weight[lm, b])[:, None]
        k = np.arange(len(lm))
        after[k, d] += wb - wa
        gain = (dev_load[lm].max(axis=1) - after.max(axis=1)) / mean[lm]
        restore = (cb == 1) & (want[lm, b] >= 2)
        out[lo : lo + chunk] = np.where(valid, gain + restore, -np.inf)
    return out


def _detour(state, goal, counts, hold, layer, slot, order, s, width, seen):
    """(layer, spare slot, expert, (layer, slot) of the move it unblocks), or None: a second
    replica for the lone expert of a pending move that only its loneness blocks, written over
    a slot of an expert with two or more replicas on another device. Slots whose own move is
    pending come first (they are rewritten anyway), then the best move first; a detour that
    would bring back a placement already passed through is skipped (no going round)."""
    candidates = []  # (spare slot not pending, rank of the move, layer, spare, expert, slot)
    for rank, m in enumerate(order):
        lm, q = int(layer[m]), int(slot[m])
        a, b, d = state[lm, q], goal[lm, q], q // s
        if counts[lm, a] != 1 or hold[lm, b, d] or counts[lm, b] >= width or width < 2:
            continue
        row = state[lm]
        spares = np.flatnonzero((counts[lm, row] >= 2) & ~hold[lm, a, np.arange(row.size) // s])
        candidates += [(bool(row[p] == goal[lm, p]), rank, lm, int(p), a, q) for p in spares]
    for _, _, lm, spare, expert, q in sorted(candidates):
        before, state[lm, spare] = state[lm, spare], expert
        known = state.tobytes() in seen
        state[lm, spare] = before
        if not known:
            return lm, spare, expert, (lm, q)
    return None


def _cycle(state, goal, layer, slot, first, n, s, width, experts):
    """[moves] indices: move `first` plus the pending moves it needs, until the layer is valid.

    An expert left with no replica takes the move that brings it; a device holding an expert
    twice takes the move that overwrites the old copy; an expert over max_replicas takes a
    move that overwrites one of its slots. Applying every pending move gives the (valid)
    target, so this ends.
    """
    lm = layer[first]
    ids = np.flatnonzero(layer == lm)
    row = state[lm].copy()
    taken = {int(first)}
    row[slot[first]] = goal[lm, slot[first]]
    while True:
        count = np.bincount(row, minlength=experts)
        q_pending = [int(m) for m in ids if int(m) not in taken]
        need = None
        missing = set(np.flatnonzero(count == 0).tolist())
        if missing:
            need = next(m for m in q_pending if goal[lm, slot[m]] in missing)
        else:
            dev = row.reshape(n, s)
            dup = [
                (d, x)
                for d in range(n)
                for x, c in zip(*np.unique(dev[d], return_counts=True), strict=True)
                if c > 1
            ]
            over = np.flatnonzero(count > width)
            if dup:
                d, x = dup[0]
                need = next(m for m in q_pending if slot[m] // s == d and row[slot[m]] == x)
            elif over.size:
                need = next(m for m in q_pending if row[slot[m]] == over[0])
        if need is None:
            return np.array(sorted(taken))
        taken.add(need)
        row[slot[need]] = goal[lm, slot[need]]
