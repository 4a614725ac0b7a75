"""The README's Python examples run as a newcomer runs them, and show what they claim.

The Python API example runs in its own interpreter, as a script would: it must end without a
traceback (a standby timer that outlived the script once printed one) and print that the tokens
equal a failure-free run. The client example runs against a server on free ports (its addresses
swapped in). Every Python block of the README is one of these two, so none goes unchecked.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = (REPO / "README.md").read_text()
BLOCKS = re.findall(r"^```python\n(.*?)^```", README, re.S | re.M)
API_BLOCKS = [b for b in BLOCKS if "from elastic_moe.coordinator import Coordinator" in b]
CLIENT_BLOCKS = [b for b in BLOCKS if "from serve.client import Client" in b]
GENERATION, ADMIN = "127.0.0.1:50051", "127.0.0.1:50052"


def test_every_python_block_is_checked_here():
    assert len(BLOCKS) == 2
    assert len(API_BLOCKS) == 1 and len(CLIENT_BLOCKS) == 1


def test_python_api_example_fails_a_device_mid_generation_and_ends_clean():
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("XLA_FLAGS", None)  # the example sets its own, as a fresh script would
    result = subprocess.run(
        [sys.executable, "-c", API_BLOCKS[0]],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "Error" not in result.stderr, result.stderr
    out = result.stdout
    assert "tokens equal to the failure-free run: True" in out, out
    # The failure hit a request: it was re-prefilled and finished on the new mesh.
    assert re.search(r"failed device \d: epoch 1", out), out
    assert re.search(r"\b[1-9] request\(s\) re-prefilled", out), out
    finished = re.findall(r"^req-\d+ \[(.*)\] epochs \[(.*)\]$", out, re.M)
    assert len(finished) == 3, out
    assert all(len(tokens.split(",")) == 24 and epochs == "0, 1" for tokens, epochs in finished)


@pytest.fixture
def server_addresses(devices, monkeypatch):
    """A server (tiny-mixtral on 4 devices) on free ports: (generation, admin) addresses."""
    from elastic_moe import Engine, EngineOptions, get_preset, init_params
    from elastic_moe.coordinator import Coordinator
    from elastic_moe.runtime import Runtime
    from serve.server import ServerConfig, ServerThread

    monkeypatch.delenv("ELASTIC_MOE_ADMIN_TOKEN", raising=False)
    cfg = get_preset("tiny-mixtral")
    options = EngineOptions(request_slots_per_device=2, redundant_experts=8)
    engine = Engine(cfg, init_params(cfg), devices[:4], options)
    with Runtime(engine, coordinator=Coordinator(engine, standby=False)) as runtime:
        config = ServerConfig(host="127.0.0.1", port=0, admin_port=0, admin_token="")
        thread = ServerThread(runtime, config).start()
        try:
            ports = thread.ports
            yield f"127.0.0.1:{ports.generation}", f"127.0.0.1:{ports.admin}"
        finally:
            thread.stop()


def test_client_example_runs_against_a_server(server_addresses):
    block = CLIENT_BLOCKS[0]
    assert GENERATION in block and ADMIN in block  # else the swap below would change nothing
    generation, admin = server_addresses
    code = block.replace(GENERATION, generation).replace(ADMIN, admin)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), {"__name__": "readme"})
    printed = out.getvalue()
    assert "ms paused" in printed and "epoch 1 serving on [0, 1, 2]" in printed, printed
    assert "length" in printed  # the first generate finished by length
