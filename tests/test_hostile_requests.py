"""Hostile input against the gRPC server (issue 11): oversized lists and strings, bytes that are
not a protobuf message, and Abort of another client's request. One server (tiny-mixtral on 2
simulated devices, with an admin token) serves the whole module.
"""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2

from elastic_moe import Engine, EngineOptions, get_preset, init_params
from elastic_moe.coordinator import Coordinator
from elastic_moe.requests import (
    MAX_REQUEST_ID_CHARS,
    MAX_STOP_TOKEN_IDS,
    Request,
    RequestError,
    SamplingParams,
)
from elastic_moe.runtime import Runtime
from serve.client import Client
from serve.demo import paced_stepper
from serve.generation_service import MAX_ABORT_IDS
from serve.proto import elastic_moe_pb2 as pb
from serve.proto import elastic_moe_pb2_grpc as pb_grpc
from serve.server import ServerConfig, ServerThread

TOKEN = "operator-secret"
GARBAGE = b"\xff\xff\xff\xff\xff"  # field 0x1fffffff... with wire type 7: never a message
LONG = 100  # tokens of a request that is still running while the test aborts it
STEP_S = 0.02  # engine steps paced to at least this: a LONG request runs for 2 s


@pytest.fixture(scope="module")
def server(devices):
    cfg = get_preset("tiny-mixtral")
    engine = Engine(cfg, init_params(cfg), devices[:2], EngineOptions(request_slots_per_device=4))
    coordinator = Coordinator(engine, standby=False)
    runtime = Runtime(engine, coordinator=coordinator)
    runtime.stepper = paced_stepper(coordinator, runtime.injector, STEP_S)
    runtime.start()
    config = ServerConfig(host="127.0.0.1", port=0, admin_port=0, admin_token=TOKEN)
    thread = ServerThread(runtime, config).start()
    thread.cfg = cfg
    thread.target = f"127.0.0.1:{thread.ports.generation}"
    thread.admin_target = f"127.0.0.1:{thread.ports.admin}"
    yield thread
    thread.stop()
    runtime.stop()


@pytest.fixture
def client(server):
    with Client(server.target, admin_target=server.admin_target, admin_token="", timeout=30) as c:
        yield c


def other_connection(target: str) -> grpc.Channel:
    """A channel with a TCP connection of its own (gRPC otherwise shares one between the
    channels of a process to the same address): another client, as the server sees it."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])


def refused(call) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as error:
        call()
    return error.value


def assert_invalid(call, *needles: str) -> None:
    error = refused(call)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
    for needle in needles:
        assert needle in error.details(), (needle, error.details())


# ---- lists and strings are bounded (Request.validate, request_from_proto) -----------------
def test_request_validate_bounds_stop_ids_and_request_id():
    ok = Request([1, 2], 4, stop_token_ids=tuple(range(MAX_STOP_TOKEN_IDS)), request_id="x" * 256)
    ok.validate(vocab_size=256, max_seq_len=128)
    too_many = Request([1, 2], 4, stop_token_ids=tuple(range(MAX_STOP_TOKEN_IDS + 1)))
    with pytest.raises(RequestError, match="at most 64 stop_token_ids"):
        too_many.validate(256, 128)
    with pytest.raises(RequestError, match=r"stop_token_ids outside the vocabulary \[0, 256\)"):
        Request([1], 4, stop_token_ids=(256,)).validate(256, 128)
    with pytest.raises(RequestError, match="at most 256"):
        Request([1], 4, request_id="x" * 257).validate(256, 128)
    with pytest.raises(RequestError, match="printable"):
        Request([1], 4, request_id="a\x1b[2Jb").validate(256, 128)
    with pytest.raises(RequestError, match="top_k must be at most"):
        Request([1], 4, SamplingParams(top_k=2**31)).validate(256, 128)


def test_stop_token_ids_are_bounded(client):
    stops = list(range(100, 100 + MAX_STOP_TOKEN_IDS))
    assert client.generate([1, 2, 3], 4, stop_token_ids=stops).finish_reason in ("length", "stop")
    for count in (MAX_STOP_TOKEN_IDS + 1, 900_000):
        assert_invalid(
            lambda n=count: client.generate([1, 2, 3], 4, stop_token_ids=[7] * n),
            f"at most {MAX_STOP_TOKEN_IDS} stop_token_ids",
            str(count),
        )
    assert_invalid(
        lambda: client.generate([1, 2, 3], 4, stop_token_ids=[999]), "outside the vocabulary"
    )


def test_prompts_are_bounded_before_tokenizing(client, server):
    max_seq_len = server.cfg.max_seq_len
    assert_invalid(lambda: client.generate("a" * (64 * max_seq_len + 1), 4), "bytes; at most")
    assert_invalid(lambda: client.generate([1] * (max_seq_len + 1), 4), "max_seq_len")


def test_request_id_is_bounded_and_printable(client):
    longest = "r" * MAX_REQUEST_ID_CHARS
    assert client.generate([1, 2], 2, request_id=longest).request_id == longest
    for request_id in ("r" * (MAX_REQUEST_ID_CHARS + 1), "x" * 3_000_000):
        assert_invalid(
            lambda i=request_id: client.generate([1, 2], 2, request_id=i),
            f"{len(request_id)} characters; at most {MAX_REQUEST_ID_CHARS}",
        )
    assert_invalid(lambda: client.generate([1, 2], 2, request_id="a\nb"), "printable")


def test_abort_ids_are_bounded(client):
    assert_invalid(lambda: client.abort(["x"] * (MAX_ABORT_IDS + 1)), f"at most {MAX_ABORT_IDS}")
    assert_invalid(lambda: client.abort(["x" * 300]), "300 characters")


def test_admin_strings_and_lists_are_bounded(server):
    with Client(server.target, admin_target=server.admin_target, admin_token=TOKEN) as admin:
        assert_invalid(lambda: admin.fail([1], reason="r" * 2000, dry_run=True), "reason")
        assert_invalid(lambda: admin.rejoin([1], op_id="o" * 300), "op_id")
        assert_invalid(lambda: admin.fail(list(range(5000)), dry_run=True), "device_ids")
        assert admin.mesh_status().epoch == 0  # nothing changed


# ---- bytes that are not a message: INVALID_ARGUMENT on both ports ---------------------------
def raw_unary(channel: grpc.Channel, method: str, metadata=()):
    call = channel.unary_unary(method)  # no serializers: the bytes go out as they are
    return lambda: call(GARBAGE, timeout=10, metadata=metadata)


def raw_stream(channel: grpc.Channel, method: str, metadata=()):
    call = channel.unary_stream(method)
    return lambda: list(call(GARBAGE, timeout=10, metadata=metadata))


def test_malformed_bytes_are_invalid_argument_on_the_generation_port(server, caplog):
    with caplog.at_level(logging.ERROR), grpc.insecure_channel(server.target) as channel:
        generation = "/elastic_moe.v1.Generation/"
        assert_invalid(raw_stream(channel, generation + "Generate"), "GenerateRequest")
        assert_invalid(raw_unary(channel, generation + "Abort"), "AbortRequest")
        assert_invalid(raw_unary(channel, generation + "GetModelInfo"), "ModelInfoRequest")
        assert_invalid(raw_unary(channel, "/grpc.health.v1.Health/Check"), "HealthCheckRequest")
        # Well-formed calls pass the guard, a streaming one that writes through its context too.
        stub = pb_grpc.GenerationStub(channel)
        assert stub.GetModelInfo(pb.ModelInfoRequest(), timeout=10).name == "tiny-mixtral"
        watch = channel.unary_stream(
            "/grpc.health.v1.Health/Watch",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        readiness = watch(health_pb2.HealthCheckRequest(service="elastic_moe.v1.Generation"))
        assert next(readiness).status == health_pb2.HealthCheckResponse.SERVING
        readiness.cancel()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


def test_malformed_bytes_are_invalid_argument_on_the_admin_port(server, caplog):
    bearer = (("authorization", f"Bearer {TOKEN}"),)
    admin = "/elastic_moe.v1.Admin/"
    with caplog.at_level(logging.ERROR), grpc.insecure_channel(server.admin_target) as channel:
        assert_invalid(raw_unary(channel, admin + "GetMeshStatus", bearer), "MeshStatusRequest")
        assert_invalid(raw_stream(channel, admin + "WatchMeshStatus", bearer))
        assert_invalid(raw_unary(channel, admin + "FailDevices", bearer), "FailDevicesRequest")
        # The token is checked first: garbage from a caller without it learns nothing more.
        error = refused(raw_unary(channel, admin + "FailDevices"))
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        health = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=health_pb2.HealthCheckRequest.SerializeToString,
            response_deserializer=health_pb2.HealthCheckResponse.FromString,
        )
        assert health(health_pb2.HealthCheckRequest(), timeout=10).status == 1  # SERVING
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text


# ---- Abort ends only the caller's own requests ------------------------------------------------
def start_long(stub: pb_grpc.GenerationStub, request_id: str):
    """A LONG request, with its first response already read (so it is running)."""
    message = pb.GenerateRequest(
        request_id=request_id, tokens=pb.TokenIds(ids=[5, 6, 7]), max_tokens=LONG
    )
    stream = stub.Generate(message, timeout=60)
    first = next(stream)
    assert first.HasField("chunk")
    return stream, len(first.chunk.token_ids)


def rest(stream, tokens: int) -> tuple[int, str]:
    finish = ""
    for response in stream:
        if response.HasField("chunk"):
            tokens += len(response.chunk.token_ids)
        else:
            finish = pb.FinishReason.Name(response.complete.finish_reason)
    return tokens, finish


def test_another_connection_cannot_abort_a_request(client, server):
    with other_connection(server.target) as channel:
        stream, tokens = start_long(pb_grpc.GenerationStub(channel), "victim")
        assert client.abort(["victim"]) == 0
        assert rest(stream, tokens) == (LONG, "LENGTH")


def test_the_owner_aborts_its_own_request(server):
    with other_connection(server.target) as channel:
        stub = pb_grpc.GenerationStub(channel)
        stream, tokens = start_long(stub, "mine")
        abort = pb.AbortRequest(request_ids=["mine", "mine", "", "unknown"])
        assert stub.Abort(abort, timeout=10).aborted == 1
        assert rest(stream, tokens)[1] == "ABORTED"
        assert stub.Abort(abort, timeout=10).aborted == 0  # finished: ignored


def test_an_operator_with_the_admin_token_aborts_any_request(server):
    with other_connection(server.target) as channel:
        stream, tokens = start_long(pb_grpc.GenerationStub(channel), "stuck")
        with Client(server.target, admin_token="wrong", timeout=10) as impostor:
            error = refused(lambda: impostor.abort(["stuck"], as_operator=True))
            assert error.code() == grpc.StatusCode.PERMISSION_DENIED
        with Client(server.target, admin_token=TOKEN, timeout=10) as operator:
            assert operator.abort(["stuck"]) == 0  # the token is sent only when asked
            assert operator.abort(["stuck"], as_operator=True) == 1
        assert rest(stream, tokens)[1] == "ABORTED"
