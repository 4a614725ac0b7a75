"""Fault injection and detection for the single-controller mode.

`FaultInjector` plays the hardware: a device it breaks makes the next step raise and fails its
probe. `GuardedStepper` runs engine steps; when a step raises or overruns its deadline it probes
every device of the mesh with a timeout and fails those that do not answer, so the engine goes on
with the survivors. On a real accelerator the probe is a tiny computation on the device.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import jax
import jax.numpy as jnp

from elastic_moe.coordinator import Coordinator
from elastic_moe.engine import TokenEvent
from elastic_moe.reconfiguration import Reconfiguration


class DeviceFailure(RuntimeError):
    """A step could not run because devices are gone."""

    def __init__(self, device_ids: Iterable[int]):
        self.device_ids = sorted(device_ids)
        super().__init__(f"devices {self.device_ids} stopped responding")


class FaultInjector:
    """Simulated device faults: broken devices fail steps and probes until repaired."""

    def __init__(self) -> None:
        self._broken: set[int] = set()
        self._lock = threading.Lock()

    def break_devices(self, device_ids: Iterable[int]) -> None:
        with self._lock:
            self._broken.update(int(i) for i in device_ids)

    def repair_devices(self, device_ids: Iterable[int]) -> None:
        with self._lock:
            self._broken.difference_update(int(i) for i in device_ids)

    def is_broken(self, device_id: int) -> bool:
        with self._lock:
            return device_id in self._broken

    def check_step(self, devices: Iterable[jax.Device]) -> None:
        broken = [d.id for d in devices if self.is_broken(d.id)]
        if broken:
            raise DeviceFailure(broken)


def probe_device(device: jax.Device, timeout_s: float, injector: FaultInjector | None) -> bool:
    """True when the device runs a tiny computation within `timeout_s`."""
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
    detections: list[Reconfiguration] = field(default_factory=list)

    def step(self) -> list[TokenEvent]:
        engine = self.coordinator.engine
        started = time.perf_counter()
        try:
            if self.injector is not None:
                self.injector.check_step(engine.mesh.devices)
            events = engine.step()
        except Exception as error:
            self._recover(started, error)
            return []
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
        if not dead:
            if probe_only:
                return
            raise error
        detect_ms = 1000 * (time.perf_counter() - started)
        result = self.coordinator.fail(dead, reason=f"detected: {error}", detect_ms=detect_ms)
        self.detections.append(result)
