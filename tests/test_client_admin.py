"""The client's Admin address and token, as a newcomer meets them: an Admin call that finds no
server says which address it tried (and how to give another), and a missing token says how to
send one, on the CLI and in Python."""

from __future__ import annotations

import asyncio
import socket

import grpc
import pytest

from serve.auth import check_token
from serve.cli_common import describe_rpc_error
from serve.client import DEFAULT_ADMIN_PORT, AdminUnreachable, AsyncClient, Client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_default_admin_address_is_named_with_how_to_change_it():
    if listening(DEFAULT_ADMIN_PORT):
        pytest.skip(f"something listens on 127.0.0.1:{DEFAULT_ADMIN_PORT}")
    with Client(f"127.0.0.1:{free_port()}", admin_token="", timeout=10) as client:
        with pytest.raises(AdminUnreachable) as caught:
            client.mesh_status()
    error = caught.value
    assert isinstance(error, grpc.RpcError) and error.code() == grpc.StatusCode.UNAVAILABLE
    message = str(error)
    assert message.startswith(f"cannot reach 127.0.0.1:{DEFAULT_ADMIN_PORT}, the Admin address")
    assert "admin_target='HOST:PORT'" in message
    assert error.details() == message and error.admin_target == f"127.0.0.1:{DEFAULT_ADMIN_PORT}"


def test_an_explicit_admin_address_is_named_in_every_kind_of_call():
    admin = f"127.0.0.1:{free_port()}"
    with Client(f"127.0.0.1:{free_port()}", admin_target=admin, admin_token="", timeout=10) as c:
        for call in (c.mesh_status, lambda: c.fail([3]), c.rebalance, lambda: next(c.watch_mesh())):
            with pytest.raises(AdminUnreachable, match=f"cannot reach {admin}, the Admin address"):
                call()
        stream = c.watch_mesh()
        stream.cancel()  # the call's own methods pass through
    # The CLI reports it as one line, naming the address once.
    unreachable = AdminUnreachable(FakeError(grpc.StatusCode.UNAVAILABLE), admin, False)
    line = describe_rpc_error(unreachable, admin)
    assert line.count(admin) == 1 and line.startswith(f"cannot reach {admin}")


def test_the_async_client_names_the_admin_address_too():
    admin = f"127.0.0.1:{free_port()}"

    async def calls() -> None:
        client = AsyncClient(f"127.0.0.1:{free_port()}", admin_target=admin, admin_token="")
        try:
            with pytest.raises(AdminUnreachable, match=admin):
                await client.mesh_status()
            with pytest.raises(AdminUnreachable, match=admin):
                async for _ in client.watch_mesh():
                    pass
        finally:
            await client.close()

    asyncio.run(calls())


class FakeError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str = "connection refused"):
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


def test_a_missing_admin_token_says_how_to_send_one():
    code, message = check_token([], "s3cret")
    assert code == grpc.StatusCode.UNAUTHENTICATED
    for way in ("--admin-token", "$ELASTIC_MOE_ADMIN_TOKEN", "admin_token=", "Bearer <token>"):
        assert way in message, way
    line = describe_rpc_error(FakeError(code, message), "127.0.0.1:50052")
    assert line.startswith("127.0.0.1:50052 needs the admin token: pass --admin-token TOKEN")
    wrong = describe_rpc_error(FakeError(grpc.StatusCode.PERMISSION_DENIED, "wrong"), "h:1")
    assert "refused the admin token" in wrong and "--admin-token" in wrong
