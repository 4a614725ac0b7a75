"""The Admin service: mesh status (one-shot and watched), fail / rejoin / rebalance, drain,
and the on-demand check of every expert slot (VerifyExperts).

Every operation runs on the runtime's loop thread at a step boundary; here it is awaited as a
future and its errors become status codes: UnknownDevice -> NOT_FOUND, ReconfigurationRefused ->
FAILED_PRECONDITION, a bad argument -> INVALID_ARGUMENT, a stopped runtime -> UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from concurrent.futures import Future

import grpc

from elastic_moe.reconfiguration import MeshStatus, ReconfigurationRefused, UnknownDevice
from elastic_moe.runtime import Draining, Runtime
from serve.metrics import ServerMetrics
from serve.proto import elastic_moe_pb2 as pb
from serve.proto import elastic_moe_pb2_grpc as pb_grpc
from serve.status_convert import (
    integrity_report_to_proto,
    mesh_status_to_proto,
    reconfigure_result,
)

# Bounds on what one Admin call may carry (the cause string is kept in every status).
MAX_DEVICE_IDS = 4096
MAX_REASON_CHARS = 1024
MAX_OP_ID_CHARS = 256
MAX_ERROR_CHARS = 2000  # of an error's message in a status (a worker's traceback is longer)


def check_sizes(message) -> None:
    """ValueError when a reconfiguration request carries more than any mesh needs."""
    ids = getattr(message, "device_ids", ())
    if len(ids) > MAX_DEVICE_IDS:
        raise ValueError(f"at most {MAX_DEVICE_IDS} device_ids per call, got {len(ids)}")
    for field, limit in (("reason", MAX_REASON_CHARS), ("op_id", MAX_OP_ID_CHARS)):
        text = getattr(message, field, "")
        if len(text) > limit:
            raise ValueError(f"{field} has {len(text)} characters; at most {limit}")


def status_code_of(error: BaseException) -> grpc.StatusCode:
    if isinstance(error, UnknownDevice):
        return grpc.StatusCode.NOT_FOUND
    if isinstance(error, ReconfigurationRefused):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, Draining):
        return grpc.StatusCode.UNAVAILABLE
    if isinstance(error, (ValueError, TypeError)):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


class AdminService(pb_grpc.AdminServicer):
    def __init__(
        self,
        runtime: Runtime,
        drain: Callable[[float], Awaitable[tuple[int, int]]],
        metrics: ServerMetrics,
    ):
        """drain(timeout_s) is the server's drain (it also flips readiness)."""
        self.runtime = runtime
        self._drain = drain
        self.metrics = metrics

    async def _operation(
        self, message, start: Callable[[], Future], context
    ) -> pb.ReconfigureResult:
        try:
            check_sizes(message)
        except ValueError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        return reconfigure_result(await self._run(start, context))

    async def _run(self, start: Callable[[], Future], context):
        """Awaits a loop-thread operation; its errors become status codes."""
        try:
            return await asyncio.wrap_future(start())
        except Exception as error:  # mapped to a status code with the runtime's message
            code = status_code_of(error)
            message = str(error) or type(error).__name__
            if code is grpc.StatusCode.INTERNAL:
                message = f"{type(error).__name__}: {message}"
            if len(message) > MAX_ERROR_CHARS:  # gRPC refuses trailers over 8 KiB in all
                message = message[: MAX_ERROR_CHARS - 30] + " ... (cut; see the server log)"
            await context.abort(code, message)

    async def _status(self) -> MeshStatus:
        return await asyncio.get_running_loop().run_in_executor(None, self.runtime.status)

    async def GetMeshStatus(self, message, context):
        try:
            return mesh_status_to_proto(await self._status())
        except Draining as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))

    async def WatchMeshStatus(self, message, context):
        loop = asyncio.get_running_loop()
        changes: asyncio.Queue[MeshStatus] = asyncio.Queue()
        # Subscribe first so that no change between the first status and the watch is missed.
        unsubscribe = self.runtime.watch(
            lambda status: loop.call_soon_threadsafe(changes.put_nowait, status)
        )
        try:
            try:
                yield mesh_status_to_proto(await self._status())
            except Draining as error:
                await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
            while True:
                yield mesh_status_to_proto(await changes.get())
        finally:
            unsubscribe()

    async def FailDevices(self, message: pb.FailDevicesRequest, context):
        ids = list(message.device_ids)
        return await self._operation(
            message,
            lambda: self.runtime.fail(
                ids, reason=message.reason, op_id=message.op_id, dry_run=message.dry_run
            ),
            context,
        )

    async def RejoinDevices(self, message: pb.RejoinDevicesRequest, context):
        ids = list(message.device_ids)
        return await self._operation(
            message, lambda: self.runtime.rejoin(ids, op_id=message.op_id), context
        )

    async def Rebalance(self, message: pb.RebalanceRequest, context):
        return await self._operation(
            message,
            lambda: self.runtime.rebalance(op_id=message.op_id, max_copies=message.max_copies),
            context,
        )

    async def VerifyExperts(self, message: pb.VerifyExpertsRequest, context):
        repair = not message.check_only
        report = await self._run(lambda: self.runtime.verify(repair=repair), context)
        self.metrics.experts_verified(report.slots_checked, len(report.mismatches))
        return integrity_report_to_proto(report)

    async def Drain(self, message: pb.DrainRequest, context):
        completed, aborted = await self._drain(
            float(message.timeout_s) if message.timeout_s else None
        )
        return pb.DrainResult(completed=completed, aborted=aborted)
