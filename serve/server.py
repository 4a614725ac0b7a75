"""The gRPC server: Generation and Admin on two ports, health, reflection, metrics, drain.

    server = ElasticServer(runtime, ServerConfig(port=0, admin_port=0))
    await server.start(); print(server.ports); await server.wait()

Generation (with health and reflection) listens on `host:port`; Admin (with health and
reflection) on `admin_host:admin_port`, which is 127.0.0.1 unless an admin token is set: the
server refuses to put Admin on a non-loopback address without a token. With a token every Admin
call must carry `authorization: Bearer <token>`. Readiness ("elastic_moe.v1.Generation" in
grpc.health.v1) is SERVING while the mesh serves every expert and NOT_SERVING once draining.
The server does not own the runtime: `stop()` leaves it running (`serve()` stops it).
`ServerThread` runs a server on its own event loop in a background thread (tests, notebooks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from elastic_moe.reconfiguration import MeshState, MeshStatus
from elastic_moe.runtime import Runtime
from models.tokenizer import ByteTokenizer, Tokenizer
from serve.admin_service import AdminService
from serve.auth import AdminTokenInterceptor, is_loopback, resolve_admin_token
from serve.generation_service import GenerationService
from serve.malformed_requests import MalformedRequestInterceptor
from serve.metrics import ServerMetrics
from serve.proto import elastic_moe_pb2 as pb
from serve.proto import elastic_moe_pb2_grpc as pb_grpc

log = logging.getLogger("elastic_moe.serve")

GENERATION_SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name
ADMIN_SERVICE = pb.DESCRIPTOR.services_by_name["Admin"].full_name
READINESS = GENERATION_SERVICE  # the health service name whose status is readiness
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
GRPC_OPTIONS = [("grpc.so_reuseport", 0)]  # a port in use is an error, not a shared port


@dataclass
class ServerConfig:
    host: str = "[::]"  # Generation's address (all interfaces)
    port: int = 50051  # 0: an ephemeral port (see ElasticServer.ports)
    admin_port: int = 50052
    admin_host: str | None = None  # None: 127.0.0.1, or `host` when an admin token is set
    admin_token: str | None = None  # None: $ELASTIC_MOE_ADMIN_TOKEN; "": no token
    tls_cert: str | None = None  # PEM files; both or neither
    tls_key: str | None = None
    metrics_port: int | None = None  # Prometheus /metrics; None or 0: off
    metrics_host: str = "127.0.0.1"
    drain_timeout_s: float = 30.0  # Drain with timeout_s 0, and SIGTERM/SIGINT
    stop_grace_s: float = 5.0
    handle_signals: bool = False  # SIGTERM/SIGINT: drain, then stop (main thread only)
    reflection: bool = True


@dataclass(frozen=True)
class BoundPorts:
    generation: int
    admin: int
    metrics: int | None = None


def _address(host: str, port: int) -> str:
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _bind(server: grpc.aio.Server, host: str, port: int, credentials) -> int:
    """Binds host:port (falls back from [::] to 0.0.0.0 without IPv6); returns the port."""
    hosts = [host] + (["0.0.0.0"] if host in ("[::]", "::") else [])
    for candidate in hosts:
        address = _address(candidate, port)
        try:
            if credentials is not None:
                bound = server.add_secure_port(address, credentials)
            else:
                bound = server.add_insecure_port(address)
        except RuntimeError:
            bound = 0
        if bound:
            return bound
    raise OSError(f"cannot bind {_address(host, port)} (in use, or not an address of this host)")


class ElasticServer:
    def __init__(
        self,
        runtime: Runtime,
        config: ServerConfig | None = None,
        tokenizer: Tokenizer | None = None,
    ):
        self.runtime = runtime
        self.config = config = config or ServerConfig()
        self.admin_token = resolve_admin_token(config.admin_token)
        self.admin_host = config.admin_host or (
            "127.0.0.1" if not self.admin_token else config.host
        )
        if not self.admin_token and not is_loopback(self.admin_host):
            raise ValueError(
                f"refusing to serve Admin on {self.admin_host} without an admin token: set "
                "admin_token (--admin-token or ELASTIC_MOE_ADMIN_TOKEN) or bind it to 127.0.0.1"
            )
        if bool(config.tls_cert) != bool(config.tls_key):
            raise ValueError("TLS needs both tls_cert and tls_key")
        vocab_size = runtime.engine.cfg.vocab_size
        self.tokenizer = tokenizer if tokenizer is not None else ByteTokenizer(vocab_size)
        self.tokenizer_kind = "byte" if isinstance(self.tokenizer, ByteTokenizer) else "hf"
        self.metrics = ServerMetrics()
        self.draining = False
        self._ports: BoundPorts | None = None
        self._servers: list[grpc.aio.Server] = []
        self._health: list[health.aio.HealthServicer] = []
        self._unwatch = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: set[asyncio.Task] = set()
        self._stopped: asyncio.Event | None = None
        self._shutting_down = False

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> ElasticServer:
        config, runtime = self.config, self.runtime
        self._loop = loop = asyncio.get_running_loop()
        self._stopped = asyncio.Event()
        credentials = None
        if config.tls_cert:
            credentials = grpc.ssl_server_credentials(
                [(Path(config.tls_key).read_bytes(), Path(config.tls_cert).read_bytes())]
            )
        # Bytes that are not the request message: INVALID_ARGUMENT (after the token check).
        generation = grpc.aio.server(
            interceptors=[MalformedRequestInterceptor()], options=GRPC_OPTIONS
        )
        interceptors = [AdminTokenInterceptor(self.admin_token)] if self.admin_token else []
        interceptors.append(MalformedRequestInterceptor())
        admin = grpc.aio.server(interceptors=interceptors, options=GRPC_OPTIONS)
        generation_service = GenerationService(
            runtime, self.tokenizer, self.tokenizer_kind, self.metrics, self.admin_token
        )
        pb_grpc.add_GenerationServicer_to_server(generation_service, generation)
        pb_grpc.add_AdminServicer_to_server(AdminService(runtime, self.drain, self.metrics), admin)
        for server, service in ((generation, GENERATION_SERVICE), (admin, ADMIN_SERVICE)):
            checker = health.aio.HealthServicer()
            health_pb2_grpc.add_HealthServicer_to_server(checker, server)
            self._health.append(checker)
            if config.reflection:
                names = (service, health.SERVICE_NAME, reflection.SERVICE_NAME)
                reflection.enable_server_reflection(names, server)
        self._servers = [generation, admin]
        try:
            port = _bind(generation, config.host, config.port, credentials)
            admin_port = _bind(admin, self.admin_host, config.admin_port, credentials)
            status = await loop.run_in_executor(None, runtime.status)
            self.metrics.mesh_changed(status, initial=True)
            await self._set_readiness(self._ready(status))
            self._unwatch = runtime.watch(self._on_status)
            for server in self._servers:
                await server.start()
            metrics_port = None
            if config.metrics_port:
                metrics_port = self.metrics.serve_http(config.metrics_port, config.metrics_host)
        except BaseException:
            await self.stop(0)  # frees whatever was bound
            raise
        self._ports = BoundPorts(port, admin_port, metrics_port)
        if config.handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_signal, sig)
        log.info(
            "serving Generation on %s, Admin on %s%s",
            _address(config.host, port),
            _address(self.admin_host, admin_port),
            " (admin token required)" if self.admin_token else "",
        )
        return self

    @property
    def ports(self) -> BoundPorts:
        if self._ports is None:
            raise RuntimeError("the server is not started")
        return self._ports

    async def wait(self) -> None:
        """Returns once the server has stopped."""
        await self._stopped.wait()

    async def stop(self, grace: float | None = None) -> None:
        """Stops both ports (in-flight calls get `grace` seconds, then are cancelled and their
        requests aborted). The runtime keeps running."""
        if self._stopped is None or self._stopped.is_set():
            return
        grace = self.config.stop_grace_s if grace is None else grace
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None
        for checker in self._health:
            await checker.enter_graceful_shutdown()
        await asyncio.gather(*(server.stop(grace) for server in self._servers))
        self.metrics.stop_http()
        if self.config.handle_signals:
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._loop.remove_signal_handler(sig)
        self._stopped.set()

    async def drain(self, timeout_s: float | None = None) -> tuple[int, int]:
        """Readiness NOT_SERVING, new requests UNAVAILABLE; running requests get timeout_s to
        finish, then are aborted. Returns (completed, aborted)."""
        self.draining = True
        await self._set_readiness(NOT_SERVING)
        timeout_s = self.config.drain_timeout_s if timeout_s is None else timeout_s
        return await asyncio.get_running_loop().run_in_executor(None, self.runtime.drain, timeout_s)

    async def shutdown(self) -> None:
        """Drain (config.drain_timeout_s), then stop: what SIGTERM does."""
        if self._shutting_down:
            return
        self._shutting_down = True
        try:
            completed, aborted = await self.drain()
            log.info("drained: %d requests completed, %d aborted", completed, aborted)
        finally:
            await self.stop()

    # ---- readiness and the mesh ---------------------------------------------------------
    def _ready(self, status: MeshStatus) -> int:
        serving = (
            not self.draining
            and status.state not in (MeshState.DRAINING, MeshState.STOPPED)
            and status.min_live_replicas >= 1
        )
        return SERVING if serving else NOT_SERVING

    async def _set_readiness(self, value: int) -> None:
        for checker in self._health:
            await checker.set(READINESS, value)

    def _on_status(self, status: MeshStatus) -> None:  # on the runtime's loop thread
        self.metrics.mesh_changed(status)
        self._loop.call_soon_threadsafe(self._spawn, self._set_readiness(self._ready(status)))

    def _spawn(self, coroutine) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _on_signal(self, sig: int) -> None:
        if self._shutting_down:
            log.warning("%s again: stopping now", signal.Signals(sig).name)
            self._spawn(self.stop(0))
            return
        log.info("%s: draining, then stopping", signal.Signals(sig).name)
        self._spawn(self.shutdown())


async def serve(
    runtime: Runtime,
    config: ServerConfig | None = None,
    tokenizer: Tokenizer | None = None,
    *,
    stop_runtime: bool = True,
) -> None:
    """Serves until stopped (with config.handle_signals, SIGTERM/SIGINT drain, then stop);
    then stops the runtime unless stop_runtime=False."""
    server = ElasticServer(runtime, config, tokenizer)
    try:
        await server.start()
        await server.wait()
    finally:
        await server.stop()
        if stop_runtime:
            await asyncio.get_running_loop().run_in_executor(None, runtime.stop)


class ServerThread:
    """An ElasticServer on its own event loop in a daemon thread, driven from sync code.

    with ServerThread(runtime, ServerConfig(port=0, admin_port=0)) as server:
        client = Client(f"127.0.0.1:{server.ports.generation}", ...)
    """

    def __init__(
        self,
        runtime: Runtime,
        config: ServerConfig | None = None,
        tokenizer: Tokenizer | None = None,
    ):
        self.server = ElasticServer(runtime, config, tokenizer)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="elastic-moe-grpc", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        # Let cancelled handlers run their clean-up before the loop closes.
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        with contextlib.suppress(Exception):
            self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.close()

    def start(self, timeout: float = 120) -> ServerThread:
        self._thread.start()
        try:
            self.call(self.server.start(), timeout)
        except BaseException:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)
            raise
        return self

    def call(self, coroutine, timeout: float | None = None):
        """Runs a coroutine on the server's loop and returns its result."""
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    @property
    def ports(self) -> BoundPorts:
        return self.server.ports

    def drain(self, timeout_s: float | None = None) -> tuple[int, int]:
        return self.call(self.server.drain(timeout_s))

    def stop(self, grace: float | None = 1.0) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.call(self.server.stop(grace), timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout=30)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
