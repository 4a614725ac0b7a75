"""Coordinator.close(): after it, no standby timer fires and no compile can be queued, so a
program that ends right after a reconfiguration ends without a traceback (the README's
example checks that end to end)."""

from __future__ import annotations

import time

import pytest

from elastic_moe import Engine, EngineOptions, get_preset, init_params
from elastic_moe.coordinator import Coordinator

DELAY_S = 0.05


@pytest.fixture(scope="module")
def engine(devices):
    cfg = get_preset("tiny-mixtral")
    options = EngineOptions(request_slots_per_device=2, redundant_experts=8)
    return Engine(cfg, init_params(cfg), devices, options)


def test_close_cancels_the_standby_timer_and_the_compile_pool(engine):
    fired = []
    # standby=False at start: no background compiles on the 2-core test machine; a
    # reconfiguration then arms the timer as it does with standby on.
    with Coordinator(engine, standby=False, standby_delay_s=DELAY_S) as coordinator:
        coordinator.standby = True
        coordinator.warm_standby = lambda: fired.append(time.monotonic())
        coordinator.fail([3])
    time.sleep(10 * DELAY_S)
    assert fired == []  # the timer armed by fail() was cancelled
    assert not coordinator.standby
    with pytest.raises(RuntimeError, match="shutdown"):  # nothing can be queued any more
        engine.executables.warm_standby(list(engine.mesh.devices), [16], engine.min_devices)
    # Reconfigurations still work after close (they compile on the spot).
    assert coordinator.rejoin([3]).to_epoch == 2
