"""The frontend's side of the worker processes: it hosts the coordination service, starts one
worker per GPU (or per group of simulated CPU devices), and sends every step to all of them.

The frontend never joins the cluster and owns no accelerator, so a worker's death loses no
request state. A worker's death reaches the frontend two ways: its channel closes (the kernel
closes a killed process's sockets: the frontend knows at once, on one host), and the survivors'
steps fail with `ProcessFailureError` once the coordination service has missed its heartbeats.
A worker that misses a step's deadline without dying (a hang) is killed by the frontend, which
turns a hang into a death that the survivors detect the same way.
"""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, Listener, wait
from typing import Any

from elastic_moe.distributed_service import (
    ClusterOptions,
    CoordinationService,
    worker_environment,
)
from elastic_moe.worker import AUTHKEY_ENV


class WorkerError(RuntimeError):
    """A worker raised an exception that is not a peer's death (its text is the message)."""


@dataclass
class WorkerFailure(Exception):
    """One or more workers died (or were killed for missing a step's deadline).

    dead: process ids whose channel closed or that the frontend killed.
    failed_device_ids: the devices the survivors' `live_devices` reported failed.
    eof_at / reported_at: wall-clock times (time.time()) when the frontend saw the first channel
        close and when the last survivor's failure report arrived (None if none came).
    """

    dead: list[int]
    failed_device_ids: list[int]
    eof_at: float | None
    reported_at: float | None
    survivor_detected_at: dict[int, float] = field(default_factory=dict)
    reason: str = "process died"

    def __str__(self) -> str:
        return (
            f"worker(s) {self.dead} lost ({self.reason}); "
            f"devices reported failed: {self.failed_device_ids}"
        )


@dataclass
class WorkerHandle:
    process_id: int
    process: subprocess.Popen | None  # None: a worker started on another host
    conn: Connection | None = None
    device_ids: list[int] = field(default_factory=list)
    alive: bool = True
    hello: dict = field(default_factory=dict)


class WorkerPool:
    """N worker processes in one cluster, driven in lockstep through `request`.

    Across hosts: `local_workers` are the process ids started here (default: all); the others
    are started on their own hosts with `worker_command(i)` and connect to `address` (this
    host's address the others reach) with the same key (`authkey`, or $ELASTIC_MOE_WORKER_AUTHKEY
    in hex, in their environment too)."""

    def __init__(
        self,
        num_workers: int,
        *,
        platform: str = "cpu",
        cpu_devices_per_worker: int = 1,
        options: ClusterOptions | None = None,
        log_dir: str | None = None,
        start_timeout_s: float = 180.0,
        local_workers: Sequence[int] | None = None,
        address: str = "127.0.0.1",
        service_port: int | None = None,
        channel_port: int = 0,
        authkey: bytes | None = None,
        announce: Callable[[int, list[str]], None] | None = None,
    ):
        options = options or ClusterOptions()
        self.num_workers = num_workers
        self.platform = platform
        self.options = options
        self.cpu_devices_per_worker = cpu_devices_per_worker
        self.local_workers = list(range(num_workers) if local_workers is None else local_workers)
        self.address = address
        if authkey is None and os.environ.get(AUTHKEY_ENV):
            authkey = bytes.fromhex(os.environ[AUTHKEY_ENV])
        remote = [i for i in range(num_workers) if i not in self.local_workers]
        if remote and authkey is None:
            raise ValueError(
                f"workers {remote} start on other hosts: give them and this frontend the same "
                f"key in ${AUTHKEY_ENV} (hex, e.g. from `openssl rand -hex 16`)"
            )
        self._authkey = authkey or os.urandom(16)
        self.service = CoordinationService(num_workers, options, port=service_port)
        self._listener = Listener((address, channel_port), authkey=self._authkey)
        self.workers: list[WorkerHandle] = []
        env = dict(os.environ)
        for name in ("XLA_FLAGS", "JAX_PLATFORMS"):
            env.pop(name, None)
        env.update(worker_environment(platform, options, cpu_devices=cpu_devices_per_worker))
        env[AUTHKEY_ENV] = self._authkey.hex()
        # The workers import this checkout's packages, installed or not.
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self._env, self._log_dir = env, log_dir
        self._accepted: queue.Queue = queue.Queue()
        threading.Thread(target=self._accept_forever, daemon=True, name="worker-accept").start()
        for i in range(num_workers):
            self.workers.append(
                WorkerHandle(i, self._spawn(i) if i in self.local_workers else None)
            )
        for i in remote:
            if announce is not None:  # the command each other host runs
                announce(i, self.worker_command(i, "0" if platform == "gpu" else None))
        try:
            self._wait_for_hellos(list(range(num_workers)), start_timeout_s)
        except BaseException:
            self.close()
            raise

    def worker_command(self, i: int, local_device_ids: str | None = None) -> list[str]:
        """Worker i's command line (its key goes in its environment: AUTHKEY_ENV, in hex)."""
        options, (host, port) = self.options, self._listener.address
        command = [
            sys.executable,
            "-m",
            "elastic_moe.worker",
            f"--coordinator={self.service.address(self.address)}",
            f"--num-workers={self.num_workers}",
            f"--process-id={i}",
            f"--frontend={host}:{port}",
            f"--platform={self.platform}",
            f"--heartbeat-timeout={options.heartbeat_timeout_s}",
            f"--shutdown-timeout={options.shutdown_timeout_s}",
            f"--init-timeout={options.init_timeout_s}",
            f"--collective-timeout={options.collective_timeout_s}",
        ]
        if local_device_ids is not None:
            command.append(f"--local-device-ids={local_device_ids}")
        if self.platform == "cpu":
            command.append(f"--cpu-devices={self.cpu_devices_per_worker}")
        return command

    def _spawn(self, i: int) -> subprocess.Popen:
        gpu = str(self.local_workers.index(i)) if self.platform == "gpu" else None
        command = self.worker_command(i, gpu)  # on GPU: one per local GPU, in order
        out = subprocess.DEVNULL
        if self._log_dir is not None:  # appended: a restarted worker's log follows the last
            out = open(os.path.join(self._log_dir, f"worker{i}.log"), "ab")
        process = subprocess.Popen(command, env=self._env, stdout=out, stderr=subprocess.STDOUT)
        if self._log_dir is not None:
            out.close()  # the worker holds its own copy
        return process

    def _accept_forever(self) -> None:
        """Accepts every channel a worker opens (at start-up, and a restarted worker's)."""
        while True:
            try:
                conn = self._listener.accept()
            except OSError:
                return  # the listener was closed
            except Exception:  # a stranger that failed the key's challenge
                continue
            self._accepted.put(conn)

    def _wait_for_hellos(self, process_ids: list[int], timeout_s: float) -> None:
        """Waits until each of these workers has connected and said hello."""
        deadline = time.monotonic() + timeout_s
        pending = set(process_ids)
        while pending:
            for i in pending:
                w = self.workers[i]
                if w.process is not None and w.process.poll() is not None:
                    raise RuntimeError(f"worker {i} exited with {w.process.returncode} at start-up")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} worker(s) did not connect in {timeout_s:.0f} s")
            try:
                conn = self._accepted.get(timeout=0.2)
            except queue.Empty:
                continue
            kind, hello = conn.recv()
            if kind != "hello":
                raise RuntimeError(f"a worker opened with {kind!r}, not hello")
            handle = self.workers[hello["process_id"]]
            if handle.conn is not None:
                handle.conn.close()
            handle.conn, handle.device_ids, handle.hello = conn, hello["device_ids"], hello
            handle.alive = True
            pending.discard(hello["process_id"])

    def restart(self, process_id: int, *, timeout_s: float = 180.0) -> WorkerHandle:
        """Starts a dead worker again: the same process id, a new process (a new incarnation
        in the coordination service), connected to this frontend. It holds no mesh until the
        next "deploy" that includes its devices. A worker of another host is not started here:
        this waits for it to connect again (started on its host by its operator)."""
        w = self.workers[process_id]
        if w.alive and (w.process is None or w.process.poll() is None):
            raise RuntimeError(f"worker {process_id} is alive")
        w.alive = False
        if process_id in self.local_workers:
            w.process = self._spawn(process_id)
        self._wait_for_hellos([process_id], timeout_s)
        return w

    def restart_cluster(self, *, timeout_s: float = 180.0) -> None:
        """Every worker stopped, a new coordination service, every worker started again: a
        new cluster under the same frontend (its requests are not touched). What a rejoin
        falls back to where a restarted worker cannot rejoin the running cluster
        (docs/WORKERS.md). Workers of other hosts cannot be restarted from here."""
        remote = [i for i in range(self.num_workers) if i not in self.local_workers]
        if remote:
            raise RuntimeError(f"workers {remote} run on other hosts: restart them there")
        for w in self.workers:
            self.kill(w.process_id)
            if w.conn is not None:
                w.conn.close()
                w.conn = None
        self.service.shutdown()
        self.service = CoordinationService(self.num_workers, self.options)
        for w in self.workers:
            w.process = self._spawn(w.process_id)
        self._wait_for_hellos(list(range(self.num_workers)), timeout_s)

    # ---- driving the workers ------------------------------------------------------------
    @property
    def live_workers(self) -> list[WorkerHandle]:
        return [w for w in self.workers if w.alive]

    def device_ids(self, process_ids: Sequence[int] | None = None) -> list[int]:
        chosen = [w for w in self.workers if process_ids is None or w.process_id in process_ids]
        return sorted(d for w in chosen for d in w.device_ids)

    def request(self, kind: str, payload: Any = None, *, timeout_s: float = 60.0) -> list[Any]:
        """Sends one message to every live worker and returns their replies' payloads, by
        process id order. Raises WorkerFailure when a worker died or a survivor reported a
        peer's death, WorkerError when a worker raised anything else."""
        targets = self.live_workers
        for w in targets:
            try:
                w.conn.send((kind, payload))
            except OSError:
                pass  # its death shows as EOF below
        replies: dict[int, tuple[str, Any]] = {}
        dead: list[int] = []
        eof_at: float | None = None
        reported_at: float | None = None
        waiting = {w.conn: w for w in targets}
        deadline = time.monotonic() + timeout_s
        while waiting:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for conn in wait(list(waiting), timeout=left):
                w = waiting.pop(conn)
                try:
                    replies[w.process_id] = conn.recv()
                except (EOFError, OSError):
                    eof_at = eof_at or time.time()
                    w.alive = False
                    dead.append(w.process_id)
                    continue
                if replies[w.process_id][0] == "failed":
                    reported_at = time.time()
        reason = "process died"
        for w in waiting.values():  # missed the deadline: a hang becomes a death
            self.kill(w.process_id)
            dead.append(w.process_id)
            reason = f"missed the {timeout_s:.0f} s step deadline and was killed"
        failed = [(i, r[1]) for i, r in replies.items() if r[0] == "failed"]
        if dead or failed:
            raise WorkerFailure(
                dead=sorted(dead),
                failed_device_ids=sorted({d for _, r in failed for d in r["failed_device_ids"]}),
                eof_at=eof_at,
                reported_at=reported_at,
                survivor_detected_at={i: r["detected_at"] for i, r in failed},
                reason=reason,
            )
        errors = [f"worker {i}: {r[1]}" for i, r in sorted(replies.items()) if r[0] == "error"]
        if errors:
            raise WorkerError("\n".join(errors))
        return [replies[w.process_id][1] for w in targets]

    def kill(self, process_id: int) -> None:
        """kill -9 of one worker (what a GPU fault does to it). A worker of another host has its
        channel closed instead, which makes it exit."""
        w = self.workers[process_id]
        if w.process is None:
            if w.conn is not None:
                w.conn.close()
                w.conn = None
        elif w.process.poll() is None:
            w.process.kill()
            w.process.wait()
        w.alive = False

    def close(self) -> None:
        for w in self.workers:
            if w.alive and w.conn is not None and (w.process is None or w.process.poll() is None):
                try:
                    w.conn.send(("shutdown", None))
                except OSError:
                    pass
        for w in self.workers:
            if w.process is not None:
                try:
                    w.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    w.process.kill()
                    w.process.wait()
            if w.conn is not None:
                w.conn.close()
            w.alive = False
        self._listener.close()
        self.service.shutdown()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
