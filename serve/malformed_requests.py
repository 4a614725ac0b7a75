"""Request bytes that do not parse as the method's message: INVALID_ARGUMENT, not UNKNOWN.

grpc.aio deserializes a request before the servicer runs; when the parser raises, the call ends
UNKNOWN and the server logs a full traceback, on every such call. The interceptor swaps each
unary-request handler's parser for one that returns `Malformed` instead of raising, and ends
the call with INVALID_ARGUMENT before the servicer sees it. Streamed requests (reflection) are
left to grpc.
"""

from __future__ import annotations

import inspect
import logging

import grpc

log = logging.getLogger("elastic_moe.serve")


class Malformed:
    """What the lenient parser returns for bytes that are not the expected message."""

    def __init__(self, message_type: str, error: Exception):
        self.message_type, self.error = message_type, error

    def describe(self) -> str:
        reason = str(self.error) or type(self.error).__name__
        return f"the request bytes do not parse as a {self.message_type} message ({reason})"


def lenient(deserialize):
    """`deserialize`, returning Malformed where it would raise."""
    owner = getattr(deserialize, "__self__", None)  # Message.FromString is bound to its class
    descriptor = getattr(owner, "DESCRIPTOR", None)
    message_type = getattr(descriptor, "full_name", "request")

    def parse(raw: bytes):
        try:
            return deserialize(raw)
        except Exception as error:  # DecodeError, or whatever a parser raises on hostile bytes
            return Malformed(message_type, error)

    return parse


async def _refuse(request: Malformed, context) -> None:
    log.debug("refused malformed request bytes: %s", request.describe())
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())


def _guard_unary(behavior):
    async def guarded(request, context):
        if isinstance(request, Malformed):
            await _refuse(request, context)
        return await behavior(request, context)

    return guarded


def _guard_stream(behavior):
    # A streaming servicer either yields (an async generator) or writes through
    # context.write (a coroutine, like grpc's health Watch); the guard keeps its kind.
    if inspect.isasyncgenfunction(behavior):

        async def guarded_generator(request, context):
            if isinstance(request, Malformed):
                await _refuse(request, context)
            async for response in behavior(request, context):
                yield response

        return guarded_generator
    return _guard_unary(behavior)


class MalformedRequestInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        behavior = handler.unary_stream or handler.unary_unary
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler  # a synchronous servicer: not one of this server's
        parse = lenient(handler.request_deserializer)
        if handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(
                _guard_stream(handler.unary_stream),
                request_deserializer=parse,
                response_serializer=handler.response_serializer,
            )
        return grpc.unary_unary_rpc_method_handler(
            _guard_unary(handler.unary_unary),
            request_deserializer=parse,
            response_serializer=handler.response_serializer,
        )
