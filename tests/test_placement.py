"""Properties of failure-aware expert placement (mesh/placement.py)."""

from collections import deque

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.placement import (
    Placement,
    PlacementError,
    device_load,
    orphaned_after,
    orphaned_by_loss,
    place,
    repair,
    replica_counts,
    survivor_view,
)

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LOAD_KINDS = ("uniform", "random", "small_ints", "zipf")


def make_load(kind: str, layers: int, experts: int, seed: int) -> np.ndarray:
    """[layers, experts] load of a given shape: ties, zeros and skew all show up."""
    rng = np.random.default_rng(seed)
    if kind == "uniform":
        return np.ones((layers, experts))
    if kind == "random":
        return rng.random((layers, experts)) * 100
    if kind == "small_ints":
        return rng.integers(0, 4, (layers, experts)).astype(float)
    ranks = rng.permuted(np.tile(np.arange(1, experts + 1), (layers, 1)), axis=1)
    return 1e4 / ranks ** rng.uniform(0.5, 1.5)


@st.composite
def layouts(draw, max_devices=8, max_slots=5):
    """(load, num_devices, slots_per_device, max_replicas) that place() must accept."""
    n = draw(st.integers(1, max_devices))
    s = draw(st.integers(1, max_slots))
    experts = draw(st.integers(s, n * s))  # a device holds s distinct experts
    layers = draw(st.integers(1, 3))
    max_replicas = draw(st.integers(-(-n * s // experts), n + 2))
    kind = draw(st.sampled_from(LOAD_KINDS))
    load = make_load(kind, layers, experts, draw(st.integers(0, 2**16)))
    return load, n, s, max_replicas


def guaranteed_second(load, num_slots, cap):
    """[layers, experts] bool: experts given a second replica before EPLB (module docstring)."""
    layers, experts = load.shape
    g = int(np.clip(2 * (num_slots - experts) - experts, 0, experts)) if cap >= 2 else 0
    order = np.lexsort((np.broadcast_to(np.arange(experts), load.shape), -load), axis=-1)
    out = np.zeros(load.shape, dtype=bool)
    out[np.arange(layers)[:, None], order[:, :g]] = True
    return out


def survivors_of(old: Placement, keep) -> np.ndarray:
    old_dev = np.array([-1 if k is None else k for k in keep])
    return survivor_view(old.phy2log, old_dev, old.slots_per_device)


def moved_slots(old: Placement, new: Placement, keep) -> np.ndarray:
    """[layers] new slots whose expert differs from what the slot held before."""
    return (new.phy2log != survivors_of(old, keep)).sum(axis=1)


def must_create(old: Placement, new: Placement, keep) -> np.ndarray:
    """[layers] lower bound on moves: replicas the survivors cannot provide."""
    before = survivors_of(old, keep)
    e = new.num_experts
    surviving = np.stack([np.bincount(b[b >= 0], minlength=e) for b in before])
    return np.maximum(new.replica_count - surviving, 0).sum(axis=1)


def fewest_moves(counts, survivors, num_devices, slots_per_device):
    """Exact fewest moves for one layer: min-cost flow by successive shortest paths.

    source -> expert (capacity count) -> device (capacity 1, cost -1 if the device held the
    expert before) -> sink (capacity slots_per_device). Independent of mesh/placement.py.
    """
    experts = len(counts)
    held = {(int(x), q // slots_per_device) for q, x in enumerate(survivors) if x >= 0}
    nodes = experts + num_devices + 2
    source, sink = 0, nodes - 1
    cap, cost, adj = {}, {}, [[] for _ in range(nodes)]

    def edge(u, v, c, w):
        adj[u].append(v)
        adj[v].append(u)
        cap[u, v], cap[v, u], cost[u, v], cost[v, u] = c, 0, w, -w

    for e in range(experts):
        edge(source, 1 + e, int(counts[e]), 0)
        for d in range(num_devices):
            edge(1 + e, 1 + experts + d, 1, -int((e, d) in held))
    for d in range(num_devices):
        edge(1 + experts + d, sink, slots_per_device, 0)
    total = 0
    for _ in range(num_devices * slots_per_device):
        dist, parent = [np.inf] * nodes, [-1] * nodes
        dist[source] = 0
        queue, queued = deque([source]), {source}
        while queue:  # SPFA (Bellman-Ford with a queue): residual costs can be negative
            u = queue.popleft()
            queued.discard(u)
            for v in adj[u]:
                if cap[u, v] > 0 and dist[u] + cost[u, v] < dist[v]:
                    dist[v], parent[v] = dist[u] + cost[u, v], u
                    if v not in queued:
                        queue.append(v)
                        queued.add(v)
        v = sink
        while v != source:
            u = parent[v]
            cap[u, v] -= 1
            cap[v, u] += 1
            v = u
        total += dist[sink]
    return num_devices * slots_per_device + total


# --- place -------------------------------------------------------------------------------------


@SETTINGS
@given(layouts())
def test_place_obeys_every_rule(layout):
    load, n, s, max_replicas = layout
    p = place(load, n, s, max_replicas)
    p.validate()  # every expert served, distinct devices, tables consistent
    assert p.phy2log.shape == (load.shape[0], n * s)
    assert p.log2phy.shape == (*load.shape, max_replicas)
    assert p.num_devices == n and p.slots_per_device == s
    assert (p.replica_count.sum(axis=1) == n * s).all()
    for layer in range(p.num_layers):
        for d in range(n):  # exactly S slots per device, all distinct experts
            on = p.experts_on_device(layer, d)
            assert len(on) == s and len(set(on.tolist())) == s
            assert (p.device_of_slot(p.log2phy[layer][p.log2phy[layer] >= 0]) < n).all()


@SETTINGS
@given(layouts())
def test_replica_counts_follow_load(layout):
    """EPLB optimality: no replica could move to an expert with a higher load per replica."""
    load, n, s, max_replicas = layout
    cap = min(n, max_replicas)
    counts = replica_counts(load, n * s, cap)
    assert (counts.sum(axis=1) == n * s).all()
    assert (counts >= 1).all() and (counts <= cap).all()
    floor = 1 + guaranteed_second(load, n * s, cap)
    assert (counts >= floor).all()
    for layer in range(load.shape[0]):
        can_take = counts[layer] < cap
        can_give = counts[layer] > floor[layer]
        if can_take.any() and can_give.any():
            taker = (load[layer] / counts[layer])[can_take].max()
            giver = (load[layer][can_give] / (counts[layer][can_give] - 1)).min()
            assert taker <= giver * (1 + 1e-9)


@SETTINGS
@given(layouts())
def test_place_balance_bound(layout):
    """max device load - min device load <= max load per replica, in every layer."""
    load, n, s, max_replicas = layout
    p = place(load, n, s, max_replicas)
    per_device = device_load(p, load)
    max_w = (load / p.replica_count).max(axis=1)
    spread = per_device.max(axis=1) - per_device.min(axis=1)
    assert (spread <= max_w * (1 + 1e-9) + 1e-9).all()
    mean = per_device.mean(axis=1)
    assert (per_device.max(axis=1) <= mean + max_w * (1 + 1e-9) + 1e-9).all()


@st.composite
def redundant_layouts(draw):
    """Layouts with R = N*S - E >= E redundant slots."""
    experts = draw(st.integers(1, 12))
    n = draw(st.integers(2, 8))
    s = draw(st.integers(-(-2 * experts // n), experts))
    load = make_load(draw(st.sampled_from(LOAD_KINDS)), 2, experts, draw(st.integers(0, 99)))
    return load, n, s, draw(st.integers(max(2, -(-n * s // experts)), n + 2))


@SETTINGS
@given(redundant_layouts())
def test_enough_redundancy_means_no_single_loss_orphans(layout):
    load, n, s, max_replicas = layout
    p = place(load, n, s, max_replicas)
    assert (p.replica_count >= 2).all()
    assert not orphaned_by_loss(p).any()
    for d in range(n):
        assert not orphaned_after(p, [d]).any()


@SETTINGS
@given(layouts(), st.data())
def test_orphans_match_definition(layout, data):
    load, n, s, max_replicas = layout
    p = place(load, n, s, max_replicas)
    lost = data.draw(st.lists(st.integers(0, n - 1), unique=True, max_size=n))
    got = orphaned_after(p, lost)
    by_one = orphaned_by_loss(p)
    for layer in range(p.num_layers):
        for e in range(p.num_experts):
            devices = {q // s for q in np.flatnonzero(p.phy2log[layer] == e)}
            assert got[layer, e] == devices.issubset(lost)
            for d in range(n):
                assert by_one[layer, d, e] == (devices == {d})


def test_place_is_deterministic():
    load = make_load("small_ints", 4, 24, seed=3)  # many ties
    a, b = place(load, 6, 5, 6), place(load.copy(), 6, 5, 6)
    assert np.array_equal(a.phy2log, b.phy2log) and np.array_equal(a.log2phy, b.log2phy)
    keep = [0, 2, 3, 5, 1]
    ra, rb = repair(a, keep, load, 6), repair(b, list(keep), load.copy(), 6)
    assert np.array_equal(ra.phy2log, rb.phy2log)


def test_place_refuses_too_few_slots_with_the_numbers():
    with pytest.raises(PlacementError, match=r"6 slots cannot hold 8 experts"):
        place(np.ones((1, 8)), 3, 2, 2)
    with pytest.raises(PlacementError, match=r"12 slots exceed 4 experts x 2"):
        place(np.ones((1, 4)), 6, 2, 2)


def test_uniform_load_spreads_replicas_evenly():
    p = place(np.ones((2, 8)), 4, 3, 4)  # 12 slots: 4 experts get a second replica
    assert sorted(p.replica_count[0].tolist()) == [1] * 4 + [2] * 4


# --- repair ------------------------------------------------------------------------------------


@st.composite
def reconfigurations(draw):
    """(old, keep, new load, max_replicas, kind): fail, rejoin, rebalance or a mix."""
    load, n, s, max_replicas = draw(layouts())
    old = place(load, n, s, max_replicas)
    kind = draw(st.sampled_from(("fail", "rejoin", "rebalance")))
    devices = list(range(n))
    if kind == "fail":
        spare = n - -(-load.shape[1] // s)  # devices that can go with every expert served
        refused = spare < 1 or draw(st.sampled_from([False, False, False, True]))
        count = draw(st.integers(1, n) if refused else st.integers(1, spare))
        lost = draw(st.permutations(devices))[:count]
        keep = [d for d in devices if d not in lost]
        keep = draw(st.permutations(keep)) if draw(st.booleans()) else keep
    elif kind == "rejoin":
        lost = draw(st.lists(st.sampled_from(devices), unique=True, max_size=n - 1))
        keep = [d for d in devices if d not in lost] + [None] * draw(st.integers(1, 2))
    else:
        keep = devices
        load = make_load(draw(st.sampled_from(LOAD_KINDS)), *load.shape, draw(st.integers(0, 99)))
    return old, keep, load, max_replicas, kind


def feasible(old: Placement, keep, max_replicas) -> bool:
    slots = len(keep) * old.slots_per_device
    return old.num_experts <= slots <= old.num_experts * min(len(keep), max_replicas)


@SETTINGS
@given(reconfigurations())
def test_repair_is_valid_and_moves_fewest_slots(case):
    old, keep, load, max_replicas, kind = case
    if not feasible(old, keep, max_replicas):
        with pytest.raises(PlacementError):
            repair(old, keep, load, max_replicas)
        return
    new = repair(old, keep, load, max_replicas)
    new.validate()
    assert new.num_devices == len(keep) and new.log2phy.shape == old.log2phy.shape
    assert np.array_equal(
        new.replica_count, replica_counts(load, new.num_slots, min(len(keep), max_replicas))
    )
    moved, lower = moved_slots(old, new, keep), must_create(old, new, keep)
    assert (moved >= lower).all()
    before = survivors_of(old, keep)
    for layer in range(new.num_layers):  # exact optimum for the same replica counts
        best = fewest_moves(
            new.replica_count[layer], before[layer], len(keep), old.slots_per_device
        )
        assert moved[layer] == best
    for j, k in enumerate(keep):  # an expert a surviving device still hosts did not move
        s = old.slots_per_device
        if k is None:
            continue
        was, now = old.experts_on_device(0, k), new.experts_on_device(0, j)
        for q in range(s):
            if was[q] in now:
                assert now[q] == was[q]


@pytest.mark.parametrize("redundant", [8, 64])
def test_single_loss_moves_only_what_must_be_created(redundant):
    """The common case: one device dies and E >> S. No survivor slot that is wanted moves.

    (Not a law: in dense layouts, E close to S or max_replicas binding, the distinct-device rule
    can force one extra move; test_repair_is_valid_and_moves_fewest_slots checks the optimum.)
    """
    load = make_load("zipf", 4, 64, seed=7)
    n = 16
    s = -(-(64 + redundant) // n)
    old = place(load, n, s, 16)
    for lost in range(n):
        keep = [d for d in range(n) if d != lost]
        new = repair(old, keep, load, 16)
        assert (moved_slots(old, new, keep) == must_create(old, new, keep)).all()
        if redundant >= 64:  # R >= E: nothing to create, every expert kept a replica
            assert not orphaned_after(old, [lost]).any()


def test_rejoin_fills_the_new_device():
    load = make_load("zipf", 3, 16, seed=1)
    old = place(load, 4, 6, 4)
    failed = repair(old, [0, 1, 3], load, 4)
    back = repair(failed, [0, 1, 2, None], load, 4)
    back.validate()
    assert back.num_devices == 4
    for layer in range(3):
        assert len(set(back.experts_on_device(layer, 3).tolist())) == 6
    # Expert 8 gains two replicas and only one fits on the new device: one survivor slot must
    # make room, so the fewest moves is one more than the replicas that must be created.
    keep = [0, 1, 2, None]
    moved, before = moved_slots(failed, back, keep), survivors_of(failed, keep)
    assert (moved == must_create(failed, back, keep) + 1).all()
    for layer in range(3):
        assert moved[layer] == fewest_moves(back.replica_count[layer], before[layer], 4, 6)


def test_rebalance_follows_the_new_load():
    old = place(np.ones((1, 8)), 4, 3, 4)
    hot = np.ones((1, 8))
    hot[0, 5] = 50.0
    new = repair(old, [0, 1, 2, 3], hot, 4)
    new.validate()
    assert new.replica_count[0, 5] == 4  # as many as there are devices
    assert moved_slots(old, new, [0, 1, 2, 3]).sum() == must_create(old, new, [0, 1, 2, 3]).sum()


def test_repair_refuses_when_too_few_slots_remain():
    old = place(np.ones((2, 10)), 4, 3, 3)  # 12 slots for 10 experts
    with pytest.raises(PlacementError, match=r"9 slots cannot hold 10 experts"):
        repair(old, [0, 1, 3], np.ones((2, 10)), 3)


def test_repair_rejects_bad_keep_lists():
    old = place(np.ones((1, 4)), 4, 2, 2)
    with pytest.raises(ValueError, match="twice"):
        repair(old, [0, 0, 1], np.ones((1, 4)), 2)
    with pytest.raises(ValueError, match="outside"):
        repair(old, [0, 7], np.ones((1, 4)), 2)


# --- validate ----------------------------------------------------------------------------------


def test_validate_names_the_broken_rule():
    p = place(np.ones((1, 4)), 2, 3, 2)  # 6 slots, experts 0..3
    p.validate()
    bad = p.phy2log.copy()
    bad[0, :3] = [0, 0, 1]  # two replicas of 0 on device 0 (and counts now disagree)
    with pytest.raises(ValueError, match="replica_count says"):
        Placement(bad, p.log2phy, p.replica_count, 3).validate()
    same_device = Placement(
        np.array([[0, 1, 0, 2, 3, 1]]),
        np.array([[[0, 2], [1, 5], [3, -1], [4, -1]]]),
        np.array([[2, 2, 1, 1]]),
        3,
    )
    with pytest.raises(ValueError, match="two replicas on one device"):
        same_device.validate()
    missing = Placement(
        np.array([[0, 1, 2, 0, 1, 2]]),
        np.array([[[0, 3], [1, 4], [2, 5], [-1, -1]]]),
        np.array([[2, 2, 2, 0]]),
        3,
    )
    with pytest.raises(ValueError, match="expert 3 has no slot"):
        missing.validate()
    assert p.phy2log.flags.writeable is False
