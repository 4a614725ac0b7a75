"""The compiled transfer programs (mesh/reshard.py) execute plans as the planner assumes.

tests/test_transfer_plan.py checks plans against a numpy model of the program; here the real
programs run on the simulated devices and every slot is read back. Each slot holds a value that
names its expert, so a slot that ends up holding another expert's weights shows at once.
"""

import functools

import jax
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_transfer_plan import reconfigurations, surviving_layout

from mesh.device_mesh import EXPERT_AXIS, build_mesh
from mesh.placement import PlacementError, place, repair
from mesh.reshard import SlotTransfer, SlotWriter
from mesh.transfer_plan import plan_transfers, schedule_rounds

WEIGHT_SHAPES = ((2, 3), (4,))  # two arrays moved together, as w_gate / w_down are


def expert_value(expert: np.ndarray, k: int) -> np.ndarray:
    """What weight k of `expert` holds (NaN for an empty slot): distinct per expert and k."""
    return np.where(expert >= 0, 100.0 * expert + k, np.nan)


@functools.cache
def programs(n: int, slots_per_device: int):
    mesh = build_mesh(jax.devices()[:n])
    shapes = [
        jax.ShapeDtypeStruct((n * slots_per_device, *shape), np.float32) for shape in WEIGHT_SHAPES
    ]
    return mesh, SlotTransfer(mesh, shapes), SlotWriter(mesh, shapes)


def run_plan(old, new, keep):
    """The real programs turn the surviving slots into `new`; returns [layers, slots] per weight
    as read back from the devices (one value per slot)."""
    n, s = new.num_devices, new.slots_per_device
    mesh, transfer, writer = programs(n, s)
    plan = plan_transfers(old, new, keep)
    rounds = schedule_rounds(plan, n, s)
    before = surviving_layout(old, keep)
    sharding = NamedSharding(mesh, P(EXPERT_AXIS))
    result = []
    for layer in range(new.num_layers):
        arrays = tuple(
            jax.device_put(
                np.broadcast_to(
                    expert_value(before[layer], k).reshape(-1, *[1] * len(shape)),
                    (n * s, *shape),
                ).astype(np.float32),
                sharding,
            )
            for k, shape in enumerate(WEIGHT_SHAPES)
        )
        for r in range(rounds.num_rounds):
            arrays = transfer(arrays, rounds.send_slot[r, layer], rounds.recv_slot[r, layer])
        pending = [
            list(np.flatnonzero(plan.from_host[layer, d * s : (d + 1) * s])) for d in range(n)
        ]
        while any(pending):
            slot = np.array([p.pop() if p else -1 for p in pending], np.int32)
            expert = [new.phy2log[layer, d * s + slot[d]] if slot[d] >= 0 else -1 for d in range(n)]
            values = [
                (
                    lambda d, k=k, shape=shape, expert=expert: np.full(
                        shape, expert_value(np.array(expert[d]), k)
                    )
                )
                for k, shape in enumerate(WEIGHT_SHAPES)
            ]
            arrays = writer(arrays, slot, values)
        result.append([np.asarray(a) for a in arrays])
    return result


def assert_slots_hold(result, placement):
    for layer, arrays in enumerate(result):
        for k, array in enumerate(arrays):
            want = expert_value(placement.phy2log[layer], k)
            held = array.reshape(array.shape[0], -1)
            assert (held == want[:, None]).all(), (
                f"layer {layer} weight {k}: slots hold {held[:, 0]}, placement says {want}"
            )


SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))


@SETTINGS
@given(reconfigurations(), st.data())
def test_compiled_rounds_reach_any_placement(case, data):
    """A full re-pack reads slots that are overwritten later: the order inside a round counts."""
    old, keep, load, max_replicas = case
    if not keep or len(keep) > len(jax.devices()):  # a rejoin may add more than exist here
        return
    rng = np.random.default_rng(data.draw(st.integers(0, 99)))
    try:
        new = place(rng.random(load.shape) ** 3, len(keep), old.slots_per_device, max_replicas)
    except PlacementError:
        return
    assert_slots_hold(run_plan(old, new, keep), new)


@SETTINGS
@given(reconfigurations())
def test_compiled_rounds_reach_the_repaired_placement(case):
    old, keep, load, max_replicas = case
    if len(keep) > len(jax.devices()):
        return
    try:
        new = repair(old, keep, load, max_replicas)
    except PlacementError:
        return
    assert_slots_hold(run_plan(old, new, keep), new)


def test_repacks_of_three_devices():
    """Small re-packs under skewed loads: before the order inside a round was fixed, some of
    these read a slot that an earlier shift of the same round had overwritten."""
    old = place(np.ones((1, 3)), 3, 2, 3)
    rng = np.random.default_rng(7)
    for _ in range(30):
        new = place(rng.random((1, 3)) ** 4, 3, 2, 3)
        assert_slots_hold(run_plan(old, new, [0, 1, 2]), new)
