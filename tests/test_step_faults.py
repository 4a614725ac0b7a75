"""Faults in the middle of a step, steps that fail with every device answering, and a runtime
that cannot go on: no token lost or repeated, every caller told, nobody left waiting.

The oracle is a failure-free run of the same requests.
"""

import threading

import numpy as np
import pytest

from elastic_moe import Engine, EngineOptions, Request, SamplingParams
from elastic_moe.coordinator import Coordinator
from elastic_moe.faults import FaultInjector, GuardedStepper, StepFailed
from elastic_moe.reconfiguration import MeshState, ReconfigurationKind
from elastic_moe.runtime import QueueFull, Runtime, RuntimeStopped
from models.params import init_params
from models.presets import get_preset

OPTIONS = EngineOptions(request_slots_per_device=2, redundant_experts=8)


@pytest.fixture(scope="module")
def model():
    cfg = get_preset("tiny-mixtral")
    return cfg, init_params(cfg)


def workload():
    rng = np.random.default_rng(5)
    return [
        Request(
            rng.integers(0, 256, size=int(rng.integers(3, 20))).tolist(),
            max_tokens=12,
            sampling=SamplingParams(temperature=0.8, seed=i) if i % 2 else SamplingParams(),
            request_id=f"r{i}",
        )
        for i in range(20)  # more than the 16 request slots of 8 devices: some wait
    ]


@pytest.fixture(scope="module")
def baseline(model, devices):
    cfg, params = model
    engine = Engine(cfg, params, devices, OPTIONS)
    requests = [engine.submit(r) for r in workload()]
    while engine.has_work():
        engine.step()
    return {r.request_id: r.generated for r in requests}


def drive(engine, stepper, script=None):
    """Steps to completion; returns {request id: [token indices seen, in order]}."""
    seen: dict[str, list[int]] = {}
    step = 0
    while engine.has_work():
        if script is not None:
            script(step)
        for event in stepper.step():
            seen.setdefault(event.request_id, []).append(event.index)
        step += 1
        assert step < 200
    return seen


# The decode case in the default suite; the prefill case (the same recovery) with -m slow.
@pytest.mark.parametrize("point", [pytest.param("prefill", marks=pytest.mark.slow), "decode"])
def test_a_device_dying_mid_step_loses_no_token(model, devices, baseline, point):
    cfg, params = model
    engine = Engine(cfg, params, devices, OPTIONS)
    coordinator = Coordinator(engine, standby=False)
    injector = FaultInjector()
    stepper = GuardedStepper(coordinator, injector)
    requests = [engine.submit(r) for r in workload()]

    def script(step):
        if step == 1:  # step 1 prefills the second 8 requests, then decodes all 16
            injector.break_during([5], point)

    seen = drive(engine, stepper, script)
    assert {r.request_id: r.generated for r in requests} == baseline
    # Every event exactly once and in order: none lost with the failed step, none repeated.
    for r in requests:
        assert seen[r.request_id] == list(range(len(r.generated))), r.request_id
    # The survivors' caches were not trusted: all 16 requests in flight were re-prefilled,
    # not only the 2 on the dead device.
    (detection,) = stepper.detections
    assert detection.kind is ReconfigurationKind.DETECTED
    assert detection.requests_reprefilled == 16
    assert sum(r.reprefills for r in requests) == 16


def test_a_step_failing_once_with_every_device_alive_is_retried(model, devices, baseline):
    cfg, params = model
    engine = Engine(cfg, params, devices, OPTIONS)
    stepper = GuardedStepper(Coordinator(engine, standby=False))
    requests = [engine.submit(r) for r in workload()]
    fired = []

    def flaky(point):
        if point == "decode" and len(fired) < 1 and engine.steps_run == 3:
            fired.append(point)
            raise RuntimeError("a transient fault")

    engine.fault_point = flaky
    seen = drive(engine, stepper)
    assert fired and stepper.detections == []
    assert {r.request_id: r.generated for r in requests} == baseline
    for r in requests:
        assert seen[r.request_id] == list(range(len(r.generated)))


def test_a_step_that_keeps_failing_ends_its_requests_with_the_error(model, devices):
    cfg, params = model
    engine = Engine(cfg, params, devices[:4], OPTIONS)
    stepper = GuardedStepper(Coordinator(engine, standby=False), step_retries=1)
    requests = [engine.submit(r) for r in workload()[:4]]
    engine.step()

    def broken(point):
        raise RuntimeError("the decode program is broken")

    engine.fault_point = broken
    assert stepper.step() == [] and stepper.failed_steps == 1  # retried: re-prefilled
    with pytest.raises(StepFailed) as failed:
        stepper.step()
    assert sorted(r.request_id for r in failed.value.ended) == [r.request_id for r in requests]
    for r in requests:
        assert r.done and "the decode program is broken" in r.error
    assert not engine.has_work()
    engine.fault_point = None  # the next request is served
    (fresh,) = engine.generate([[1, 2, 3]], 4)
    assert len(fresh.generated) == 4 and fresh.error is None


def run_to_end(runtime, requests):
    """Submits through the runtime; returns {id: (tokens seen, the Finished request)}."""
    done = threading.Event()
    results = {r.request_id: [[], None] for r in requests}

    def listener(event):
        entry = results[event.request_id]
        if hasattr(event, "token"):
            entry[0].append(event.token)
        else:
            entry[1] = event.request
            if all(e[1] is not None for e in results.values()):
                done.set()

    for r in requests:
        runtime.submit(r, listener)
    assert done.wait(120), "some request never finished"
    return results


def test_when_the_survivors_cannot_serve_the_runtime_stops_and_says_why(model, devices):
    cfg, params = model
    engine = Engine(cfg, params, devices[:4], OPTIONS)  # 4 x 4 slots; 2 devices hold 8 experts
    runtime = Runtime(engine, coordinator=Coordinator(engine, standby=False)).start()
    states = []
    runtime.watch(lambda status: states.append(status.state))
    try:
        requests = workload()[:6]
        runtime.break_devices([1, 2, 3])
        results = run_to_end(runtime, requests)
        for _, finished in results.values():
            assert finished.error and "cannot hold all 8 experts" in finished.error
        assert states[-1] is MeshState.STOPPED
        # Every later call fails at once with the reason, nobody waits.
        with pytest.raises(RuntimeStopped, match="cannot hold all 8 experts"):
            runtime.status()
        with pytest.raises(RuntimeStopped):
            runtime.submit(Request([1, 2], max_tokens=2), lambda e: None)
        with pytest.raises(RuntimeStopped):
            runtime.rebalance().result(timeout=5)
    finally:
        runtime.stop()


def test_admission_limits_count_requests_and_prompt_tokens(model, devices):
    cfg, params = model
    engine = Engine(cfg, params, devices[:2], OPTIONS)
    runtime = Runtime(
        engine,
        coordinator=Coordinator(engine, standby=False),
        max_queued_requests=3,
        max_queued_tokens=40,
    ).start()
    release = threading.Event()
    busy = runtime.call(release.wait)  # the loop is busy: nothing leaves the queue
    try:
        runtime.submit(Request([1] * 30, max_tokens=2), lambda e: None)
        with pytest.raises(QueueFull, match="30 prompt tokens waiting"):
            runtime.submit(Request([1] * 11, max_tokens=2), lambda e: None)
        runtime.submit(Request([1] * 5, max_tokens=2), lambda e: None)
        runtime.submit(Request([1] * 5, max_tokens=2), lambda e: None)
        with pytest.raises(QueueFull, match="3 requests waiting"):
            runtime.submit(Request([1], max_tokens=2), lambda e: None)
    finally:
        release.set()
        busy.result(timeout=30)
        runtime.stop()


def test_an_op_id_reused_for_another_operation_is_refused(model, devices):
    cfg, params = model
    engine = Engine(cfg, params, devices[:4], OPTIONS)
    coordinator = Coordinator(engine, standby=False)
    first = coordinator.fail([2], op_id="op-A", reason="detected by an operator")
    assert first.kind is ReconfigurationKind.FAIL  # the word in a reason changes nothing
    assert coordinator.fail([2], op_id="op-A") is first
    with pytest.raises(ValueError, match="op_id 'op-A' was already used for fail \\[2\\]"):
        coordinator.rejoin([2], op_id="op-A")
    with pytest.raises(ValueError, match="already used"):
        coordinator.fail([3], op_id="op-A")
    assert coordinator.rejoin([2], op_id="op-B").kind is ReconfigurationKind.REJOIN


def test_history_and_op_ids_are_bounded(model, devices, monkeypatch):
    """A long-lived server remembers the newest reconfigurations and op ids only."""
    from elastic_moe import coordinator as module

    monkeypatch.setattr(module, "HISTORY_KEPT", 3)
    monkeypatch.setattr(module, "OP_IDS_KEPT", 2)
    cfg, params = model
    engine = Engine(cfg, params, devices[:4], OPTIONS)
    coordinator = Coordinator(engine, standby=False)
    results = []
    for cycle in range(3):
        results.append(coordinator.fail([3], op_id=f"fail-{cycle}"))
        results.append(coordinator.rejoin([3], op_id=f"rejoin-{cycle}"))
    assert coordinator.history == results[-3:]
    assert coordinator.status().last is results[-1]
    assert coordinator.rejoin([3], op_id="rejoin-2") is results[-1]  # remembered: no-op
    assert coordinator.fail([3], op_id="fail-2") is results[-2]
    # fail-0 was forgotten: running it again is a new operation, not the old result.
    again = coordinator.fail([3], op_id="fail-0")
    assert again is not results[0] and again.to_epoch == results[-1].to_epoch + 1


def test_a_hung_device_is_found_by_the_step_deadline(model, devices, baseline):
    """A device that stops answering without making the step raise: the step overruns its
    deadline, the probes find the device, and serving moves to the survivors."""
    cfg, params = model
    engine = Engine(cfg, params, devices, OPTIONS)
    injector = FaultInjector()
    stepper = GuardedStepper(
        Coordinator(engine, standby=False), injector, probe_timeout_s=0.5, step_deadline_s=60.0
    )
    requests = [engine.submit(r) for r in workload()]

    def script(step):
        if step == 3:
            injector.hang_devices([4])  # no step raises; the device just stops answering
            stepper.step_deadline_s = 0.0  # so this step "overruns" its deadline
        if step == 4:
            stepper.step_deadline_s = 60.0

    drive(engine, stepper, script)
    assert {r.request_id: r.generated for r in requests} == baseline
    (detection,) = stepper.detections
    assert detection.cause.startswith("fail [4]") and "step took" in detection.cause


def test_spread_routing_gives_the_tokens_of_primary_routing(model, devices, baseline):
    """Tokens spread over every replica of an expert compute the same as on its primary."""
    cfg, params = model
    engine = Engine(
        cfg,
        params,
        devices,
        EngineOptions(request_slots_per_device=2, redundant_experts=8, replica_routing="spread"),
    )
    assert int(np.asarray(engine.mesh.tables[1]).max()) > 1  # some expert has 2 live replicas
    requests = [engine.submit(r) for r in workload()]
    stepper = GuardedStepper(Coordinator(engine, standby=False))
    drive(engine, stepper, lambda step: step == 4 and stepper.coordinator.fail([6]))
    assert {r.request_id: r.generated for r in requests} == baseline
