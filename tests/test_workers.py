"""Worker processes under jax.distributed, on simulated CPU devices (gloo collectives).

The oracle is the single-process Engine on the same number of devices, failure-free. The kill
tests send SIGKILL to a real worker process, as a GPU fault would.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time

import numpy as np
import pytest

from elastic_moe.distributed_service import (
    ClusterOptions,
    CoordinationService,
    worker_environment,
)
from elastic_moe.remote_mesh import assemble
from elastic_moe.worker_pool import WorkerFailure, WorkerPool

PRESET = "tiny-mixtral"
PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [20, 21]]
FAST = ClusterOptions(heartbeat_timeout_s=1, collective_timeout_s=5)


def test_worker_environment_bounds_cpu_collectives_and_cancels_gpu_ones():
    cpu = worker_environment("cpu", ClusterOptions(collective_timeout_s=7), cpu_devices=2)
    assert "--xla_force_host_platform_device_count=2" in cpu["XLA_FLAGS"]
    assert "--xla_cpu_collective_timeout_seconds=7" in cpu["XLA_FLAGS"]
    gpu = worker_environment("gpu", ClusterOptions())
    assert "--xla_gpu_nccl_terminate_on_error=false" in gpu["XLA_FLAGS"]
    assert gpu["XLA_PYTHON_CLIENT_ABORT_COLLECTIVES_ON_FAILURE"] == "1"
    with pytest.raises(ValueError, match="platform"):
        worker_environment("tpu", ClusterOptions())
    with pytest.raises(ValueError, match="heartbeat_timeout_s"):
        ClusterOptions(heartbeat_timeout_s=0)


def test_coordination_service_is_hosted_without_joining():
    service = CoordinationService(2, FAST)
    try:
        assert service.running and service.address().endswith(f":{service.port}")
    finally:
        service.shutdown()
    assert not service.running


def test_assemble_puts_each_workers_rows_in_place_and_refuses_gaps():
    replies = [
        {"tokens": [(4, np.array([5, 6], np.int32)), (6, np.array([7, 8], np.int32))]},
        {"tokens": [(0, np.array([1, 2], np.int32)), (2, np.array([3, 4], np.int32))]},
    ]
    np.testing.assert_array_equal(assemble(replies, "tokens", 8), np.arange(1, 9))
    with pytest.raises(RuntimeError, match="6 of 8 rows"):
        assemble(replies[:1] + [{"tokens": [(0, np.array([1, 2], np.int32))]}], "tokens", 8)


def test_a_killed_worker_is_seen_by_the_frontend_and_by_the_survivor():
    """No model: the frontend sees the channel close at once; the survivor's coordination
    client reports the dead worker once its heartbeats have stopped."""
    with WorkerPool(2, options=FAST) as pool:
        assert [r["process_id"] for r in pool.request("ping")] == [0, 1]
        assert pool.request("live_processes")[0]["live"] == [0, 1]
        killed_at = time.time()
        os.kill(pool.workers[1].process.pid, signal.SIGKILL)
        with pytest.raises(WorkerFailure) as failure:
            pool.request("ping")
        assert failure.value.dead == [1] and failure.value.eof_at - killed_at < 1.0
        assert [w.process_id for w in pool.live_workers] == [0]
        (reply,) = pool.request("live_processes", timeout_s=30.0)
        assert reply["live"] == [0]
        # Detection by heartbeat: about heartbeat_timeout_s (1 s) after the kill.
        assert reply["time"] - killed_at < 10 * FAST.heartbeat_timeout_s


@pytest.fixture(scope="module")
def model_and_reference(devices):
    from elastic_moe.checkpoint import load_model
    from elastic_moe.engine import Engine, EngineOptions

    options = EngineOptions()
    cfg, params, _ = load_model(PRESET)
    reference = Engine(cfg, params, devices[:4], options)
    expected = reference.generate(PROMPTS, 12)
    return cfg, options, reference.mesh.geometry, expected


@pytest.mark.slow
def test_two_workers_serve_the_single_process_tokens_and_survive_a_kill(model_and_reference):
    """A frontend and two workers of 2 simulated devices each: the same tokens and logprobs as
    the single-process Engine on 4 devices. Then worker 1 is killed (SIGKILL) mid-generation:
    the survivor's step fails with ProcessFailureError naming worker 1's devices, the survivor
    deploys again over its own 2 devices, every request in flight is re-prefilled from the
    journal, and every request finishes with the failure-free tokens."""
    from elastic_moe.frontend_engine import frontend_engine, recover_on_survivors
    from elastic_moe.remote_mesh import RemoteMesh
    from elastic_moe.requests import Request

    cfg, options, geometry, expected = model_and_reference
    as_dict = dataclasses.asdict(options)
    with WorkerPool(2, cpu_devices_per_worker=2, options=FAST) as pool:
        mesh = RemoteMesh.deploy(pool, PRESET, as_dict, prefill_lengths=[16])
        assert mesh.geometry == geometry and len(mesh.device_ids) == 4
        engine = frontend_engine(cfg, mesh, options)
        served = engine.generate(PROMPTS, 12)
        assert [r.generated for r in served] == [r.generated for r in expected]
        assert [r.logprobs for r in served] == [r.logprobs for r in expected]

        requests = [engine.submit(Request(list(p), max_tokens=12)) for p in PROMPTS]
        for _ in range(4):
            engine.step()
        assert all(0 < len(r.generated) < 12 for r in requests)
        killed_at = time.time()
        os.kill(pool.workers[1].process.pid, signal.SIGKILL)
        with pytest.raises(WorkerFailure) as failure:
            engine.step()
        assert failure.value.dead == [1]
        assert failure.value.failed_device_ids == pool.workers[1].device_ids
        assert failure.value.survivor_detected_at[0] - killed_at < 10 * FAST.heartbeat_timeout_s
        assert recover_on_survivors(engine, PRESET, as_dict) == len(PROMPTS)
        assert engine.mesh.device_ids == pool.workers[0].device_ids
        while any(not r.done for r in requests):
            engine.step()
        assert [r.generated for r in requests] == [r.generated for r in expected]
        assert all(r.reprefills == 1 for r in requests)


@pytest.mark.slow
def test_two_workers_with_layer_group_programs_serve_the_single_process_tokens(devices):
    """Layer-group programs (EngineOptions.layers_per_program) across two worker processes: the MoE
    layers' index arrays are placed on a mesh that spans both; the tokens and logprobs are the
    single-process Engine's."""
    from elastic_moe.checkpoint import load_model
    from elastic_moe.engine import Engine, EngineOptions
    from elastic_moe.frontend_engine import frontend_engine
    from elastic_moe.remote_mesh import RemoteMesh

    options = EngineOptions(layers_per_program=1)
    cfg, params, _ = load_model(PRESET)
    expected = Engine(cfg, params, devices[:4], options).generate(PROMPTS, 8)
    with WorkerPool(2, cpu_devices_per_worker=2, options=FAST) as pool:
        mesh = RemoteMesh.deploy(pool, PRESET, dataclasses.asdict(options), prefill_lengths=[16])
        served = frontend_engine(cfg, mesh, options).generate(PROMPTS, 8)
    assert [r.generated for r in served] == [r.generated for r in expected]
    assert [r.logprobs for r in served] == [r.logprobs for r in expected]
