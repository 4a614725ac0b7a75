"""Fuzzing the gRPC services (issue 11): hypothesis-generated Generation and Admin messages,
bursts of concurrent requests aborted or cancelled mid-stream, and raw request bytes (parseable
or not) sent to every unary-request method of both ports, against a real server (tiny-mixtral on
4 simulated devices).

Invariants, for every call: an answer within a deadline (no hang), and that answer is OK or a
documented status code (INVALID_ARGUMENT, RESOURCE_EXHAUSTED, NOT_FOUND, FAILED_PRECONDITION,
UNAVAILABLE; DEADLINE_EXCEEDED only where the fuzz chose a short deadline); never UNKNOWN or
INTERNAL, and nothing logged at ERROR. A stream that is accepted is well formed (continuous
offsets, one Complete). After every call every device still serves, and after a burst every
request slot is free. Good requests, sent back to back from another connection and the first
started before the fuzzing, get exactly the tokens of a failure-free run.

Operations that would change the server for everyone are kept out: FailDevices goes out as a
dry run or with an id outside the pool (nothing changes), Drain only with bytes that do not
parse. Rebalance and VerifyExperts run for real (they must not change a token).

ELASTIC_MOE_FUZZ_EXAMPLES multiplies the examples of each test (default 1: about a minute;
10 for a longer hunt); hypothesis prints a failing example and how to reproduce it.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from elastic_moe import Engine, EngineOptions, SamplingParams, get_preset, init_params
from elastic_moe.coordinator import Coordinator
from elastic_moe.runtime import Runtime
from serve.client import Client, Completion
from serve.proto import elastic_moe_pb2 as pb
from serve.proto import elastic_moe_pb2_grpc as pb_grpc
from serve.server import ServerConfig, ServerThread

SCALE = float(os.environ.get("ELASTIC_MOE_FUZZ_EXAMPLES", "1"))


def fuzz_settings(examples: int):
    return settings(
        max_examples=max(1, round(examples * SCALE)),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


HANG_S = 120.0  # a call that has no answer by then hangs (a full-length request takes ~5 s)
DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.UNAVAILABLE,
}
GOOD = [
    ([5, 6, 7, 8], SamplingParams()),
    ([7] * 9, SamplingParams(temperature=0.9, top_k=30, seed=11)),
    ([200, 3, 99], SamplingParams(temperature=0.7, top_p=0.9, seed=12)),
]
GOOD_TOKENS = 24
POOL = [0, 1, 2, 3]  # the served devices' ids
GENERATION = "/elastic_moe.v1.Generation/"
ADMIN = "/elastic_moe.v1.Admin/"


class ErrorLog(logging.Handler):
    """Records logged at ERROR or above (a servicer exception, a traceback) while fuzzing."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


class FuzzServer:
    def __init__(self, devices):
        cfg = get_preset("tiny-mixtral")
        self.engine = Engine(
            cfg,
            init_params(cfg),
            devices,
            EngineOptions(request_slots_per_device=2, redundant_experts=cfg.num_experts),
        )
        assert [d.id for d in devices] == POOL
        # Failure-free references, on the same engine before the runtime drives it.
        self.want = [
            self.engine.generate([prompt], GOOD_TOKENS, sampling)[0].generated
            for prompt, sampling in GOOD
        ]
        # Every program a Rebalance or VerifyExperts needs, compiled now rather than inside an
        # example (the fuzz sends prompts of every prefill bucket too: those compile once).
        self.engine.executables.get(self.engine.mesh.devices).warm([16])
        self.runtime = Runtime(
            self.engine, coordinator=Coordinator(self.engine, standby=False)
        ).start()
        config = ServerConfig(host="127.0.0.1", port=0, admin_port=0, admin_token="")
        self.thread = ServerThread(self.runtime, config).start()
        self.target = f"127.0.0.1:{self.thread.ports.generation}"
        self.admin_target = f"127.0.0.1:{self.thread.ports.admin}"
        # The fuzz's own connections (gRPC would otherwise share one with the good traffic's
        # channel): its Aborts then reach none of the good requests.
        local = [("grpc.use_local_subchannel_pool", 1)]
        self.channel = grpc.insecure_channel(self.target, options=local)
        self.admin_channel = grpc.insecure_channel(self.admin_target, options=local)
        self.generation = pb_grpc.GenerationStub(self.channel)
        self.admin = pb_grpc.AdminStub(self.admin_channel)
        self.errors = ErrorLog()
        logging.getLogger().addHandler(self.errors)

    def assert_healthy(self) -> None:
        """Every device serves, nothing was logged at ERROR, every good request so far got
        its failure-free tokens."""
        status = self.admin.GetMeshStatus(pb.MeshStatusRequest(), timeout=HANG_S)
        states = {d.id: pb.DeviceState.Name(d.state) for d in status.devices}
        assert set(states.values()) == {"HEALTHY"}, states
        assert status.state in (pb.SERVING, pb.DEGRADED), pb.MeshState.Name(status.state)
        logged = [r.getMessage() for r in self.errors.records]
        self.errors.records.clear()  # each example answers for its own
        assert not logged, logged
        assert self.good.failures == [], self.good.failures

    def close(self) -> None:
        logging.getLogger().removeHandler(self.errors)
        self.channel.close()
        self.admin_channel.close()
        self.thread.stop()
        self.runtime.stop()


class GoodTraffic:
    """Good requests back to back from another connection, each checked against its
    failure-free tokens. On entry the first one is already streaming."""

    def __init__(self, server: FuzzServer):
        self.server = server
        self.stop = threading.Event()
        self.started = threading.Event()
        self.completed = 0
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, name="good-traffic", daemon=True)

    def _run(self) -> None:
        s = self.server
        try:
            with Client(s.target, admin_target=s.admin_target, timeout=HANG_S) as client:
                n = 0
                while not self.stop.is_set() or n == 0:
                    prompt, sampling = GOOD[n % len(GOOD)]
                    completion = Completion()
                    for response in client.generate_stream(
                        prompt,
                        GOOD_TOKENS,
                        temperature=sampling.temperature,
                        top_p=sampling.top_p,
                        top_k=sampling.top_k,
                        seed=sampling.seed,
                        request_id=f"good-traffic-{os.getpid()}-{n}",
                    ):
                        completion.add(response)
                        self.started.set()
                    if completion.token_ids != s.want[n % len(GOOD)]:
                        self.failures.append(f"good request {n}: {completion.token_ids}")
                    self.completed += 1
                    n += 1
        except Exception as error:  # reported by __exit__ and assert_healthy
            self.failures.append(f"good request failed: {error!r}")
            self.started.set()

    def __enter__(self) -> GoodTraffic:
        self.thread.start()
        assert self.started.wait(HANG_S), "the good request never started"
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(HANG_S)
        assert not self.thread.is_alive(), "a good request hung"
        assert self.failures == [], self.failures
        assert self.completed >= 1


@pytest.fixture(scope="module")
def server(devices):
    s = FuzzServer(devices[:4])
    try:
        # Good requests from before the first fuzzed call until after the last.
        with GoodTraffic(s) as s.good:
            yield s
    finally:
        s.close()


def answer_code(call) -> grpc.StatusCode:
    """The status a call ends with; fails the test where it is not documented."""
    try:
        call()
        code, details = grpc.StatusCode.OK, ""
    except grpc.RpcError as error:
        code, details = error.code(), error.details()
    assert code in DOCUMENTED, f"{code.name}: {details}"
    return code


# Each field of a request: values the server must accept (extremes included) and values it
# must refuse. A request takes every field from the first kind or, field by field, from either,
# so that about half are served and the rest refused for one reason or several.
VOCAB = 256
PRINTABLE_ID = "abcdefghijklmnopqrstuvwxyz0123456789-"
WEIRD_FLOATS = [math.nan, math.inf, -math.inf, -1.0, -1e-45, 3.4e38, 1e300, 1.5]


def accepted_floats(high: float):
    """Floats in [0, high], the smallest subnormal and the largest float32 included."""
    return st.one_of(
        st.floats(0, high, width=32),
        st.sampled_from([0.0, 1e-45, 1e-38, high] + ([3.4e38] if high > 1 else [])),
    )


def any_floats():
    return st.one_of(
        st.floats(width=32, allow_nan=True, allow_infinity=True), st.sampled_from(WEIRD_FLOATS)
    )


def ids():
    """int32 ids, the vocabulary's edges likely."""
    return st.one_of(
        st.integers(0, VOCAB - 1), st.integers(-(2**31), 2**31 - 1), st.sampled_from([-1, VOCAB])
    )


def request_ids():
    return st.one_of(
        st.just(""),
        st.text(max_size=24),
        st.text(min_size=250, max_size=300),
        st.sampled_from(["a\nb", "\x1b[2J", "x" * 100_000, "é" * 200]),
    )


FIELDS = {  # field -> (accepted, anything)
    "request_id": (st.text(PRINTABLE_ID, max_size=16), request_ids()),
    "prompt": (
        st.one_of(
            st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=12),
            st.text(st.characters(codec="ascii"), min_size=1, max_size=12),
        ),
        st.one_of(
            st.lists(ids(), max_size=12),
            st.text(max_size=40),
            st.sampled_from([None, "", "a" * 9000, [1] * 129, [1] * 600_000, [-1] * 600_000]),
        ),
    ),
    "max_tokens": (
        st.integers(1, 6),
        st.one_of(st.integers(0, 6), st.sampled_from([100, 127, 128, 2**31, 2**32 - 1])),
    ),
    "temperature": (accepted_floats(2.0), any_floats()),
    "top_p": (accepted_floats(1.0), any_floats()),
    "top_k": (
        st.one_of(st.integers(0, 300), st.just(2**31 - 1)),
        st.integers(-(2**31), 2**31 - 1),
    ),
    "seed": (st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)),
    "stop_token_ids": (
        st.lists(st.integers(0, VOCAB - 1), max_size=4),
        st.one_of(st.lists(ids(), max_size=4), st.sampled_from([[7] * 65, [7] * 5000])),
    ),
}


@st.composite
def generate_requests(draw) -> tuple[pb.GenerateRequest, float]:
    """(request, deadline): anything a client could send; those served are short."""
    valid = draw(st.booleans())
    value = {
        name: draw(accepted if valid or draw(st.booleans()) else anything)
        for name, (accepted, anything) in FIELDS.items()
    }
    message = pb.GenerateRequest(
        request_id=value["request_id"],
        max_tokens=value["max_tokens"],
        sampling=pb.SamplingParams(
            temperature=value["temperature"],
            top_p=value["top_p"],
            top_k=value["top_k"],
            seed=value["seed"],
        ),
        stop_token_ids=value["stop_token_ids"],
    )
    prompt = value["prompt"]
    if isinstance(prompt, str):
        message.text = prompt
    elif prompt is not None:  # None: neither text nor tokens
        message.tokens.ids.extend(prompt)
    # Mostly the hang deadline; sometimes one that passes mid-request (DEADLINE_EXCEEDED).
    deadline = draw(st.one_of(st.just(HANG_S), st.just(HANG_S), st.floats(0.001, 0.5)))
    return message, deadline


def stream_code(stream, deadline: float, after_response=None) -> grpc.StatusCode:
    """How a Generate stream ends; fails the test on an undocumented code or a malformed
    stream. after_response(count) runs after each response (to abort or cancel)."""

    def consume():
        completion, completes = Completion(), 0
        for count, response in enumerate(stream, 1):
            assert completes == 0, "a response after Complete"
            completion.add(response)  # raises on a gap or a repeated offset
            completes += response.HasField("complete")
            if after_response is not None:
                after_response(count)
        assert completes == 1, "the stream ended without Complete"

    try:
        consume()
        code = grpc.StatusCode.OK
    except grpc.RpcError as error:
        code = error.code()
        if code is grpc.StatusCode.DEADLINE_EXCEEDED and deadline < HANG_S:
            return code  # the deadline the fuzz chose
        if code is grpc.StatusCode.CANCELLED and after_response is not None:
            return code  # the test cancelled it
        assert code in DOCUMENTED, f"{code.name}: {error.details()}"
    return code


# ---- messages -----------------------------------------------------------------------------------
@fuzz_settings(100)
@given(generate_requests())
def test_fuzzed_generate_requests(server, generated):
    message, deadline = generated
    code = stream_code(server.generation.Generate(message, timeout=deadline), deadline)
    event(code.name)  # --hypothesis-show-statistics: how many were served, refused, timed out
    server.assert_healthy()


@fuzz_settings(30)
@given(
    to_abort=st.one_of(st.lists(request_ids(), max_size=5), st.sampled_from([1024, 1025, 200_000]))
)
def test_fuzzed_abort_requests(server, to_abort):
    if isinstance(to_abort, int):
        to_abort = [f"r{i}" for i in range(to_abort)]
    message = pb.AbortRequest(request_ids=to_abort)
    code = answer_code(lambda: server.generation.Abort(message, timeout=HANG_S))
    event(code.name)
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT)
    server.assert_healthy()


@st.composite
def bursts(draw) -> list[tuple[pb.GenerateRequest, str, int]]:
    """Requests sent at once, each (request, what the client does, after how many responses):
    "read" to the end, "abort" its id (from the same connection), "cancel" the call. Ids are
    often shared, so a request can be refused for an id in use, or abort another's."""
    burst = []
    for _ in range(draw(st.integers(1, 12))):
        prompt = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40))
        message = pb.GenerateRequest(
            request_id=draw(st.sampled_from(["", "dup-a", "dup-b"]) | st.text(PRINTABLE_ID)),
            tokens=pb.TokenIds(ids=prompt),
            max_tokens=draw(st.integers(1, 24)),
            sampling=pb.SamplingParams(
                temperature=draw(accepted_floats(2.0)),
                top_k=draw(st.integers(0, 40)),
                seed=draw(st.integers(0, 2**32 - 1)),
            ),
        )
        burst.append(
            (message, draw(st.sampled_from(["read", "abort", "cancel"])), draw(st.integers(1, 4)))
        )
    return burst


def device_id_lists():
    return st.one_of(
        st.lists(st.sampled_from(POOL), min_size=1, max_size=3),
        st.lists(st.sampled_from(POOL), min_size=1, max_size=3),
        st.lists(ids(), max_size=5),
        st.sampled_from([[], list(range(4097)), [2**31 - 1, -(2**31)]]),
    )


def op_ids():
    return st.one_of(
        st.just(""),
        st.text(PRINTABLE_ID, min_size=1, max_size=12),
        st.text(max_size=12),
        st.sampled_from(["o" * 257, "op-1"]),
    )


@st.composite
def admin_calls(draw):
    """(method name, request): every Admin method but Drain, with random ids and op ids."""
    method = draw(
        st.sampled_from(
            ["FailDevices", "RejoinDevices", "Rebalance", "VerifyExperts", "GetMeshStatus"]
        )
    )
    if method == "FailDevices":
        message = pb.FailDevicesRequest(
            device_ids=draw(device_id_lists()),
            reason=draw(st.one_of(st.text(max_size=20), st.text(), st.just("r" * 1025))),
            op_id=draw(op_ids()),
            dry_run=draw(st.sampled_from([True, True, False])),
        )
        if not message.dry_run and set(message.device_ids) <= set(POOL):
            # A real failure of pool devices: an id outside the pool keeps it refused.
            message.device_ids.append(draw(st.integers(len(POOL), 2**31 - 1)))
    elif method == "RejoinDevices":  # every device serves: a rejoin is refused or unknown
        message = pb.RejoinDevicesRequest(device_ids=draw(device_id_lists()), op_id=draw(op_ids()))
    elif method == "Rebalance":
        message = pb.RebalanceRequest(op_id=draw(op_ids()))
    elif method == "VerifyExperts":
        message = pb.VerifyExpertsRequest(check_only=draw(st.booleans()))
    else:
        message = pb.MeshStatusRequest()
    return method, message


@fuzz_settings(60)
@given(admin_calls())
def test_fuzzed_admin_requests(server, call):
    method, message = call
    epoch = server.admin.GetMeshStatus(pb.MeshStatusRequest(), timeout=HANG_S).epoch
    answer = None

    def send():
        nonlocal answer
        answer = getattr(server.admin, method)(message, timeout=HANG_S)

    code = answer_code(send)
    event(f"{method}: {code.name}")
    if method == "FailDevices" and code is grpc.StatusCode.OK:  # a plan only
        assert answer.summary.dry_run and answer.epoch == epoch
    if method == "Rebalance" and code is grpc.StatusCode.OK:
        check = pb.VerifyExpertsRequest(check_only=True)
        assert not server.admin.VerifyExperts(check, timeout=HANG_S).mismatches
    watch = server.admin.WatchMeshStatus(pb.MeshStatusRequest(), timeout=HANG_S)
    assert next(watch).devices  # a watch still answers at once
    watch.cancel()
    server.assert_healthy()


@fuzz_settings(15)
@given(bursts())
def test_fuzzed_concurrent_generate_abort_and_cancel(server, burst):
    """Requests at once, some aborted or cancelled mid-stream, ids shared: each ends with a
    documented code, and every slot is free again afterwards (nothing leaks)."""

    def run(message: pb.GenerateRequest, action: str, after: int) -> grpc.StatusCode:
        stream = server.generation.Generate(message, timeout=HANG_S)

        def act(count: int) -> None:
            if count != after or action == "read":
                return
            if action == "cancel":
                stream.cancel()
            else:
                abort = pb.AbortRequest(request_ids=[message.request_id])
                assert answer_code(lambda: server.generation.Abort(abort, timeout=HANG_S)) in (
                    grpc.StatusCode.OK,
                    grpc.StatusCode.INVALID_ARGUMENT,  # an empty id: nothing to abort
                )

        return stream_code(stream, HANG_S, act)

    with ThreadPoolExecutor(len(burst)) as pool:
        codes = list(pool.map(lambda args: run(*args), burst))
    for code in codes:
        event(code.name)
    for _ in range(200):  # the last Complete can reach a client before the status updates
        status = server.admin.GetMeshStatus(pb.MeshStatusRequest(), timeout=HANG_S)
        if status.active_requests <= 1 and status.queued_requests == 0:  # the good request
            break
        time.sleep(0.05)
    assert status.active_requests <= 1 and status.queued_requests == 0, status
    server.assert_healthy()


# ---- raw bytes ----------------------------------------------------------------------------------
# method -> (request type, response type, streams its responses)
METHODS = {
    GENERATION + "Generate": (pb.GenerateRequest, pb.GenerateResponse, True),
    GENERATION + "Abort": (pb.AbortRequest, pb.AbortResponse, False),
    GENERATION + "GetModelInfo": (pb.ModelInfoRequest, pb.ModelInfo, False),
    ADMIN + "GetMeshStatus": (pb.MeshStatusRequest, pb.MeshStatus, False),
    ADMIN + "WatchMeshStatus": (pb.MeshStatusRequest, pb.MeshStatus, True),
    ADMIN + "FailDevices": (pb.FailDevicesRequest, pb.ReconfigureResult, False),
    ADMIN + "RejoinDevices": (pb.RejoinDevicesRequest, pb.ReconfigureResult, False),
    ADMIN + "Rebalance": (pb.RebalanceRequest, pb.ReconfigureResult, False),
    ADMIN + "Drain": (pb.DrainRequest, pb.DrainResult, False),
    ADMIN + "VerifyExperts": (pb.VerifyExpertsRequest, pb.VerifyExpertsResult, False),
    "/grpc.health.v1.Health/Check": (
        health_pb2.HealthCheckRequest,
        health_pb2.HealthCheckResponse,
        False,
    ),
}
SAMPLES = [  # one valid message of each request type, for mutation
    pb.GenerateRequest(request_id="r", tokens=pb.TokenIds(ids=[1, 2, 3]), max_tokens=2),
    pb.GenerateRequest(text="héllo", max_tokens=1, stop_token_ids=[9]),
    pb.AbortRequest(request_ids=["a", "b"]),
    pb.FailDevicesRequest(device_ids=[1], reason="x", op_id="o", dry_run=True),
    pb.RejoinDevicesRequest(device_ids=[2, 3], op_id="o"),
    pb.RebalanceRequest(op_id="o"),
    pb.VerifyExpertsRequest(check_only=True),
    health_pb2.HealthCheckRequest(service="elastic_moe.v1.Generation"),
]
KNOWN_BAD = [
    b"\xff\xff\xff\xff\xff",  # field 0x1fffffff... with wire type 7
    b"\x08",  # a varint field with no value
    b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01",  # a varint of 11 bytes
    b"\x0a\x05ab",  # a length past the end
    b"\x0a\x02\xff\xfe",  # field 1 (a string in most requests) that is not UTF-8
    b"\x12\x02\xc3\x28",  # field 2: text / a string, not UTF-8
    b"\x1a\x03\x08\x80",  # tokens holding a truncated varint
    b"\x0b" * 200,  # groups opened and never closed
    b"\x0c",  # a group closed that was never opened
    b"\x00",  # field number 0
]


@st.composite
def raw_requests(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "mutated", "known", "huge"]))
    if kind == "random":
        return draw(st.binary(max_size=64))
    if kind == "known":
        return draw(st.sampled_from(KNOWN_BAD))
    if kind == "huge":  # over the 4 MB receive limit, or just under it
        return b"\x0a" + b"\xff" * draw(st.sampled_from([4 * 2**20 + 10, 3 * 2**20]))
    raw = bytearray(draw(st.sampled_from(SAMPLES)).SerializeToString())
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(raw)))
        action = draw(st.sampled_from(["flip", "insert", "truncate", "delete"]))
        if action == "flip" and at < len(raw):
            raw[at] ^= draw(st.integers(1, 255))
        elif action == "insert":
            raw[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif action == "truncate":
            del raw[at:]
        elif at < len(raw):
            del raw[at]
    return bytes(raw)


def parsed(message_type, raw: bytes):
    try:
        return message_type.FromString(raw)
    except Exception:  # any parser error: the bytes are not a message
        return None


def changes_the_server(method: str, raw: bytes) -> bool:
    """Bytes that parse into a Drain (it stops serving for everyone) or a real FailDevices of
    pool devices: kept out, like the messages above."""
    if method.endswith("/Drain"):
        return parsed(pb.DrainRequest, raw) is not None
    if method.endswith("/FailDevices"):
        message = parsed(pb.FailDevicesRequest, raw)
        return (
            message is not None
            and not message.dry_run
            and bool(message.device_ids)
            and set(message.device_ids) <= set(POOL)
        )
    return False


@fuzz_settings(100)
@given(st.sampled_from(sorted(METHODS)), raw_requests())
def test_raw_request_bytes(server, method, raw):
    assume(not changes_the_server(method, raw))
    request_type, response_type, streams = METHODS[method]
    channel = server.admin_channel if method.startswith(ADMIN) else server.channel
    if streams:
        responses = channel.unary_stream(method)(raw, timeout=HANG_S)  # the bytes as they are
        if method.endswith("WatchMeshStatus"):  # never ends: its first answer is enough
            code = answer_code(lambda: response_type.FromString(next(responses)))
            responses.cancel()
        else:
            code = answer_code(lambda: [response_type.FromString(r) for r in responses])
    else:
        call = channel.unary_unary(method)
        code = answer_code(lambda: response_type.FromString(call(raw, timeout=HANG_S)))
    event(f"{method.rsplit('/', 1)[1]}: {code.name}")
    if parsed(request_type, raw) is None:  # bytes that are not the message reach no servicer
        expected = grpc.StatusCode.INVALID_ARGUMENT
        if len(raw) > 4 * 2**20:
            expected = grpc.StatusCode.RESOURCE_EXHAUSTED  # over the receive limit
        assert code is expected, code.name
    server.assert_healthy()


def test_sampling_extremes_that_parse_are_refused_not_served(server):
    """The floats a client cannot be trusted with: each refused before it reaches a step."""
    for temperature, top_p in [(math.nan, 0), (math.inf, 0), (-1, 0), (1, math.nan), (1, 1.5)]:
        message = pb.GenerateRequest(tokens=pb.TokenIds(ids=[1, 2]), max_tokens=2)
        message.sampling.temperature, message.sampling.top_p = temperature, top_p
        with pytest.raises(grpc.RpcError) as error:
            list(server.generation.Generate(message, timeout=HANG_S))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (temperature, top_p)
