"""The runtime: one thread drives the engine; other threads submit requests and operations.

Everything that touches the engine or the mesh runs on the loop thread at a step boundary, so a
reconfiguration never races a step. Requests wait in a bounded admission queue; a listener per
request receives its `TokenEvent`s and one `Finished`. This is what the gRPC server, the CLI and
the notebooks drive.

The loop survives what a step raises: a device failure becomes a reconfiguration, a step that
fails with every device answering is retried and then ends its requests with the error. When it
cannot go on (the survivors cannot hold every expert, or steps keep failing) it stops: every
request ends with the reason, watchers see MeshState.STOPPED, and every later call fails at once
with RuntimeStopped instead of waiting.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from elastic_moe.background_repair import RepairBudget, RepairSchedule
from elastic_moe.coordinator import Coordinator
from elastic_moe.engine import Engine, TokenEvent
from elastic_moe.faults import FaultInjector, GuardedStepper, StepFailed
from elastic_moe.reconfiguration import (
    MeshState,
    MeshStatus,
    Reconfiguration,
    ReconfigurationKind,
)
from elastic_moe.requests import FinishReason, Request, RequestError
from elastic_moe.worker_mode import WorkerCoordinator, WorkerStepper

log = logging.getLogger("elastic_moe.runtime")
FATAL_FAILED_STEPS = 4  # consecutive failed steps (no device to blame) that stop the runtime


class QueueFull(RuntimeError):
    """The admission queue is full (requests or prompt tokens)."""


class Draining(RuntimeError):
    """The runtime is draining or stopped and takes no new requests."""


class RuntimeStopped(Draining):
    """The runtime's loop stopped (a fault it could not recover from, or stop())."""


@dataclass(frozen=True)
class Finished:
    request: Request

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def finish_reason(self) -> FinishReason:
        return self.request.finish_reason or FinishReason.ABORTED


Listener = Callable[[TokenEvent | Finished], None]


class Runtime:
    def __init__(
        self,
        engine: Engine,
        *,
        coordinator: Coordinator | WorkerCoordinator | None = None,
        injector: FaultInjector | None = None,
        max_queued_requests: int = 256,
        max_queued_tokens: int = 1 << 16,
        repair_budget: RepairBudget | None = None,
        stepper: GuardedStepper | WorkerStepper | None = None,
    ):
        """repair_budget: after a loss or a rejoin, restore redundancy and balance in the
        background, that many bytes of expert copies per interval (None: only when asked).

        Worker mode (docs/WORKERS.md) passes its own coordinator and stepper
        (elastic_moe.worker_mode: WorkerCoordinator, WorkerStepper), which have the same
        methods as Coordinator and GuardedStepper that the loop calls; the single-process
        default builds both around the engine."""
        self.engine = engine
        self.coordinator = coordinator or Coordinator(engine)
        self.injector = injector or FaultInjector()
        self.stepper = stepper or GuardedStepper(self.coordinator, self.injector)
        self.max_queued_requests = max_queued_requests
        self.max_queued_tokens = max_queued_tokens
        self._lock = threading.Condition()
        self._inbox: collections.deque[Request] = collections.deque()
        self._commands: collections.deque[tuple[Callable[[], Any], Future]] = collections.deque()
        # Who to tell about each request accepted and not finished. The requests themselves
        # are in the inbox until the loop hands them to the engine, then in its journal.
        self._listeners: dict[str, Listener] = {}
        self._queued_tokens: dict[str, int] = {}  # accepted, no token or Finished yet
        self.failure: BaseException | None = None  # why the loop stopped, if it did
        self._watchers: list[Callable[[MeshStatus], None]] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.draining = False
        self.step_count = 0
        self.tokens_generated = 0
        self.repair = RepairSchedule(repair_budget)

    # ---- lifecycle ----------------------------------------------------------------------
    def start(self) -> Runtime:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="elastic-moe-loop", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.coordinator.close()  # its standby timer and compiles

    def __enter__(self) -> Runtime:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- requests -----------------------------------------------------------------------
    def submit(self, request: Request, listener: Listener) -> Request:
        """Validates and queues a request; raises RequestError (bad input), QueueFull or
        Draining. The one validation on this path: the engine takes it as it is."""
        cfg = self.engine.cfg
        request.validate(cfg.vocab_size, cfg.max_seq_len)
        with self._lock:
            self._raise_if_stopped()
            if self.draining:
                raise Draining("the server is draining and accepts no new requests")
            if request.request_id in self._listeners:
                raise RequestError(f"request_id {request.request_id!r} is already running")
            # Counted here, not from the engine's queue: that belongs to the loop thread.
            queued = len(self._queued_tokens)
            if queued >= self.max_queued_requests:
                raise QueueFull(f"admission queue full ({queued} requests waiting)")
            tokens = sum(self._queued_tokens.values())
            if tokens + len(request.prompt) > self.max_queued_tokens:
                raise QueueFull(f"admission queue full ({tokens} prompt tokens waiting)")
            self._listeners[request.request_id] = listener
            self._queued_tokens[request.request_id] = len(request.prompt)
            self._inbox.append(request)
            self._lock.notify_all()
        return request

    def abort(self, request_ids: list[str]) -> Future:
        """Aborts requests at the next step boundary; the future gives how many were live."""
        return self.call(lambda: sum(self._abort_now(i) for i in request_ids))

    def _abort_now(self, request_id: str) -> int:
        for request in list(self._inbox):
            if request.request_id == request_id:
                self._inbox.remove(request)
                request.finish_reason = FinishReason.ABORTED
                self._emit(Finished(request))
                return 1
        request = self.engine.journal.get(request_id)
        if request is None or not self.engine.abort(request_id):
            return 0
        self._emit(Finished(request))
        return 1

    # ---- operations at a step boundary --------------------------------------------------
    def call(self, fn: Callable[[], Any]) -> Future:
        """Runs fn() on the loop thread between two steps; its result comes in the future."""
        future: Future = Future()
        with self._lock:
            try:
                self._raise_if_stopped()
            except RuntimeStopped as error:
                future.set_exception(error)
                return future
            self._commands.append((fn, future))
            self._lock.notify_all()
        return future

    def _raise_if_stopped(self) -> None:
        """Called under the lock."""
        if self.failure is not None:
            raise RuntimeStopped(f"the runtime stopped: {self.failure}")
        if self._thread is None or self._stopping or not self._thread.is_alive():
            raise RuntimeStopped("the runtime is not running")

    def status(self) -> MeshStatus:
        return self.call(self._status_now).result()

    def _status_now(self) -> MeshStatus:
        status = self.coordinator.status()
        status.queued_requests += len(self._inbox)
        if self.draining and status.state is not MeshState.STOPPED:
            status.state = MeshState.DRAINING
        return status

    def watch(self, watcher: Callable[[MeshStatus], None]) -> Callable[[], None]:
        """Calls watcher(status) after every change of the mesh; returns an unsubscribe."""
        with self._lock:
            self._watchers.append(watcher)

        def unsubscribe() -> None:
            with self._lock:
                if watcher in self._watchers:
                    self._watchers.remove(watcher)

        return unsubscribe

    def fail(self, device_ids, **kw) -> Future:
        return self.call(lambda: self._changed(self.coordinator.fail(device_ids, **kw)))

    def rejoin(self, device_ids, **kw) -> Future:
        return self.call(lambda: self._changed(self.coordinator.rejoin(device_ids, **kw)))

    def rebalance(self, **kw) -> Future:
        return self.call(lambda: self._changed(self.coordinator.rebalance(**kw)))

    def verify(self, *, repair: bool = True) -> Future:
        """Checks every expert slot against its expert's checksum at a step boundary (an
        IntegrityReport); with `repair`, wrong slots are rewritten before the next step."""
        return self.call(lambda: self.coordinator.verify(repair=repair))

    def break_devices(self, device_ids) -> None:
        """Simulates hardware faults: the next step fails and detection takes over."""
        self.injector.break_devices(device_ids)

    def stop_admission(self) -> None:
        """New requests are refused from now on (Draining); watchers see MeshState.DRAINING.
        `draining` is the one flag that says so (status and readiness read it)."""
        with self._lock:
            already, self.draining = self.draining, True
        if not already:
            self.call(self._notify_watchers)  # on the loop thread, like every status

    def drain(self, timeout_s: float) -> tuple[int, int]:
        """Stops admission, lets running requests finish for up to timeout_s, aborts the rest.

        Returns (completed, aborted)."""
        self.stop_admission()
        with self._lock:
            live = set(self._listeners)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self._lock:
                if not (live & set(self._listeners)):
                    break
            time.sleep(0.01)
        with self._lock:
            left = list(live & set(self._listeners))
        aborted = self.abort(left).result() if left else 0
        return len(live) - aborted, aborted

    # ---- the loop -----------------------------------------------------------------------
    def _changed(self, result: Reconfiguration) -> Reconfiguration:
        if not result.dry_run:
            if result.kind is not ReconfigurationKind.REBALANCE:
                self.repair.arm(time.monotonic())  # a loss or a rejoin leaves a repair to do
            self._notify_watchers()
        return result

    def _repair_step(self) -> None:
        """One budgeted step of the background repair, at a step boundary."""
        copies = self.repair.budget.copies(self.engine.cfg.expert_bytes())
        try:
            result = self.coordinator.rebalance(max_copies=copies)
        except Exception:  # the repair is an optimisation: serving goes on without it
            log.exception("background repair step failed; repair stopped")
            self.repair.cancel()
            return
        copied = result.experts_copied + result.experts_restored_from_host
        self.repair.stepped(time.monotonic(), result.steps_left, copied)
        log.info(
            "background repair step %d: %d expert copies in %.1f ms, %d steps left",
            self.repair.steps_taken,
            copied,
            result.pause_ms,
            result.steps_left,
        )
        self._notify_watchers()

    def _notify_watchers(self, status: MeshStatus | None = None) -> None:
        """On the loop thread: every watcher gets the current status (or `status`)."""
        if not self._watchers:
            return
        status = status or self._status_now()
        for watcher in list(self._watchers):
            try:
                watcher(status)
            except Exception:  # a broken watcher must not stop serving
                self.unwatch(watcher)

    @property
    def watcher_count(self) -> int:
        """Status watchers subscribed now (one per open WatchMeshStatus stream)."""
        with self._lock:
            return len(self._watchers)

    def unwatch(self, watcher) -> None:
        with self._lock:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    def _emit(self, event: TokenEvent | Finished) -> None:
        with self._lock:
            self._queued_tokens.pop(event.request_id, None)  # it has left the queue
        listener = self._listeners.get(event.request_id)
        if listener is None:
            return
        if isinstance(event, Finished):
            with self._lock:
                self._listeners.pop(event.request_id, None)
        try:
            listener(event)
        except Exception:  # a broken listener must not stop serving
            pass

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as error:  # nothing may end the loop silently
            log.exception("the runtime loop stopped")
            self._stop_with(error)
        for _, future in self._commands:
            future.set_exception(RuntimeStopped("the runtime stopped"))

    def _emit_step(self, events: list[TokenEvent]) -> None:
        """A step's tokens, then a Finished for each request that ended with them."""
        for event in events:
            self._emit(event)
        for request in self.engine.take_finished():
            self._emit(Finished(request))

    def _stop_with(self, error: BaseException) -> None:
        """The loop cannot go on: every request ends with the reason, watchers hear STOPPED,
        later calls fail at once."""
        reason = f"{type(error).__name__}: {error}"
        with self._lock:
            self.failure = error
            inbox, self._inbox = list(self._inbox), collections.deque()
            commands, self._commands = list(self._commands), collections.deque()
        for _, future in commands:
            future.set_exception(RuntimeStopped(f"the runtime stopped: {reason}"))
        try:
            status = self._status_now()
            status.state = MeshState.STOPPED
            self._notify_watchers(status)
        except Exception:
            log.exception("could not report the final mesh status")
        try:
            self._emit_step(self.engine.take_events())  # what the last step had recorded
        except Exception:
            log.exception("could not hand out the last step's tokens")
        live = [r for r in self.engine.journal if not r.done] + inbox
        for request in live:
            if not request.done:
                request.finish_reason = FinishReason.ABORTED
                request.error = f"the runtime stopped: {reason}"
            self._emit(Finished(request))

    def _serve(self) -> None:
        engine = self.engine
        while True:
            with self._lock:
                while not (
                    self._stopping
                    or self._commands
                    or self._inbox
                    or engine.has_work()
                    or self.repair.is_due(time.monotonic())
                ):
                    wait = self.repair.seconds_until_due(time.monotonic())
                    self._lock.wait(timeout=0.5 if wait is None else min(0.5, wait))
                if self._stopping:
                    break
                commands, self._commands = list(self._commands), collections.deque()
                inbox, self._inbox = list(self._inbox), collections.deque()
            for fn, future in commands:
                try:
                    result = fn()
                except Exception as error:
                    self._emit_step(engine.take_events())
                    future.set_exception(error)
                    continue
                # Tokens an operation read back (a reconfiguration settles the launched step)
                # go out before its answer.
                self._emit_step(engine.take_events())
                future.set_result(result)
            for request in inbox:
                if request.done:
                    continue
                try:
                    engine.enqueue(request)  # validated by submit()
                except RequestError:
                    request.finish_reason = FinishReason.ABORTED
                    self._emit(Finished(request))
            if self.repair.is_due(time.monotonic()):
                self._repair_step()
            if engine.has_work():
                self._step()

    def _step(self) -> None:
        before = self.engine.mesh.epoch
        detections = len(self.stepper.detections)
        try:
            events = self.stepper.step()
        except StepFailed as failed:
            log.error("%s; %d requests ended with the error", failed, len(failed.ended))
            self._emit_step(self.engine.take_events())  # recorded before it failed
            for request in failed.ended:
                self._emit(Finished(request))
            if self.stepper.failed_steps >= FATAL_FAILED_STEPS:
                raise
            return
        self.step_count += 1
        self.tokens_generated += len(events)
        self._emit_step(events)
        if len(self.stepper.detections) != detections:
            self.repair.arm(time.monotonic())  # a detected loss leaves a repair to do
        if self.engine.mesh.epoch != before or len(self.stepper.detections) != detections:
            self._notify_watchers()
