"""The background repair: after a loss (declared or detected) or a rejoin, the runtime restores
redundancy and balance in budgeted steps, while requests keep their failure-free tokens."""

import threading
import time

import numpy as np
import pytest

from elastic_moe import Engine, EngineOptions, Request
from elastic_moe.background_repair import RepairBudget, RepairSchedule
from elastic_moe.coordinator import Coordinator
from elastic_moe.reconfiguration import MeshState, ReconfigurationKind
from elastic_moe.runtime import Finished, Runtime
from models.params import init_params
from models.presets import get_preset

OPTIONS = EngineOptions(request_slots_per_device=2, redundant_experts=8)
COPIES_PER_STEP = 2


@pytest.fixture(scope="module")
def model():
    cfg = get_preset("tiny-mixtral")
    return cfg, init_params(cfg)


def workload():
    rng = np.random.default_rng(11)
    return [
        Request(
            rng.integers(0, 256, size=int(rng.integers(3, 12))).tolist(),
            max_tokens=24,
            request_id=f"r{i}",
        )
        for i in range(12)
    ]


@pytest.fixture(scope="module")
def baseline(model, devices):
    cfg, params = model
    engine = Engine(cfg, params, devices, OPTIONS)
    requests = [engine.submit(r) for r in workload()]
    while engine.has_work():
        engine.step()
    return {r.request_id: r.generated for r in requests}


def start_runtime(model, devices, budget):
    cfg, params = model
    engine = Engine(cfg, params, devices, OPTIONS)
    return Runtime(engine, coordinator=Coordinator(engine, standby=False), repair_budget=budget)


def skew(runtime):
    """A heavily skewed observed load, so a repair has balance to restore, not only replicas."""
    load = runtime.engine.expert_load
    load[:] = 1
    load[:, 0] = 400
    load[:, 3] = 100


def submit_all(runtime):
    done, tokens = {}, {}
    for request in workload():
        tokens[request.request_id] = []
        done[request.request_id] = threading.Event()

        def listen(event, rid=request.request_id):
            if isinstance(event, Finished):
                done[rid].set()
            else:
                tokens[rid].append(event.token)

        runtime.submit(request, listen)
    return done, tokens


def wait_for(predicate, timeout_s=120.0):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def repair_steps(coordinator, after):
    return [r for r in coordinator.history[after:] if r.kind is ReconfigurationKind.REBALANCE]


def budget_for(model):
    cfg, _ = model
    return RepairBudget(bytes_per_interval=COPIES_PER_STEP * cfg.expert_bytes(), interval_s=0.05)


def test_a_loss_is_repaired_in_budgeted_steps_without_changing_a_token(model, devices, baseline):
    with start_runtime(model, devices, budget_for(model)) as runtime:
        skew(runtime)
        done, tokens = submit_all(runtime)
        fail = runtime.fail([2, 5]).result()
        assert runtime.repair.pending
        wait_for(lambda: not runtime.repair.pending)
        wait_for(lambda: all(e.is_set() for e in done.values()))
        coordinator = runtime.coordinator
        steps = repair_steps(coordinator, coordinator.history.index(fail))
        status = runtime.status()
    assert len(steps) >= 2, "the repair should take several budgeted steps"
    assert all(s.experts_copied + s.experts_restored_from_host <= COPIES_PER_STEP for s in steps)
    assert all(s.experts_restored_from_host == 0 for s in steps), "copies come from replicas"
    assert steps[-1].steps_left == 0
    assert [s.steps_left for s in steps] == sorted((s.steps_left for s in steps), reverse=True)
    # Back within the placement policy's promise: one more loss restores at most the budget.
    assert status.state is MeshState.SERVING
    assert status.worst_single_loss_restore <= OPTIONS.restore_budget
    assert tokens == baseline


def test_a_detected_loss_and_a_rejoin_start_a_repair_too(model, devices, baseline):
    with start_runtime(model, devices, budget_for(model)) as runtime:
        skew(runtime)
        done, tokens = submit_all(runtime)
        runtime.break_devices([6])  # the next step fails; detection reconfigures
        wait_for(lambda: runtime.engine.mesh.devices and len(runtime.engine.mesh.devices) == 7)
        wait_for(lambda: runtime.repair.steps_taken >= 1 and not runtime.repair.pending)
        taken = runtime.repair.steps_taken
        detected = [
            r for r in runtime.coordinator.history if r.kind is ReconfigurationKind.DETECTED
        ]
        rejoin = runtime.rejoin([6]).result()
        assert runtime.repair.pending
        wait_for(lambda: not runtime.repair.pending)
        wait_for(lambda: all(e.is_set() for e in done.values()))
        after_rejoin = repair_steps(runtime.coordinator, runtime.coordinator.history.index(rejoin))
    assert len(detected) == 1
    assert runtime.repair.steps_taken > taken and after_rejoin
    assert tokens == baseline


def test_without_a_budget_nothing_moves_until_asked(model, devices):
    with start_runtime(model, devices, None) as runtime:
        skew(runtime)
        runtime.fail([2, 5]).result()
        assert not runtime.repair.pending
        time.sleep(0.3)
        kinds = [r.kind for r in runtime.coordinator.history]
    assert kinds == [ReconfigurationKind.FAIL]


def test_a_failing_repair_step_stops_the_repair_not_the_runtime(model, devices):
    with start_runtime(model, devices, budget_for(model)) as runtime:

        def broken(**_):
            raise RuntimeError("no route to the host copy")

        runtime.coordinator.rebalance = broken
        runtime.fail([1]).result()
        wait_for(lambda: not runtime.repair.pending)
        request = Request([1, 2, 3], max_tokens=3, request_id="after")
        finished = threading.Event()
        runtime.submit(request, lambda e: isinstance(e, Finished) and finished.set())
        assert finished.wait(60)
    assert request.generated and runtime.failure is None


def test_budget_and_schedule():
    with pytest.raises(ValueError, match="bytes_per_interval"):
        RepairBudget(bytes_per_interval=0)
    with pytest.raises(ValueError, match="interval_s"):
        RepairBudget(bytes_per_interval=10, interval_s=0.0)
    budget = RepairBudget(bytes_per_interval=250, interval_s=2.0)
    assert budget.copies(100) == 2 and budget.copies(1000) == 1
    schedule = RepairSchedule(budget)
    schedule.arm(10.0)
    assert not schedule.is_due(11.9) and schedule.is_due(12.0)
    assert schedule.seconds_until_due(11.0) == 1.0
    schedule.stepped(12.0, steps_left=3, copied=2)
    assert schedule.is_due(14.0)
    schedule.stepped(14.0, steps_left=0, copied=2)
    assert not schedule.pending and schedule.steps_taken == 2
    idle = RepairSchedule(None)
    idle.arm(0.0)
    assert not idle.pending
