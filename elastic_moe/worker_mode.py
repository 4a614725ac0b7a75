"""The runtime loop over worker processes: what `Runtime` needs in place of the single-process
`Coordinator` and `GuardedStepper` when the mesh is a `RemoteMesh` (docs/WORKERS.md).

`WorkerCoordinator` is the status source and the operations (fail, rejoin) of the Admin API;
`WorkerStepper` runs the engine's steps and turns a `WorkerFailure` into a recovery: the dead
worker's devices are marked failed, the live workers deploy the model again over their own
devices (`recover_on_survivors`), and every request in flight is re-prefilled from the journal.

    engine = frontend_engine(cfg, RemoteMesh.deploy(pool, model, options), engine_options)
    coordinator = WorkerCoordinator(engine, model, options)
    runtime = Runtime(engine, coordinator=coordinator, stepper=WorkerStepper(coordinator))

What the worker mode does not do (yet): a reconfiguration is a fresh deployment, so it keeps no
survivor's buffers and moves no expert; `rebalance` and `verify` (checksums of the slots) are
refused; a rejoin restarts the dead worker's process first when it is not running.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from elastic_moe.coordinator import known_device_ids, mesh_status, remember_newest
from elastic_moe.engine import Engine, TokenEvent
from elastic_moe.faults import StepFailed
from elastic_moe.frontend_engine import recover_on_survivors
from elastic_moe.reconfiguration import (
    DeviceState,
    IntegrityReport,
    MeshStatus,
    Reconfiguration,
    ReconfigurationKind,
    ReconfigurationRefused,
)
from elastic_moe.remote_mesh import RemoteMesh
from elastic_moe.worker_pool import WorkerError, WorkerFailure

log = logging.getLogger("elastic_moe.workers")
REJOIN_MODES = ("restart", "in-place")


class WorkerCoordinator:
    """Mesh status, fail and rejoin over worker processes; called on the runtime's loop thread.

    model, options: what every deploy sends the workers (a preset name or a model directory,
    and EngineOptions as a dict). standby: after each deploy, every worker compiles the
    programs of the meshes one more worker's death would leave. auto_rejoin: a dead worker's
    process is restarted in the background at once, and its devices rejoin at the first step
    boundary after it has connected again. rejoin_mode: "restart" (a rejoin starts every
    worker again in a new cluster: a pause of a full start, every request re-prefilled) or
    "in-place" (only the dead worker restarts and joins the running cluster, which JAX 0.11 and
    0.12 refuse so far: the rejoin is then undone, docs/WORKERS.md)."""

    def __init__(
        self,
        engine: Engine,
        model: str,
        options: dict,
        *,
        standby: bool = True,
        auto_rejoin: bool = False,
        rejoin_mode: str = "restart",
    ):
        mesh: RemoteMesh = engine.mesh
        self.engine, self.model, self.options = engine, model, options
        self.pool = mesh.pool
        if rejoin_mode not in REJOIN_MODES:
            raise ValueError(f"rejoin_mode must be one of {REJOIN_MODES}, got {rejoin_mode!r}")
        self.standby = standby
        self.auto_rejoin = auto_rejoin
        self.rejoin_mode = rejoin_mode
        # Every device of the cluster, serving or not: id -> the worker that owns it.
        self.owner = {d: w.process_id for w in self.pool.workers for d in w.device_ids}
        self.states = {
            d: DeviceState.HEALTHY if d in mesh.device_ids else DeviceState.FAILED
            for d in self.owner
        }
        self.history: list[Reconfiguration] = []
        self._restarts: dict[int, threading.Thread] = {}  # auto_rejoin: restarts under way
        self._restart_errors: dict[int, BaseException] = {}
        self._due_by_restart: set[int] = set()  # auto_rejoin, restart mode: dead workers

    # ---- reporting ----------------------------------------------------------------------
    def status(self) -> MeshStatus:
        mesh = self.engine.mesh
        platform = self.pool.platform
        known = [(d, platform, self.owner[d]) for d in sorted(self.owner)]
        last = self.history[-1] if self.history else None
        return mesh_status(self.engine, mesh.placement, mesh.device_ids, known, self.states, last)

    # ---- what the stepper calls -----------------------------------------------------------
    def worker_failed(self, failure: WorkerFailure, detect_ms: float) -> Reconfiguration:
        """After a step raised WorkerFailure: the dead workers' devices are failed, the live
        workers deploy again over their own devices, every request in flight is requeued."""
        lost = sorted(set(self.pool.device_ids(failure.dead)) | set(failure.failed_device_ids))
        for d in lost:
            self.states[d] = DeviceState.FAILED
        cause = f"fail {lost}: worker(s) {failure.dead} lost ({failure.reason})"
        log.warning("%s; deploying again over the survivors", cause)
        # Wall-clock times (one host: the same clock as a benchmark's kill), for measurement.
        log.info(
            "worker failure seen at (unix time): channel closed %s, survivors' failure %s",
            "none" if failure.eof_at is None else f"{failure.eof_at:.3f}",
            {i: round(t, 3) for i, t in failure.survivor_detected_at.items()},
        )
        result = self._redeploy(ReconfigurationKind.DETECTED, cause, detect_ms)
        if self.auto_rejoin and self.rejoin_mode == "in-place":
            for process_id in failure.dead:
                self._restart_in_background(process_id)
        elif self.auto_rejoin:
            self._due_by_restart.update(failure.dead)  # at the next step boundary
        return result

    def due_rejoins(self) -> Reconfiguration | None:
        """auto_rejoin: the devices of every dead worker rejoin now (restart mode: the whole
        cluster starts again; in-place: each restarted worker that has connected since the last
        call). None when there is none."""
        if self._due_by_restart:
            dead, self._due_by_restart = sorted(self._due_by_restart), set()
            try:
                return self.rejoin(self.pool.device_ids(dead))
            except ReconfigurationRefused as refused:
                log.error("automatic rejoin of worker(s) %s failed: %s", dead, refused)
                return None
        ready = [i for i, t in self._restarts.items() if not t.is_alive()]
        if not ready:
            return None
        for i in ready:
            del self._restarts[i]
            error = self._restart_errors.pop(i, None)
            if error is not None:
                log.error("worker %d could not be restarted: %s", i, error)
        alive = [i for i in ready if self.pool.workers[i].alive]
        if not alive:
            return None
        try:
            return self.rejoin(self.pool.device_ids(alive))
        except ReconfigurationRefused as refused:  # serving goes on over the survivors
            log.error("automatic rejoin of worker(s) %s failed: %s", alive, refused)
            return self.history[-1] if self.history else None

    # ---- the Admin API's operations ---------------------------------------------------------
    def fail(
        self,
        device_ids: Iterable[int],
        *,
        reason: str = "",
        op_id: str = "",
        dry_run: bool = False,
        detect_ms: float = 0.0,
        detected: bool = False,
    ) -> Reconfiguration:
        """Declares devices failed: in worker mode a worker's devices go together, so the
        workers that own them are stopped (SIGKILL, as a fault would) and the others deploy
        again over their own devices. Refused for part of a worker's devices."""
        ids = self._known(device_ids)
        workers = self._whole_workers(ids, "the devices of a worker fail together")
        serving = set(self.engine.mesh.device_ids)
        not_serving = [d for d in ids if d not in serving]
        if not_serving:
            raise ReconfigurationRefused(f"devices {not_serving} are not in the serving mesh")
        if not [w for w in self.pool.live_workers if w.process_id not in workers]:
            raise ReconfigurationRefused(f"failing {ids} would leave no worker; nothing changed")
        cause = f"fail {ids}" + (f": {reason}" if reason else "")
        epoch = self.engine.mesh.epoch
        if dry_run:
            return Reconfiguration(
                from_epoch=epoch,
                to_epoch=epoch,
                cause=cause,
                dry_run=True,
                requests_reprefilled=len(self.engine.running),
            )
        self.engine.settle()  # the launched step is sound: its tokens are recorded first
        for process_id in workers:
            self.pool.kill(process_id)
        for d in ids:
            self.states[d] = DeviceState.FAILED
        kind = ReconfigurationKind.DETECTED if detected else ReconfigurationKind.FAIL
        return self._redeploy(kind, cause, detect_ms)

    def rejoin(self, device_ids: Iterable[int], *, op_id: str = "") -> Reconfiguration:
        """Brings a worker's devices back: its process is started again when it is not running
        (same process id, a new incarnation in the coordination service), then every live
        worker deploys over the grown mesh and every request in flight is re-prefilled."""
        ids = self._known(device_ids)
        workers = self._whole_workers(ids, "a worker's devices rejoin together")
        already = [d for d in ids if d in self.engine.mesh.device_ids]
        if already:
            raise ReconfigurationRefused(f"devices {already} are already serving")
        self.engine.settle()  # the launched step is sound: its tokens are recorded first
        if self.rejoin_mode == "restart":
            return self._rejoin_by_restart(ids)
        try:
            for i in workers:
                thread = self._restarts.pop(i, None)
                if thread is not None:
                    thread.join()  # an automatic restart is under way: let it finish
                if not self.pool.workers[i].alive:
                    self.pool.restart(i)
        except (RuntimeError, TimeoutError) as error:
            for i in workers:
                self.pool.kill(i)
            raise ReconfigurationRefused(
                f"rejoin {ids}: worker(s) {workers} did not start again ({error}); nothing changed"
            ) from None
        for d in ids:
            self.states[d] = DeviceState.REJOINING
        try:
            return self._redeploy(ReconfigurationKind.REJOIN, f"rejoin {ids}")
        except (WorkerError, WorkerFailure) as error:
            # Back to the mesh before the rejoin: the rejoining workers are stopped again and
            # the others deploy over their own devices (the failed deploy left them none).
            for i in workers:
                self.pool.kill(i)
            for d in ids:
                self.states[d] = DeviceState.FAILED
            cause = f"rejoin {ids} failed: {last_error_line(error)}"
            log.error("%s; back to the devices serving before", cause)
            result = self._redeploy(ReconfigurationKind.FAIL, cause)
            raise ReconfigurationRefused(
                f"{cause}; worker(s) {workers} stopped again, serving goes on over devices "
                f"{self.engine.mesh.device_ids} (epoch {result.to_epoch})"
            ) from None

    def _rejoin_by_restart(self, ids: list[int]) -> Reconfiguration:
        """Every worker starts again in a new cluster and deploys over all their devices."""
        for thread in list(self._restarts.values()):
            thread.join()  # automatic restarts under way are superseded
        self._restarts.clear()
        for d in ids:
            self.states[d] = DeviceState.REJOINING
        started = time.perf_counter()
        try:
            self.pool.restart_cluster()
        except (RuntimeError, TimeoutError) as error:
            for d in ids:
                self.states[d] = DeviceState.FAILED
            raise ReconfigurationRefused(
                f"rejoin {ids}: the workers did not start again ({error})"
            ) from None
        restart_ms = 1000 * (time.perf_counter() - started)
        result = self._redeploy(ReconfigurationKind.REJOIN, f"rejoin {ids} (cluster restarted)")
        result.pause_ms += restart_ms
        return result

    def rebalance(self, *, op_id: str = "", max_copies: int = 0) -> Reconfiguration:
        raise ReconfigurationRefused(
            "rebalance is not available in worker mode yet (each deploy places the experts "
            "afresh); nothing changed"
        )

    def verify(self, *, repair: bool = True) -> IntegrityReport:
        raise ReconfigurationRefused("VerifyExperts is not available in worker mode yet")

    def close(self) -> None:
        """Waits for automatic restarts under way (the pool is its owner's to close)."""
        self.auto_rejoin = False
        for thread in list(self._restarts.values()):
            thread.join(timeout=60)

    # ---- internals ------------------------------------------------------------------------
    def _redeploy(
        self, kind: ReconfigurationKind, cause: str, detect_ms: float = 0.0
    ) -> Reconfiguration:
        """Every live worker deploys over the live workers' devices; the engine's running
        requests go back to be re-prefilled."""
        engine = self.engine
        old = engine.mesh
        live = [w.process_id for w in self.pool.live_workers]
        if not live:
            raise ReconfigurationRefused(f"{cause}: no worker is left to serve")
        started = time.perf_counter()
        requeued = recover_on_survivors(engine, self.model, self.options)
        engine.mesh.step_timeout_s = old.step_timeout_s
        deploy_ms = 1000 * (time.perf_counter() - started)
        replies = engine.mesh.deploy_replies
        result = Reconfiguration(
            from_epoch=old.epoch,
            to_epoch=engine.mesh.epoch,
            cause=cause,
            kind=kind,
            detect_ms=detect_ms,
            compile_ms=max(r["compile_ms"] for r in replies),
            transfer_ms=deploy_ms,  # a fresh deployment: every weight placed from host copies
            requests_reprefilled=requeued,
            standby_hit=all(r.get("standby_hit", False) for r in replies),
        )
        for d in engine.mesh.device_ids:
            self.states[d] = DeviceState.HEALTHY
        if self.standby and len(live) > 1:
            lengths = sorted(engine.prefill_lengths_seen) or [engine.options.min_prefill_bucket]
            engine.mesh.standby(lengths)  # for the next death (serving waits for it)
        result.pause_ms = detect_ms + 1000 * (time.perf_counter() - started)
        remember_newest(self.history, result)
        log.info(
            "epoch %d -> %d (%s): deployed over %s in %.0f ms, %d requests re-prefilled",
            result.from_epoch,
            result.to_epoch,
            kind.value,
            engine.mesh.device_ids,
            deploy_ms,
            requeued,
        )
        return result

    def _restart_in_background(self, process_id: int) -> None:
        if process_id in self._restarts:
            return

        def restart() -> None:
            try:
                self.pool.restart(process_id)
            except BaseException as error:  # reported by due_rejoins
                self._restart_errors[process_id] = error

        thread = threading.Thread(target=restart, name=f"restart-worker-{process_id}", daemon=True)
        self._restarts[process_id] = thread
        thread.start()

    def _known(self, device_ids: Iterable[int]) -> list[int]:
        return known_device_ids(device_ids, self.owner)

    def _whole_workers(self, ids: list[int], what: str) -> list[int]:
        """The workers owning ids; refused unless ids are all of those workers' devices."""
        workers = sorted({self.owner[d] for d in ids})
        whole = self.pool.device_ids(workers)
        if whole != ids:
            raise ReconfigurationRefused(
                f"in worker mode {what}: worker(s) {workers} own devices {whole}; nothing changed"
            )
        return workers


def last_error_line(error: BaseException, limit: int = 300) -> str:
    """The last line of a worker's traceback that names an error (what an operator reads)."""
    lines = [x.strip() for x in str(error).splitlines()]
    raised = [x for x in lines if re.match(r"[\w.]+(Error|Exception|Failure)\b", x)]
    return (raised[-1] if raised else lines[-1] if lines else repr(error))[:limit]


@dataclass
class WorkerStepper:
    """Runs the frontend engine's steps; a worker's death becomes a redeploy on the survivors.

    A step that fails with every worker alive (a worker raised) is retried once with every
    request in flight re-prefilled; when it fails again, the requests it held end with the
    error (StepFailed), as in GuardedStepper."""

    coordinator: WorkerCoordinator
    step_retries: int = 1
    detections: list[Reconfiguration] = field(default_factory=list)
    failed_steps: int = 0  # consecutive steps that failed with every worker alive

    def step(self) -> list[TokenEvent]:
        engine = self.coordinator.engine
        if self.coordinator.auto_rejoin:
            rejoined = self.coordinator.due_rejoins()
            if rejoined is not None:
                self.detections.append(rejoined)  # a change of the mesh the watchers hear of
        started = time.perf_counter()
        try:
            events = engine.step()
        except WorkerFailure as failure:
            events = engine.take_events()  # the step's tokens recorded before it failed
            detect_ms = 1000 * (time.perf_counter() - started)
            self.detections.append(self.coordinator.worker_failed(failure, detect_ms))
            return events
        except WorkerError as error:
            events = engine.take_events()
            self._failed_with_every_worker_alive(error)
            return events
        self.failed_steps = 0
        return events

    def _failed_with_every_worker_alive(self, error: WorkerError) -> None:
        engine = self.coordinator.engine
        in_flight = list(engine.running)
        if engine.in_flight_untrusted:
            engine.requeue_in_flight()
        self.failed_steps += 1
        if self.failed_steps <= self.step_retries:
            return  # retried: the requests re-prefill at the next step
        ended = engine.finish_with_error(
            in_flight, f"the server could not run this request's step: {error}"
        )
        raise StepFailed(error, ended) from error
