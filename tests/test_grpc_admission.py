"""Admission on small servers of their own: a full queue, and draining (which is for good)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from elastic_moe import Engine, EngineOptions, get_preset, init_params
from elastic_moe.coordinator import Coordinator
from elastic_moe.runtime import Runtime
from serve.client import Client
from serve.proto import elastic_moe_pb2 as pb
from serve.server import ServerConfig, ServerThread

PROMPTS = [[(5 * i + j + 2) % 256 for j in range(3 + i % 4)] for i in range(8)]
SLOTS = 4  # 4 devices x 1 request slot


def small_server(devices, max_queued_requests: int, max_tokens: int):
    """A 4-device server with one request slot per device, and reference outputs."""
    cfg = get_preset("tiny-mixtral")
    engine = Engine(cfg, init_params(cfg), devices[:4], EngineOptions(request_slots_per_device=1))
    reference = [r.generated for r in engine.generate(PROMPTS, max_tokens)]
    runtime = Runtime(
        engine,
        coordinator=Coordinator(engine, standby=False),
        max_queued_requests=max_queued_requests,
    ).start()
    config = ServerConfig(host="127.0.0.1", port=0, admin_port=0, admin_token="")
    thread = ServerThread(runtime, config).start()
    client = Client(
        f"127.0.0.1:{thread.ports.generation}",
        admin_target=f"127.0.0.1:{thread.ports.admin}",
        timeout=60,
    )
    return runtime, thread, client, reference


def wait_until(predicate, timeout=20.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.005)
    raise AssertionError("condition not met in time")


class Streams:
    """Generate calls on background threads; first_token[i] is set at the first chunk."""

    def __init__(self, client: Client, max_tokens: int):
        self.client, self.max_tokens = client, max_tokens
        self.results: dict[int, object] = {}
        self.first_token: dict[int, threading.Event] = {}
        self.threads: list[threading.Thread] = []

    def start(self, i: int) -> None:
        self.first_token[i] = threading.Event()

        def run():
            try:
                tokens, complete = [], None
                for response in self.client.generate_stream(PROMPTS[i], self.max_tokens):
                    if response.HasField("chunk"):
                        tokens += response.chunk.token_ids
                        self.first_token[i].set()
                    else:
                        complete = response.complete
                self.results[i] = (tokens, complete)
            except grpc.RpcError as error:
                self.results[i] = error
            finally:
                self.first_token[i].set()

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        self.threads.append(thread)

    def join(self) -> None:
        for thread in self.threads:
            thread.join(60)


def test_full_queue_is_resource_exhausted_and_running_requests_are_untouched(devices):
    max_tokens = 110
    runtime, thread, client, reference = small_server(devices, 2, max_tokens)
    try:
        streams = Streams(client, max_tokens)
        for i in range(SLOTS):  # one at a time: the queue holds only 2
            streams.start(i)
            assert streams.first_token[i].wait(30) and i not in streams.results
        for i in range(SLOTS, SLOTS + 2):  # these wait in the queue: all slots are taken
            streams.start(i)
        wait_until(lambda: client.mesh_status().queued_requests == 2)
        with pytest.raises(grpc.RpcError) as error:
            client.generate(PROMPTS[6], 4)
        assert error.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue full" in error.value.details()
        assert client.mesh_status().active_requests == SLOTS  # still running
        streams.join()
        for i in range(SLOTS + 2):
            tokens, complete = streams.results[i]
            assert tokens == reference[i]
            assert complete.finish_reason == pb.LENGTH
        assert client.generate(PROMPTS[6], 8).token_ids == reference[6][:8]  # room again
    finally:
        client.close()
        thread.stop()
        runtime.stop()


def test_drain(devices):
    max_tokens = 60
    runtime, thread, client, reference = small_server(devices, 16, max_tokens)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{thread.ports.generation}")
        health = health_pb2_grpc.HealthStub(channel)

        def readiness():
            request = health_pb2.HealthCheckRequest(service="elastic_moe.v1.Generation")
            return health.Check(request, timeout=10).status

        assert readiness() == health_pb2.HealthCheckResponse.SERVING
        streams = Streams(client, max_tokens)
        for i in range(2):
            streams.start(i)
        for i in range(2):
            assert streams.first_token[i].wait(30)
        drained = []
        drainer = threading.Thread(target=lambda: drained.append(client.drain(timeout_s=30)))
        drainer.start()
        wait_until(lambda: readiness() == health_pb2.HealthCheckResponse.NOT_SERVING)
        with pytest.raises(grpc.RpcError) as error:
            client.generate(PROMPTS[3], 4)
        assert error.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "draining" in error.value.details()
        drainer.join(60)
        assert (drained[0].completed, drained[0].aborted) == (2, 0)
        streams.join()
        for i in range(2):
            tokens, complete = streams.results[i]
            assert tokens == reference[i] and complete.finish_reason == pb.LENGTH
        assert client.mesh_status().state == pb.DRAINING
        liveness = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert liveness.status == health_pb2.HealthCheckResponse.SERVING
        channel.close()
    finally:
        client.close()
        thread.stop()
        runtime.stop()


SIGTERM_SCRIPT = """
import asyncio, logging, sys
import jax
from elastic_moe import Engine, EngineOptions, get_preset, init_params
from elastic_moe.coordinator import Coordinator
from elastic_moe.runtime import Runtime
from serve.server import ElasticServer, ServerConfig

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
cfg = get_preset("tiny-mixtral")
engine = Engine(cfg, init_params(cfg), jax.devices()[:1], EngineOptions(request_slots_per_device=2))
runtime = Runtime(engine, coordinator=Coordinator(engine, standby=False)).start()

async def main():
    config = ServerConfig(
        host="127.0.0.1", port=0, admin_port=0, admin_token="", handle_signals=True,
        drain_timeout_s=60,
    )
    server = await ElasticServer(runtime, config).start()
    print("PORTS", server.ports.generation, server.ports.admin, flush=True)
    await server.wait()
    print("STOPPED", flush=True)

asyncio.run(main())
runtime.stop()
"""


def test_sigterm_drains_then_stops(tmp_path):
    script = tmp_path / "serve_once.py"
    script.write_text(SIGTERM_SCRIPT)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    child = subprocess.Popen(
        [sys.executable, str(script)],
        cwd=repo,
        env={**os.environ, "PYTHONPATH": repo},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = child.stdout.readline()
        assert line.startswith("PORTS"), (line, child.stderr.read() if child.poll() else "")
        port, admin_port = map(int, line.split()[1:])
        with Client(f"127.0.0.1:{port}", admin_target=f"127.0.0.1:{admin_port}", timeout=60) as c:
            stream = c.generate_stream([1, 2, 3], 100)
            first = next(stream)
            child.send_signal(signal.SIGTERM)
            rest = list(stream)
        tokens = list(first.chunk.token_ids) + [
            t for r in rest if r.HasField("chunk") for t in r.chunk.token_ids
        ]
        assert len(tokens) == 100 and rest[-1].complete.finish_reason == pb.LENGTH
        out, err = child.communicate(timeout=60)
        assert child.returncode == 0, err
        assert "STOPPED" in out
        assert "drained: 1 requests completed, 0 aborted" in err
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
