"""Every expert slot holds, byte for byte, the expert its placement names: after every
reconfiguration of random schedules under skewed and even loads, and when a slot goes wrong the
runtime finds it (on the device, by checksum), rewrites it from the host copy and says so.

The oracle is the host copy of the weights, read against the device buffers themselves.
"""

import jax
import numpy as np
import pytest

import elastic_moe.serving_mesh as serving_mesh
from elastic_moe import Engine, EngineOptions, Request
from elastic_moe.coordinator import Coordinator
from elastic_moe.reconfiguration import ReconfigurationRefused
from models.params import EXPERT_WEIGHTS, expert_weights, is_expert_path, moe_layer_indices
from models.presets import get_preset

OPTIONS = EngineOptions(request_slots_per_device=2, redundant_experts=8)


@pytest.fixture(scope="module")
def model():
    from models.params import init_params

    cfg = get_preset("tiny-mixtral")
    return cfg, init_params(cfg)


def bits(array) -> np.ndarray:
    array = np.ascontiguousarray(array)
    return array.view({1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}[array.itemsize])


def wrong_slots(engine, host_params) -> list[tuple[int, int, str]]:
    """(MoE layer, slot, weight) of every device slot whose bytes differ from its expert's."""
    wrong = []
    placement = engine.mesh.placement
    for j, i in enumerate(moe_layer_indices(engine.cfg)):
        on_device = expert_weights(engine.mesh.params, i)
        on_host = expert_weights(host_params, i)
        for name in EXPERT_WEIGHTS:
            held = bits(np.asarray(on_device[name]))
            want = bits(on_host[name][placement.phy2log[j]])
            wrong += [(j, int(p), name) for p in np.flatnonzero((held != want).any(axis=(1, 2)))]
    return wrong


def dense_weights_intact(engine, host_params) -> bool:
    """Every shard of every dense weight on every serving device equals the host copy."""
    ok = []

    def check(path, array):
        if is_expert_path(path):
            return
        host = host_params
        for key in path:
            host = host[getattr(key, "key", key)]
        ok.extend(
            np.array_equal(bits(np.asarray(s.data)), bits(np.asarray(host)[s.index]))
            for s in array.addressable_shards
        )

    jax.tree_util.tree_map_with_path(check, engine.mesh.params)
    return all(ok)


def cache_by_device(engine) -> dict[int, list[np.ndarray]]:
    """{device id: its KV-cache shards} of the serving mesh."""
    out: dict[int, list[np.ndarray]] = {}
    for leaf in jax.tree.leaves(engine.mesh.cache):
        for shard in leaf.addressable_shards:
            out.setdefault(shard.device.id, []).append(np.asarray(shard.data).copy())
    return out


def skewed_requests(rng, n):
    """Prompts of one repeated token: the router sends them to few experts."""
    return [Request([1] * int(rng.integers(8, 25)), max_tokens=24) for _ in range(n)]


def even_requests(rng, n):
    return [
        Request(rng.integers(0, 256, size=int(rng.integers(2, 25))).tolist(), max_tokens=40)
        for _ in range(n)
    ]


def random_event(rng, coordinator):
    engine = coordinator.engine
    serving = [d.id for d in engine.mesh.devices]
    failed = sorted(set(coordinator.pool) - set(serving))
    kind = rng.choice(["fail", "fail", "rejoin", "rebalance"])
    if kind == "rejoin" and failed:
        chosen = rng.choice(
            failed, size=int(rng.integers(1, min(2, len(failed)) + 1)), replace=False
        )
        return coordinator.rejoin(chosen.tolist())
    if kind == "rebalance":
        return coordinator.rebalance()
    lost = rng.choice(serving, size=int(rng.integers(1, 4)), replace=False)
    return coordinator.fail(lost.tolist())


def run_schedule(cfg, params, devices, seed, load, events):
    """Random fail / rejoin / rebalance between steps; every slot checked after each event."""
    rng = np.random.default_rng(seed)
    engine = Engine(cfg, params, devices, OPTIONS)
    coordinator = Coordinator(engine, standby=False)
    make = skewed_requests if load == "skewed" else even_requests
    for r in make(rng, 10):
        engine.submit(r)
    done = 0
    while done < events:
        for _ in range(int(rng.integers(1, 4))):  # let the router's load build up
            engine.step()
            if not engine.has_work():
                for r in make(rng, 6):
                    engine.submit(r)
        survivors_before = cache_by_device(engine)
        try:
            result = random_event(rng, coordinator)
        except ReconfigurationRefused:
            continue
        done += 1
        where = f"seed {seed}, after {result.cause}"
        assert wrong_slots(engine, params) == [], where
        assert result.slots_repaired == 0, f"{where}: the move itself wrote a wrong slot"
        assert result.slots_verified == (result.experts_copied + result.experts_restored_from_host)
        assert dense_weights_intact(engine, params), where
        after = cache_by_device(engine)
        for device_id, shards in after.items():
            if device_id in survivors_before:
                for a, b in zip(survivors_before[device_id], shards, strict=True):
                    assert np.array_equal(bits(a), bits(b)), f"{where}: cache of {device_id}"
    return engine, coordinator


@pytest.mark.parametrize(
    "load,seed", [("skewed", 1), pytest.param("even", 2, marks=pytest.mark.slow)]
)
def test_every_slot_holds_its_expert_through_random_schedules(model, devices, load, seed):
    cfg, params = model
    run_schedule(cfg, params, devices, seed, load, events=5)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(10, 16))
@pytest.mark.parametrize("load", ["skewed", "even"])
def test_every_slot_holds_its_expert_long(model, devices, load, seed):
    cfg, params = model
    run_schedule(cfg, params, devices, seed, load, events=12)


def test_rejoin_under_skewed_load_keeps_every_expert(model, devices):
    """The reported corruption: fail three devices, rejoin one, under a skewed router load.
    Afterwards a slot held another expert's weights and later requests changed."""
    cfg, params = model
    reference = Engine(cfg, params, devices, OPTIONS)
    engine = Engine(cfg, params, devices, OPTIONS)
    coordinator = Coordinator(engine, standby=False)
    engine.generate([[1] * 24], 24)
    coordinator.fail([0, 1, 2])
    result = coordinator.rejoin([0])
    assert result.experts_copied > 0 and result.slots_repaired == 0
    assert wrong_slots(engine, params) == []
    prompts = [np.random.default_rng(i).integers(0, 256, 12).tolist() for i in range(8)]
    want = [r.generated for r in reference.generate(prompts, 16)]
    assert [r.generated for r in engine.generate(prompts, 16)] == want


def test_a_wrong_slot_written_by_a_move_is_caught_and_rewritten(model, devices, monkeypatch):
    """A transfer that delivers the wrong expert never serves: the check after the move finds
    it, names the expert it holds, rewrites it from the host copy, and reports it."""
    cfg, params = model
    real = serving_mesh.schedule_rounds

    def misdirected(plan, num_devices, slots_per_device):
        rounds = real(plan, num_devices, slots_per_device)
        r, layer, d, shift = (int(x[0]) for x in np.nonzero(rounds.send_slot >= 0))
        sent = rounds.send_slot[r, layer, d, shift]
        rounds.send_slot[r, layer, d, shift] = (sent + 1) % slots_per_device  # its neighbour
        return rounds

    reference = Engine(cfg, params, devices, OPTIONS)
    engine = Engine(cfg, params, devices, OPTIONS)
    coordinator = Coordinator(engine, standby=False)
    prompts = [np.random.default_rng(i).integers(0, 256, 12).tolist() for i in range(8)]
    requests = [engine.submit(Request(p, max_tokens=16)) for p in prompts]
    engine.step()
    coordinator.fail([3])
    monkeypatch.setattr(serving_mesh, "schedule_rounds", misdirected)
    result = coordinator.rebalance()  # restores the lost replicas by device-to-device copies
    monkeypatch.undo()
    assert result.experts_copied > 0
    assert result.slots_repaired == 1 and result.slots_verified >= result.experts_copied
    assert wrong_slots(engine, params) == []
    while engine.has_work():
        engine.step()
    want = [r.generated for r in reference.generate(prompts, 16)]
    assert [r.generated for r in requests] == want


def test_verify_on_demand_finds_and_repairs_a_corrupted_slot(model, devices):
    cfg, params = model
    engine = Engine(cfg, params, devices[:4], OPTIONS)
    coordinator = Coordinator(engine, standby=False)
    clean = coordinator.verify()
    assert clean.mismatches == [] and clean.slots_checked == engine.mesh.placement.phy2log.size
    # Overwrite slot 1 of MoE layer 0 with expert 0's weights, as a stray write would.
    placement, s = engine.mesh.placement, engine.mesh.geometry.expert_slots_per_device
    slot = 1
    intruder = next(e for e in range(cfg.num_experts) if e != placement.phy2log[0, slot])
    i = moe_layer_indices(cfg)[0]
    weights = expert_weights(engine.mesh.params, i)
    host = expert_weights(params, i)
    local = np.full((4,), -1, np.int32)
    local[slot // s] = slot % s
    values = [(lambda d, name=name: host[name][intruder]) for name in EXPERT_WEIGHTS]
    arrays = engine.mesh.compiled.writer(tuple(weights[n] for n in EXPERT_WEIGHTS), local, values)
    weights.update(zip(EXPERT_WEIGHTS, arrays, strict=True))
    assert wrong_slots(engine, params) != []

    found = coordinator.verify(repair=False)
    assert [(m.layer, m.slot, m.found_expert) for m in found.mismatches] == [(0, slot, intruder)]
    assert found.mismatches[0].expected_expert == placement.phy2log[0, slot]
    assert found.slots_repaired == 0 and wrong_slots(engine, params) != []

    fixed = coordinator.verify()
    assert len(fixed.mismatches) == 1 and fixed.slots_repaired == 1
    assert wrong_slots(engine, params) == []
    assert coordinator.verify().mismatches == []
