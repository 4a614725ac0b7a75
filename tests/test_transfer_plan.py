"""Transfer plans and rounds turn the surviving layout into the new one (mesh/transfer_plan.py).

The simulation holds one expert id per slot (-1: a slot of a new device, poisoned: reading it
is a bug). Lost devices are not in the new numbering at all, so they can never be read.
"""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.placement import Placement, PlacementError, place, repair, survivor_view
from mesh.transfer_plan import TransferPlan, plan_transfers, schedule_rounds

SETTINGS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
POISON = -1


def surviving_layout(old, keep) -> np.ndarray:
    """[layers, new_num_slots] what each new slot holds before any transfer."""
    old_dev = np.array([-1 if k is None else k for k in keep])
    return survivor_view(old.phy2log, old_dev, old.slots_per_device)


def execute(old, new, keep, plan, rounds) -> np.ndarray:
    """Run the rounds then the host restores on expert ids; return the final layout.

    Executes in the compiled program's order (mesh.reshard.SlotTransfer): the shifts of a round
    one after another, each reading all its sources before writing its destinations.
    """
    s, n = new.slots_per_device, new.num_devices
    held = surviving_layout(old, keep).copy()
    assert rounds.send_slot.shape == rounds.recv_slot.shape
    assert rounds.send_slot.shape[1:] == (new.num_layers, n, n)
    for r in range(rounds.num_rounds):
        sends, recvs = rounds.send_slot[r], rounds.recv_slot[r]
        # Every buffer sent is received: recv[l, (d + h) % n, h] pairs with send[l, d, h].
        shifted = np.stack([np.roll(recvs[:, :, h], -h, axis=1) for h in range(n)], axis=2)
        assert np.array_equal(sends >= 0, shifted >= 0)
        for h in range(n):
            writes = []
            for layer, d in zip(*np.nonzero(sends[:, :, h] >= 0), strict=True):
                value = held[layer, d * s + sends[layer, d, h]]
                assert value != POISON, f"round {r} shift {h} reads a poisoned slot"
                dst = (d + h) % n
                writes.append((layer, dst * s + recvs[layer, dst, h], value))
            for layer, slot, value in writes:  # one ppermute: its reads precede its writes
                held[layer, slot] = value
    held[plan.from_host] = new.phy2log[plan.from_host]
    return held


def check_plan(old, new, keep, plan: TransferPlan):
    before = surviving_layout(old, keep)
    after = new.phy2log
    copied = plan.source_slot >= 0
    # Exactly one way for each slot.
    assert ((copied.astype(int) + plan.from_host + plan.keep) == 1).all()
    assert np.array_equal(plan.keep, before == after)
    # A source held the expert before the move; the host only restores what no survivor held.
    layer, dst = np.nonzero(copied)
    assert (before[layer, plan.source_slot[layer, dst]] == after[layer, dst]).all()
    for layer, slot in zip(*np.nonzero(plan.from_host), strict=True):
        assert after[layer, slot] not in before[layer]
    assert plan.experts_copied == copied.sum()
    assert plan.bytes_moved(10) == 10 * (copied.sum() + plan.from_host.sum())


@st.composite
def reconfigurations(draw):
    """(old, keep, load, max_replicas) for fail, rejoin or rebalance, all feasible."""
    n = draw(st.integers(1, 8))
    s = draw(st.integers(1, 4))
    experts = draw(st.integers(s, n * s))
    layers = draw(st.integers(1, 3))
    max_replicas = draw(st.integers(-(-n * s // experts), n + 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    load = rng.random((layers, experts)) ** draw(st.sampled_from([0.0, 1.0, 4.0]))
    old = place(load, n, s, max_replicas)
    kind = draw(st.sampled_from(("fail", "rejoin", "rebalance")))
    devices = list(range(n))
    if kind == "rebalance":
        keep = devices
        load = rng.random((layers, experts)) ** 3
    else:
        spare = max(0, n - -(-experts // s))  # devices that can go with every expert served
        lost = draw(st.permutations(devices))[: draw(st.integers(0, spare))]
        keep = draw(st.permutations([d for d in devices if d not in lost]))
        keep = keep + [None] * (draw(st.integers(1, 2)) if kind == "rejoin" else 0)
    return old, keep, load, max_replicas


@SETTINGS
@given(reconfigurations())
def test_rounds_turn_survivors_into_the_repaired_layout(case):
    old, keep, load, max_replicas = case
    try:
        new = repair(old, keep, load, max_replicas)
    except PlacementError:
        return
    plan = plan_transfers(old, new, keep)
    check_plan(old, new, keep, plan)
    rounds = schedule_rounds(plan, new.num_devices, new.slots_per_device)
    assert np.array_equal(execute(old, new, keep, plan, rounds), new.phy2log)
    # Sources of repair() plans are kept slots, so the greedy packing is optimal: the busiest
    # (layer, sender, shift) pair sets the number of rounds.
    layer, dst = np.nonzero(plan.source_slot >= 0)
    src = plan.source_slot[layer, dst]
    s, n = new.slots_per_device, new.num_devices
    if plan.keep[layer, src].all():
        pairs = (layer * n + src // s) * n + (dst // s - src // s) % n
        busiest = np.bincount(pairs).max() if pairs.size else 0
        assert rounds.num_rounds == busiest


@SETTINGS
@given(reconfigurations(), st.data())
def test_rounds_between_any_two_placements(case, data):
    """A full re-pack (place() on the new devices) reads slots that are later overwritten."""
    old, keep, load, max_replicas = case
    if not keep:
        return
    rng = np.random.default_rng(data.draw(st.integers(0, 99)))
    try:
        new = place(rng.random(load.shape), len(keep), old.slots_per_device, max_replicas)
    except PlacementError:
        return
    plan = plan_transfers(old, new, keep)
    copied = plan.source_slot >= 0
    assert ((copied.astype(int) + plan.from_host + plan.keep) == 1).all()
    rounds = schedule_rounds(plan, new.num_devices, new.slots_per_device)
    assert np.array_equal(execute(old, new, keep, plan, rounds), new.phy2log)


def test_fail_then_rejoin_under_skewed_load():
    """tiny-mixtral's shape (8 devices x 2 slots, 8 experts, R = 8) through fail + rejoin under
    skewed loads: the rejoin's repair moves kept replicas, so copies read volatile slots."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        load = rng.random((2, 8)) ** 6
        old = place(load, 8, 2, 8)
        lost = sorted(rng.choice(8, size=int(rng.integers(1, 4)), replace=False).tolist())
        survivors = [d for d in range(8) if d not in lost]
        mid = repair(old, survivors, load, 8)
        rejoined = list(range(len(survivors))) + [None] * int(rng.integers(1, len(lost) + 1))
        skewed = rng.random((2, 8)) ** 6
        new = repair(mid, rejoined, skewed, 8)
        for before, after, keep in ((old, mid, survivors), (mid, new, rejoined)):
            plan = plan_transfers(before, after, keep)
            check_plan(before, after, keep, plan)
            rounds = schedule_rounds(plan, after.num_devices, after.slots_per_device)
            assert np.array_equal(execute(before, after, keep, plan, rounds), after.phy2log)


def test_single_loss_with_full_redundancy_needs_no_host():
    rng = np.random.default_rng(0)
    load = 1.0 / rng.permutation(np.arange(1, 65)).reshape(1, 64) ** 1.0
    old = place(np.repeat(load, 3, axis=0), 8, 16, 8)  # 128 slots, R = 64 = E
    for lost in range(8):
        keep = [d for d in range(8) if d != lost]
        new = repair(old, keep, np.repeat(load, 3, axis=0), 8)
        plan = plan_transfers(old, new, keep)
        assert plan.experts_from_host == 0
        rounds = schedule_rounds(plan, 7, 16)
        assert np.array_equal(execute(old, new, keep, plan, rounds), new.phy2log)


def test_rejoin_restores_from_host_only_missing_experts():
    old = place(np.ones((1, 6)), 3, 2, 2)  # 6 slots, 6 experts: no redundancy
    new = repair(old, [0, 1, None], np.ones((1, 6)), 2)
    plan = plan_transfers(old, new, [0, 1, None])
    lost_experts = set(old.experts_on_device(0, 2).tolist())
    assert set(new.phy2log[plan.from_host].tolist()) == lost_experts
    assert plan.experts_copied == 0 and plan.experts_from_host == 2
    rounds = schedule_rounds(plan, 3, 2)
    assert rounds.num_rounds == 0 and rounds.send_slot.shape == (0, 1, 3, 3)


def test_within_device_copy_uses_shift_zero():
    """A slot refilled from another slot of the same device is a shift-0 copy."""
    old = place(np.ones((1, 2)), 1, 2, 1)  # one device holding [0, 1]
    new = Placement(np.array([[1, 0]]), np.array([[[1], [0]]]), np.array([[1, 1]]), 2)
    new.validate()  # the same experts, local slots swapped
    plan = plan_transfers(old, new, [0])
    # A two-copy cycle on one (sender, shift) pair cannot run in one round: one copy goes to
    # the host, the other reads its source before the host overwrites it.
    assert plan.experts_copied == 1 and plan.experts_from_host == 1
    rounds = schedule_rounds(plan, 1, 2)
    assert rounds.send_slot[0, 0, 0, 0] >= 0
    assert np.array_equal(execute(old, new, [0], plan, rounds), new.phy2log)


def test_plan_rejects_mismatched_meshes():
    old = place(np.ones((1, 4)), 2, 2, 2)
    other = place(np.ones((1, 4)), 1, 4, 1)
    with pytest.raises(ValueError, match="slots_per_device"):
        plan_transfers(old, other, [0])
    with pytest.raises(ValueError, match="entries"):
        plan_transfers(old, old, [0])
