"""The Generation service: Generate (a token stream), Abort, GetModelInfo.

Each Generate call submits one request to the runtime with a listener that hops every event from
the runtime's loop thread onto the asyncio loop. Whatever ends the call before the request
finished (the client cancels, its deadline passes, the server stops) aborts the request in the
runtime at once, so its slot frees. Every list and string of a request is bounded
(INVALID_ARGUMENT beyond), and Abort ends only the caller's own requests (request_owners.py).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence

import grpc

from elastic_moe.engine import TokenEvent
from elastic_moe.requests import (
    MAX_PROMPT_TEXT_BYTES_PER_TOKEN,
    MAX_REQUEST_ID_CHARS,
    MAX_STOP_TOKEN_IDS,
    Request,
    RequestError,
    SamplingParams,
)
from elastic_moe.runtime import Draining, Finished, QueueFull, Runtime
from models.tokenizer import Tokenizer
from serve.metrics import ServerMetrics
from serve.proto import elastic_moe_pb2 as pb
from serve.proto import elastic_moe_pb2_grpc as pb_grpc
from serve.request_owners import AbortRefused, RequestOwners
from serve.status_convert import finish_reason_to_proto, model_info
from serve.text_stream import IncrementalDetokenizer

MAX_ABORT_IDS = 1024  # request ids in one Abort call


def check_abort_ids(request_ids: Sequence[str]) -> None:
    """RequestError when an Abort carries too many ids, or one that no request could have."""
    if len(request_ids) > MAX_ABORT_IDS:
        raise RequestError(f"at most {MAX_ABORT_IDS} request_ids per Abort, got {len(request_ids)}")
    for request_id in request_ids:
        if len(request_id) > MAX_REQUEST_ID_CHARS:
            raise RequestError(
                f"a request_id has {len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}"
            )


def request_from_proto(message: pb.GenerateRequest, runtime: Runtime, tokenizer: Tokenizer):
    """The runtime Request for a GenerateRequest; raises RequestError naming what is wrong.

    Every list and string is measured before it is walked or tokenized (a gRPC message may be
    up to 4 MB: a million ids), so a hostile request costs no more than a normal one."""
    cfg = runtime.engine.cfg
    which = message.WhichOneof("input")
    if which is None:
        raise RequestError("the request has no input: set either text or tokens")
    if len(message.request_id) > MAX_REQUEST_ID_CHARS:
        raise RequestError(
            f"request_id has {len(message.request_id)} characters; at most {MAX_REQUEST_ID_CHARS}"
        )
    if len(message.stop_token_ids) > MAX_STOP_TOKEN_IDS:
        raise RequestError(
            f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids per request, got "
            f"{len(message.stop_token_ids)}"
        )
    if message.max_tokens > cfg.max_seq_len:
        raise RequestError(
            f"max_tokens ({message.max_tokens}) exceeds the model's max_seq_len ({cfg.max_seq_len})"
        )
    if which == "text":
        if not message.text:
            raise RequestError("the prompt is empty (text is '')")
        limit = MAX_PROMPT_TEXT_BYTES_PER_TOKEN * cfg.max_seq_len
        size = len(message.text.encode("utf-8"))
        if size > limit:
            raise RequestError(
                f"the text prompt has {size} bytes; at most {limit} for a model of max_seq_len "
                f"{cfg.max_seq_len}"
            )
        try:
            prompt = list(tokenizer.encode(message.text))
        except ValueError as error:
            raise RequestError(f"the text cannot be tokenized: {error}") from None
    else:
        if len(message.tokens.ids) > cfg.max_seq_len:
            raise RequestError(
                f"the prompt has {len(message.tokens.ids)} tokens; the model's max_seq_len is "
                f"{cfg.max_seq_len}"
            )
        prompt = list(message.tokens.ids)
    if not prompt:
        raise RequestError("the prompt is empty (no token ids)")
    s = message.sampling
    request = Request(
        prompt,
        max_tokens=message.max_tokens,
        sampling=SamplingParams(
            temperature=float(s.temperature), top_p=float(s.top_p), top_k=s.top_k, seed=s.seed
        ),
        stop_token_ids=tuple(message.stop_token_ids),
        request_id=message.request_id or f"req-{uuid.uuid4().hex}",
    )
    return request  # Runtime.submit validates it (ids, lengths, request_id, sampling)


class GenerationService(pb_grpc.GenerationServicer):
    def __init__(
        self,
        runtime: Runtime,
        tokenizer: Tokenizer,
        tokenizer_kind: str,
        metrics: ServerMetrics,
        admin_token: str | None = None,
    ):
        """admin_token: an Abort call carrying it may end any request (operators)."""
        self.runtime, self.tokenizer, self.metrics = runtime, tokenizer, metrics
        engine = runtime.engine
        self.info = model_info(engine.cfg, tokenizer_kind, engine.options.numerics)
        self.owners = RequestOwners(admin_token)

    async def Generate(self, message: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            request = request_from_proto(message, self.runtime, self.tokenizer)
        except RequestError as error:
            self.metrics.request_rejected("INVALID_ARGUMENT")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[TokenEvent | Finished] = asyncio.Queue()
        clock = self.metrics.request_accepted()
        runtime, metrics = self.runtime, self.metrics

        def listener(event: TokenEvent | Finished) -> None:  # on the runtime's loop thread
            if isinstance(event, TokenEvent):
                metrics.token(clock, runtime.step_count)
            else:
                metrics.request_finished(clock, event.finish_reason.value)
            loop.call_soon_threadsafe(events.put_nowait, event)

        refusal = None
        try:
            runtime.submit(request, listener)
        except RequestError as error:
            refusal = grpc.StatusCode.INVALID_ARGUMENT, str(error)
        except QueueFull as error:
            refusal = grpc.StatusCode.RESOURCE_EXHAUSTED, str(error)
        except Draining as error:
            refusal = grpc.StatusCode.UNAVAILABLE, str(error)
        if refusal is not None:
            metrics.request_refused(clock, refusal[0].name)
            await context.abort(*refusal)

        request_id = request.request_id
        owner = self.owners.add(request_id, context)
        detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt)
        finished = False
        try:
            while not finished:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                failed = next(
                    (e.request.error for e in batch if isinstance(e, Finished) and e.request.error),
                    None,
                )
                for response in self._responses(request_id, batch, detokenizer):
                    finished = response.HasField("complete")
                    if finished and failed:
                        break  # the tokens before it were sent; the error replaces Complete
                    yield response
                if failed:
                    finished = True
                    # UNAVAILABLE: the runtime stopped (retry elsewhere); INTERNAL: a step
                    # failed on this server while the runtime went on.
                    code = (
                        grpc.StatusCode.UNAVAILABLE
                        if runtime.failure is not None
                        else grpc.StatusCode.INTERNAL
                    )
                    await context.abort(code, failed)
        finally:
            if not finished:  # cancelled, deadline passed, or the server is stopping
                runtime.abort([request_id])
            self.owners.remove(request_id, owner)

    def _responses(self, request_id, batch, detokenizer):
        """Chunks for runs of consecutive tokens of one mesh epoch, then Complete if finished."""
        tokens: list[TokenEvent] = []

        def chunk() -> pb.GenerateResponse:
            final = tokens[-1].finish_reason is not None
            return pb.GenerateResponse(
                request_id=request_id,
                chunk=pb.Chunk(
                    token_ids=[e.token for e in tokens],
                    logprobs=[e.logprob for e in tokens],
                    offset=tokens[0].index,
                    mesh_epoch=tokens[0].epoch,
                    text=detokenizer.push([e.token for e in tokens], final=final),
                ),
            )

        for event in batch:
            if isinstance(event, TokenEvent):
                if tokens and (
                    event.epoch != tokens[0].epoch or event.index != tokens[-1].index + 1
                ):
                    yield chunk()
                    tokens = []
                tokens.append(event)
                continue
            if tokens:
                yield chunk()
                tokens = []
            r = event.request
            yield pb.GenerateResponse(
                request_id=request_id,
                complete=pb.Complete(
                    finish_reason=finish_reason_to_proto(r.finish_reason),
                    prompt_tokens=len(r.prompt),
                    completion_tokens=len(r.generated),
                    reprefills=r.reprefills,
                    ttft_ms=r.ttft_ms,
                ),
            )
            return
        if tokens:
            yield chunk()

    async def Abort(self, message: pb.AbortRequest, context: grpc.aio.ServicerContext):
        try:
            check_abort_ids(message.request_ids)
            ids = self.owners.abortable(message.request_ids, context)
        except RequestError as error:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(error))
        except AbortRefused as error:
            await context.abort(error.code, str(error))
        if not ids:
            return pb.AbortResponse(aborted=0)
        try:
            aborted = await asyncio.wrap_future(self.runtime.abort(ids))
        except Draining as error:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(error))
        return pb.AbortResponse(aborted=aborted)

    async def GetModelInfo(self, message: pb.ModelInfoRequest, context):
        return self.info
