"""Chaos: concurrent streaming clients against a real server on 8 simulated devices while a
seeded fault scheduler fails, breaks (mid-step too), rejoins and rebalances at random.

Invariants, for every request: it completes, its tokens are exactly those of a failure-free
run, its chunk offsets are continuous with no repeat. After every event: every expert slot
holds the expert its placement names (VerifyExperts finds nothing wrong). At the end: every
device healthy, nothing running or queued.

The seed comes from ELASTIC_MOE_CHAOS_SEED (otherwise random, printed: rerun with it to
reproduce); ELASTIC_MOE_CHAOS_EVENTS sets the events of the long run. `pytest -m chaos`
selects these tests; the long run is also `slow`.
"""

from __future__ import annotations

import asyncio
import os
import random

import grpc
import numpy as np
import pytest

from elastic_moe import Engine, EngineOptions, SamplingParams, get_preset, init_params
from elastic_moe.coordinator import Coordinator
from elastic_moe.runtime import Runtime
from serve.client import AsyncClient, Completion
from serve.proto import elastic_moe_pb2 as pb
from serve.server import ServerConfig, ServerThread

pytestmark = pytest.mark.chaos
OPTIONS = EngineOptions(request_slots_per_device=2, redundant_experts=8)
MAX_TOKENS = 24


def chaos_seed() -> int:
    seed = int(os.environ.get("ELASTIC_MOE_CHAOS_SEED") or random.randrange(2**31))
    print(f"chaos seed: {seed} (ELASTIC_MOE_CHAOS_SEED={seed} reproduces it)")
    return seed


def workload(rng: np.random.Generator, n: int) -> list[tuple[list[int], SamplingParams]]:
    """Half the prompts one repeated token (a skewed router load), half random; half greedy,
    half seeded sampling."""
    out = []
    for i in range(n):
        length = int(rng.integers(3, 20))
        prompt = [7] * length if i % 2 else rng.integers(0, 256, size=length).tolist()
        sampling = SamplingParams(temperature=0.9, top_k=30, seed=i) if i % 4 >= 2 else None
        out.append((prompt, sampling or SamplingParams()))
    return out


class ChaosServer:
    def __init__(self, devices):
        cfg = get_preset("tiny-mixtral")
        self.engine = Engine(cfg, init_params(cfg), devices, OPTIONS)
        self.runtime = Runtime(
            self.engine, coordinator=Coordinator(self.engine, standby=False)
        ).start()
        config = ServerConfig(host="127.0.0.1", port=0, admin_port=0, admin_token="")
        self.thread = ServerThread(self.runtime, config).start()
        self.target = f"127.0.0.1:{self.thread.ports.generation}"
        self.admin = f"127.0.0.1:{self.thread.ports.admin}"
        self.ids = [d.id for d in devices]

    def references(self, requests) -> list[list[int]]:
        """Failure-free tokens, from a second engine on the same devices (no runtime)."""
        engine = Engine(self.engine.cfg, self.engine.host_params, self.engine.mesh.devices, OPTIONS)
        out = []
        for prompt, sampling in requests:
            (done,) = engine.generate([prompt], MAX_TOKENS, sampling)
            out.append(done.generated)
        return out

    def close(self):
        self.thread.stop()
        self.runtime.stop()


@pytest.fixture(scope="module")
def server(devices):
    s = ChaosServer(devices)
    yield s
    s.close()


async def fault_scheduler(client: AsyncClient, server: ChaosServer, rng, events: int, log):
    """Random events between the streams' steps; every slot checked after each."""
    failed: set[int] = set()  # declared failed through the Admin API
    broken: set[int] = set()  # broken in the "hardware": detected by the runtime
    injector = server.runtime.injector
    done = 0
    while done < events:
        await asyncio.sleep(float(rng.uniform(0.05, 0.4)))
        status = await client.mesh_status()
        serving = [d.id for d in status.devices if d.state == pb.HEALTHY]
        down = sorted(d.id for d in status.devices if d.state == pb.FAILED)
        kind = str(rng.choice(["fail", "fail2", "break", "break_mid", "rejoin", "rebalance"]))
        try:
            if kind in ("fail", "fail2") and len(serving) > 5:
                lost = rng.choice(serving, size=1 if kind == "fail" else 2, replace=False)
                await client.fail(lost.tolist(), reason="chaos")
                failed.update(lost.tolist())
            elif kind in ("break", "break_mid") and len(serving) > 5:
                lost = int(rng.choice(serving))
                if kind == "break":
                    injector.break_devices([lost])
                else:  # dies inside a step: after its prefill or its decode program ran
                    injector.break_during([lost], str(rng.choice(["prefill", "decode"])))
                broken.add(lost)
                await wait_for_state(client, lost, pb.FAILED)
            elif kind == "rejoin" and down:
                back = rng.choice(down, size=int(rng.integers(1, len(down) + 1)), replace=False)
                injector.repair_devices(back.tolist())
                await client.rejoin(back.tolist())
                failed.difference_update(back.tolist())
                broken.difference_update(back.tolist())
            elif kind == "rebalance":
                await client.rebalance()
            else:
                continue
        except grpc.aio.AioRpcError as error:
            # Refusals are fine (e.g. too few devices left); anything else is a failure.
            assert error.code() == grpc.StatusCode.FAILED_PRECONDITION, error.details()
            continue
        done += 1
        log.append(kind)
        check = await client.verify_experts(check_only=True)
        assert list(check.mismatches) == [], f"after {kind}: {check.mismatches}"
    # Bring everyone back for the final check.
    status = await client.mesh_status()
    down = sorted(d.id for d in status.devices if d.state == pb.FAILED)
    if down:
        injector.repair_devices(down)
        await client.rejoin(down)


async def wait_for_state(client, device_id, state, timeout_s=60.0):
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        status = await client.mesh_status()
        if next(d.state for d in status.devices if d.id == device_id) == state:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"device {device_id} never became {pb.DeviceState.Name(state)}")


def run_chaos(server: ChaosServer, seed: int, streams: int, events: int):
    rng = np.random.default_rng(seed)
    pool = workload(rng, 24)
    want = server.references(pool)
    log: list[str] = []
    results: list[tuple[int, Completion, list[tuple[int, int]]]] = []

    async def run():
        # Per request: a contended CI machine compiles new meshes on the critical path.
        timeout = float(os.environ.get("ELASTIC_MOE_CHAOS_STREAM_TIMEOUT", "300"))
        async with AsyncClient(server.target, admin_target=server.admin, timeout=timeout) as client:
            counter = iter(range(10**6))
            stop = asyncio.Event()

            async def stream(i):
                prompt, sampling = pool[i % len(pool)]
                completion, offsets = Completion(), []
                async for response in client.generate_stream(
                    prompt,
                    MAX_TOKENS,
                    temperature=sampling.temperature,
                    top_k=sampling.top_k,
                    seed=sampling.seed,
                    request_id=f"chaos-{seed}-{i}",
                ):
                    if response.HasField("chunk"):
                        offsets.append((response.chunk.offset, len(response.chunk.token_ids)))
                    completion.add(response)  # raises on a gap or a repeated offset
                results.append((i, completion, offsets))

            async def client_loop():
                # Each client sends requests back to back until the faults stop, so requests
                # arrive (and prefill) all through the chaos.
                await stream(next(counter))
                while not stop.is_set():
                    await stream(next(counter))

            clients = [asyncio.create_task(client_loop()) for _ in range(streams)]
            try:
                await fault_scheduler(client, server, rng, events, log)
            finally:
                stop.set()
            await asyncio.gather(*clients)
            status = await client.mesh_status()
            for _ in range(100):  # the last Complete can reach us before the status updates
                if status.active_requests == 0 and status.queued_requests == 0:
                    break
                await asyncio.sleep(0.05)
                status = await client.mesh_status()
            check = await client.verify_experts(check_only=True)
            return status, check

    status, check = asyncio.run(run())
    for i, completion, offsets in results:
        assert completion.token_ids == want[i % len(pool)], f"seed {seed}: request {i} ({log})"
        assert completion.completion_tokens == MAX_TOKENS
        covered = [o for start, n in offsets for o in range(start, start + n)]
        assert covered == list(range(MAX_TOKENS)), f"seed {seed}: request {i} offsets"
    assert all(d.state == pb.HEALTHY and d.expert_slots > 0 for d in status.devices)
    assert status.active_requests == 0 and status.queued_requests == 0
    assert list(check.mismatches) == []
    print(f"chaos seed {seed}: {len(results)} requests through {log}")
    return log


def test_chaos_short(server):
    log = run_chaos(server, chaos_seed(), streams=8, events=4)
    assert len(log) == 4


@pytest.mark.slow
@pytest.mark.timeout(3 * 3600)  # new meshes compile on the critical path here (no standby)
def test_chaos_long(server):
    events = int(os.environ.get("ELASTIC_MOE_CHAOS_EVENTS", "60"))
    log = run_chaos(server, chaos_seed(), streams=32, events=events)
    assert len(log) == events
