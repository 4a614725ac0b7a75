"""TLS on both gRPC ports: the server presents the certificate it was given, a client that
trusts it gets the same tokens as from a plaintext server, and a plaintext client or one that
trusts another certificate gets nothing. One runtime (tiny-mixtral on 2 simulated devices)
serves a plaintext server and a TLS server for the whole module."""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
from pathlib import Path

import grpc
import pytest

from elastic_moe import Engine, EngineOptions, get_preset, init_params
from elastic_moe.coordinator import Coordinator
from elastic_moe.runtime import Runtime
from serve.client import Client
from serve.server import ElasticServer, ServerConfig, ServerThread

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
PROMPT = [1, 2, 3, 4]
TOKENS = 8


def make_certificate(folder: Path, name: str) -> tuple[str, str]:
    """A self-signed certificate for localhost and 127.0.0.1 (its own CA): (cert, key)."""
    cert, key = folder / f"{name}.pem", folder / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]
        + ["-nodes", "-days", "1", "-keyout", str(key), "-out", str(cert)]
        + ["-subj", f"/CN={name}", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True,
        capture_output=True,
    )
    return str(cert), str(key)


class Servers:
    def __init__(self, devices, folder: Path):
        self.cert, key = make_certificate(folder, "server")
        self.other_cert, _ = make_certificate(folder, "impostor")
        cfg = get_preset("tiny-mixtral")
        engine = Engine(cfg, init_params(cfg), devices[:2], EngineOptions())
        self.runtime = Runtime(engine, coordinator=Coordinator(engine, standby=False)).start()
        plain = ServerConfig(host="127.0.0.1", port=0, admin_port=0, admin_token="")
        tls = ServerConfig(
            host="127.0.0.1", port=0, admin_port=0, admin_token="", tls_cert=self.cert, tls_key=key
        )
        self.plain = ServerThread(self.runtime, plain).start()
        self.tls = ServerThread(self.runtime, tls).start()

    def client(self, server: ServerThread, **kw) -> Client:
        ports = server.ports
        return Client(
            f"127.0.0.1:{ports.generation}",
            admin_target=f"127.0.0.1:{ports.admin}",
            admin_token="",
            timeout=60,  # the first request compiles
            **kw,
        )

    def close(self) -> None:
        self.tls.stop()
        self.plain.stop()
        self.runtime.stop()


@pytest.fixture(scope="module")
def servers(devices, tmp_path_factory):
    s = Servers(devices, tmp_path_factory.mktemp("tls"))
    yield s
    s.close()


def presented_certificate(port: int, cafile: str) -> bytes:
    """The DER certificate the server sends in a TLS handshake (verified against cafile)."""
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(["h2"])  # what a gRPC client offers
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            assert tls.selected_alpn_protocol() == "h2"
            return tls.getpeercert(binary_form=True)


def test_both_ports_present_the_configured_certificate(servers):
    configured = ssl.PEM_cert_to_DER_cert(Path(servers.cert).read_text())
    for port in (servers.tls.ports.generation, servers.tls.ports.admin):
        assert presented_certificate(port, servers.cert) == configured


def test_tokens_over_tls_equal_the_plaintext_servers(servers):
    sampling = dict(temperature=0.8, top_p=0.9, top_k=20, seed=7)
    with (
        servers.client(servers.plain) as plain,
        servers.client(servers.tls, tls_ca=servers.cert) as tls,
    ):
        for kw in ({}, sampling):
            expected = plain.generate(PROMPT, TOKENS, **kw)
            got = tls.generate(PROMPT, TOKENS, **kw)
            assert len(got.token_ids) == TOKENS and got.finish_reason == "length"
            assert (got.token_ids, got.logprobs) == (expected.token_ids, expected.logprobs)
        assert tls.mesh_status().epoch == plain.mesh_status().epoch


@pytest.mark.parametrize("trust", ["nothing (plaintext)", "another certificate"])
def test_a_client_that_does_not_trust_the_certificate_gets_nothing(servers, trust):
    kw = {} if trust.startswith("nothing") else {"tls_ca": servers.other_cert}
    with servers.client(servers.tls, **kw) as client:
        for call in (client.model_info, client.mesh_status):
            with pytest.raises(grpc.RpcError) as refused:
                call()
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE


def test_tls_needs_both_the_certificate_and_the_key(servers):
    with pytest.raises(ValueError, match="both tls_cert and tls_key"):
        ElasticServer(servers.runtime, ServerConfig(tls_cert=servers.cert, admin_token=""))
