"""Prometheus metrics of one server, in its own registry, optionally exposed over HTTP.

The server's request listeners and mesh watcher feed them; the listeners run on the runtime's
loop thread (prometheus_client metrics are thread-safe).
"""

from __future__ import annotations

import threading
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from elastic_moe.reconfiguration import MeshStatus, Reconfiguration

LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
PAUSE_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class RequestClock:
    """Timestamps of one request, kept by its listener (only the loop thread touches it)."""

    __slots__ = ("arrived", "last_token", "tokens")

    def __init__(self) -> None:
        self.arrived = time.monotonic()
        self.last_token: float | None = None
        self.tokens = 0


class ServerMetrics:
    PREFIX = "elastic_moe_"

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        p, r = self.PREFIX, self.registry
        self.time_to_first_token = Histogram(
            p + "time_to_first_token_seconds",
            "Arrival of a request to its first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inter_token_latency = Histogram(
            p + "inter_token_latency_seconds",
            "Time between two consecutive tokens of one request (a reconfiguration's pause "
            "shows up here).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            p + "queue_time_seconds",
            "Arrival of a request to the start of the engine step that prefilled it "
            "(estimated as the end of the step before).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_length = Gauge(
            p + "queue_length", "Requests accepted and waiting for their first token.", registry=r
        )
        self.running_requests = Gauge(
            p + "running_requests", "Requests generating tokens.", registry=r
        )
        self.tokens_generated = Counter(
            p + "tokens_generated", "Tokens generated and sent.", registry=r
        )
        self.requests = Counter(
            p + "requests_finished", "Finished requests.", ["finish_reason"], registry=r
        )
        self.rejected = Counter(
            p + "requests_rejected", "Requests refused at admission.", ["code"], registry=r
        )
        self.reconfigurations = Counter(
            p + "reconfigurations",
            "Mesh reconfigurations, by kind of cause (fail, detected, rejoin, rebalance).",
            ["cause"],
            registry=r,
        )
        self.reconfiguration_pause = Histogram(
            p + "reconfiguration_pause_seconds",
            "How long requests made no progress during a reconfiguration.",
            ["cause"],
            buckets=PAUSE_BUCKETS,
            registry=r,
        )
        self.expert_slots_verified = Counter(
            p + "expert_slots_verified",
            "Expert slots checked against their expert's checksum on the device (every slot a "
            "reconfiguration wrote, and every slot of an on-demand VerifyExperts).",
            registry=r,
        )
        self.expert_slots_wrong = Counter(
            p + "expert_slots_wrong",
            "Expert slots found holding weights other than their expert's (each was rewritten "
            "from the host copy before serving, unless a VerifyExperts asked only to check).",
            registry=r,
        )
        self.mesh_epoch = Gauge(p + "mesh_epoch", "The mesh epoch.", registry=r)
        self.live_devices = Gauge(
            p + "live_devices", "Devices serving in the current mesh.", registry=r
        )
        self.min_live_replicas = Gauge(
            p + "min_live_replicas", "Fewest live replicas of any expert.", registry=r
        )
        self._last_reconfiguration: Reconfiguration | None = None
        self._step = -1
        self._step_started = 0.0  # end of the step before the current one
        self._last_event = 0.0
        self._lock = threading.Lock()
        self._http = None

    # ---- requests (called from the runtime's loop thread) --------------------------------
    def request_accepted(self) -> RequestClock:
        self.queue_length.inc()
        return RequestClock()

    def request_rejected(self, code: str) -> None:
        """A request refused before it was accepted (bad input)."""
        self.rejected.labels(code=code).inc()

    def request_refused(self, clock: RequestClock, code: str) -> None:
        """A request accepted by request_accepted() that the runtime then refused."""
        self.queue_length.dec()
        self.rejected.labels(code=code).inc()

    def token(self, clock: RequestClock, step: int) -> None:
        now = time.monotonic()
        if step != self._step:
            self._step, self._step_started = step, self._last_event
        self._last_event = now
        if clock.last_token is None:
            self.time_to_first_token.observe(now - clock.arrived)
            self.queue_time.observe(max(0.0, self._step_started - clock.arrived))
            self.queue_length.dec()
            self.running_requests.inc()
        else:
            self.inter_token_latency.observe(now - clock.last_token)
        clock.last_token = now
        clock.tokens += 1
        self.tokens_generated.inc()

    def request_finished(self, clock: RequestClock, finish_reason: str) -> None:
        if clock.last_token is None:
            self.queue_length.dec()
        else:
            self.running_requests.dec()
        self.requests.labels(finish_reason=finish_reason).inc()

    # ---- the mesh -----------------------------------------------------------------------
    def mesh_changed(self, status: MeshStatus, initial: bool = False) -> None:
        """Updates the mesh gauges; counts status.last once (initial: counts nothing, the
        reconfiguration happened before this server started)."""
        self.mesh_epoch.set(status.epoch)
        self.live_devices.set(sum(d.expert_slots > 0 for d in status.devices))
        self.min_live_replicas.set(status.min_live_replicas)
        last = status.last
        with self._lock:
            if last is None or last is self._last_reconfiguration:
                return
            seen = self._last_reconfiguration
            if seen is not None and (seen.to_epoch, seen.cause) == (last.to_epoch, last.cause):
                return
            self._last_reconfiguration = last
        if initial:
            return
        self.experts_verified(last.slots_verified, last.slots_repaired)
        kind = last.kind.value
        self.reconfigurations.labels(cause=kind).inc()
        self.reconfiguration_pause.labels(cause=kind).observe(last.pause_ms / 1000)

    def experts_verified(self, checked: int, wrong: int) -> None:
        self.expert_slots_verified.inc(checked)
        self.expert_slots_wrong.inc(wrong)

    # ---- exposition ---------------------------------------------------------------------
    def serve_http(self, port: int, addr: str = "127.0.0.1") -> int:
        """Serves /metrics on addr:port (0 = an ephemeral port); returns the bound port."""
        self.stop_http()
        self._http, _ = start_http_server(port, addr=addr, registry=self.registry)
        return int(self._http.server_port)

    def stop_http(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
