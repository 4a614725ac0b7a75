"""Requests and the request journal: everything needed to resume a request from scratch.

The journal holds each request's prompt, the tokens produced so far and its sampling state. A
request whose KV cache died with its device is re-prefilled from `prompt + generated` and goes
on producing token `len(generated)`: no token is produced twice, none is skipped.
"""

from __future__ import annotations

import enum
import itertools
import math
import time
from dataclasses import dataclass, field

# Bounds on what one request may carry, so that no single request can slow every other one
# (900,000 stop ids once made a 0.55 s request take 57 s) or echo megabytes back: the request id
# is sent back in every response.
MAX_STOP_TOKEN_IDS = 64
MAX_REQUEST_ID_CHARS = 256
# A text prompt is refused before tokenizing when it has more UTF-8 bytes than this many per
# token of max_seq_len: generous for any tokenizer (English averages about 4 bytes a token).
MAX_PROMPT_TEXT_BYTES_PER_TOKEN = 64
MAX_TOP_K = 2**31 - 1  # int32, as in the proto and the compiled sampler


class FinishReason(enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORTED = "aborted"


class RequestError(ValueError):
    """A request that cannot be served as given; the message says what is wrong."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 0.0  # 0 = off
    top_k: int = 0  # 0 = off
    seed: int = 0

    def validate(self) -> None:
        for name in ("temperature", "top_p"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise RequestError(f"sampling.{name} must be a finite number >= 0, got {value}")
        if self.top_p > 1:
            raise RequestError(f"sampling.top_p must be in [0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise RequestError(f"sampling.top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.seed < 2**32:
            raise RequestError(f"sampling.seed must be in [0, 2**32), got {self.seed}")


_ids = itertools.count()


@dataclass
class Request:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop_token_ids: tuple[int, ...] = ()
    request_id: str = ""
    # Filled in by the engine.
    generated: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)  # mesh epoch that produced each token
    reprefills: int = 0
    finish_reason: FinishReason | None = None
    error: str | None = None  # why the runtime ended it, when it could not serve it
    submitted_at: float = field(default_factory=time.monotonic)
    admitted_at: float | None = None  # first given a request slot (prefilled)
    first_token_at: float | None = None

    def __post_init__(self) -> None:
        if not self.request_id:
            self.request_id = f"req-{next(_ids)}"
        self.prompt = [int(t) for t in self.prompt]
        self.stop_token_ids = tuple(int(t) for t in self.stop_token_ids)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def context(self) -> list[int]:
        """Tokens whose keys and values a fresh prefill must compute."""
        return self.prompt + self.generated

    @property
    def context_length(self) -> int:
        """len(context), without building it (read for every running request each step)."""
        return len(self.prompt) + len(self.generated)

    @property
    def ttft_ms(self) -> float:
        if self.first_token_at is None:
            return 0.0
        return 1000.0 * (self.first_token_at - self.submitted_at)

    def validate(self, vocab_size: int, max_seq_len: int) -> None:
        # Sizes first: each later check walks a list this bounds.
        if not self.prompt:
            raise RequestError("the prompt is empty")
        if self.max_tokens < 1:
            raise RequestError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if len(self.prompt) + self.max_tokens > max_seq_len:
            raise RequestError(
                f"prompt ({len(self.prompt)} tokens) + max_tokens ({self.max_tokens}) exceeds "
                f"the model's max_seq_len ({max_seq_len})"
            )
        if len(self.stop_token_ids) > MAX_STOP_TOKEN_IDS:
            raise RequestError(
                f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids per request, got "
                f"{len(self.stop_token_ids)}"
            )
        if len(self.request_id) > MAX_REQUEST_ID_CHARS:
            raise RequestError(
                f"request_id has {len(self.request_id)} characters; at most {MAX_REQUEST_ID_CHARS}"
            )
        if not self.request_id.isprintable():
            raise RequestError(f"request_id must be printable, got {self.request_id[:64]!r}")
        for what, ids in (("token ids", self.prompt), ("stop_token_ids", self.stop_token_ids)):
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise RequestError(
                    f"{what} outside the vocabulary [0, {vocab_size}): {bad[:8]}"
                    + (" ..." if len(bad) > 8 else "")
                )
        self.sampling.validate()
        if self.sampling.top_k > MAX_TOP_K:
            raise RequestError(
                f"sampling.top_k must be at most {MAX_TOP_K}, got {self.sampling.top_k}"
            )


class Journal:
    """All live requests by id, in arrival order."""

    def __init__(self) -> None:
        self._requests: dict[str, Request] = {}

    def add(self, request: Request) -> None:
        if request.request_id in self._requests:
            raise RequestError(f"request_id {request.request_id!r} is already running")
        self._requests[request.request_id] = request

    def get(self, request_id: str) -> Request | None:
        return self._requests.get(request_id)

    def remove(self, request_id: str) -> Request | None:
        return self._requests.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._requests)

    def __iter__(self):
        return iter(list(self._requests.values()))
