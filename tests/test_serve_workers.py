"""`elastic-moe serve --workers N` (docs/WORKERS.md): the frontend's runtime loop over worker
processes, through gRPC.

The slow test runs the real thing on simulated CPU devices: a serve process that starts two
worker processes, streaming requests through serve.client, one worker killed with SIGKILL
mid-stream, then rejoined. The fast tests check the frontend's side of a worker's death (the
journal, re-prefill of every request in flight, the dead worker's devices failed in the mesh
status, a rejoin) against an in-process stand-in for the worker processes, which computes each
token from the step's inputs so that a re-prefilled request has to come out the same.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from elastic_moe.engine import EngineOptions
from elastic_moe.reconfiguration import DeviceState, ReconfigurationKind, ReconfigurationRefused
from elastic_moe.requests import FinishReason, Request
from elastic_moe.runtime import Finished, Runtime
from elastic_moe.worker_pool import WorkerError, WorkerFailure, WorkerHandle, WorkerPool

REPO = Path(__file__).resolve().parent.parent
PRESET = "tiny-mixtral"


# ---- the frontend's side, against an in-process stand-in for the workers ------------------
class StandInHandle(WorkerHandle):
    def __init__(self, process_id: int, device_ids: list[int]):  # no process behind it
        self.process_id, self.device_ids, self.alive = process_id, device_ids, True
        self.process, self.conn, self.hello = None, None, {}


class StandInPool(WorkerPool):
    """WorkerPool as the frontend uses it, with no process behind it: each step's token is a
    function of the request's context (its last token and position), so a request re-prefilled
    from its journal produces the tokens it would have produced anyway. `die_in` makes a worker
    die during the next step of that kind."""

    platform = "cpu"

    def __init__(self, cfg, devices_per_worker: int = 2, workers: int = 2):  # no processes
        self.cfg = cfg
        self.workers = [
            StandInHandle(i, list(range(i * devices_per_worker, (i + 1) * devices_per_worker)))
            for i in range(workers)
        ]
        self.die_in: dict[str, int] = {}
        self.fail_deploy_over: int | None = None  # a deploy over this many devices raises
        self.restarted: list[int] = []
        self.cluster_restarts = 0
        self.sent: list[str] = []

    def kill(self, process_id: int) -> None:
        self.workers[process_id].alive = False

    def restart(self, process_id: int):
        self.workers[process_id].alive = True
        self.restarted.append(process_id)
        return self.workers[process_id]

    def restart_cluster(self, *, timeout_s=180.0):
        for w in self.workers:
            w.alive = True
        self.cluster_restarts += 1

    def request(self, kind, payload=None, *, timeout_s=60.0):
        from elastic_moe.worker import step_geometry
        from mesh.placement import place

        self.sent.append(kind)
        if kind in self.die_in:
            victim = self.die_in.pop(kind)
            self.kill(victim)
            raise WorkerFailure(
                dead=[victim],
                failed_device_ids=self.workers[victim].device_ids,
                eof_at=time.time(),
                reported_at=time.time(),
            )
        live = self.live_workers
        if kind == "deploy":
            ids = payload["device_ids"] or self.device_ids()
            if len(ids) == self.fail_deploy_over:  # as JAX's collectives refuse a rejoin
                raise WorkerError("worker 0: ...\njax.errors.JaxRuntimeError: ALREADY_EXISTS: key")
            options = EngineOptions(**payload["options"])
            geometry = step_geometry(self.cfg, len(ids), options)
            load = np.ones((self.cfg.num_moe_layers, self.cfg.num_experts))
            placement = place(
                load,
                len(ids),
                geometry.expert_slots_per_device,
                geometry.max_replicas,
                policy=options.placement,
                restore_budget=options.restore_budget,
            )
            reply = {
                "geometry": dataclasses.asdict(geometry),
                "placement": placement,
                "device_ids": ids,
                "compile_ms": 0.0,
                "standby_hit": True,
            }
            return [reply for _ in live]
        if kind in ("prefill", "decode"):
            return [self._rows(kind, payload) for _ in live]
        return [{"compile_ms": 0.0} for _ in live]

    def _rows(self, kind, args):
        if kind == "prefill":
            tokens, positions, _, last, _ = args
            rows = np.arange(len(last))
            token, position = tokens[rows, last], positions[rows, last]
        else:
            token, position = args[0], args[1]
        out = ((token.astype(np.int64) * 31 + position * 7 + 3) % self.cfg.vocab_size).astype(
            np.int32
        )
        expert_load = np.zeros((self.cfg.num_moe_layers, self.cfg.num_experts), np.int64)
        return {
            "tokens": [(0, out)],
            "logprobs": [(0, np.full(out.shape, -0.5, np.float32))],
            "expert_load": expert_load,
            "step_ms": 0.1,
        }


def frontend(pool, *, auto_rejoin=False, rejoin_mode="restart"):
    from elastic_moe.frontend_engine import frontend_engine
    from elastic_moe.remote_mesh import RemoteMesh
    from elastic_moe.worker_mode import WorkerCoordinator, WorkerStepper
    from models.presets import get_preset

    options = EngineOptions(redundant_experts=8)
    as_dict = dataclasses.asdict(options)
    mesh = RemoteMesh.deploy(pool, PRESET, as_dict)
    engine = frontend_engine(get_preset(PRESET), mesh, options)
    coordinator = WorkerCoordinator(
        engine, PRESET, as_dict, auto_rejoin=auto_rejoin, rejoin_mode=rejoin_mode
    )
    return engine, coordinator, WorkerStepper(coordinator)


def run_to_end(runtime: Runtime, prompts, max_tokens, on_token=None):
    """Submits every prompt and waits for every Finished; returns the finished requests."""
    done: queue.Queue = queue.Queue()

    def listener(event):
        if isinstance(event, Finished):
            done.put(event.request)
        elif on_token is not None:
            on_token(event)

    for p in prompts:
        runtime.submit(Request(list(p), max_tokens=max_tokens), listener)
    finished = [done.get(timeout=60) for _ in prompts]
    return sorted(finished, key=lambda r: r.prompt)


PROMPTS = [[1, 2, 3], [4, 5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]


def test_a_dead_worker_fails_its_devices_and_every_request_finishes_unchanged():
    from models.presets import get_preset

    cfg = get_preset(PRESET)
    expected = None
    for kill in (False, True):
        pool = StandInPool(cfg)
        die_in = pool.die_in
        engine, coordinator, stepper = frontend(pool)
        runtime = Runtime(engine, coordinator=coordinator, stepper=stepper)
        seen = threading.Event()

        def on_token(event, kill=kill, seen=seen, die_in=die_in):
            if kill and event.index == 3 and not seen.is_set():
                seen.set()
                die_in["decode"] = 1  # worker 1 dies inside the next decode step

        with runtime:
            finished = run_to_end(runtime, PROMPTS, 10, on_token)
            status = runtime.status()
        tokens = [r.generated for r in finished]
        assert all(r.finish_reason is FinishReason.LENGTH for r in finished)
        if not kill:
            expected = tokens
            assert status.epoch == 0 and all(r.reprefills == 0 for r in finished)
            continue
        assert tokens == expected
        # Every request in flight was re-prefilled (all of them, not only worker 1's).
        assert sum(r.reprefills for r in finished) >= 1
        states = {d.id: d.state for d in status.devices}
        assert states == {
            0: DeviceState.HEALTHY,
            1: DeviceState.HEALTHY,
            2: DeviceState.FAILED,
            3: DeviceState.FAILED,
        }
        assert status.epoch == 1 and status.last.kind is ReconfigurationKind.DETECTED
        assert [d.expert_slots > 0 for d in status.devices] == [True, True, False, False]
        assert stepper.detections[-1].requests_reprefilled >= 1


def test_rejoin_restarts_the_cluster_and_deploys_over_the_grown_mesh():
    from models.presets import get_preset

    pool = StandInPool(get_preset(PRESET))
    engine, coordinator, stepper = frontend(pool)
    with Runtime(engine, coordinator=coordinator, stepper=stepper) as runtime:
        runtime.fail([2, 3]).result()
        result = runtime.rejoin([2, 3]).result()
        assert pool.cluster_restarts == 1 and pool.restarted == []
        assert result.kind is ReconfigurationKind.REJOIN and "cluster restarted" in result.cause
        assert engine.mesh.device_ids == [0, 1, 2, 3]
        assert all(d.state is DeviceState.HEALTHY for d in runtime.status().devices)


def test_an_in_place_rejoin_that_jax_refuses_goes_back_to_the_survivors():
    from models.presets import get_preset

    pool = StandInPool(get_preset(PRESET))
    engine, coordinator, stepper = frontend(pool, rejoin_mode="in-place")
    with Runtime(engine, coordinator=coordinator, stepper=stepper) as runtime:
        runtime.fail([2, 3]).result()
        pool.fail_deploy_over = 4
        with pytest.raises(ReconfigurationRefused, match="rejoin .* failed: jax.errors.*ALREADY"):
            runtime.rejoin([2, 3]).result()
        assert pool.restarted == [1] and not pool.workers[1].alive
        assert engine.mesh.device_ids == [0, 1] and engine.mesh.epoch == 2
        states = [d.state for d in runtime.status().devices]
        assert states == [DeviceState.HEALTHY] * 2 + [DeviceState.FAILED] * 2
        finished = run_to_end(runtime, PROMPTS[:2], 6)
        assert all(len(r.generated) == 6 for r in finished)


def test_an_in_place_rejoin_restarts_the_worker_and_deploys_over_the_grown_mesh():
    from models.presets import get_preset

    pool = StandInPool(get_preset(PRESET))
    engine, coordinator, stepper = frontend(pool, rejoin_mode="in-place")
    with Runtime(engine, coordinator=coordinator, stepper=stepper) as runtime:
        with pytest.raises(ReconfigurationRefused, match="fail together"):
            runtime.fail([2]).result()
        result = runtime.fail([2, 3], reason="maintenance").result()
        assert result.kind is ReconfigurationKind.FAIL and not pool.workers[1].alive
        assert engine.mesh.device_ids == [0, 1]
        with pytest.raises(ReconfigurationRefused, match="already serving"):
            runtime.rejoin([0, 1]).result()
        result = runtime.rejoin([2, 3]).result()
        assert pool.restarted == [1] and result.kind is ReconfigurationKind.REJOIN
        assert engine.mesh.device_ids == [0, 1, 2, 3] and result.to_epoch == 2
        status = runtime.status()
        assert all(d.state is DeviceState.HEALTHY for d in status.devices)
        finished = run_to_end(runtime, PROMPTS[:2], 6)
        assert all(len(r.generated) == 6 for r in finished)
        with pytest.raises(ReconfigurationRefused, match="worker mode"):
            runtime.rebalance().result()


def test_auto_rejoin_brings_a_dead_workers_devices_back_at_a_step_boundary():
    from models.presets import get_preset

    pool = StandInPool(get_preset(PRESET))
    engine, coordinator, stepper = frontend(pool, auto_rejoin=True, rejoin_mode="in-place")
    with Runtime(engine, coordinator=coordinator, stepper=stepper) as runtime:
        pool.die_in["decode"] = 0  # worker 0 dies in the first decode step
        run_to_end(runtime, PROMPTS[:1], 4)
        deadline = time.monotonic() + 10
        while len(coordinator.history) < 2 and time.monotonic() < deadline:
            run_to_end(runtime, PROMPTS[1:2], 2)  # its restart finished: rejoined at a step
        assert pool.restarted == [0] and engine.mesh.device_ids == [0, 1, 2, 3]
        kinds = [r.kind for r in coordinator.history]
        assert kinds == [ReconfigurationKind.DETECTED, ReconfigurationKind.REJOIN]


def test_worker_layout_splits_simulated_devices_and_refuses_what_cannot_run():
    import argparse

    from serve.cli_common import CliError
    from serve.cli_workers import worker_layout

    def layout(**kw):
        base = {"worker_platform": "cpu", "workers": 2, "devices": None}
        return worker_layout(argparse.Namespace(**{**base, **kw}))

    assert layout() == ("cpu", 2, 4)
    assert layout(devices=2) == ("cpu", 2, 1)
    with pytest.raises(CliError, match="evenly"):
        layout(devices=3)
    with pytest.raises(CliError, match="auto"):
        layout(workers="auto")


def test_workers_of_other_hosts_need_a_shared_key(monkeypatch):
    monkeypatch.delenv("ELASTIC_MOE_WORKER_AUTHKEY", raising=False)
    with pytest.raises(ValueError, match="ELASTIC_MOE_WORKER_AUTHKEY"):
        WorkerPool(2, local_workers=[0])


# ---- the real thing: serve --workers 2 on simulated CPU devices, through gRPC --------------
SERVING = re.compile(r"serving generation on 127\.0\.0\.1:(\d+), admin on 127\.0\.0\.1:(\d+)")


def children(pid: int) -> list[int]:
    """The child processes of `pid` (Linux /proc)."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        found += [int(c) for c in text]
    return found


def worker_pid(serve_pid: int, process_id: int) -> int:
    for child in children(serve_pid):
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"elastic_moe.worker" in argv and f"--process-id={process_id}".encode() in argv:
            return child
    raise LookupError(f"no worker {process_id} under process {serve_pid}")


def stream_all(client, requests, max_tokens, *, after_tokens=None, action=None):
    """Streams every request at once; once every stream has `after_tokens` tokens, runs
    action() (in this thread). Returns the completions in order."""
    from serve.client import Completion

    completions = [Completion() for _ in requests]
    progress = [threading.Event() for _ in requests]
    errors: list[BaseException] = []

    def run(i, prompt, sampling):
        try:
            for response in client.generate_stream(prompt, max_tokens, **sampling):
                completions[i].add(response)
                if after_tokens is not None and len(completions[i].token_ids) >= after_tokens:
                    progress[i].set()
        except BaseException as error:  # reported below
            errors.append(error)
        progress[i].set()

    threads = [
        threading.Thread(target=run, args=(i, p, s), daemon=True)
        for i, (p, s) in enumerate(requests)
    ]
    for t in threads:
        t.start()
    if action is not None:
        for e in progress:
            assert e.wait(timeout=120)
        action()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return completions


LOAD = [
    ([1, 2, 3, 4, 5], {}),
    ([7, 8, 9], {"temperature": 0.8, "seed": 11}),
    ([10, 11, 12, 13, 14, 15, 16], {}),
    ([20, 21], {"temperature": 0.8, "seed": 5}),
]


@pytest.mark.slow
def test_serve_workers_survives_a_worker_killed_mid_stream_and_rejoins_it(tmp_path):
    """serve --workers 2 (one simulated CPU device each, gloo): a failure-free round of
    streaming requests; the same requests again with worker 1 SIGKILLed mid-stream (every
    request finishes with the failure-free tokens, worker 1's device failed in the status);
    then `mesh rejoin` of that device restarts the cluster, and the same requests again."""
    from serve.client import Client
    from serve.proto import elastic_moe_pb2 as pb

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ELASTIC_MOE_NO_COMPILATION_CACHE": "1"}
    env.pop("ELASTIC_MOE_ADMIN_TOKEN", None)
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, "-m", "elastic_moe", "serve", "--preset", PRESET]
    command += ["--workers", "2", "--devices", "2", "--port", "0", "--admin-port", "0"]
    command += ["--heartbeat-timeout", "1", "--collective-timeout", "5", "--drain-timeout", "5"]
    command += ["--worker-logs", str(tmp_path)]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in process.stdout], daemon=True).start()
    try:
        first = lines.get(timeout=300)
        serving = SERVING.search(first)
        assert serving, first
        port, admin_port = serving.groups()
        with Client(f"127.0.0.1:{port}", admin_target=f"127.0.0.1:{admin_port}") as client:
            status = client.mesh_status()
            assert [d.process_index for d in status.devices] == [0, 1]
            lost = [d.id for d in status.devices if d.process_index == 1]  # CPU: [2048]
            clean = stream_all(client, LOAD, 24)
            assert all(c.finish_reason == "length" and c.reprefills == 0 for c in clean)

            victim = worker_pid(process.pid, 1)
            killed = stream_all(
                client, LOAD, 24, after_tokens=4, action=lambda: os.kill(victim, signal.SIGKILL)
            )
            assert [c.token_ids for c in killed] == [c.token_ids for c in clean]
            assert all(c.finish_reason == "length" for c in killed)
            assert any(c.reprefills == 1 and set(c.epochs) == {0, 1} for c in killed), killed
            status = client.mesh_status()
            failed = [d.id for d in status.devices if d.state == pb.FAILED]
            assert status.epoch == 1 and failed == lost, status
            assert status.last.cause.startswith(f"fail {lost}"), status.last

            # Rejoin (the default mode restarts the cluster: a worker restarted alone cannot
            # join the running one, docs/WORKERS.md): every worker starts again, the same
            # requests come out unchanged over both devices.
            result = client.rejoin(lost)
            assert result.summary.to_epoch == 2, result
            assert "cluster restarted" in result.summary.cause, result
            assert worker_pid(process.pid, 1) != victim
            status = client.mesh_status()
            assert all(d.state == pb.HEALTHY and d.expert_slots for d in status.devices), status
            again = stream_all(client, LOAD, 24)
            assert [c.token_ids for c in again] == [c.token_ids for c in clean]
            assert {e for c in again for e in c.epochs} == {2}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            _, stderr = process.communicate()
    assert process.returncode == 0, stderr[-4000:]
    assert "Traceback" not in stderr, stderr[-4000:]


@pytest.mark.slow
def test_a_worker_started_by_hand_joins_as_on_another_host():
    """The two-host launch on one host: serve --workers 2 --local-workers 1 prints the command
    of worker 1, which is started separately with the same $ELASTIC_MOE_WORKER_AUTHKEY; it
    joins, serves, and its death is survived like a local worker's."""
    import shlex

    from serve.client import Client
    from serve.proto import elastic_moe_pb2 as pb

    key = os.urandom(16).hex()
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ELASTIC_MOE_NO_COMPILATION_CACHE": "1"}
    env["ELASTIC_MOE_WORKER_AUTHKEY"] = key
    env.pop("ELASTIC_MOE_ADMIN_TOKEN", None)
    env.pop("XLA_FLAGS", None)
    command = [sys.executable, "-m", "elastic_moe", "serve", "--preset", PRESET]
    command += ["--workers", "2", "--devices", "2", "--local-workers", "1", "--no-standby"]
    command += ["--port", "0", "--admin-port", "0", "--heartbeat-timeout", "1"]
    command += ["--collective-timeout", "5", "--drain-timeout", "5"]
    server = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO
    )
    announced: queue.Queue[str] = queue.Queue()
    log: list[str] = []

    def read_stderr() -> None:
        for line in server.stderr:
            log.append(line)
            found = re.search(r"worker 1: start it on its host .*?: (python .*)$", line)
            if found:
                announced.put(found.group(1))

    threading.Thread(target=read_stderr, daemon=True).start()
    remote = None
    try:
        argv = shlex.split(announced.get(timeout=120))
        worker_env = {k: v for k, v in env.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
        worker_env["PYTHONPATH"] = str(REPO)
        remote = subprocess.Popen([sys.executable, *argv[1:]], env=worker_env, cwd="/")
        serving = SERVING.search(server.stdout.readline())
        assert serving, "".join(log[-20:])
        port, admin_port = serving.groups()
        with Client(f"127.0.0.1:{port}", admin_target=f"127.0.0.1:{admin_port}") as client:
            status = client.mesh_status()
            assert [d.process_index for d in status.devices] == [0, 1]
            clean = stream_all(client, LOAD, 12)
            remote.kill()
            again = stream_all(client, LOAD, 12)
            assert [c.token_ids for c in again] == [c.token_ids for c in clean]
            status = client.mesh_status()
            assert [d.state for d in status.devices] == [pb.HEALTHY, pb.FAILED]
    finally:
        if remote is not None:
            remote.kill()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
    assert server.returncode == 0, "".join(log[-40:])
