"""`elastic-moe serve --workers N`: this process is the frontend of N worker processes.

The frontend owns no accelerator (its JAX stays on the CPU): it hosts JAX's coordination
service, starts the workers (one per GPU, or on CPU a share of --devices simulated devices each),
has them deploy the model, and runs the same runtime loop and gRPC services as the single-process
server over a `RemoteMesh` (docs/WORKERS.md). A worker that dies is survived: its devices are
marked failed, the others deploy again over their own devices and every request in flight is
re-prefilled.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
from typing import Any

from serve.cli_common import CliError, check_model_source, load_model


def visible_gpus() -> int:
    """NVIDIA GPUs this process may use, counted without starting a JAX backend."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    try:
        return len([n for n in os.listdir("/dev") if n.startswith("nvidia") and n[6:].isdigit()])
    except OSError:
        return 0


def worker_layout(args: argparse.Namespace) -> tuple[str, int, int]:
    """(platform, workers, simulated CPU devices per worker) from the command line."""
    gpus = visible_gpus()
    platform = args.worker_platform or ("gpu" if gpus else "cpu")
    workers = args.workers
    local = getattr(args, "local_workers", None)
    if local is not None and workers != "auto" and local > workers:
        raise CliError(f"--local-workers {local} exceeds --workers {workers}")
    if platform == "gpu":
        if workers == "auto":
            workers = gpus
        if workers < 1 or (workers if local is None else local) > gpus:
            raise CliError(f"--workers {workers}: this host has {gpus} visible GPUs")
        if args.devices is not None and args.devices != workers:
            raise CliError("with GPU workers each worker owns one GPU: leave --devices out")
        return platform, workers, 1
    if workers == "auto":
        raise CliError("--workers auto counts GPUs and this host has none: give a number")
    devices = args.devices or 8
    if devices % workers:
        raise CliError(f"--devices {devices} does not split evenly over {workers} workers")
    return platform, workers, devices // workers


def frontend_model(args: argparse.Namespace) -> tuple[str, Any, Any]:
    """(the name the workers load, config, tokenizer). A preset costs the frontend nothing; a
    model directory is loaded here once too (its weights are not used by the frontend)."""
    from models.presets import PRESETS
    from models.tokenizer import ByteTokenizer

    check_model_source(args.preset, args.checkpoint)
    if args.preset in PRESETS and not os.path.exists(args.preset):
        cfg = PRESETS[args.preset]
        return args.preset, cfg, ByteTokenizer(cfg.vocab_size)
    cfg, _, tokenizer = load_model(args.preset, args.checkpoint)
    if args.checkpoint is not None:
        return os.path.abspath(args.checkpoint), cfg, tokenizer
    return args.preset, cfg, tokenizer


def deploy_workers(args: argparse.Namespace, console, progress) -> tuple[Any, Any, Any]:
    """(runtime, tokenizer, pool): the workers started, the model deployed over them, their
    standby programs compiled (unless --no-standby), the runtime built (not started)."""
    from elastic_moe.distributed_service import ClusterOptions
    from elastic_moe.engine import EngineOptions
    from elastic_moe.frontend_engine import frontend_engine
    from elastic_moe.remote_mesh import RemoteMesh
    from elastic_moe.runtime import Runtime
    from elastic_moe.worker_mode import WorkerCoordinator, WorkerStepper
    from elastic_moe.worker_pool import WorkerPool

    platform, workers, per_worker = worker_layout(args)
    model, cfg, tokenizer = frontend_model(args)
    devices = workers * per_worker
    redundant = args.redundant_experts
    if redundant is None:  # one spare replica of every expert when the mesh allows it
        redundant = cfg.num_experts if devices > 1 else 0
    try:
        options = EngineOptions(
            request_slots_per_device=args.request_slots_per_device,
            redundant_experts=redundant,
            placement=args.placement,
            numerics=args.numerics,
            layers_per_program=args.layers_per_program,
        )
    except ValueError as error:
        raise CliError(str(error)) from None
    as_dict = dataclasses.asdict(options)
    cluster = ClusterOptions(
        heartbeat_timeout_s=args.heartbeat_timeout,
        collective_timeout_s=args.collective_timeout,
    )
    if args.worker_logs:
        os.makedirs(args.worker_logs, exist_ok=True)
    with progress(console) as bar:
        task = bar.add_task(f"starting {workers} {platform} workers", total=1)
        try:
            local = args.local_workers
            pool = WorkerPool(
                workers,
                platform=platform,
                cpu_devices_per_worker=per_worker,
                options=cluster,
                log_dir=args.worker_logs,
                local_workers=None if local is None else range(local),
                address=args.cluster_address,
                service_port=args.service_port,
                channel_port=args.channel_port,
                announce=lambda i, command: console.print(
                    f"worker {i}: start it on its host (with $ELASTIC_MOE_WORKER_AUTHKEY set "
                    f"as here): {shlex.join(['python', *command[1:]])}",
                    soft_wrap=True,
                    highlight=False,
                ),
                start_timeout_s=180.0 if local is None else 3600.0,
            )
        except (RuntimeError, TimeoutError, ValueError, OSError) as error:
            raise CliError(f"the workers did not start: {error}") from None
        bar.update(task, completed=1)
        try:
            task = bar.add_task(
                f"deploying {model} over {devices} devices of {workers} workers "
                f"({cfg.num_experts} experts + {redundant} redundant slots), compiling",
                total=1,
            )
            lengths = [options.min_prefill_bucket]
            mesh = RemoteMesh.deploy(pool, model, as_dict, prefill_lengths=lengths)
            mesh.step_timeout_s = args.step_timeout
            bar.update(task, completed=1)
            if not args.no_standby and workers > 1:
                task = bar.add_task("standby: compiling the single-failure meshes", total=1)
                mesh.standby(lengths)
                bar.update(task, completed=1)
        except BaseException:
            pool.close()
            raise
    engine = frontend_engine(cfg, mesh, options)
    coordinator = WorkerCoordinator(
        engine,
        model,
        as_dict,
        standby=not args.no_standby,
        auto_rejoin=args.auto_rejoin,
        rejoin_mode=args.rejoin_mode,
    )
    runtime = Runtime(engine, coordinator=coordinator, stepper=WorkerStepper(coordinator))
    return runtime, tokenizer, pool
