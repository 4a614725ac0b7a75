"""`elastic-moe demo --no-live` (what `make demo` runs, in plain-line mode): two devices fail
and come back under gRPC traffic; no request is lost and every output equals the failure-free
run. Run as a user runs it, in a subprocess on 8 simulated CPU devices."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENV = {
    **os.environ,
    "XLA_FLAGS": (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip(),
    "JAX_PLATFORMS": "cpu",
    "COLUMNS": "160",
}
ENV.pop("ELASTIC_MOE_ADMIN_TOKEN", None)


def test_demo_loses_nothing_and_changes_nothing():
    result = subprocess.run(
        [sys.executable, "-m", "elastic_moe", "demo", "--no-live"],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        cwd=REPO,
    )
    out = result.stdout
    assert result.returncode == 0, (out[-4000:], result.stderr[-4000:])
    assert "Traceback" not in result.stderr
    summary = re.search(
        r"demo passed: (\d+) finished, (\d+) lost, outputs equal: (\w+), pauses ms: (.*)", out
    )
    assert summary is not None, out[-4000:]
    finished, lost, equal, pauses = summary.groups()
    assert (int(finished), int(lost), equal) == (12, 0, "yes")
    assert len(pauses.split(",")) == 3  # fail, fail, rejoin
    for needle in ("fail [", "rejoin [", "wave 3", "requests lost", "outputs equal"):
        assert needle in out, needle
