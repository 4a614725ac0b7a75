"""Fault injection and detection for the single-controller mode.

`FaultInjector` plays the hardware: a device it breaks makes the next step raise and fails its
probe; `break_during` breaks it in the middle of a step instead (after the prefill or the decode
program ran, before its output is read). `GuardedStepper` runs engine steps; when a step raises
or overruns its deadline it probes every device of the mesh with a timeout and fails those that
do not answer, so the engine goes on with the survivors. On a real accelerator the probe is a
tiny computation on the device.

A step that failed after its device work started leaves the survivors' KV caches untrusted
(their buffers were donated to the failed program): every request in flight is re-prefilled from
its journal, not only the dead devices' ones. A step that fails with every device answering is
retried the same way; when it keeps failing, the requests it held end with the error
(`StepFailed`) so their callers hear of it instead of waiting forever.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from elastic_moe.coordinator import Coordinator
from elastic_moe.engine import TokenEvent
from elastic_moe.reconfiguration import Reconfiguration
from elastic_moe.requests import Request

FAULT_POINTS = ("prefill", "decode")


class DeviceFailure(RuntimeError):
    """A step could not run because devices are gone."""

    def __init__(self, device_ids: Iterable[int]):
        self.device_ids = sorted(device_ids)
        super().__init__(f"devices {self.device_ids} stopped responding")


class StepFailed(RuntimeError):
    """A step failed with every device answering, past its retries: `ended` are the requests
    it held, finished with the error."""

    def __init__(self, error: BaseException, ended: Sequence[Request]):
        self.error, self.ended = error, list(ended)
        super().__init__(f"a step failed ({type(error).__name__}: {error})")


class FaultInjector:
    """Simulated device faults: broken devices fail steps and probes until repaired."""

    def __init__(self) -> None:
        self._broken: set[int] = set()
        self._hung: set[int] = set()
        self._armed: dict[str, set[int]] = {}
        self._lock = threading.Lock()

    def hang_devices(self, device_ids: Iterable[int]) -> None:
        """The devices stop answering probes, but no step raises: only a step deadline
        (GuardedStepper.step_deadline_s) finds them, as it would a hung GPU."""
        with self._lock:
            self._hung.update(int(i) for i in device_ids)

    def break_during(self, device_ids: Iterable[int], point: str) -> None:
        """The devices break when the next step reaches `point` ("prefill": after the prefill
        program ran; "decode": after the decode program ran, before its tokens are read)."""
        if point not in FAULT_POINTS:
            raise ValueError(f"point must be one of {FAULT_POINTS}, got {point!r}")
        with self._lock:
            self._armed.setdefault(point, set()).update(int(i) for i in device_ids)

    def at_point(self, point: str) -> None:
        """Called by the engine at each fault point: fires what break_during armed there."""
        with self._lock:
            firing = self._armed.pop(point, set())
            self._broken.update(firing)
        if firing:
            raise DeviceFailure(firing)

    def break_devices(self, device_ids: Iterable[int]) -> None:
        with self._lock:
            self._broken.update(int(i) for i in device_ids)

    def repair_devices(self, device_ids: Iterable[int]) -> None:
        with self._lock:
            self._broken.difference_update(int(i) for i in device_ids)
            self._hung.difference_update(int(i) for i in device_ids)

    def is_broken(self, device_id: int) -> bool:
        """Whether the device fails its probe (broken or hung)."""
        with self._lock:
            return device_id in self._broken or device_id in self._hung

    def check_step(self, devices: Iterable[jax.Device]) -> None:
        with self._lock:
            broken = [d.id for d in devices if d.id in self._broken]
        if broken:
            raise DeviceFailure(broken)


def probe_device(
    device: jax.Device, timeout_s: float | None, injector: FaultInjector | None
) -> bool:
    """True when the device runs a tiny computation within `timeout_s` (None: no limit)."""
    if injector is not None and injector.is_broken(device.id):
        return False

    def run() -> float:
        x = jax.device_put(jnp.float32(1.0), device)
        return float((x + 1).block_until_ready())

    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            return pool.submit(run).result(timeout=timeout_s) == 2.0
        except (FutureTimeout, RuntimeError):
            return False


@dataclass
class GuardedStepper:
    """Runs engine steps and turns a failed step into a reconfiguration onto the survivors."""

    coordinator: Coordinator
    injector: FaultInjector | None = None
    probe_timeout_s: float = 1.0
    step_deadline_s: float | None = None
    # A step failing with every device answering is retried (everything in flight
    # re-prefilled) this many times before the requests it held end with the error.
    step_retries: int = 1
    detections: list[Reconfiguration] = field(default_factory=list)
    failed_steps: int = 0  # consecutive steps that failed with no device to blame

    def __post_init__(self) -> None:
        # The probe's tiny program compiles on its first run per device: do that now, so a
        # probe's timeout measures the device, not the compiler (a busy host's compile can
        # take longer than the timeout and fail a healthy device).
        for device in self.coordinator.pool.values():
            probe_device(device, timeout_s=None, injector=None)

    def step(self) -> list[TokenEvent]:
        """One engine step; raises StepFailed (requests ended) or, when the survivors cannot
        serve every expert, the coordinator's ReconfigurationRefused."""
        engine = self.coordinator.engine
        if self.injector is not None:
            engine.fault_point = self.injector.at_point
        started = time.perf_counter()
        try:
            if self.injector is not None:
                self.injector.check_step(engine.mesh.devices)
            events = engine.step()
        except Exception as error:
            self._recover(started, error)
            return engine.take_events()  # what the step recorded before it failed
        self.failed_steps = 0
        elapsed = time.perf_counter() - started
        if self.step_deadline_s is not None and elapsed > self.step_deadline_s:
            self._recover(started, TimeoutError(f"step took {elapsed:.3f} s"), probe_only=True)
        return events

    def _recover(self, started: float, error: Exception, probe_only: bool = False) -> None:
        engine = self.coordinator.engine
        dead = [
            d.id
            for d in engine.mesh.devices
            if not probe_device(d, self.probe_timeout_s, self.injector)
        ]
        if not dead and probe_only:
            return
        in_flight = list(engine.running)
        requeued = engine.requeue_in_flight() if engine.in_flight_untrusted else 0
        if not dead:
            self.failed_steps += 1
            if self.failed_steps <= self.step_retries:
                return  # retried: the requests re-prefill at the next step
            ended = engine.finish_with_error(
                in_flight, f"the server could not run this request's step: {error}"
            )
            raise StepFailed(error, ended) from error
        detect_ms = 1000 * (time.perf_counter() - started)
        result = self.coordinator.fail(
            dead, reason=f"detected: {error}", detect_ms=detect_ms, detected=True
        )
        result.requests_reprefilled += requeued
        self.detections.append(result)
