"""The gRPC server end to end: a real server on 127.0.0.1 (tiny-mixtral on 8 simulated devices)
and real clients. One server serves the whole module; tests leave it healthy for the next."""

from __future__ import annotations

import asyncio
import math
import threading
import time
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from elastic_moe import Engine, EngineOptions, SamplingParams, get_preset, init_params
from elastic_moe.coordinator import Coordinator
from elastic_moe.runtime import Runtime
from models.tokenizer import ByteTokenizer
from serve.client import AsyncClient, Client, Completion, admin_target_for
from serve.proto import elastic_moe_pb2 as pb
from serve.proto import elastic_moe_pb2_grpc as pb_grpc
from serve.server import ElasticServer, ServerConfig, ServerThread
from serve.text_stream import IncrementalDetokenizer

PROMPTS = [[(7 * i + 3 * j + 1) % 256 for j in range(3 + i % 10)] for i in range(32)]
MAX_TOKENS = 48
SAMPLING = SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=1234)
SAMPLED_TOKENS = 16
LONG = 110  # max_tokens of a request that runs long enough to be cancelled mid-stream


class Served:
    def __init__(self, devices):
        cfg = get_preset("tiny-mixtral")
        self.cfg = cfg
        self.engine = Engine(
            cfg,
            init_params(cfg),
            devices,
            EngineOptions(request_slots_per_device=4, redundant_experts=8),
        )
        # Failure-free references, computed on the same engine before the runtime drives it.
        self.greedy = [r.generated for r in self.engine.generate(PROMPTS, MAX_TOKENS)]
        self.greedy_logprobs = [r.logprobs for r in self.engine.generate(PROMPTS[:2], MAX_TOKENS)]
        self.sampled = [
            r.generated for r in self.engine.generate(PROMPTS[:4], SAMPLED_TOKENS, SAMPLING)
        ]
        self.long = self.engine.generate([PROMPTS[0]], LONG)[0].generated
        self.runtime = Runtime(
            self.engine, coordinator=Coordinator(self.engine, standby=False)
        ).start()
        config = ServerConfig(host="127.0.0.1", port=0, admin_port=0, admin_token="")
        self.thread = ServerThread(self.runtime, config).start()
        self.metrics_port = self.thread.server.metrics.serve_http(0, "127.0.0.1")
        self.target = f"127.0.0.1:{self.thread.ports.generation}"
        self.admin_target = f"127.0.0.1:{self.thread.ports.admin}"

    def client(self, **kw) -> Client:
        return Client(self.target, admin_target=self.admin_target, timeout=60, **kw)

    def async_client(self, **kw) -> AsyncClient:
        return AsyncClient(self.target, admin_target=self.admin_target, timeout=60, **kw)

    def close(self) -> None:
        self.thread.stop()
        self.runtime.stop()


@pytest.fixture(scope="module")
def served(devices):
    s = Served(devices)
    yield s
    s.close()


@pytest.fixture
def client(served):
    with served.client() as c:
        yield c


def wait_until(predicate, timeout=20.0, interval=0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def idle(client: Client) -> bool:
    status = client.mesh_status()
    return status.active_requests == 0 and status.queued_requests == 0


# ---- generation ------------------------------------------------------------------------
def test_model_info(client, served):
    info = client.model_info()
    assert (info.name, info.architecture) == ("tiny-mixtral", "mixtral")
    assert info.vocab_size == served.cfg.vocab_size == 256
    assert (info.num_experts, info.experts_per_token) == (8, 2)
    assert info.max_seq_len == served.cfg.max_seq_len
    assert info.num_layers == 2 and info.num_moe_layers == 2 and info.tokenizer == "byte"
    assert info.numerics == "invariant"


def test_greedy_stream_equals_engine_generate(client, served):
    for i, prompt in enumerate(PROMPTS[:3]):
        responses = list(client.generate_stream(prompt, MAX_TOKENS, request_id=f"greedy-{i}"))
        assert all(r.request_id == f"greedy-{i}" for r in responses)
        *chunks, last = responses
        assert all(r.HasField("chunk") for r in chunks) and last.HasField("complete")
        offsets = [r.chunk.offset for r in chunks]
        tokens = [t for r in chunks for t in r.chunk.token_ids]
        assert tokens == served.greedy[i]
        assert offsets == [
            sum(len(r.chunk.token_ids) for r in chunks[:k]) for k in range(len(chunks))
        ]
        assert all(len(r.chunk.logprobs) == len(r.chunk.token_ids) for r in chunks)
        complete = last.complete
        assert complete.finish_reason == pb.LENGTH
        assert (complete.prompt_tokens, complete.completion_tokens) == (len(prompt), MAX_TOKENS)
        assert complete.reprefills == 0 and complete.ttft_ms > 0
    done = client.generate(PROMPTS[1], MAX_TOKENS)
    assert done.token_ids == served.greedy[1]
    assert all(
        math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-4)
        for a, b in zip(done.logprobs, served.greedy_logprobs[1], strict=True)
    )
    assert done.finish_reason == "length" and done.epochs == [0] * MAX_TOKENS


def test_seeded_sampling_equals_engine_generate(client, served):
    s = SAMPLING
    for i, prompt in enumerate(PROMPTS[:4]):
        done = client.generate(
            prompt,
            SAMPLED_TOKENS,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            seed=s.seed,
        )
        assert done.token_ids == served.sampled[i]


def test_stop_token_finishes_with_stop(client, served):
    reference = served.greedy[2]
    stop = reference[5]
    done = client.generate(PROMPTS[2], MAX_TOKENS, stop_token_ids=[stop])
    first = reference.index(stop)
    assert done.token_ids == reference[: first + 1]
    assert done.finish_reason == "stop"


def test_text_prompt_and_streamed_text(client, served):
    text = "héllo, wörld €"
    by_text = client.generate(text, 12)
    by_tokens = client.generate(list(text.encode()), 12)
    assert by_text.token_ids == by_tokens.token_ids
    assert by_text.prompt_tokens == len(text.encode())
    # The streamed text pieces join up to the decoded tokens (no character cut in half).
    assert by_text.text == ByteTokenizer(256).decode(by_text.token_ids)


def test_incremental_detokenizer_never_cuts_a_character():
    text = "naïve café ✓ 日本 𝄞!"
    ids = list(text.encode())
    detok = IncrementalDetokenizer(ByteTokenizer(256), prompt=list(b"abc"))
    pieces = [detok.push([t], final=k == len(ids) - 1) for k, t in enumerate(ids)]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)
    # Several tokens at once, and a prompt that ends mid-character.
    detok = IncrementalDetokenizer(ByteTokenizer(256), prompt=list("€".encode())[:2])
    assert detok.push(ids[:4]) + detok.push(ids[4:], final=True) == text


def test_concurrent_streams_survive_fail_and_rejoin(served):
    """32 streams while a device fails and rejoins: none breaks, no token is lost, repeated
    or changed, and the tokens after the failure come from the new mesh."""

    async def run():
        async with served.async_client() as client:
            epoch0 = (await client.mesh_status()).epoch
            started = asyncio.Event()
            first_tokens = 0
            received: dict[int, list[tuple[float, pb.GenerateResponse]]] = {}

            async def stream(i):
                nonlocal first_tokens
                completion = Completion()
                received[i] = []
                async for response in client.generate_stream(
                    PROMPTS[i], MAX_TOKENS, request_id=f"storm-{i}"
                ):
                    received[i].append((time.monotonic(), response))
                    if response.HasField("chunk") and response.chunk.offset == 0:
                        first_tokens += 1
                        if first_tokens == len(PROMPTS):
                            started.set()
                    completion.add(response)  # raises on a gap or a repeated offset
                return completion

            tasks = [asyncio.create_task(stream(i)) for i in range(len(PROMPTS))]
            await asyncio.wait_for(started.wait(), 60)
            failed = await client.fail([2], reason="test", op_id="storm-fail")
            failed_at = time.monotonic()
            again = await client.fail([2], reason="test", op_id="storm-fail")  # a retry
            rejoined = await client.rejoin([2], op_id="storm-rejoin")
            completions = await asyncio.gather(*tasks)
            return epoch0, failed, failed_at, again, rejoined, completions, received

    epoch0, failed, failed_at, again, rejoined, completions, received = asyncio.run(run())
    assert failed.epoch == epoch0 + 1 and failed.summary.cause.startswith("fail [2]")
    assert again == failed  # the same op_id repeats nothing
    assert rejoined.epoch == epoch0 + 2
    assert failed.summary.requests_reprefilled > 0
    for i, done in enumerate(completions):
        assert done.token_ids == served.greedy[i], f"stream {i} changed"
        assert done.finish_reason == "length" and done.completion_tokens == MAX_TOKENS
        offsets = [r.chunk.offset for _, r in received[i] if r.HasField("chunk")]
        assert offsets == sorted(set(offsets)) and offsets[0] == 0
        assert done.epochs == sorted(done.epochs)
        # Tokens that arrived after the failure was answered were made on a later mesh.
        late = [r.chunk.mesh_epoch for t, r in received[i] if r.HasField("chunk") and t > failed_at]
        assert all(e > epoch0 for e in late)
    assert sum(d.reprefills for d in completions) == failed.summary.requests_reprefilled
    assert any(epoch0 + 1 in d.epochs for d in completions)
    with served.client() as client:
        status = wait_until(lambda: (s := client.mesh_status()).active_requests == 0 and s)
        assert status.epoch == epoch0 + 2
        assert all(d.state == pb.HEALTHY and d.expert_slots > 0 for d in status.devices)
        assert status.last.cause.startswith("rejoin [2]")


# ---- freeing slots -----------------------------------------------------------------------
def test_abort_frees_the_slot_and_is_idempotent(client, served):
    stream = client.generate_stream(PROMPTS[0], LONG, request_id="to-abort")
    first = next(stream)
    assert first.chunk.offset == 0
    assert client.abort(["to-abort"]) == 1
    rest = list(stream)
    assert rest[-1].complete.finish_reason == pb.ABORTED
    tokens = list(first.chunk.token_ids) + [t for r in rest[:-1] for t in r.chunk.token_ids]
    assert len(tokens) < LONG and tokens == served.long[: len(tokens)]
    assert client.abort(["to-abort", "never-existed"]) == 0
    assert client.abort([]) == 0
    wait_until(lambda: idle(client))


def test_cancelling_the_stream_frees_the_slot(client):
    stream = client.generate_stream(PROMPTS[0], LONG)
    next(stream)
    assert client.mesh_status().active_requests == 1
    stream.cancel()
    with pytest.raises(grpc.RpcError) as error:
        list(stream)
    assert error.value.code() == grpc.StatusCode.CANCELLED
    wait_until(lambda: idle(client))


def test_expired_deadline_gives_deadline_exceeded_and_frees_the_slot(client):
    with pytest.raises(grpc.RpcError) as error:
        client.generate(PROMPTS[0], LONG, timeout=0.25)
    assert error.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_until(lambda: idle(client))


# ---- bad input -------------------------------------------------------------------------
def _request(**kw) -> pb.GenerateRequest:
    sampling = kw.pop("sampling", {})
    return pb.GenerateRequest(
        max_tokens=kw.pop("max_tokens", 4), sampling=pb.SamplingParams(**sampling), **kw
    )


def _tokens(*ids):
    return pb.TokenIds(ids=list(ids))


BAD_REQUESTS = [
    ("no input", _request(), "no input"),
    ("empty text", _request(text=""), "empty"),
    ("empty tokens", _request(tokens=_tokens()), "empty"),
    ("token >= vocab", _request(tokens=_tokens(1, 256)), "outside the vocabulary"),
    ("negative token", _request(tokens=_tokens(-1)), "outside the vocabulary"),
    ("too long", _request(tokens=_tokens(*[1] * 100), max_tokens=50), "max_seq_len"),
    ("max_tokens 0", _request(tokens=_tokens(1), max_tokens=0), "max_tokens"),
    ("max_tokens huge", _request(tokens=_tokens(1), max_tokens=1000), "max_tokens (1000)"),
    ("temperature < 0", _request(tokens=_tokens(1), sampling={"temperature": -1}), "temperature"),
    (
        "temperature nan",
        _request(tokens=_tokens(1), sampling={"temperature": math.nan}),
        "temperature",
    ),
    ("top_p < 0", _request(tokens=_tokens(1), sampling={"top_p": -0.5}), "top_p"),
    ("top_p > 1", _request(tokens=_tokens(1), sampling={"top_p": 1.5}), "top_p"),
    ("top_p nan", _request(tokens=_tokens(1), sampling={"top_p": math.nan}), "top_p"),
    ("top_k < 0", _request(tokens=_tokens(1), sampling={"top_k": -3}), "top_k"),
    ("seed >= 2**32", _request(tokens=_tokens(1), sampling={"seed": 2**40}), "seed"),
    ("bad stop token", _request(tokens=_tokens(1), stop_token_ids=[999]), "stop_token_ids"),
]


def test_bad_requests_are_refused_and_others_are_unaffected(client, served):
    survivor: list = []
    background = threading.Thread(
        target=lambda: survivor.append(
            client.generate(PROMPTS[3], MAX_TOKENS, request_id="bystander")
        )
    )
    channel = grpc.insecure_channel(served.target)
    stub = pb_grpc.GenerationStub(channel)
    background.start()
    wait_until(lambda: client.mesh_status().active_requests == 1)
    # A duplicate id of the running request.
    with pytest.raises(grpc.RpcError) as error:
        client.generate([1, 2], 4, request_id="bystander")
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "already running" in error.value.details()
    for name, message, words in BAD_REQUESTS:
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Generate(message, timeout=30))
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, name
        assert words in error.value.details(), (name, error.value.details())
    admin_cases = [
        (lambda: client.fail([]), grpc.StatusCode.INVALID_ARGUMENT, "no device ids"),
        (lambda: client.fail([99]), grpc.StatusCode.NOT_FOUND, "99"),
        (lambda: client.rejoin([42]), grpc.StatusCode.NOT_FOUND, "42"),
        (lambda: client.fail(range(8)), grpc.StatusCode.FAILED_PRECONDITION, "cannot hold"),
        (lambda: client.fail([0, 1, 2, 3, 4]), grpc.StatusCode.FAILED_PRECONDITION, "cannot hold"),
        (lambda: client.rejoin([0]), grpc.StatusCode.FAILED_PRECONDITION, "already serving"),
    ]
    epoch = client.mesh_status().epoch
    for call, code, words in admin_cases:
        with pytest.raises(grpc.RpcError) as error:
            call()
        assert error.value.code() == code
        assert words in error.value.details(), error.value.details()
    background.join(60)
    channel.close()
    assert survivor and survivor[0].token_ids == served.greedy[3]
    status = client.mesh_status()
    assert status.epoch == epoch and all(d.state == pb.HEALTHY for d in status.devices)


# ---- admin -------------------------------------------------------------------------------
def test_mesh_status(client):
    status = client.mesh_status()
    assert len(status.devices) == 8 and status.num_logical_experts == 8
    assert status.num_physical_slots == 16 and status.min_live_replicas >= 2
    assert status.state == pb.SERVING and status.numerics == "invariant"
    for device in status.devices:
        assert device.platform == "cpu" and device.expert_slots == 2
        assert len(device.experts) == 2 and all(len(layer.ids) == 2 for layer in device.experts)


def test_dry_run_changes_nothing(client):
    before = client.mesh_status()
    plan = client.fail([4], dry_run=True)
    assert plan.summary.dry_run and plan.epoch == before.epoch
    assert plan.summary.from_epoch == plan.summary.to_epoch == before.epoch
    after = client.mesh_status()
    assert after.epoch == before.epoch
    assert [d.state for d in after.devices] == [d.state for d in before.devices]


def test_watch_mesh_status_and_rebalance(client, served):
    watchers_before = served.runtime.watcher_count
    watch = client.watch_mesh()
    first = next(watch)
    assert served.runtime.watcher_count == watchers_before + 1
    result = client.rebalance(op_id="rebalance-1")
    assert result.epoch == first.epoch + 1 and result.summary.cause == "rebalance"
    assert client.rebalance(op_id="rebalance-1") == result
    change = next(watch)
    assert change.epoch == first.epoch + 1 and change.last.cause == "rebalance"
    watch.cancel()
    wait_until(lambda: served.runtime.watcher_count == watchers_before)
    assert client.generate(PROMPTS[0], MAX_TOKENS).token_ids == served.greedy[0]


# ---- health, reflection, metrics -------------------------------------------------------
def test_health_and_reflection_on_both_ports(served):
    for target, service in (
        (served.target, "elastic_moe.v1.Generation"),
        (served.admin_target, "elastic_moe.v1.Admin"),
    ):
        with grpc.insecure_channel(target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for name in ("", "elastic_moe.v1.Generation"):
                response = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
                assert response.status == health_pb2.HealthCheckResponse.SERVING
            services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
            assert {service, "grpc.health.v1.Health"} <= services
            file = ProtoReflectionDescriptorDatabase(channel).FindFileContainingSymbol(service)
            assert file.package == "elastic_moe.v1"


def test_metrics_endpoint_after_traffic(client, served):
    client.generate(PROMPTS[0], 8)
    with urllib.request.urlopen(f"http://127.0.0.1:{served.metrics_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for name in (
        "elastic_moe_time_to_first_token_seconds_bucket",
        "elastic_moe_inter_token_latency_seconds_bucket",
        "elastic_moe_queue_time_seconds_count",
        "elastic_moe_queue_length",
        "elastic_moe_running_requests",
        "elastic_moe_tokens_generated_total",
        "elastic_moe_reconfigurations_total",
        "elastic_moe_reconfiguration_pause_seconds_count",
        "elastic_moe_mesh_epoch",
        "elastic_moe_live_devices 8.0",
        'elastic_moe_requests_finished_total{finish_reason="length"}',
        'elastic_moe_requests_rejected_total{code="INVALID_ARGUMENT"}',
    ):
        assert name in text, name
    samples = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }
    assert samples["elastic_moe_tokens_generated_total"] >= 8
    assert samples["elastic_moe_running_requests"] == 0
    assert samples["elastic_moe_queue_length"] == 0


def test_verify_experts_checks_every_slot_and_counts_it(served):
    def verified_total() -> float:
        url = f"http://127.0.0.1:{served.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            lines = r.read().decode().splitlines()
        return float(
            next(v for v in lines if v.startswith("elastic_moe_expert_slots_verified_total")).split(
                " "
            )[1]
        )

    before = verified_total()
    with grpc.insecure_channel(served.admin_target) as channel:
        stub = pb_grpc.AdminStub(channel)
        result = stub.VerifyExperts(pb.VerifyExpertsRequest(check_only=True), timeout=60)
        status = stub.GetMeshStatus(pb.MeshStatusRequest(), timeout=60)
    slots = served.cfg.num_moe_layers * status.num_physical_slots
    assert result.epoch == status.epoch
    assert result.slots_checked == slots and list(result.mismatches) == []
    assert result.slots_repaired == 0 and result.verify_ms > 0
    assert verified_total() == before + slots


# ---- admin token, configuration (TLS: test_grpc_tls.py) --------------------------------
def test_admin_token(served):
    config = ServerConfig(host="127.0.0.1", port=0, admin_port=0, admin_token="s3cret")
    with ServerThread(served.runtime, config) as guarded:
        target = f"127.0.0.1:{guarded.ports.generation}"
        admin = f"127.0.0.1:{guarded.ports.admin}"
        for token, code in (
            (None, grpc.StatusCode.UNAUTHENTICATED),
            ("nope", grpc.StatusCode.PERMISSION_DENIED),
        ):
            with Client(target, admin_target=admin, admin_token=token or "", timeout=10) as c:
                for call in (
                    c.mesh_status,
                    lambda c=c: next(c.watch_mesh()),
                    lambda c=c: c.fail([1]),
                ):
                    with pytest.raises(grpc.RpcError) as error:
                        call()
                    assert error.value.code() == code
                assert c.model_info().name == "tiny-mixtral"  # Generation needs no token
        with Client(target, admin_target=admin, admin_token="s3cret", timeout=10) as c:
            assert len(c.mesh_status().devices) == 8
            watch = c.watch_mesh()
            assert len(next(watch).devices) == 8
            watch.cancel()
        with grpc.insecure_channel(admin) as channel:  # health stays open
            response = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(), timeout=10
            )
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_admin_token_from_the_environment(served, monkeypatch):
    monkeypatch.setenv("ELASTIC_MOE_ADMIN_TOKEN", "from-env")
    server = ElasticServer(served.runtime, ServerConfig(host="0.0.0.0"))
    assert server.admin_token == "from-env" and server.admin_host == "0.0.0.0"
    assert Client("127.0.0.1:1").admin_token == "from-env"


def test_admin_refuses_a_public_address_without_a_token(served):
    with pytest.raises(ValueError, match="without an admin token"):
        ElasticServer(served.runtime, ServerConfig(admin_host="0.0.0.0", admin_token=""))
    assert ElasticServer(served.runtime, ServerConfig(admin_token="")).admin_host == "127.0.0.1"


def test_admin_target_defaults_to_the_same_host():
    assert admin_target_for("127.0.0.1:50051") == "127.0.0.1:50052"
    assert admin_target_for("[::1]:7000") == "[::1]:50052"
    assert admin_target_for("dns:///example.org:443") == "dns:///example.org:50052"
    assert admin_target_for("localhost") == "localhost:50052"


def test_a_port_in_use_is_an_error(served):
    config = ServerConfig(
        host="127.0.0.1", port=served.thread.ports.generation, admin_port=0, admin_token=""
    )
    thread = ServerThread(served.runtime, config)
    with pytest.raises(OSError, match="cannot bind"):
        thread.start()
    assert client_still_works(served)


def client_still_works(served) -> bool:
    with served.client() as client:
        return client.generate(PROMPTS[0], 4).token_ids == served.greedy[0][:4]
