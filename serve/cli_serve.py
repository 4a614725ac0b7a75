"""`elastic-moe serve`: load a model, deploy it over the devices, serve it over gRPC.

Progress (loading, deploying, compiling, standby compiles) goes to stderr; stdout gets one line
that scripts can parse:

    serving generation on 127.0.0.1:50051, admin on 127.0.0.1:50052

SIGTERM or Ctrl-C drains (no new requests; running ones get --drain-timeout s), then stops; a
second signal stops at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import time
from concurrent.futures import Future
from typing import Any

from serve.cli_common import (
    CliError,
    build_engine,
    check_model_source,
    enable_compilation_cache,
    load_model,
    make_console,
    pick_devices,
    print_json,
)


def _progress(console):
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(bar_width=24),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


def deploy(args: argparse.Namespace, console) -> tuple[Any, Any]:
    """(engine, tokenizer): the model loaded, placed over the devices, its programs compiled.

    args needs preset, checkpoint, devices, redundant_experts, request_slots_per_device,
    placement, numerics."""
    check_model_source(args.preset, args.checkpoint)
    enable_compilation_cache()

    devices = pick_devices(args.devices)
    name = args.preset or args.checkpoint
    with _progress(console) as progress:
        task = progress.add_task(f"loading {name}", total=1)
        cfg, params, tokenizer = load_model(args.preset, args.checkpoint)
        progress.update(task, completed=1)

        redundant = args.redundant_experts
        if redundant is None:  # one spare replica of every expert when the mesh allows it
            redundant = cfg.num_experts if len(devices) > 1 else 0
        task = progress.add_task(
            f"deploying on {len(devices)} {devices[0].platform} devices "
            f"({cfg.num_experts} experts + {redundant} redundant slots)",
            total=1,
        )
        engine = build_engine(
            cfg,
            params,
            devices,
            request_slots_per_device=args.request_slots_per_device,
            redundant=redundant,
            placement=args.placement,
            numerics=args.numerics,
            layers_per_program=args.layers_per_program,
        )
        progress.update(task, completed=1)

        task = progress.add_task("compiling prefill, decode and expert transfers", total=1)
        engine.executables.get(engine.mesh.devices).warm([engine.options.min_prefill_bucket])
        progress.update(task, completed=1)
    return engine, tokenizer


def coordinate(engine: Any, standby: bool) -> tuple[Any, list[Future]]:
    """(coordinator, futures of the standby compiles of every single-failure mesh)."""
    from elastic_moe.coordinator import Coordinator

    coordinator = Coordinator(engine, standby=False)
    futures: list[Future] = []
    if standby:
        coordinator.standby = True  # later reconfigurations warm their successors too
        lengths = sorted(engine.prefill_lengths_seen) or [engine.options.min_prefill_bucket]
        futures = engine.executables.warm_standby(engine.mesh.devices, lengths, engine.min_devices)
    return coordinator, futures


def wait_standby(
    futures: list[Future], console, description: str, timeout_s: float | None = None
) -> None:
    """Shows the standby compiles until they are done (or timeout_s passed)."""
    if not futures:
        return
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with _progress(console) as progress:
        task = progress.add_task(description, total=len(futures))
        while True:
            done = sum(f.done() for f in futures)
            progress.update(task, completed=done)
            if done == len(futures) or (deadline is not None and time.monotonic() > deadline):
                break
            time.sleep(0.1)
    for f in futures:
        if f.done():
            f.result()


def _report_standby_in_background(futures: list[Future]) -> None:
    if not futures:
        return
    started = time.perf_counter()
    left = [len(futures)]

    def done(_future: Future) -> None:
        left[0] -= 1
        if left[0] == 0:
            _note(
                f"standby: programs of the {len(futures)} single-failure meshes ready "
                f"({time.perf_counter() - started:.1f} s)"
            )

    _note(f"standby: compiling the {len(futures)} single-failure meshes in the background")
    for f in futures:
        f.add_done_callback(done)


def _note(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def log_to_stderr() -> None:
    """The project's INFO lines (serving, draining, reconfigurations) on stderr.

    Configures the "elastic_moe" logger itself: `logging.basicConfig` does nothing once the root
    logger has a handler, and absl (imported with orbax) installs one; the root's WARNING level
    keeps other libraries' INFO lines out."""
    project = logging.getLogger("elastic_moe")
    project.setLevel(logging.INFO)
    if not any(getattr(h, "elastic_moe_cli", False) for h in project.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        handler.elastic_moe_cli = True  # called twice, log once
        project.addHandler(handler)
    project.propagate = False  # the root's handler would print each line again


def run_serve(args: argparse.Namespace) -> int:
    console = make_console(stderr=True)
    if args.workers is not None:
        return _run_serve_workers(args, console)
    from elastic_moe.background_repair import RepairBudget
    from elastic_moe.runtime import Runtime

    engine, tokenizer = deploy(args, console)
    coordinator, futures = coordinate(engine, standby=not args.no_standby)
    repair = (
        RepairBudget(args.repair_budget_mb << 20, args.repair_interval)
        if args.repair_budget_mb
        else None
    )
    runtime = Runtime(engine, coordinator=coordinator, repair_budget=repair)
    if args.wait_standby:
        wait_standby(futures, console, "standby: compiling the single-failure meshes")
        futures = []
    log_to_stderr()
    runtime.start()
    try:
        return asyncio.run(_serve(runtime, tokenizer, args, futures))
    finally:
        runtime.stop()


def _run_serve_workers(args: argparse.Namespace, console) -> int:
    """serve --workers: the frontend of worker processes (serve/cli_workers.py)."""
    from serve.cli_workers import deploy_workers

    enable_compilation_cache()
    runtime, tokenizer, pool = deploy_workers(args, console, _progress)
    if args.repair_budget_mb:
        _note("worker mode: no background repair (each recovery is a fresh deployment)")
    log_to_stderr()
    try:
        runtime.start()
        try:
            return asyncio.run(_serve(runtime, tokenizer, args, []))
        finally:
            runtime.stop()
    finally:
        pool.close()


async def _serve(runtime, tokenizer, args: argparse.Namespace, futures: list[Future]) -> int:
    from serve.server import ElasticServer, ServerConfig

    config = ServerConfig(
        host=args.host,
        port=args.port,
        admin_port=args.admin_port,
        admin_token=args.admin_token or "",
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        metrics_port=args.metrics_port,
        drain_timeout_s=args.drain_timeout,
        handle_signals=True,
    )
    try:
        server = ElasticServer(runtime, config, tokenizer)
        await server.start()
    except (ValueError, OSError, RuntimeError) as error:
        raise CliError(str(error)) from None
    ports = server.ports
    generation = _display(args.host, ports.generation)
    admin = _display(server.admin_host, ports.admin)
    metrics = f"http://127.0.0.1:{ports.metrics}/metrics" if ports.metrics else None
    if args.json:
        print_json({"generation": generation, "admin": admin, "metrics": metrics})
    else:
        line = f"serving generation on {generation}, admin on {admin}"
        if metrics:
            line += f", metrics on {metrics}"
        if server.admin_token:
            line += " (admin token required)"
        print(line, flush=True)
    _report_standby_in_background(futures)
    await server.wait()
    _note("stopped")
    return 0


def _display(host: str, port: int) -> str:
    """The address bound, as given: 0.0.0.0 (every address) stays 0.0.0.0."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"
