"""TLS on both ports: a client that trusts the server's certificate is served; a plaintext
client is not."""

from __future__ import annotations

import shutil
import subprocess

import grpc
import pytest

from elastic_moe import Engine, EngineOptions, get_preset, init_params
from elastic_moe.coordinator import Coordinator
from elastic_moe.runtime import Runtime
from serve.client import Client
from serve.server import ServerConfig, ServerThread

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


def test_tls_serves_trusting_clients_only(certificate, devices):
    cert, key = certificate
    cfg = get_preset("tiny-mixtral")
    engine = Engine(cfg, init_params(cfg), devices[:2], EngineOptions(request_slots_per_device=2))
    runtime = Runtime(engine, coordinator=Coordinator(engine, standby=False)).start()
    config = ServerConfig(host="127.0.0.1", port=0, admin_port=0, tls_cert=cert, tls_key=key)
    try:
        with ServerThread(runtime, config) as server:
            ports = server.ports
            target = f"127.0.0.1:{ports.generation}"
            admin = f"127.0.0.1:{ports.admin}"
            with Client(target, admin_target=admin, tls_ca=cert, timeout=60) as client:
                done = client.generate([1, 2, 3], max_tokens=4)
                assert len(done.token_ids) == 4 and done.finish_reason == "length"
                assert client.mesh_status().epoch == 0
            with Client(target, admin_target=admin, timeout=5) as plaintext:
                with pytest.raises(grpc.RpcError) as refused:
                    plaintext.generate([1, 2, 3], max_tokens=4)
                assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        runtime.stop()
