"""The admin token: every call of the Admin service must carry `authorization: Bearer <token>`.

Health checks and reflection on the admin port stay open (load balancers and grpcurl use them).
"""

from __future__ import annotations

import hmac
import ipaddress
import os

import grpc

TOKEN_ENV = "ELASTIC_MOE_ADMIN_TOKEN"
ADMIN_PREFIX = "/elastic_moe.v1.Admin/"


def resolve_admin_token(token: str | None) -> str | None:
    """The token to require: the argument, else $ELASTIC_MOE_ADMIN_TOKEN; "" means none."""
    if token is None:
        token = os.environ.get(TOKEN_ENV, "")
    return token or None


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata that carries the admin token (none when token is None)."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def check_token(metadata, token: str) -> tuple[grpc.StatusCode, str] | None:
    """None when the metadata carries `token`; else the status code and message to refuse with."""
    values = [v for k, v in (metadata or ()) if k.lower() == "authorization"]
    if not values:
        return (
            grpc.StatusCode.UNAUTHENTICATED,
            "this Admin call needs the admin token: the elastic-moe CLI takes --admin-token or "
            f"${TOKEN_ENV}, serve.client.Client admin_token= (or the same variable), other gRPC "
            "clients send metadata 'authorization: Bearer <token>'",
        )
    scheme, _, sent = str(values[0]).partition(" ")
    if scheme.lower() != "bearer" or not sent:
        return (
            grpc.StatusCode.UNAUTHENTICATED,
            "the authorization metadata must be 'Bearer <token>'",
        )
    if not hmac.compare_digest(sent.strip().encode(), token.encode()):
        return grpc.StatusCode.PERMISSION_DENIED, "wrong admin token"
    return None


class AdminTokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses Admin calls that lack the token (UNAUTHENTICATED) or carry a wrong one
    (PERMISSION_DENIED) before they reach the servicer."""

    def __init__(self, token: str, prefix: str = ADMIN_PREFIX):
        self.token, self.prefix = token, prefix

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or not handler_call_details.method.startswith(self.prefix):
            return handler
        refusal = check_token(handler_call_details.invocation_metadata, self.token)
        if refusal is None:
            return handler
        code, message = refusal

        async def deny(request, context):
            await context.abort(code, message)

        kind = {
            (False, False): grpc.unary_unary_rpc_method_handler,
            (False, True): grpc.unary_stream_rpc_method_handler,
            (True, False): grpc.stream_unary_rpc_method_handler,
            (True, True): grpc.stream_stream_rpc_method_handler,
        }[(handler.request_streaming, handler.response_streaming)]
        return kind(
            deny,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
