"""What `elastic-moe serve` tells its operator: the address it really binds on stdout, and its
INFO log lines on stderr (they were never written: absl had configured the root logger first)."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

from serve.client import Client

REPO = Path(__file__).resolve().parent.parent
SERVING = re.compile(r"serving generation on 0\.0\.0\.0:(\d+), admin on 127\.0\.0\.1:(\d+)")


def test_serve_prints_the_host_it_binds_and_logs_its_info_lines():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ELASTIC_MOE_NO_COMPILATION_CACHE": "1"}
    env.pop("ELASTIC_MOE_ADMIN_TOKEN", None)
    command = [sys.executable, "-m", "elastic_moe", "serve", "--preset", "tiny-mixtral"]
    command += ["--devices", "1", "--host", "0.0.0.0", "--port", "0", "--admin-port", "0"]
    process = subprocess.Popen(
        [*command, "--no-standby", "--drain-timeout", "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=REPO,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in process.stdout], daemon=True).start()
    try:
        first = lines.get(timeout=180)
        serving = SERVING.search(first)
        assert serving, first
        port = serving.group(1)
        with Client(f"127.0.0.1:{port}", timeout=30) as client:  # every address: loopback too
            assert client.model_info().name == "tiny-mixtral"
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    assert f"elastic_moe.serve: serving Generation on 0.0.0.0:{port}, Admin on" in stderr, stderr
    assert "elastic_moe.serve: SIGTERM: draining, then stopping" in stderr, stderr
    assert "elastic_moe.serve: drained: 0 requests completed, 0 aborted" in stderr, stderr
