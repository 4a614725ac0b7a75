"""The client library of elastic-moe (used by the CLI and the notebooks).

    with Client("127.0.0.1:50051") as client:
        done = client.generate("hello", max_tokens=16)
        print(done.token_ids, done.text, done.finish_reason)
        for response in client.generate_stream([1, 2, 3], max_tokens=8):
            ...
        client.fail([3], reason="maintenance")

`AsyncClient` has the same methods as coroutines and async iterators (grpc.aio). Errors are the
server's `grpc.RpcError` unchanged: read `.code()` and `.details()`; an Admin call that cannot
reach its server raises `AdminUnreachable` (a `grpc.RpcError` too) naming the address it tried.

The Admin API listens on its own port, so the client needs two addresses:

    Client("10.0.0.7:50051", admin_target="10.0.0.7:6000", admin_token="s3cret")

`admin_target` defaults to the host of `target` on port 50052 (the server's default
--admin-port); pass it whenever the server runs with another --admin-port (or --admin-port 0).
`admin_token` defaults to $ELASTIC_MOE_ADMIN_TOKEN; it is sent on Admin calls only, as
`authorization: Bearer <token>`, and needed when the server has one (`--admin-token`).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from serve.auth import bearer_metadata, resolve_admin_token
from serve.proto import elastic_moe_pb2 as pb
from serve.proto import elastic_moe_pb2_grpc as pb_grpc
from serve.status_convert import FINISH_REASON_NAMES

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_ADMIN_PORT = 50052


@dataclass
class Completion:
    request_id: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str = ""  # "stop", "length" or "aborted"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    reprefills: int = 0
    ttft_ms: float = 0.0
    epochs: list[int] = field(default_factory=list)  # mesh epoch that produced each token

    def add(self, response: pb.GenerateResponse) -> None:
        """Folds one streamed response into the completion."""
        self.request_id = self.request_id or response.request_id
        if response.HasField("chunk"):
            chunk = response.chunk
            if chunk.offset != len(self.token_ids):
                raise ValueError(
                    f"request {self.request_id}: chunk at offset {chunk.offset}, expected "
                    f"{len(self.token_ids)}"
                )
            self.token_ids.extend(chunk.token_ids)
            self.logprobs.extend(chunk.logprobs)
            self.epochs.extend([chunk.mesh_epoch] * len(chunk.token_ids))
            self.text += chunk.text
        elif response.HasField("complete"):
            c = response.complete
            self.finish_reason = FINISH_REASON_NAMES.get(c.finish_reason, "")
            self.prompt_tokens = c.prompt_tokens
            self.completion_tokens = c.completion_tokens
            self.reprefills = c.reprefills
            self.ttft_ms = c.ttft_ms


class AdminUnreachable(grpc.RpcError):
    """An Admin call found no server at `admin_target`. `code()` is UNAVAILABLE and `details()`
    names the address tried (and, when it was the default, how to give another); `error` is
    the original gRPC error."""

    def __init__(self, error: grpc.RpcError, admin_target: str, defaulted: bool):
        self.error, self.admin_target, self.defaulted = error, admin_target, defaulted
        super().__init__(self.details())

    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        where = f"cannot reach {self.admin_target}, the Admin address"
        if self.defaulted:
            where += (
                f" (by default the Generation host on port {DEFAULT_ADMIN_PORT}; pass "
                "admin_target='HOST:PORT' with the server's --admin-port)"
            )
        original = self.error.details() if callable(getattr(self.error, "details", None)) else ""
        return f"{where}: {original or self.error}"

    def __str__(self) -> str:
        return self.details()


def admin_target_for(target: str, port: int = DEFAULT_ADMIN_PORT) -> str:
    """The same host as `target` (host:port, [v6]:port, or a scheme:///host:port) on `port`."""
    scheme, sep, address = target.rpartition("///")
    host = address
    if address.startswith("["):
        host = address[: address.index("]") + 1]
    elif address.count(":") == 1:
        host = address.split(":")[0]
    return f"{scheme}{sep}{host}:{port}"


def generate_request(
    prompt: str | Sequence[int],
    max_tokens: int = 16,
    *,
    temperature: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
    stop_token_ids: Iterable[int] = (),
    request_id: str = "",
) -> pb.GenerateRequest:
    message = pb.GenerateRequest(
        request_id=request_id,
        max_tokens=max_tokens,
        sampling=pb.SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed),
        stop_token_ids=list(stop_token_ids),
    )
    if isinstance(prompt, str):
        message.text = prompt
    else:
        message.tokens.ids.extend(int(t) for t in prompt)
    return message


def _credentials(tls_ca: str | None) -> grpc.ChannelCredentials | None:
    if tls_ca is None:
        return None
    return grpc.ssl_channel_credentials(root_certificates=Path(tls_ca).read_bytes())


class _Base:
    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        *,
        admin_target: str | None = None,
        admin_token: str | None = None,
        timeout: float | None = None,
        tls_ca: str | None = None,
    ):
        """target: the Generation address (HOST:PORT). admin_target: the Admin address
        (default: target's host on port 50052). admin_token: sent on Admin calls (default
        $ELASTIC_MOE_ADMIN_TOKEN; "" for none). timeout: seconds per call (None: no limit).
        tls_ca: a PEM file of the CA that signed the server's certificate (TLS)."""
        self.target = target
        self._admin_defaulted = not admin_target
        self.admin_target = admin_target or admin_target_for(target)
        self.admin_token = resolve_admin_token(admin_token)
        self.timeout = timeout
        self._credentials = _credentials(tls_ca)
        self._admin_metadata = bearer_metadata(self.admin_token)

    def _timeout(self, timeout: float | None) -> float | None:
        return self.timeout if timeout is None else timeout

    def _operator_metadata(self, as_operator: bool) -> tuple[tuple[str, str], ...]:
        """The admin token on a Generation call, only when asked: the Generation port may
        face more of the network than the Admin port does."""
        if not as_operator:
            return ()
        if not self.admin_token:
            raise ValueError("as_operator=True needs admin_token (or $ELASTIC_MOE_ADMIN_TOKEN)")
        return self._admin_metadata

    @contextlib.contextmanager
    def _reaching_admin(self):
        """Turns "no server there" on the Admin port into AdminUnreachable (with the address)."""
        try:
            yield
        except grpc.RpcError as error:
            code = error.code() if callable(getattr(error, "code", None)) else None
            if code != grpc.StatusCode.UNAVAILABLE or isinstance(error, AdminUnreachable):
                raise
            raise AdminUnreachable(error, self.admin_target, self._admin_defaulted) from None


class _AdminStream:
    """A server stream of Admin messages (the call's other methods, like cancel(), pass
    through) whose errors go through _reaching_admin."""

    def __init__(self, call, reaching):
        self._call, self._reaching = call, reaching
        self._iterator = None

    def __iter__(self):
        return self

    def __next__(self):
        with self._reaching():
            return next(self._call)

    def __aiter__(self):
        return self

    async def __anext__(self):
        if self._iterator is None:
            self._iterator = self._call.__aiter__()
        with self._reaching():
            return await self._iterator.__anext__()

    def __getattr__(self, name: str):
        return getattr(self._call, name)


class Client(_Base):
    """A synchronous client (one channel per port, opened lazily for Admin)."""

    def __init__(self, target: str = DEFAULT_TARGET, **kw):
        super().__init__(target, **kw)
        self._channel = self._open(self.target)
        self._generation = pb_grpc.GenerationStub(self._channel)
        self._admin_channel: grpc.Channel | None = None
        self._admin_stub: pb_grpc.AdminStub | None = None

    def _open(self, target: str) -> grpc.Channel:
        if self._credentials is not None:
            return grpc.secure_channel(target, self._credentials)
        return grpc.insecure_channel(target)

    @property
    def _admin(self) -> pb_grpc.AdminStub:
        if self._admin_stub is None:
            self._admin_channel = self._open(self.admin_target)
            self._admin_stub = pb_grpc.AdminStub(self._admin_channel)
        return self._admin_stub

    # ---- Generation ---------------------------------------------------------------------
    def generate_stream(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 16,
        *,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
        stop_token_ids: Iterable[int] = (),
        request_id: str = "",
        timeout: float | None = None,
    ) -> Iterator[pb.GenerateResponse]:
        """The server's responses: Chunks, then one Complete. The returned call can also be
        cancelled (`.cancel()`), which aborts the request on the server."""
        message = generate_request(
            prompt,
            max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop_token_ids=stop_token_ids,
            request_id=request_id,
        )
        return self._generation.Generate(message, timeout=self._timeout(timeout))

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 16, **kw) -> Completion:
        completion = Completion()
        for response in self.generate_stream(prompt, max_tokens, **kw):
            completion.add(response)
        return completion

    def abort(self, request_ids: str | Iterable[str], *, as_operator: bool = False) -> int:
        """Aborts this client's own requests among `request_ids` (the server ignores the ids of
        requests another connection started); as_operator=True sends the admin token, with
        which any request may be aborted. Returns how many were aborted."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        return self._generation.Abort(
            pb.AbortRequest(request_ids=ids),
            timeout=self.timeout,
            metadata=self._operator_metadata(as_operator),
        ).aborted

    def model_info(self) -> pb.ModelInfo:
        return self._generation.GetModelInfo(pb.ModelInfoRequest(), timeout=self.timeout)

    # ---- Admin --------------------------------------------------------------------------
    def mesh_status(self) -> pb.MeshStatus:
        with self._reaching_admin():
            return self._admin.GetMeshStatus(
                pb.MeshStatusRequest(), timeout=self.timeout, metadata=self._admin_metadata
            )

    def watch_mesh(self) -> Iterator[pb.MeshStatus]:
        """The status now, then one after every change; `.cancel()` the result to stop."""
        call = self._admin.WatchMeshStatus(pb.MeshStatusRequest(), metadata=self._admin_metadata)
        return _AdminStream(call, self._reaching_admin)

    def fail(
        self, device_ids: Iterable[int], *, reason: str = "", op_id: str = "", dry_run: bool = False
    ) -> pb.ReconfigureResult:
        message = pb.FailDevicesRequest(
            device_ids=list(device_ids), reason=reason, op_id=op_id, dry_run=dry_run
        )
        with self._reaching_admin():
            return self._admin.FailDevices(
                message, timeout=self.timeout, metadata=self._admin_metadata
            )

    def rejoin(self, device_ids: Iterable[int], *, op_id: str = "") -> pb.ReconfigureResult:
        message = pb.RejoinDevicesRequest(device_ids=list(device_ids), op_id=op_id)
        with self._reaching_admin():
            return self._admin.RejoinDevices(
                message, timeout=self.timeout, metadata=self._admin_metadata
            )

    def rebalance(self, *, op_id: str = "", max_copies: int = 0) -> pb.ReconfigureResult:
        """max_copies > 0: one budgeted step (summary.steps_left says how many remain)."""
        with self._reaching_admin():
            return self._admin.Rebalance(
                pb.RebalanceRequest(op_id=op_id, max_copies=max_copies),
                timeout=self.timeout,
                metadata=self._admin_metadata,
            )

    def verify_experts(self, *, check_only: bool = False) -> pb.VerifyExpertsResult:
        """Checks every expert slot against its expert's checksum on the devices; wrong slots
        are rewritten from the host copy unless check_only."""
        with self._reaching_admin():
            return self._admin.VerifyExperts(
                pb.VerifyExpertsRequest(check_only=check_only),
                timeout=self.timeout,
                metadata=self._admin_metadata,
            )

    def drain(self, timeout_s: int = 30) -> pb.DrainResult:
        timeout = self.timeout if self.timeout is None else max(self.timeout, timeout_s + 30)
        with self._reaching_admin():
            return self._admin.Drain(
                pb.DrainRequest(timeout_s=timeout_s), timeout=timeout, metadata=self._admin_metadata
            )

    def close(self) -> None:
        self._channel.close()
        if self._admin_channel is not None:
            self._admin_channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncClient(_Base):
    """The same API on grpc.aio: coroutines, and async iterators for the streams. Create it
    inside the event loop that uses it."""

    def __init__(self, target: str = DEFAULT_TARGET, **kw):
        super().__init__(target, **kw)
        self._channel = self._open(self.target)
        self._generation = pb_grpc.GenerationStub(self._channel)
        self._admin_channel: grpc.aio.Channel | None = None
        self._admin_stub: pb_grpc.AdminStub | None = None

    def _open(self, target: str) -> grpc.aio.Channel:
        if self._credentials is not None:
            return grpc.aio.secure_channel(target, self._credentials)
        return grpc.aio.insecure_channel(target)

    @property
    def _admin(self) -> pb_grpc.AdminStub:
        if self._admin_stub is None:
            self._admin_channel = self._open(self.admin_target)
            self._admin_stub = pb_grpc.AdminStub(self._admin_channel)
        return self._admin_stub

    # ---- Generation ---------------------------------------------------------------------
    def generate_stream(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 16,
        *,
        temperature: float = 0.0,
        top_p: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
        stop_token_ids: Iterable[int] = (),
        request_id: str = "",
        timeout: float | None = None,
    ) -> AsyncIterator[pb.GenerateResponse]:
        """`async for response in client.generate_stream(...)`; `.cancel()` aborts."""
        message = generate_request(
            prompt,
            max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop_token_ids=stop_token_ids,
            request_id=request_id,
        )
        return self._generation.Generate(message, timeout=self._timeout(timeout))

    async def generate(self, prompt: str | Sequence[int], max_tokens: int = 16, **kw) -> Completion:
        completion = Completion()
        async for response in self.generate_stream(prompt, max_tokens, **kw):
            completion.add(response)
        return completion

    async def abort(self, request_ids: str | Iterable[str], *, as_operator: bool = False) -> int:
        """See Client.abort."""
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        response = await self._generation.Abort(
            pb.AbortRequest(request_ids=ids),
            timeout=self.timeout,
            metadata=self._operator_metadata(as_operator),
        )
        return response.aborted

    async def model_info(self) -> pb.ModelInfo:
        return await self._generation.GetModelInfo(pb.ModelInfoRequest(), timeout=self.timeout)

    # ---- Admin --------------------------------------------------------------------------
    async def mesh_status(self) -> pb.MeshStatus:
        with self._reaching_admin():
            return await self._admin.GetMeshStatus(
                pb.MeshStatusRequest(), timeout=self.timeout, metadata=self._admin_metadata
            )

    def watch_mesh(self) -> AsyncIterator[pb.MeshStatus]:
        call = self._admin.WatchMeshStatus(pb.MeshStatusRequest(), metadata=self._admin_metadata)
        return _AdminStream(call, self._reaching_admin)

    async def fail(
        self, device_ids: Iterable[int], *, reason: str = "", op_id: str = "", dry_run: bool = False
    ) -> pb.ReconfigureResult:
        message = pb.FailDevicesRequest(
            device_ids=list(device_ids), reason=reason, op_id=op_id, dry_run=dry_run
        )
        with self._reaching_admin():
            return await self._admin.FailDevices(
                message, timeout=self.timeout, metadata=self._admin_metadata
            )

    async def rejoin(self, device_ids: Iterable[int], *, op_id: str = "") -> pb.ReconfigureResult:
        message = pb.RejoinDevicesRequest(device_ids=list(device_ids), op_id=op_id)
        with self._reaching_admin():
            return await self._admin.RejoinDevices(
                message, timeout=self.timeout, metadata=self._admin_metadata
            )

    async def rebalance(self, *, op_id: str = "", max_copies: int = 0) -> pb.ReconfigureResult:
        with self._reaching_admin():
            return await self._admin.Rebalance(
                pb.RebalanceRequest(op_id=op_id, max_copies=max_copies),
                timeout=self.timeout,
                metadata=self._admin_metadata,
            )

    async def verify_experts(self, *, check_only: bool = False) -> pb.VerifyExpertsResult:
        with self._reaching_admin():
            return await self._admin.VerifyExperts(
                pb.VerifyExpertsRequest(check_only=check_only),
                timeout=self.timeout,
                metadata=self._admin_metadata,
            )

    async def drain(self, timeout_s: int = 30) -> pb.DrainResult:
        timeout = self.timeout if self.timeout is None else max(self.timeout, timeout_s + 30)
        with self._reaching_admin():
            return await self._admin.Drain(
                pb.DrainRequest(timeout_s=timeout_s), timeout=timeout, metadata=self._admin_metadata
            )

    async def close(self) -> None:
        await self._channel.close()
        if self._admin_channel is not None:
            await self._admin_channel.close()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
