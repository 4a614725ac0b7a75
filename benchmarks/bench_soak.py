"""Soak: fail / rejoin cycles under load against a real gRPC server, watching for leaks.

  python benchmarks/bench_soak.py                      # 100 cycles on 8 simulated CPU devices
  python benchmarks/bench_soak.py --cycles 20 --streams 2

tiny-mixtral on 8 devices (2 request slots and 2 expert slots per device), served by the gRPC
server in this process, standby executables on. A few streaming clients send requests back to
back the whole time. Each cycle fails one device through the Admin API (round robin over the
mesh), lets the clients run on the survivors, rejoins the device and lets them run again, then
samples the process: host RSS, open file descriptors, threads (Python's and the OS's), device
memory where the backend reports it (the CPU backend does not), and the meshes held by the
executable cache. Every request is checked against the tokens of a failure-free run.

The first round over the devices waits, after each failure, until the standby compiles of the
meshes one more failure would leave are done (the cache fills up, RSS with it); the cycles after
it are the steady state, in which nothing compiles and nothing should grow. Prints the curves
every 10 cycles; exits non-zero if a request got other tokens or a reconfiguration had to
compile (a standby miss).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from common import simulate_devices_unless_gpu  # noqa: E402

PRESET = "tiny-mixtral"
# A prompt, or a prompt with the tokens so far when a failure re-prefills it, fits the smallest
# prefill bucket (16): the only prefill length, compiled by the references before serving and
# so by every standby compile (a longer one would compile on the new mesh, mid-cycle).
MAX_PROMPT = 8
MAX_TOKENS = 8


class CompileCounter:
    """XLA compiles in this process (jax.monitoring): none should run once every mesh's
    programs are built."""

    _count = 0
    _lock = threading.Lock()
    _installed = False

    @classmethod
    def install(cls) -> None:
        import jax.monitoring

        if not cls._installed:
            jax.monitoring.register_event_duration_secs_listener(cls._listener)
            cls._installed = True

    @classmethod
    def _listener(cls, name: str, duration: float, **_) -> None:
        if name == "/jax/core/compile/backend_compile_duration":
            with cls._lock:
                cls._count += 1

    @classmethod
    def count(cls) -> int:
        return cls._count


@dataclass
class Sample:
    """The process after one cycle."""

    cycle: int
    rss_mb: float
    fds: int
    threads: int  # Python threads (threading.active_count())
    os_threads: int  # every thread of the process: XLA's and gRPC's too
    device_mb: float | None  # bytes in use summed over the devices; None where not reported
    executables: int  # meshes in the executable cache
    compiles: int  # XLA compiles so far (standby compiles included)
    cycle_ms: float
    requests: int  # completed so far


@dataclass
class Cycle:
    """What the Admin API answered for one fail + rejoin."""

    device: int
    fail_pause_ms: float
    rejoin_pause_ms: float
    standby_hits: tuple[bool, bool]  # fail, rejoin: the new mesh's programs were ready
    meshes: tuple[tuple[int, ...], tuple[int, ...]]  # serving device ids after each


@dataclass
class SoakResult:
    baseline: Sample  # before the first cycle, with the clients already streaming
    samples: list[Sample] = field(default_factory=list)
    cycles: list[Cycle] = field(default_factory=list)
    final: Sample | None = None  # after the clients stopped and the server went idle
    completed: int = 0
    mismatches: list[str] = field(default_factory=list)  # requests whose tokens differ


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def process_sample(devices, executables, cycle: int, cycle_ms: float, requests: int) -> Sample:
    """This process's resources now (Linux: /proc/self)."""
    device_bytes = [(d.memory_stats() or {}).get("bytes_in_use") for d in devices]
    return Sample(
        cycle=cycle,
        rss_mb=_proc_status("VmRSS") / 1024,
        fds=len(os.listdir("/proc/self/fd")),
        threads=threading.active_count(),
        os_threads=_proc_status("Threads"),
        device_mb=None if None in device_bytes else sum(device_bytes) / 2**20,
        executables=executables.size,
        compiles=CompileCounter.count(),
        cycle_ms=cycle_ms,
        requests=requests,
    )


def workload(vocab_size: int, n: int = 16):
    """(prompt, SamplingParams) pairs: half greedy, half seeded sampling; some prompts one
    repeated token (a skewed router load)."""
    import numpy as np

    from elastic_moe import SamplingParams

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        length = int(rng.integers(3, MAX_PROMPT + 1))
        prompt = [7] * length if i % 3 == 0 else rng.integers(0, vocab_size, length).tolist()
        sampling = SamplingParams(temperature=0.9, top_k=30, seed=i) if i % 2 else None
        out.append((prompt, sampling or SamplingParams()))
    return out


class SoakServer:
    """The engine, its coordinator (standby compiles on), the runtime and the gRPC server;
    `want`: the failure-free tokens of each of `requests`."""

    def __init__(self, cfg, params, devices, options, requests, standby_delay_s: float = 0.2):
        from elastic_moe import Engine
        from elastic_moe.coordinator import Coordinator
        from elastic_moe.runtime import Runtime
        from serve.server import ServerConfig, ServerThread

        CompileCounter.install()
        self.devices = list(devices)
        self.engine = Engine(cfg, params, self.devices, options)
        # The references, on the full mesh before anything failed (the runtime not started).
        self.requests = requests
        self.want = self._failure_free(requests)
        assert MAX_PROMPT + MAX_TOKENS - 1 <= options.min_prefill_bucket
        self.coordinator = Coordinator(self.engine, standby=True, standby_delay_s=standby_delay_s)
        self.runtime = Runtime(self.engine, coordinator=self.coordinator).start()
        config = ServerConfig(host="127.0.0.1", port=0, admin_port=0, admin_token="")
        self.thread = ServerThread(self.runtime, config).start()
        self.target = f"127.0.0.1:{self.thread.ports.generation}"
        self.admin = f"127.0.0.1:{self.thread.ports.admin}"

    def _failure_free(self, requests) -> list[list[int]]:
        from elastic_moe import Request

        batch = [
            self.engine.submit(Request(list(p), max_tokens=MAX_TOKENS, sampling=s))
            for p, s in requests
        ]
        while not all(r.done for r in batch):
            self.engine.step()
        return [r.generated for r in batch]

    def one_loss_meshes(self, mesh: tuple[int, ...]) -> list[tuple[int, ...]]:
        """The meshes (device ids) one more failure of `mesh` would leave, those too small to
        hold every expert excepted: what the standby compiles prepare while `mesh` serves."""
        if len(mesh) - 1 < self.engine.min_devices:
            return []
        return [tuple(i for i in mesh if i != lost) for lost in mesh]

    def wait_until_warm(self, meshes, timeout_s: float = 1800) -> float:
        """Waits until the standby compiles have built the programs of every mesh in `meshes`
        (tuples of device ids); returns the seconds waited."""
        by_id = {d.id: d for d in self.devices}
        started = time.perf_counter()
        while not all(self.engine.executables.is_warm([by_id[i] for i in m]) for m in meshes):
            if time.perf_counter() - started > timeout_s:
                raise TimeoutError(f"standby programs not compiled in {timeout_s} s")
            time.sleep(0.2)
        return time.perf_counter() - started

    def standby_bound(self, serving_meshes) -> int:
        """How many meshes the executable cache may hold after serving `serving_meshes`: each
        of them, the meshes one more failure of each would leave (the standby compiles), and
        the full mesh (a rejoin of everything)."""
        known = {tuple(d.id for d in self.devices)}
        for mesh in serving_meshes:
            known.add(tuple(mesh))
            known.update(self.one_loss_meshes(tuple(mesh)))
        return len(known)

    def close(self) -> None:
        self.thread.stop()
        self.runtime.stop()  # closes the coordinator: its standby timer and compiles


async def soak(
    server: SoakServer,
    cycles: int,
    fail_order: list[int],
    streams: int = 3,
    dwell_s: float = 0.5,
    settle_first_round: bool = False,
    on_sample=None,
) -> SoakResult:
    """`cycles` fail / rejoin cycles (cycle c fails fail_order[c % len]) while `streams`
    clients send requests back to back; a Sample after each cycle (passed to on_sample).

    settle_first_round: in the first round over fail_order, wait after each failure until the
    standby compiles of that mesh (every mesh one more failure would leave) are done, so the
    cycles after it run with every program compiled: the steady state a leak would show in."""
    from serve.client import AsyncClient, Completion
    from serve.proto import elastic_moe_pb2 as pb

    def sample(cycle: int, cycle_ms: float) -> Sample:
        taken = process_sample(
            server.devices, server.engine.executables, cycle, cycle_ms, result.completed
        )
        if on_sample is not None:
            on_sample(taken)
        return taken

    def serving(status) -> tuple[int, ...]:
        return tuple(d.id for d in status.devices if d.state == pb.HEALTHY)

    async with AsyncClient(server.target, admin_target=server.admin, timeout=600) as client:
        stop = asyncio.Event()
        first_done = asyncio.Event()
        result = SoakResult(baseline=None)  # type: ignore[arg-type]

        async def client_loop(stream: int):
            sent = stream
            while not stop.is_set():
                index = sent % len(server.requests)
                prompt, sampling = server.requests[index]
                completion = Completion()  # raises on a gap or a repeated offset
                async for response in client.generate_stream(
                    prompt,
                    MAX_TOKENS,
                    temperature=sampling.temperature,
                    top_k=sampling.top_k,
                    seed=sampling.seed,
                    request_id=f"soak-{stream}-{sent}",
                ):
                    completion.add(response)
                if completion.token_ids != server.want[index]:
                    result.mismatches.append(
                        f"request soak-{stream}-{sent} (prompt {index}): "
                        f"{completion.token_ids} != {server.want[index]}"
                    )
                result.completed += 1
                first_done.set()
                sent += streams

        clients = [asyncio.create_task(client_loop(i)) for i in range(streams)]
        # Op ids unique to this soak: a server kept for a second soak (the tests share one)
        # refuses an op id reused for another device.
        run = f"soak-{uuid.uuid4().hex[:8]}"
        try:
            await first_done.wait()
            result.baseline = sample(0, 0.0)
            for cycle in range(1, cycles + 1):
                device = fail_order[(cycle - 1) % len(fail_order)]
                began = time.perf_counter()
                failed = await client.fail([device], reason="soak", op_id=f"{run}-{cycle}-fail")
                after_fail = serving(await client.mesh_status())
                if settle_first_round and cycle <= len(fail_order):
                    meshes = server.one_loss_meshes(after_fail)
                    await asyncio.to_thread(server.wait_until_warm, meshes)
                await asyncio.sleep(dwell_s)
                back = await client.rejoin([device], op_id=f"{run}-{cycle}-rejoin")
                after_rejoin = serving(await client.mesh_status())
                await asyncio.sleep(dwell_s)
                result.cycles.append(
                    Cycle(
                        device=device,
                        fail_pause_ms=failed.summary.pause_ms,
                        rejoin_pause_ms=back.summary.pause_ms,
                        standby_hits=(failed.summary.standby_hit, back.summary.standby_hit),
                        meshes=(after_fail, after_rejoin),
                    )
                )
                result.samples.append(sample(cycle, 1000 * (time.perf_counter() - began)))
        finally:
            stop.set()
            await asyncio.gather(*clients)
        for _ in range(200):  # the last Complete can reach us before the status updates
            status = await client.mesh_status()
            if status.active_requests == 0 and status.queued_requests == 0:
                break
            await asyncio.sleep(0.05)
    await asyncio.sleep(1.0)  # closed channels and finished standby timers wind down
    result.final = process_sample(
        server.devices, server.engine.executables, cycles, 0.0, result.completed
    )
    return result


# ---- the script ---------------------------------------------------------------------------
HEADER = (
    f"{'cycle':>5} {'rss MB':>8} {'fds':>5} {'threads':>7} {'os thr':>6} {'dev MB':>8} "
    f"{'execs':>5} {'compiles':>8} {'cycle ms':>9} {'requests':>8}"
)


def row(s: Sample) -> str:
    device = "n/a" if s.device_mb is None else f"{s.device_mb:.1f}"
    return (
        f"{s.cycle:>5} {s.rss_mb:>8.1f} {s.fds:>5} {s.threads:>7} {s.os_threads:>6} "
        f"{device:>8} {s.executables:>5} {s.compiles:>8} {s.cycle_ms:>9.0f} {s.requests:>8}"
    )


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--cycles", type=int, default=100)
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--fail-devices", type=int, default=0, help="fail only the first N (0: all)")
    p.add_argument("--streams", type=int, default=3, help="clients sending requests throughout")
    p.add_argument("--dwell", type=float, default=0.5, help="seconds after each fail and rejoin")
    p.add_argument("--every", type=int, default=10, help="print a row every this many cycles")
    return p.parse_args()


def main() -> int:
    args = parse()
    simulate_devices_unless_gpu(args.devices)
    import jax

    from elastic_moe import EngineOptions, get_preset, init_params

    started = time.perf_counter()
    cfg = get_preset(PRESET)
    params = init_params(cfg)
    devices = jax.devices()[: args.devices]
    options = EngineOptions(request_slots_per_device=2, redundant_experts=cfg.num_experts)
    requests = workload(cfg.vocab_size)
    server = SoakServer(cfg, params, devices, options, requests)
    fail_order = [d.id for d in devices][: args.fail_devices or None]
    everyone = tuple(d.id for d in devices)
    first_losses = [m for m in server.one_loss_meshes(everyone) if set(fail_order) - set(m)]
    waited = server.wait_until_warm(first_losses)
    print(
        f"# {cfg.name} on {len(devices)} x {devices[0].device_kind}, {args.streams} streams, "
        f"{args.cycles} cycles; set-up {time.perf_counter() - started:.0f} s (standby compiles "
        f"{waited:.0f} s)",
        flush=True,
    )
    print(HEADER, flush=True)

    def show(s: Sample) -> None:
        if s.cycle % args.every == 0:
            print(row(s), flush=True)

    try:
        result = asyncio.run(
            soak(
                server,
                args.cycles,
                fail_order,
                streams=args.streams,
                dwell_s=args.dwell,
                settle_first_round=True,
                on_sample=show,
            )
        )
    finally:
        server.close()
    print(f"{'end':>5}" + row(result.final)[5:])
    misses = sum(not hit for c in result.cycles for hit in c.standby_hits)
    half = len(result.samples) // 2
    tail, before_tail = result.samples[half:], result.samples[half - 1]
    first_round = sum(s.cycle_ms for s in result.samples[: len(fail_order)]) / 1000

    def pauses(cycles) -> str:
        ms = sorted(p for c in cycles for p in (c.fail_pause_ms, c.rejoin_pause_ms))
        return f"median {ms[len(ms) // 2]:.0f} ms, max {ms[-1]:.0f} ms"

    print(
        f"# {result.completed} requests, {len(result.mismatches)} with other tokens than the "
        f"failure-free run; {2 * len(result.cycles)} reconfigurations, {misses} standby misses; "
        f"pause {pauses(result.cycles)} (last {len(tail)} cycles: {pauses(result.cycles[half:])})"
    )
    print(
        f"# first {len(fail_order)} cycles (each waits for its standby compiles): "
        f"{first_round:.0f} s; the whole run {time.perf_counter() - started:.0f} s"
    )
    print(
        f"# last {len(tail)} cycles: rss {min(s.rss_mb for s in tail):.1f}-"
        f"{max(s.rss_mb for s in tail):.1f} MB, fds {min(s.fds for s in tail)}-"
        f"{max(s.fds for s in tail)}, threads {min(s.threads for s in tail)}-"
        f"{max(s.threads for s in tail)}, executables {min(s.executables for s in tail)}-"
        f"{max(s.executables for s in tail)} (bound "
        f"{server.standby_bound([m for c in result.cycles for m in c.meshes])}), "
        f"{tail[-1].compiles - before_tail.compiles} XLA compiles"
    )
    for line in result.mismatches[:5]:
        print("MISMATCH", line)
    return 1 if result.mismatches or misses else 0


if __name__ == "__main__":
    sys.exit(main())
