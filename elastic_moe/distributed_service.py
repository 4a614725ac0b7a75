"""JAX's multi-controller runtime in one place: the coordination service, a worker joining it,
and the settings that let the survivors of a killed worker carry on.

Shape of the cluster (docs/WORKERS.md): the frontend owns no accelerator and only *hosts* the
coordination service (`CoordinationService`); the workers, one per GPU (or per group of simulated
CPU devices), connect to it as processes 0..N-1 (`join_cluster`). JAX's `initialize` makes
process 0 start a service of its own; worker 0 binds that one to an unused local port where
nobody connects, so that its death is a worker's death like any other. A service inside a worker
would take every worker down with it (the coordination service is the one thing the cluster
cannot lose).

Settings (JAX's fault-tolerance guide, and what was measured here on CPU, docs/WORKERS.md):
  - `jax_enable_recoverability` in every process and `recoverable=True` in the service: a dead
    worker is reported to the others (`ProcessFailureError` from
    `jax.experimental.multihost_utils.live_devices`) instead of making them exit.
  - GPU: `--xla_gpu_nccl_terminate_on_error=false`, async non-blocking NCCL communicators and
    `XLA_PYTHON_CLIENT_ABORT_COLLECTIVES_ON_FAILURE=1`, so a collective with a dead peer is
    cancelled instead of hanging.
  - CPU (gloo): nothing cancels a gloo collective, but `--xla_cpu_collective_timeout_seconds`
    bounds it. Without it a survivor stayed blocked in an all-reduce with the dead peer in 3 of
    5 trials (at least 15 to 40 s, never seen to end); with it every trial raised, within the
    timeout.

`get_distributed_runtime_service` is an internal JAX API (`jax._src.lib._jax`): this module is
the only place that calls it.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

PLATFORMS = ("cpu", "gpu")


@dataclass(frozen=True)
class ClusterOptions:
    """Timeouts of the cluster, in whole seconds (the runtime takes integers).

    heartbeat_timeout_s: a worker that has sent no heartbeat for this long is declared dead;
        detection of a killed worker takes about this long (docs/WORKERS.md has the figures).
    shutdown_timeout_s: how long a leaving worker waits for the others at shutdown.
    init_timeout_s: how long a worker waits for every other one to join.
    collective_timeout_s: CPU only, the bound on one gloo collective (see the module docstring).
        It must exceed the longest a worker can wait for a peer inside one step, so keep every
        compile out of the steps (the frontend asks the workers to compile before it steps).
    abort_collectives: GPU only, the flags and variable of JAX's guide that cancel a NCCL
        collective whose peer died (async, non-blocking communicators); off, a survivor can
        hang in it. `--xla_gpu_nccl_terminate_on_error=false` is set either way.
    """

    heartbeat_timeout_s: int = 2
    shutdown_timeout_s: int = 5
    init_timeout_s: int = 120
    collective_timeout_s: int = 10
    abort_collectives: bool = True

    def __post_init__(self) -> None:
        for name in ("heartbeat_timeout_s", "shutdown_timeout_s", "init_timeout_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1 s, got {getattr(self, name)}")
        if self.collective_timeout_s < 1:
            raise ValueError(
                f"collective_timeout_s must be at least 1 s, got {self.collective_timeout_s}"
            )


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the usual race: bind it soon)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def worker_environment(
    platform: str, options: ClusterOptions, *, cpu_devices: int = 1
) -> dict[str, str]:
    """Variables a worker process needs in its environment before it imports JAX.

    cpu_devices: on "cpu", how many simulated devices the worker has."""
    if platform not in PLATFORMS:
        raise ValueError(f"platform must be one of {PLATFORMS}, got {platform!r}")
    if platform == "cpu":
        flags = [
            f"--xla_force_host_platform_device_count={cpu_devices}",
            f"--xla_cpu_collective_timeout_seconds={options.collective_timeout_s}",
        ]
        return {"XLA_FLAGS": " ".join(flags), "JAX_PLATFORMS": "cpu"}
    flags = ["--xla_gpu_nccl_terminate_on_error=false"]  # no fate-sharing with a dead peer
    if not options.abort_collectives:
        return {"XLA_FLAGS": " ".join(flags)}
    flags += [
        "--xla_gpu_nccl_async_execution=true",
        "--xla_gpu_nccl_blocking_communicators=false",
    ]
    return {
        "XLA_FLAGS": " ".join(flags),
        "XLA_PYTHON_CLIENT_ABORT_COLLECTIVES_ON_FAILURE": "1",
    }


class CoordinationService:
    """JAX's coordination service, hosted by a process that is not a worker (the frontend).

    It must outlive every worker: when it dies, the workers lose their heartbeats and exit."""

    def __init__(self, num_workers: int, options: ClusterOptions, *, port: int | None = None):
        from jax._src.lib import _jax  # the internal API, wrapped here only

        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        self.num_workers = num_workers
        self.port = port or free_port()
        self._service = _jax.get_distributed_runtime_service(
            f"[::]:{self.port}",
            num_workers,
            heartbeat_timeout=options.heartbeat_timeout_s,
            shutdown_timeout=options.shutdown_timeout_s,
            recoverable=True,
        )

    def address(self, host: str = "127.0.0.1") -> str:
        """Where workers connect."""
        return f"{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._service is not None

    def shutdown(self) -> None:
        if self._service is not None:
            self._service.shutdown()
            self._service = None


def join_cluster(
    coordinator_address: str,
    num_workers: int,
    process_id: int,
    options: ClusterOptions,
    *,
    platform: str = "cpu",
    local_device_ids: list[int] | None = None,
) -> None:
    """Joins this process to the cluster as worker `process_id` (call before any JAX work).

    Worker 0's own service (JAX starts one in process 0) binds an unused local port."""
    import jax

    jax.config.update("jax_enable_recoverability", True)
    if platform == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    extra = {}
    if process_id == 0:
        extra["coordinator_bind_address"] = f"127.0.0.1:{free_port()}"
    if local_device_ids is not None:
        extra["local_device_ids"] = local_device_ids
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_workers,
        process_id=process_id,
        initialization_timeout=options.init_timeout_s,
        heartbeat_timeout_seconds=options.heartbeat_timeout_s,
        shutdown_timeout_seconds=options.shutdown_timeout_s,
        **extra,
    )


def live_process_ids(process_ids: list[int]) -> list[int]:
    """Which of these workers the coordination service holds alive now (no barrier)."""
    from jax._src import distributed

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("this process has not joined a cluster (join_cluster)")
    return sorted(client.get_live_nodes(list(process_ids)))
