"""The proto: committed stubs equal a fresh generation; the proto extends the shared contract."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

from serve.proto import generate

REPO = Path(__file__).resolve().parents[1]
CONTRACT = REPO.parent / "shared" / "contracts" / "elastic_moe.proto"


def descriptor_set(proto: Path, out: Path) -> descriptor_pb2.FileDescriptorProto:
    generate.protoc([f"-I{proto.parent}", f"--descriptor_set_out={out}", str(proto)])
    files = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    assert len(files) == 1
    return files[0]


# The generator's own version, stamped into the stubs as a runtime minimum: a newer grpcio-tools
# than the one that generated them is not a stale stub (and the committed minimum stays low).
GENERATOR_VERSION = re.compile(
    r"^(GRPC_GENERATED_VERSION = |# Protobuf Python Version: )[^\n]*|"
    r"^(_runtime_version.ValidateProtobufRuntimeVersion\().*?\)",
    re.MULTILINE | re.DOTALL,
)


def without_generator_version(text: str) -> str:
    return GENERATOR_VERSION.sub(lambda m: m.group(1) or m.group(2), text)


def test_committed_stubs_equal_a_fresh_generation(tmp_path):
    for fresh in generate.generate(tmp_path):
        committed = generate.PROTO_DIR / fresh.name
        assert without_generator_version(committed.read_text()) == without_generator_version(
            fresh.read_text()
        ), f"{committed} is stale: run `make proto`"


def test_a_stub_change_is_still_stale():
    """The normalisation drops the version stamps only."""
    text = (generate.PROTO_DIR / "elastic_moe_pb2_grpc.py").read_text()
    assert "GRPC_GENERATED_VERSION = '" in text
    bumped = re.sub(r"GRPC_GENERATED_VERSION = '[^']*'", "GRPC_GENERATED_VERSION = '9.9.9'", text)
    assert without_generator_version(bumped) == without_generator_version(text)
    edited = text.replace("def Generate", "def Generated", 1)
    assert without_generator_version(edited) != without_generator_version(text)


def test_grpc_stub_imports_the_messages_package_relative():
    text = (generate.PROTO_DIR / "elastic_moe_pb2_grpc.py").read_text()
    assert "from serve.proto import elastic_moe_pb2 as" in text


def _fields(message: descriptor_pb2.DescriptorProto) -> dict[str, tuple]:
    return {
        f.name: (
            f.number,
            f.type,
            f.label,
            f.type_name,
            f.oneof_index if f.HasField("oneof_index") else None,
        )
        for f in message.field
    }


@pytest.mark.skipif(not CONTRACT.exists(), reason=f"no shared contract at {CONTRACT}")
def test_proto_is_the_contract_plus_additions(tmp_path):
    ours = descriptor_set(generate.PROTO_DIR / generate.PROTO_NAME, tmp_path / "ours.pb")
    theirs = descriptor_set(CONTRACT, tmp_path / "contract.pb")
    assert ours.package == theirs.package == "elastic_moe.v1"
    assert ours.syntax == theirs.syntax

    our_messages = {m.name: m for m in ours.message_type}
    for message in theirs.message_type:
        assert message.name in our_messages, f"message {message.name} is missing"
        mine = our_messages[message.name]
        our_fields = _fields(mine)
        for name, spec in _fields(message).items():
            assert our_fields.get(name) == spec, f"{message.name}.{name}: {our_fields.get(name)}"
        assert [o.name for o in mine.oneof_decl][: len(message.oneof_decl)] == [
            o.name for o in message.oneof_decl
        ]
        numbers = [f.number for f in mine.field]
        assert len(numbers) == len(set(numbers)), f"{message.name}: a field number is reused"

    our_enums = {e.name: e for e in ours.enum_type}
    for enum in theirs.enum_type:
        values = {v.name: v.number for v in our_enums[enum.name].value}
        for value in enum.value:
            assert values.get(value.name) == value.number, f"{enum.name}.{value.name}"

    our_services = {s.name: s for s in ours.service}
    for service in theirs.service:
        methods = {m.name: m for m in our_services[service.name].method}
        for method in service.method:
            mine = methods.get(method.name)
            assert mine is not None, f"{service.name}.{method.name} is missing"
            for attr in ("input_type", "output_type", "client_streaming", "server_streaming"):
                assert getattr(mine, attr) == getattr(method, attr), (
                    f"{service.name}.{method.name}.{attr}"
                )
