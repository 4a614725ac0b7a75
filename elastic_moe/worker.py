"""A worker process: one per GPU (or per group of simulated CPU devices) in a jax.distributed
cluster, driven step by step by the frontend, which keeps every request's state.

    python -m elastic_moe.worker --coordinator HOST:PORT --num-workers N --process-id I \
        --frontend HOST:PORT [--platform cpu|gpu] [--local-device-ids 0]

The frontend's authentication key comes in the environment (`ELASTIC_MOE_WORKER_AUTHKEY`, hex),
never on the command line. Every worker runs the same programs over the global mesh in lockstep
(multi-controller JAX): the frontend sends each of them the same message and reads back each
worker's own rows of the result.

The channel is `multiprocessing.connection` (length-prefixed pickles over TCP, HMAC-checked with
the key): step inputs are a few small numpy arrays, only `serve` speaks gRPC in this project, and
a killed worker's socket is closed by its kernel, so the frontend sees the death at once (EOF).

Messages, frontend -> worker, each answered by one reply:
  ("deploy", {"model", "options", "device_ids", "prefill_lengths"})
                                            -> ("ok", {"geometry", "placement", "device_ids", ...})
  ("compile", {"prefill_lengths"})                                   -> ("ok", {"compile_ms"})
  ("standby", {"prefill_lengths"})                    -> ("ok", {"compile_ms", "meshes"})
  ("prefill", (tokens, positions, rows, last, sampling))             -> ("ok", rows) | ("failed")
  ("decode", (tokens, positions, sampling))                          -> ("ok", rows) | ("failed")
  ("reset_cache" | "discard_cache" | "ping", None)                   -> ("ok", {...})
  ("live_processes", None)                         -> ("ok", {"live": [process ids], "time"})
  ("shutdown", None)                                                 -> ("ok", {}), then exit
A step's reply ("ok", rows) holds this worker's rows of the tokens and logprobs, as
[(first_row, values)], the replicated expert load, and the step's time on the worker.
("failed", {"failed_device_ids", "detected_at", "error"}): a peer process died during the step
(`ProcessFailureError`); this worker's mesh is gone until the next "deploy".
("error", text): anything else the step raised (the worker carries on).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import traceback
from collections.abc import Sequence
from multiprocessing.connection import Client
from typing import Any

AUTHKEY_ENV = "ELASTIC_MOE_WORKER_AUTHKEY"


def step_geometry(cfg, num_devices: int, options):
    """The StepGeometry the single-process Engine builds for `num_devices` with `options`.

    (The same formulas as Engine.__init__; tests/test_workers.py checks that they agree.) A
    deployment over fewer devices (the survivors of a dead worker) is a fresh one with this
    geometry for its own device count; the redundant slots it cannot use (an expert has at most
    one replica per device) are left out, so one survivor holds each expert once."""
    from elastic_moe.serving_mesh import expert_slots_per_device
    from elastic_moe.steps import StepGeometry

    redundant = min(options.redundant_experts, cfg.num_experts * (num_devices - 1))
    slots = expert_slots_per_device(cfg, num_devices, redundant)
    max_replicas = max(1, min(num_devices, num_devices * slots - cfg.num_experts + 1))
    return StepGeometry(
        num_devices=num_devices,
        expert_slots_per_device=slots,
        request_slots_per_device=options.request_slots_per_device,
        prefill_rows_per_device=options.prefill_rows_per_device,
        max_replicas=max_replicas,
        numerics=options.numerics,
        layers_per_program=options.layers_per_program,
    )


def local_rows(array) -> list[tuple[int, Any]]:
    """This process's rows of a row-sharded array: [(first row, values as numpy)]."""
    import numpy as np

    rows = []
    for shard in array.addressable_shards:
        first = shard.index[0].start or 0
        rows.append((int(first), np.asarray(shard.data)))
    return rows


class Worker:
    """What one worker process holds: the model's host copy and its share of the mesh."""

    def __init__(self, process_id: int):
        self.process_id = process_id
        self.mesh = None  # a ServingMesh over the global devices, after "deploy"
        self._model: tuple[str, Any, Any] | None = None  # (name, cfg, host params)
        self._programs: dict[tuple, Any] = {}  # ExecutableCache per (model, options)

    # ---- messages ---------------------------------------------------------------------
    def handle(self, kind: str, payload: Any) -> tuple[str, Any]:
        if kind == "shutdown":
            return "ok", {}
        if kind == "live_processes":
            return "ok", self.live_processes()
        if kind == "ping":
            return "ok", {"process_id": self.process_id, "time": time.time()}
        if kind == "deploy":
            return "ok", self.deploy(**payload)
        if kind == "standby":
            return "ok", self.standby(payload["prefill_lengths"])
        if kind == "compile":
            return "ok", self.compile(payload["prefill_lengths"])
        if kind in ("prefill", "decode"):
            return self.step(kind, payload)
        if kind == "reset_cache":
            self.mesh.reset_cache()
            return "ok", {}
        if kind == "discard_cache":
            self.mesh.discard_cache()
            return "ok", {}
        raise ValueError(f"unknown message {kind!r}")

    def live_processes(self) -> dict:
        """The workers the coordination service holds alive (it waits for the live ones to
        ask too, and declares dead those whose heartbeats stopped)."""
        import jax

        from elastic_moe.distributed_service import live_process_ids

        live = live_process_ids(list(range(jax.process_count())))
        return {"live": live, "time": time.time()}

    def deploy(
        self,
        model: str,
        options: dict,
        device_ids: Sequence[int] | None = None,
        prefill_lengths: Sequence[int] = (),
    ) -> dict:
        """Builds the serving state over `device_ids` (default: every device of the cluster)
        from this process's own host copy of `model` (a preset or a model directory)."""
        import jax

        from elastic_moe.checkpoint import load_model
        from elastic_moe.engine import EngineOptions
        from elastic_moe.executables import ExecutableCache
        from elastic_moe.serving_mesh import ServingMesh

        started = time.perf_counter()
        if self._model is None or self._model[0] != model:
            cfg, host_params, _ = load_model(model)
            self._model = (model, cfg, host_params)
        _, cfg, host_params = self._model
        engine_options = EngineOptions(**options)
        devices = sorted(jax.devices(), key=lambda d: d.id)
        if device_ids is not None:  # in the order given (it is the mesh's order)
            by_id = {d.id: d for d in devices}
            devices = [by_id[i] for i in device_ids]
        self.mesh = None  # the old epoch's buffers go before the new ones are built
        key = (model, tuple(sorted(options.items())))
        if key not in self._programs:  # kept across deploys: standby programs are found here
            self._programs[key] = ExecutableCache(
                cfg, lambda n: step_geometry(cfg, n, engine_options)
            )
        programs = self._programs[key]
        standby_hit = programs.is_warm(devices)  # compiled ahead (standby) or used before
        self.mesh = ServingMesh.create(
            cfg,
            host_params,
            devices,
            programs,
            replica_routing=engine_options.replica_routing,
            placement_policy=engine_options.placement,
            restore_budget=engine_options.restore_budget,
        )
        self._programs_in_use = programs
        compile_ms = self.compile(prefill_lengths)["compile_ms"]
        return {
            "geometry": dataclasses.asdict(self.mesh.geometry),
            "placement": self.mesh.placement,  # for the frontend's mesh status
            "device_ids": [d.id for d in devices],
            "deploy_ms": 1000 * (time.perf_counter() - started),
            "compile_ms": compile_ms,
            "standby_hit": standby_hit,
        }

    def compile(self, prefill_lengths: Sequence[int]) -> dict:
        """Compiles decode and prefill at each length now, so that no step waits for a peer's
        compile inside a collective (on CPU that wait counts against the collective timeout)."""
        started = time.perf_counter()
        self.mesh.programs.compile_decode()
        for length in prefill_lengths:
            self.mesh.programs.compile_prefill(int(length))
        return {"compile_ms": 1000 * (time.perf_counter() - started)}

    def standby(self, prefill_lengths: Sequence[int]) -> dict:
        """Compiles, ahead of any failure, this worker's programs for each mesh that the death
        of one other worker would leave (the current mesh less that worker's devices), so that
        a redeploy after it compiles nothing."""
        started = time.perf_counter()
        devices = list(self.mesh.devices)
        meshes = []
        for lost in sorted({d.process_index for d in devices} - {self.process_id}):
            survivors = [d for d in devices if d.process_index != lost]
            entry = self._programs_in_use.get(survivors)
            entry.programs.compile_decode()
            for length in prefill_lengths:
                entry.programs.compile_prefill(int(length))
            meshes.append([d.id for d in survivors])
        return {"compile_ms": 1000 * (time.perf_counter() - started), "meshes": meshes}

    def step(self, kind: str, args: tuple) -> tuple[str, Any]:
        """Runs one prefill or decode step over the mesh, guarded by `live_devices`: a peer's
        death during the step raises ProcessFailureError in every survivor alike."""
        import jax
        from jax.experimental.multihost_utils import ProcessFailureError, live_devices

        if self.mesh is None:
            raise RuntimeError("no mesh: deploy first (or again, after a failure)")
        started = time.perf_counter()
        try:
            with live_devices(self.mesh.devices):
                run = self.mesh.prefill if kind == "prefill" else self.mesh.decode
                out = run(*args)
                jax.block_until_ready((out.tokens, out.logprobs, out.expert_load))
                reply = {
                    "tokens": local_rows(out.tokens),
                    "logprobs": local_rows(out.logprobs),
                    "expert_load": local_rows(out.expert_load)[0][1],
                }
        except ProcessFailureError as e:
            detected_at = time.time()
            self.mesh = None  # its buffers span a dead process; the step's cache is donated
            return "failed", {
                "failed_device_ids": sorted(d.id for d in e.failed_devices),
                "detected_at": detected_at,
                "error": f"{e}; cause: {e.__cause__!r}"[:2000],
            }
        reply["step_ms"] = 1000 * (time.perf_counter() - started)
        return "ok", reply


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m elastic_moe.worker", description=__doc__)
    parser.add_argument("--coordinator", required=True, help="the coordination service HOST:PORT")
    parser.add_argument("--num-workers", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--frontend", required=True, help="the frontend's channel HOST:PORT")
    parser.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    parser.add_argument("--local-device-ids", default=None, help="e.g. 0 (GPU: this worker's)")
    parser.add_argument("--heartbeat-timeout", type=int, default=2)
    parser.add_argument("--shutdown-timeout", type=int, default=5)
    parser.add_argument("--init-timeout", type=int, default=120)
    parser.add_argument("--collective-timeout", type=int, default=10)
    parser.add_argument("--cpu-devices", type=int, default=1, help="CPU: simulated devices")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = _parse(argv)
    from elastic_moe.distributed_service import ClusterOptions, join_cluster, worker_environment

    options = ClusterOptions(
        heartbeat_timeout_s=args.heartbeat_timeout,
        shutdown_timeout_s=args.shutdown_timeout,
        init_timeout_s=args.init_timeout,
        collective_timeout_s=args.collective_timeout,
    )
    # What the frontend puts in the environment of the workers it starts; a worker started by
    # hand on another host gets the same defaults here (its own settings win).
    for name, value in worker_environment(
        args.platform, options, cpu_devices=args.cpu_devices
    ).items():
        os.environ.setdefault(name, value)
    local_ids = None
    if args.local_device_ids:
        local_ids = [int(i) for i in args.local_device_ids.split(",")]
    started = time.perf_counter()
    join_cluster(
        args.coordinator,
        args.num_workers,
        args.process_id,
        options,
        platform=args.platform,
        local_device_ids=local_ids,
    )
    import jax

    if not os.environ.get("ELASTIC_MOE_NO_COMPILATION_CACHE"):
        # A worker started again (a rejoin, a restarted cluster) reads its programs from disk.
        from elastic_moe.executables import enable_persistent_cache

        try:
            enable_persistent_cache()
        except OSError:
            pass
    host, port = args.frontend.rsplit(":", 1)
    conn = Client((host, int(port)), authkey=bytes.fromhex(os.environ[AUTHKEY_ENV]))
    conn.send(
        (
            "hello",
            {
                "process_id": args.process_id,
                "pid": os.getpid(),
                "device_ids": [d.id for d in jax.local_devices()],
                "num_devices": jax.device_count(),
                "join_ms": 1000 * (time.perf_counter() - started),
            },
        )
    )
    worker = Worker(args.process_id)
    while True:
        try:
            kind, payload = conn.recv()
        except (EOFError, OSError):
            os._exit(0)  # the frontend is gone: nothing is left to serve
        try:
            reply = worker.handle(kind, payload)
        except Exception:
            reply = ("error", traceback.format_exc()[-4000:])
        conn.send(reply)
        if kind == "shutdown":
            sys.stdout.flush()
            os._exit(0)  # no shutdown barrier: the others may be dead


if __name__ == "__main__":
    main()
