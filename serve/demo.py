"""`elastic-moe demo` (what `make demo` runs): devices die under live traffic, nothing is lost.

1. Deploys tiny-mixtral on 8 simulated CPU devices with one redundant replica of every expert,
   compiles its programs and runs the demo's requests once, failure-free: the reference.
2. Compiles the programs of every single-failure mesh (standby), starts the runtime and a gRPC
   server on 127.0.0.1 (ephemeral ports), and streams the requests through the real client, in
   three waves, from one thread each.
3. Through the Admin API: fails the busiest device during wave 1, another during wave 2, and
   rejoins both during wave 3. The live view shows every request's tokens, the mesh and pauses.
4. Summary: requests finished / lost, outputs equal to the reference, each pause. Exit status 0
   only when no request was lost and every output equals the reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from serve.cli_common import CliError, make_console, print_json, reconfiguration_dict

PROMPTS = (
    "The quick brown fox",
    "Once upon a time",
    "Mixture of experts",
    "Devices fail; serving goes on",
    "Hello, world",
    "In the beginning",
    "JAX compiles for XLA",
    "Twelve requests stream",
    "A redundant replica",
    "The mesh shrinks and grows",
    "Nothing is lost",
    "Greedy or sampled, the same",
)
WAVES = 3
TRIGGER_FRACTION = 0.25  # each operation waits for its wave to reach this share of max_tokens


@dataclass
class DemoRequest:
    index: int
    prompt: str
    temperature: float
    seed: int
    prompt_ids: list[int] = field(default_factory=list)
    reference: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    reprefills: int = 0
    finish_reason: str = ""
    state: str = "queued"  # queued, streaming, done, lost
    error: str = ""

    @property
    def request_id(self) -> str:
        return f"demo-{self.index}"

    @property
    def sampling(self) -> str:
        return "greedy" if self.temperature == 0 else f"t={self.temperature:g} s={self.seed}"

    @property
    def equal(self) -> bool:
        return self.state == "done" and self.tokens == self.reference


def demo_requests(count: int, tokenizer: Any) -> list[DemoRequest]:
    """Prompts cycle through PROMPTS; every third request samples (temperature 0.8, a seed)."""
    requests = []
    for i in range(count):
        prompt = PROMPTS[i % len(PROMPTS)] + (
            f" ({i // len(PROMPTS)})" if i >= len(PROMPTS) else ""
        )
        sampled = i % 3 == 2
        request = DemoRequest(i, prompt, 0.8 if sampled else 0.0, 1000 + i if sampled else 0)
        request.prompt_ids = list(tokenizer.encode(prompt))
        requests.append(request)
    return requests


class Log:
    """Timestamped events: printed as they happen (plain mode) or kept for the live view."""

    def __init__(self, console, plain: bool):
        self.console, self.plain = console, plain
        self.started = time.perf_counter()
        self.lines: list[str] = []
        self.lock = threading.Lock()

    def __call__(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.started:6.1f}s] {message}"
        with self.lock:
            self.lines.append(line)
        if self.plain:
            self.console.print(line, markup=False, highlight=False, soft_wrap=True)


# ---- the failure-free reference ---------------------------------------------------------------
def run_reference(engine: Any, requests: list[DemoRequest], max_tokens: int) -> None:
    """Runs every request on the healthy mesh, straight on the engine (no server)."""
    from elastic_moe.requests import Request, SamplingParams

    submitted = [
        engine.submit(
            Request(
                r.prompt_ids,
                max_tokens,
                SamplingParams(temperature=r.temperature, seed=r.seed),
                request_id=f"reference-{r.index}",
            )
        )
        for r in requests
    ]
    while any(not s.done for s in submitted):
        engine.step()
    for r, s in zip(requests, submitted, strict=True):
        r.reference = list(s.generated)


def paced_stepper(coordinator: Any, injector: Any, min_step_s: float):
    """A GuardedStepper whose steps take at least min_step_s (so that people can watch)."""
    from elastic_moe.faults import GuardedStepper

    class PacedStepper(GuardedStepper):
        def step(self):
            started = time.perf_counter()
            events = super().step()
            left = min_step_s - (time.perf_counter() - started)
            if left > 0:
                time.sleep(left)
            return events

    return PacedStepper(coordinator, injector)


# ---- traffic ----------------------------------------------------------------------------------
def stream_request(client: Any, request: DemoRequest, max_tokens: int) -> None:
    """One request through the gRPC client (runs on its own thread)."""
    import grpc

    from serve.cli_common import describe_rpc_error
    from serve.status_convert import FINISH_REASON_NAMES

    request.state = "streaming"
    try:
        for response in client.generate_stream(
            request.prompt,
            max_tokens,
            temperature=request.temperature,
            seed=request.seed,
            request_id=request.request_id,
            timeout=300,
        ):
            if response.HasField("chunk"):
                chunk = response.chunk
                if chunk.offset != len(request.tokens):
                    raise RuntimeError(
                        f"chunk at offset {chunk.offset}, expected {len(request.tokens)}"
                    )
                request.tokens = request.tokens + list(chunk.token_ids)
                request.epochs = request.epochs + [int(chunk.mesh_epoch)] * len(chunk.token_ids)
            elif response.HasField("complete"):
                request.finish_reason = FINISH_REASON_NAMES.get(response.complete.finish_reason)
                request.reprefills = response.complete.reprefills
        if request.finish_reason in ("length", "stop"):
            request.state = "done"
        else:
            request.state, request.error = "lost", f"finished: {request.finish_reason or '?'}"
    except grpc.RpcError as error:
        request.state, request.error = "lost", describe_rpc_error(error, client.target)
    except Exception as error:  # a broken stream is a lost request, reported, not a crash
        request.state, request.error = "lost", f"{type(error).__name__}: {error}"


class MeshWatcher:
    """Polls GetMeshStatus on a thread (the watch stream only speaks on mesh changes; the live
    view also wants each device's active requests); `latest` is the newest status."""

    def __init__(self, client: Any, interval_s: float = 0.2):
        self.latest = None
        self.client, self.interval_s = client, interval_s
        self._stop = threading.Event()
        self.refresh()
        self._thread = threading.Thread(target=self._run, name="demo-mesh", daemon=True)
        self._thread.start()

    def refresh(self) -> None:
        import grpc

        try:
            self.latest = self.client.mesh_status()
        except grpc.RpcError:
            pass  # the server is stopping; keep the last status

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.refresh()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ---- the live view ------------------------------------------------------------------------------
def _bar(done: int, total: int, width: int = 16) -> str:
    filled = round(width * done / total) if total else width
    return "█" * filled + "·" * (width - filled)


STATE_STYLE = {"queued": "dim", "streaming": "cyan", "done": "green", "lost": "bold red"}


def requests_table(requests: list[DemoRequest], max_tokens: int, final: bool = False):
    from rich.table import Table

    table = Table(title="requests", title_justify="left", expand=False)
    table.add_column("id", justify="right")
    table.add_column("prompt", max_width=24, no_wrap=True, overflow="ellipsis")
    table.add_column("sampling")
    table.add_column("tokens", justify="right")
    table.add_column("progress")
    table.add_column("epochs", no_wrap=True)
    table.add_column("re-prefills", justify="right")
    table.add_column("state", no_wrap=True)
    if final:
        table.add_column("= failure-free")
    for r in requests:
        epochs = sorted(set(r.epochs))
        row = [
            str(r.index),
            r.prompt,
            r.sampling,
            f"{len(r.tokens)}/{max_tokens}",
            _bar(len(r.tokens), max_tokens, 12),
            " ".join(map(str, epochs)) if epochs else "-",
            str(r.reprefills) if r.state == "done" else "",
            f"[{STATE_STYLE[r.state]}]{r.state}[/]",
        ]
        if final:
            row.append("[green]yes[/]" if r.equal else "[bold red]NO[/]")
        table.add_row(*row)
    return table


def mesh_table(status: Any):
    from rich.table import Table

    from serve.cli_mesh import status_dict

    table = Table(title="mesh", title_justify="left", expand=False)
    if status is None:
        table.add_column("waiting for the first status")
        return table
    s = status_dict(status)
    table.title = (
        f"mesh: epoch {s['epoch']}, {s['state'].lower()}, min live replicas "
        f"{s['min_live_replicas']}"
    )
    table.add_column("device", justify="right")
    table.add_column("state")
    table.add_column("slots", justify="right")
    table.add_column("requests", justify="right")
    style = {"HEALTHY": "green", "FAILED": "bold red", "REJOINING": "yellow"}
    for d in s["devices"]:
        table.add_row(
            str(d["id"]),
            f"[{style.get(d['state'], '')}]{d['state'].lower()}[/]",
            str(d["expert_slots"]),
            str(d["active_requests"]),
        )
    return table


def reconfigurations_table(reconfigurations: list[dict[str, Any]], title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left", expand=False)
    for name, justify in (
        ("epoch", "left"),
        ("cause", "left"),
        ("pause ms", "right"),
        ("detect", "right"),
        ("plan", "right"),
        ("transfer", "right"),
        ("compile", "right"),
        ("standby", "left"),
        ("copied", "right"),
        ("from host", "right"),
        ("re-prefilled", "right"),
    ):
        table.add_column(name, justify=justify)
    for r in reconfigurations:
        table.add_row(
            f"{r['from_epoch']} -> {r['to_epoch']}",
            r["cause"],
            f"{r['pause_ms']:.1f}",
            f"{r['detect_ms']:.1f}",
            f"{r['plan_ms']:.1f}",
            f"{r['transfer_ms']:.1f}",
            f"{r['compile_ms']:.1f}",
            "ready" if r.get("standby_hit") else "compiled now",
            str(r["experts_copied"]),
            str(r["experts_restored_from_host"]),
            str(r["requests_reprefilled"]),
        )
    return table


# ---- the demo -----------------------------------------------------------------------------------
@dataclass
class Demo:
    args: argparse.Namespace
    console: Any
    log: Log
    requests: list[DemoRequest] = field(default_factory=list)
    reconfigurations: list[dict[str, Any]] = field(default_factory=list)
    watcher: MeshWatcher | None = None
    engine: Any = None
    header: str = ""

    def view(self):
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        requests = requests_table(self.requests, self.args.max_tokens)
        mesh = mesh_table(self.watcher.latest if self.watcher else None)
        parts: list[Any] = [Text(self.header, style="bold")]
        if self.console.width >= 130:
            top = Table.grid(padding=(0, 2))
            top.add_row(requests, mesh)
            parts.append(top)
        else:
            parts += [requests, mesh]
        if self.reconfigurations:
            parts.append(reconfigurations_table(self.reconfigurations, "reconfigurations"))
        with self.log.lock:
            lines = self.log.lines[-8:]
        parts.append(Text("\n".join(lines), style="dim"))
        return Group(*parts)

    def wait_for(self, wave: list[DemoRequest], what: str) -> None:
        """Until every request of the wave has TRIGGER_FRACTION of its tokens (or finished)."""
        need = max(1, int(TRIGGER_FRACTION * self.args.max_tokens))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if all(len(r.tokens) >= need or r.state in ("done", "lost") for r in wave):
                return
            time.sleep(0.005)
        raise CliError(f"the demo's requests made no progress in 120 s (waiting to {what})")

    def device_to_fail(self, exclude: set[int]) -> tuple[int, str]:
        """The serving device with the most active requests, preferring devices whose loss
        finds its programs compiled already (standby); ties go to the highest id."""
        self.watcher.refresh()
        status = self.watcher.latest
        serving = [d for d in status.devices if d.expert_slots > 0] if status is not None else []
        candidates = [d for d in serving if d.id not in exclude]
        if not candidates:
            raise CliError("the demo found no serving device to fail")
        ready = [d for d in candidates if self.standby_ready(serving, d.id)]
        why = "busiest device with standby programs ready"
        if not ready:
            ready, why = candidates, "busiest device; no standby programs ready yet"
        return max(ready, key=lambda d: (d.active_requests, d.id)).id, why

    def standby_ready(self, serving: list[Any], device_id: int) -> bool:
        if self.engine is None:
            return False
        by_id = {d.id: d for d in self.engine.mesh.devices}
        survivors = [by_id[d.id] for d in serving if d.id != device_id and d.id in by_id]
        return self.engine.executables.is_warm(survivors)

    def operate(self, call: Callable[[], Any]) -> None:
        result = call()
        summary = reconfiguration_dict(result.summary)
        self.reconfigurations.append(summary)
        self.log(
            f"{summary['cause']}: epoch {summary['from_epoch']} -> {summary['to_epoch']}, "
            f"pause {summary['pause_ms']:.1f} ms, {summary['requests_reprefilled']} requests "
            f"re-prefilled, {summary['experts_copied']} experts copied "
            f"({'standby programs ready' if summary.get('standby_hit') else 'compiled now'})"
        )


def run_demo(args: argparse.Namespace) -> int:
    out = make_console()
    plain = args.no_live or not out.is_terminal or args.json
    log = Log(out if not args.json else make_console(stderr=True), plain)
    demo = Demo(args, out, log)
    started = time.perf_counter()
    _run(demo, plain)
    return _summary(demo, time.perf_counter() - started)


def _run(demo: Demo, plain: bool) -> None:
    import contextlib

    from elastic_moe.runtime import Runtime
    from serve.cli_serve import coordinate, deploy, wait_standby

    args, log = demo.args, demo.log
    if args.devices < 4:
        raise CliError(
            f"the demo fails two devices of the mesh: --devices must be >= 4, got {args.devices}"
        )
    progress = make_console(stderr=True) if args.json else demo.console
    deploy_args = argparse.Namespace(
        preset=args.preset,
        checkpoint=None,
        devices=args.devices,
        redundant_experts=None,  # = num_experts: a spare replica of every expert
        request_slots_per_device=4,
        placement="auto",
        numerics="invariant",
        layers_per_program=0,
    )
    engine, tokenizer = deploy(deploy_args, progress)
    cfg = engine.cfg
    if args.max_tokens + 32 > cfg.max_seq_len:
        raise CliError(f"--max-tokens {args.max_tokens}: at most {cfg.max_seq_len - 32} here")
    demo.requests = requests = demo_requests(args.requests, tokenizer)
    t = time.perf_counter()
    run_reference(engine, requests, args.max_tokens)
    log(
        f"failure-free reference: {len(requests)} requests x {args.max_tokens} tokens on "
        f"{len(engine.mesh.devices)} devices in {time.perf_counter() - t:.1f} s"
    )
    for r in requests:  # the reference step count is not the served one
        r.tokens, r.epochs = [], []

    demo.engine = engine
    coordinator, futures = coordinate(engine, standby=True)
    wait_standby(
        futures,
        progress,
        f"standby: compiling the {len(futures)} single-failure meshes",
        timeout_s=args.standby_wait,
    )
    ready = sum(f.done() for f in futures)
    log(
        f"standby programs ready for {ready} of the {len(futures)} single-failure meshes"
        + ("" if ready == len(futures) else "; the rest compile in the background")
    )

    runtime = Runtime(engine, coordinator=coordinator)
    runtime.stepper = paced_stepper(coordinator, runtime.injector, args.step_ms / 1000)
    runtime.start()
    from serve.client import Client
    from serve.server import ServerConfig, ServerThread

    server = ServerThread(
        runtime, ServerConfig(host="127.0.0.1", port=0, admin_port=0, admin_token=""), tokenizer
    )
    with contextlib.ExitStack() as stack:
        stack.callback(runtime.stop)
        server.start()
        stack.callback(server.stop)
        ports = server.ports
        client = Client(
            f"127.0.0.1:{ports.generation}",
            admin_target=f"127.0.0.1:{ports.admin}",
            admin_token="",
            timeout=300,
        )
        stack.callback(client.close)
        log(f"serving on 127.0.0.1:{ports.generation}, admin on 127.0.0.1:{ports.admin}")
        demo.watcher = MeshWatcher(client)
        stack.callback(demo.watcher.stop)
        demo.header = (
            f"elastic-moe demo: {cfg.name} on {len(engine.mesh.devices)} simulated "
            f"{engine.mesh.devices[0].platform} devices, {len(requests)} requests x "
            f"{args.max_tokens} tokens through gRPC, steps paced to >= {args.step_ms:g} ms"
        )
        if plain:
            log(demo.header)
            _traffic(demo, client)
        else:
            from rich.live import Live

            with Live(get_renderable=demo.view, console=demo.console, refresh_per_second=10):
                _traffic(demo, client)


def _traffic(demo: Demo, client: Any) -> None:
    args, log, requests = demo.args, demo.log, demo.requests
    waves = [requests[w::WAVES] for w in range(WAVES)]
    threads: list[threading.Thread] = []

    def launch(wave: list[DemoRequest], number: int) -> None:
        for r in wave:
            thread = threading.Thread(
                target=stream_request, args=(client, r, args.max_tokens), daemon=True
            )
            thread.start()
            threads.append(thread)
        log(f"wave {number}: {len(wave)} requests sent ({', '.join(r.request_id for r in wave)})")

    failed: list[int] = []
    launch(waves[0], 1)
    demo.wait_for(waves[0], "fail a device")
    first, why = demo.device_to_fail(set())
    log(f"failing device {first} ({why})")
    demo.operate(lambda: client.fail([first], reason="demo: device lost"))
    failed.append(first)

    if len(waves) > 1 and waves[1]:
        launch(waves[1], 2)
        demo.wait_for(waves[1], "fail a second device")
    second, why = demo.device_to_fail(set(failed))
    log(f"failing device {second} ({why})")
    demo.operate(lambda: client.fail([second], reason="demo: another device lost"))
    failed.append(second)

    if len(waves) > 2 and waves[2]:
        launch(waves[2], 3)
        demo.wait_for(waves[2], "rejoin the devices")
    demo.operate(lambda: client.rejoin(sorted(failed)))

    for thread in threads:
        thread.join(timeout=300)
    done = sum(r.state == "done" for r in requests)
    log(f"all streams ended: {done} finished, {len(requests) - done} lost")


def _summary(demo: Demo, wall: float) -> int:
    from rich.table import Table

    requests = demo.requests
    finished = sum(r.state == "done" for r in requests)
    lost = len(requests) - finished
    equal = sum(r.equal for r in requests)
    reprefilled = sum(r.reprefills > 0 for r in requests)
    success = lost == 0 and equal == len(requests)
    if demo.args.json:
        print_json(
            {
                "ok": success,
                "requests": len(requests),
                "finished": finished,
                "lost": lost,
                "outputs_equal": equal == len(requests),
                "equal": equal,
                "reprefilled_requests": reprefilled,
                "wall_s": wall,
                "reconfigurations": demo.reconfigurations,
                "per_request": [
                    {
                        **{k: v for k, v in dataclasses.asdict(r).items() if k != "prompt_ids"},
                        "equal": r.equal,
                    }
                    for r in requests
                ],
            }
        )
    else:
        console = demo.console
        console.print()
        console.print(requests_table(requests, demo.args.max_tokens, final=True))
        console.print(reconfigurations_table(demo.reconfigurations, "reconfigurations"))
        table = Table(title="summary", title_justify="left", show_header=False)
        table.add_column(style="bold")
        table.add_column()
        table.add_row("requests finished", f"{finished}/{len(requests)}")
        table.add_row("requests lost", f"[{'green' if lost == 0 else 'bold red'}]{lost}[/]")
        same = equal == len(requests)
        table.add_row(
            "outputs equal to the failure-free run",
            f"[{'green' if same else 'bold red'}]{'yes' if same else 'NO'}[/] "
            f"({equal}/{len(requests)})",
        )
        table.add_row("requests re-prefilled after a loss", str(reprefilled))
        for r in demo.reconfigurations:
            table.add_row(f"pause: {r['cause']}", f"{r['pause_ms']:.1f} ms")
        table.add_row("wall time", f"{wall:.1f} s")
        console.print(table)
        # One plain line for logs and scripts.
        console.print(
            f"demo {'passed' if success else 'FAILED'}: {finished} finished, {lost} lost, "
            f"outputs equal: {'yes' if same else 'no'}, pauses ms: "
            + ", ".join(f"{r['pause_ms']:.1f}" for r in demo.reconfigurations),
            markup=False,
            soft_wrap=True,
        )
    if not success:
        bad = [r.request_id for r in requests if not r.equal]
        raise CliError(
            f"demo failed: {lost} requests lost, {len(requests) - equal} outputs differ from "
            f"the failure-free run ({', '.join(bad[:6])})"
        )
    return 0
