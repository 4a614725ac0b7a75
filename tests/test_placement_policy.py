"""What the placement policies promise (mesh/placement_policy.py), over random loads and shapes."""

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh.placement import Placement, device_load, orphaned_by_loss, place, repair
from mesh.placement_policy import (
    BALANCE_SLACK,
    best_lone,
    counts_with_lone,
    lone_range,
    placement_figures,
    policy_counts,
)
from tests.test_placement import LOAD_KINDS, layouts, make_load

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
POLICY = st.sampled_from(("auto", "balance", "survive"))


def max_w(load, counts):
    return (load / counts).max(axis=1)


def restore_promise(experts, n, s, budget):
    """Most lone experts one device may hold under "auto" (module docstring, promise 1)."""
    r = n * s - experts
    return min(s, budget + -(-max(0, experts - r) // n))


def worst_restore(p: Placement) -> np.ndarray:
    """[layers] most experts a single device loss orphans, from the definition."""
    return orphaned_by_loss(p).sum(axis=2).max(axis=1)


@SETTINGS
@given(layouts(), POLICY, st.integers(0, 3))
def test_every_policy_obeys_every_rule(layout, policy, budget):
    load, n, s, max_replicas = layout
    p = place(load, n, s, max_replicas, policy=policy, restore_budget=budget)
    p.validate()
    assert p.phy2log.shape == (load.shape[0], n * s)
    assert p.log2phy.shape == (*load.shape, max_replicas)


@SETTINGS
@given(layouts(), st.integers(1, 3))
def test_auto_restore_and_balance_within_the_promise(layout, budget):
    load, n, s, max_replicas = layout
    p = place(load, n, s, max_replicas, policy="auto", restore_budget=budget)
    experts = load.shape[1]
    restore = worst_restore(p)
    assert (restore <= restore_promise(experts, n, s, budget)).all()
    if n * s >= 2 * experts and s > budget:  # R >= E: within the budget itself
        assert (restore <= budget).all()
    lone = (p.replica_count == 1).sum(axis=1)
    plain = s <= budget  # no device can hold more than the budget: plain EPLB packing
    if not plain:
        assert (restore <= np.maximum(budget, -(-lone // n))).all()  # lone experts spread
    w = max_w(load, p.replica_count)
    per_device = device_load(p, load)
    mean = per_device.mean(axis=1)
    aligned = plain | (lone % n == 0)
    allowed = mean + np.where(aligned, 1.0, 2.0) * w
    assert (per_device.max(axis=1) <= allowed * (1 + 1e-9) + 1e-9).all()


@SETTINGS
@given(layouts(), st.integers(1, 3))
def test_auto_sits_between_pure_eplb_and_two_replicas_each(layout, budget):
    """balance (EPLB) has the lowest max load per replica; auto never does worse than the
    every-expert-twice floor when that floor exists (R >= E)."""
    load, n, s, max_replicas = layout
    cap = min(n, max_replicas)
    auto = policy_counts(load, n, s, cap, "auto", budget)
    balance = policy_counts(load, n, s, cap, "balance")
    survive = policy_counts(load, n, s, cap, "survive")
    for counts in (auto, balance, survive):
        assert (counts.sum(axis=1) == n * s).all() and (counts >= 1).all()
        assert (counts <= cap).all()
    assert (max_w(load, balance) <= max_w(load, auto) * (1 + 1e-9)).all()
    if n * s >= 2 * load.shape[1]:  # within the slack of the every-expert-twice layout
        slack = BALANCE_SLACK * load.sum(axis=1) / n
        assert (max_w(load, auto) <= (max_w(load, survive) + slack) * (1 + 1e-9)).all()
    # EPLB optimality of balance: no replica could move to an expert with a higher load each.
    for layer in range(load.shape[0]):
        c = balance[layer]
        if (c < cap).any() and (c > 1).any():
            taker = (load[layer] / c)[c < cap].max()
            giver = (load[layer][c > 1] / (c[c > 1] - 1)).min()
            assert taker <= giver * (1 + 1e-9)


@st.composite
def growing_meshes(draw):
    """(load, n, cap, budget): a mesh whose slots per device grow from E / N up."""
    n = draw(st.integers(2, 8))
    experts = draw(st.integers(2, 24))
    load = make_load(draw(st.sampled_from(LOAD_KINDS)), 2, experts, draw(st.integers(0, 999)))
    return load, n, draw(st.integers(2, n + 2)), draw(st.integers(1, 3))


@SETTINGS
@given(growing_meshes())
def test_auto_has_no_cliff(case):
    """More redundant slots never raise the best max load per replica, and auto stays within
    1% of a mean device load of it."""
    load, n, max_replicas, budget = case
    experts = load.shape[1]
    cap = min(n, max_replicas)
    slack = BALANCE_SLACK * load.sum(axis=1) / n
    before = None
    for s in range(-(-experts // n), experts + 1):
        if n * s > experts * cap:
            break
        best = max_w(load, policy_counts(load, n, s, cap, "auto", budget, balance_slack=0.0))
        auto = max_w(load, policy_counts(load, n, s, cap, "auto", budget))
        assert (auto <= (best + slack) * (1 + 1e-9)).all()
        if before is not None:
            assert (best <= before * (1 + 1e-9)).all(), s
        before = best


def test_lone_range_follows_the_ramp():
    # 256 experts on 32 devices, budget 2: R = E allows 64 lone experts, two per device.
    assert lone_range(256, 32, 16, 32, 2) == (0, 64)
    # Between R = B*N and R = E the allowance shrinks by one lone expert per redundant slot.
    assert lone_range(256, 32, 12, 32, 2) == (128, 192)
    # Below R = B*N every slot may follow load, up to what the caps can fill.
    assert lone_range(256, 32, 10, 32, 2) == (192, 253)
    counts = counts_with_lone(np.ones((1, 8)), 12, 4, 4)
    assert sorted(counts[0].tolist()) == [1] * 4 + [2] * 4


@SETTINGS
@given(layouts(), st.integers(1, 3), st.sampled_from([0.0, 0.01, 0.3]))
def test_best_lone_is_the_fewest_within_the_slack_of_every_allowed_count(layout, budget, share):
    """Bisection against trying every u in [lo, hi]."""
    load, n, s, max_replicas = layout
    cap = min(n, max_replicas)
    lo, hi = lone_range(load.shape[1], n, s, cap, budget)
    every = np.stack(
        [max_w(load, counts_with_lone(load, n * s, cap, u)) for u in range(lo, hi + 1)]
    )  # [u, layers]
    slack = share * load.sum(axis=1) / n
    chosen, counts = best_lone(load, n * s, cap, lo, hi, slack)
    assert ((lo <= chosen) & (chosen <= hi)).all()
    assert np.array_equal(counts, counts_with_lone(load, n * s, cap, chosen))
    limit = every.min(axis=0) + slack
    assert (max_w(load, counts) <= limit * (1 + 1e-9)).all()
    for layer, u in enumerate(chosen):  # no fewer lone experts would do
        assert (every[: u - lo, layer] > limit[layer] * (1 - 1e-7)).all()


def test_auto_at_deepseek_shape_keeps_two_lone_experts_per_device():
    """256 experts, Zipf(1), 32 devices x 16 slots (R = E): balanced, two restores at most."""
    rng = np.random.default_rng(0)
    share = 1.0 / np.arange(1, 257)
    load = np.stack([rng.permutation(share) for _ in range(4)]) * 1e5
    p = place(load, 32, 16, 32, policy="auto")
    figures = placement_figures(p, load)
    assert figures.worst_restore.max() <= 2
    assert figures.imbalance.max() <= 1.3
    survive = placement_figures(place(load, 32, 16, 32), load)
    assert survive.worst_restore.max() == 0 and survive.imbalance.max() > 2.5


@SETTINGS
@given(layouts(), st.integers(1, 3), st.data())
def test_auto_repair_keeps_the_lone_allowance(layout, budget, data):
    load, n, s, max_replicas = layout
    experts = load.shape[1]
    old = place(load, n, s, max_replicas, policy="auto", restore_budget=budget)
    if not experts <= (n - 1) * s <= experts * min(n - 1, max_replicas):
        return  # no valid layout on the survivors
    lost = data.draw(st.integers(0, n - 1))
    keep = [d for d in range(n) if d != lost]
    new = repair(old, keep, load, max_replicas, policy="auto", restore_budget=budget)
    new.validate()
    lone = (new.replica_count == 1).sum(axis=1)
    assert (worst_restore(new) <= np.maximum(budget, -(-lone // (n - 1)))).all()


def test_placement_figures_match_their_definitions():
    load = make_load("zipf", 3, 12, seed=5)
    p = place(load, 4, 5, 4, policy="auto", restore_budget=1)
    f = placement_figures(p, load)
    mean = load.sum(axis=1) / 4
    assert np.allclose(f.imbalance, device_load(p, load).max(axis=1) / mean)
    assert np.allclose(f.primary_floor, np.maximum(1, load.max(axis=1) / mean))
    assert (f.primary_imbalance >= f.primary_floor - 1e-12).all()
    orphans = orphaned_by_loss(p)
    for layer in range(3):
        assert f.worst_restore[layer] == max(orphans[layer, d].sum() for d in range(4))
    assert f.worst_restore_total == max(orphans[:, d].sum() for d in range(4))


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="policy must be one of"):
        place(np.ones((1, 4)), 2, 3, 2, policy="fast")
