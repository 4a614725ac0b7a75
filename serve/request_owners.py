"""Who may abort a request: the connection that started it, or an operator with the admin token.

Request ids are chosen by clients and often guessable ("req-1", a user id, ...), so an Abort by
id alone would let any client end anyone's request. A request belongs to the gRPC connection
(the peer, `ipv4:10.0.0.7:53122`) whose Generate call started it; Abort ends only the caller's
own requests and ignores other ids, like unknown or finished ones (so it tells nobody which ids
exist). A request never outlives its owner's connection: when the connection closes, the
Generate call is cancelled and the request aborted.

A call carrying the server's admin token (`authorization: Bearer <token>`) may end any request.
Channels of one process to the same address may share a connection (gRPC pools them), and
clients behind one proxy share its connection: there the proxy decides who may abort what.
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from serve.auth import check_token


class AbortRefused(Exception):
    """An Abort whose admin token is wrong (or sent to a server without one)."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(message)
        self.code = code


class RequestOwners:
    """request_id -> the peer whose Generate call runs it, while that call lasts."""

    def __init__(self, admin_token: str | None):
        self.admin_token = admin_token
        self._owners: dict[str, tuple[str, object]] = {}

    def add(self, request_id: str, context) -> tuple[str, object]:
        # The object tells this call's entry from that of a later call reusing the id.
        owner = (context.peer(), object())
        self._owners[request_id] = owner
        return owner

    def remove(self, request_id: str, owner: tuple[str, object]) -> None:
        if self._owners.get(request_id) is owner:
            del self._owners[request_id]

    def abortable(self, request_ids: Sequence[str], context) -> list[str]:
        """The ids among `request_ids` this caller may abort (duplicates and "" dropped)."""
        ids = list(dict.fromkeys(i for i in request_ids if i))
        if self._is_operator(context):
            return ids
        peer = context.peer()
        return [i for i in ids if self._owners.get(i, ("",))[0] == peer]

    def _is_operator(self, context) -> bool:
        metadata = context.invocation_metadata() or ()
        if not any(key.lower() == "authorization" for key, _ in metadata):
            return False
        if self.admin_token is None:
            raise AbortRefused(
                grpc.StatusCode.PERMISSION_DENIED,
                "this server has no admin token: Abort ends only the caller's own requests "
                "(send it without authorization metadata)",
            )
        refusal = check_token(metadata, self.admin_token)
        if refusal is not None:
            raise AbortRefused(*refusal)
        return True
