"""The `elastic-moe` command line, run as a user runs it: `python -m elastic_moe ...` in
subprocesses, against one `elastic-moe serve` subprocess on 8 simulated CPU devices.

The module's tests share that server, in file order: the mesh tests change its epoch.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENV = {
    **os.environ,
    "XLA_FLAGS": (
        os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    ).strip(),
    "JAX_PLATFORMS": "cpu",
    "PYTHONUNBUFFERED": "1",
    "COLUMNS": "160",
}
ENV.pop("ELASTIC_MOE_ADMIN_TOKEN", None)
SERVING_LINE = re.compile(r"serving generation on 127\.0\.0\.1:(\d+), admin on 127\.0\.0\.1:(\d+)")
ACCEPTANCE = [
    "generate",
    "--preset",
    "tiny-mixtral",
    "--devices",
    "8",
    "--prompt-tokens",
    "1,2,3,4,5",
    "--max-tokens",
    "32",
    "--json",
]
INJECTIONS = ["--inject-failure", "5:3", "--inject-failure", "9:6", "--inject-rejoin", "20:3"]


SCRIPT = Path(sys.executable).parent / "elastic-moe"


def cli(*args: str, timeout: float = 240, script: bool = False) -> subprocess.CompletedProcess:
    """`python -m elastic_moe ARGS`; with script=True the `elastic-moe` console script when it
    is installed (it starts faster: the elastic_moe package, which imports jax, is not loaded)."""
    command = [str(SCRIPT)] if script and SCRIPT.exists() else [sys.executable, "-m", "elastic_moe"]
    return subprocess.run(
        [*command, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=ENV,
        cwd=REPO,
    )


def assert_user_error(result: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    """Exit status `code`, no traceback, and for status 1 exactly one `elastic-moe: error:`
    line on stderr that contains every needle."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    if code == 1:
        assert len(lines) == 1 and lines[0].startswith("elastic-moe: error: "), result.stderr
    for needle in needles:
        assert needle in result.stderr, (needle, result.stderr)
    return result.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    generation: str
    admin: str


@pytest.fixture(scope="module")
def server():
    """`elastic-moe serve` on ephemeral ports; stopped with SIGTERM (a drain) at the end."""
    stderr = tempfile.TemporaryFile(mode="w+")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "elastic_moe",
            "serve",
            "--preset",
            "tiny-mixtral",
            "--devices",
            "8",
            "--redundant-experts",
            "8",
            "--port",
            "0",
            "--admin-port",
            "0",
            "--no-standby",  # keep the 2-core test machine for the tests
            "--repair-budget-mb",  # the mesh tests count epochs: repairs only when asked
            "0",
            "--drain-timeout",
            "10",
        ],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        env=ENV,
        cwd=REPO,
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(
        target=lambda: [lines.put(line) for line in process.stdout], daemon=True
    ).start()
    try:
        match = None
        while match is None:
            try:
                line = lines.get(timeout=180)
            except queue.Empty:
                break
            match = SERVING_LINE.search(line)
        if match is None:
            stderr.seek(0)
            pytest.fail(f"the server did not start:\n{stderr.read()[-3000:]}")
        yield Server(process, f"127.0.0.1:{match.group(1)}", f"127.0.0.1:{match.group(2)}")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        stderr.seek(0)
        log = stderr.read()
        stderr.close()
    assert code == 0, log[-3000:]
    assert "Traceback" not in log, log[-3000:]


# ---- without a server ---------------------------------------------------------------------------
def test_help_lists_every_command_with_examples():
    result = cli("--help")
    assert result.returncode == 0
    for command in ("serve", "generate", "mesh", "demo", "bench", "examples:"):
        assert command in result.stdout
    for command in (["serve"], ["generate"], ["mesh"], ["mesh", "fail"], ["demo"], ["bench"]):
        result = cli(*command, "--help", script=True)
        assert result.returncode == 0, result.stderr
        assert "example" in result.stdout, command


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "--preset", "tiny-mixtral", "--prompt-tokens", "1,2"],  # no --max-tokens
        ["generate", "--preset", "tiny-mixtral", "--prompt-tokens", "1,x", "--max-tokens", "4"],
        ["generate", "--prompt", "hi", "--max-tokens", "4"],  # no --server/--preset/--checkpoint
        ["generate", "--preset", "tiny-mixtral", "--prompt", "hi", "--max-tokens", "0"],
        [
            "generate",
            "--preset",
            "a",
            "--server",
            "127.0.0.1:1",
            "--prompt",
            "x",
            "--max-tokens",
            "1",
        ],
        [
            "generate",
            "--server",
            "127.0.0.1:1",
            "--prompt",
            "x",
            "--max-tokens",
            "1",
            "--inject-failure",
            "1:2",
        ],
        [
            "generate",
            "--preset",
            "tiny-mixtral",
            "--prompt",
            "x",
            "--max-tokens",
            "1",
            "--inject-failure",
            "5",
        ],
        ["mesh", "fail"],
        ["mesh", "fail", "three"],
        ["mesh", "status", "--admin", "nohost"],
        ["mesh"],
        ["serve", "--devices", "8"],
        ["serve", "--preset", "tiny-mixtral", "--repair-budget-mb", "-1"],
        ["serve", "--preset", "tiny-mixtral", "--repair-interval", "0"],
        ["serve", "--preset", "tiny-mixtral", "--numerics", "exact"],
        ["nonsense"],
    ],
)
def test_bad_arguments_exit_2(args):
    assert_user_error(cli(*args, script=True), 2, "usage:")


def test_unknown_preset_lists_the_known_ones():
    stderr = assert_user_error(
        cli("generate", "--preset", "gpt-17", "--prompt", "hi", "--max-tokens", "4"),
        1,
        "unknown preset 'gpt-17'",
        "tiny-mixtral",
    )
    assert "tiny-deepseek-v3" in stderr
    assert_user_error(cli("serve", "--preset", "gpt-17"), 1, "tiny-qwen3-moe")


def test_missing_checkpoint_directory(tmp_path):
    missing = tmp_path / "no-such-model"
    assert_user_error(
        cli("generate", "--checkpoint", str(missing), "--prompt", "hi", "--max-tokens", "4"),
        1,
        "does not exist",
    )
    (tmp_path / "empty").mkdir()
    assert_user_error(
        cli(
            "generate",
            "--checkpoint",
            str(tmp_path / "empty"),
            "--prompt",
            "x",
            "--max-tokens",
            "1",
        ),
        1,
        "neither an elastic-moe checkpoint",
    )


def test_unreachable_server_is_one_line():
    address = f"127.0.0.1:{free_port()}"
    assert_user_error(cli("mesh", "status", "--admin", address), 1, f"cannot reach {address}")
    assert_user_error(
        cli("generate", "--server", address, "--prompt", "hi", "--max-tokens", "4"),
        1,
        f"cannot reach {address}",
    )


def test_unknown_benchmark_is_a_clear_error():
    assert_user_error(cli("bench", "no-such-bench"), 1, "benchmarks/bench_no-such-bench.py")
    listed = cli("bench", "--list")
    assert listed.returncode == 0, listed.stderr


@pytest.fixture(scope="module")
def offline_reference():
    result = cli(*ACCEPTANCE)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_offline_generate_with_failures_and_rejoin_changes_nothing(offline_reference):
    result = cli(*ACCEPTANCE, *INJECTIONS)
    assert result.returncode == 0, result.stderr
    injected = json.loads(result.stdout)
    assert len(offline_reference["token_ids"]) == 32
    assert injected["token_ids"] == offline_reference["token_ids"]
    assert injected["logprobs"] == pytest.approx(offline_reference["logprobs"], abs=1e-5)
    assert [i["fired"] for i in injected["injections"]] == [True, True, True]
    causes = [r["cause"] for r in injected["reconfigurations"]]
    assert causes[0].startswith("fail [3]") and causes[1].startswith("fail [6]")
    assert causes[2] == "rejoin [3]"
    assert all(r["pause_ms"] > 0 for r in injected["reconfigurations"])
    assert injected["final_epoch"] == 3 and injected["epochs"][-1] == 3
    assert injected["serving_devices"] == [0, 1, 2, 3, 4, 5, 7]
    assert offline_reference["reconfigurations"] == [] and offline_reference["epochs"][-1] == 0
    # With faults the CLI ran the failure-free reference itself; without, it compared nothing.
    assert injected["tokens_equal"] is True
    assert injected["reference_token_ids"] == offline_reference["token_ids"]
    assert offline_reference["tokens_equal"] is None


def test_offline_generate_text_streams_and_reports():
    result = cli(
        "generate",
        "--preset",
        "tiny-mixtral",
        "--devices",
        "4",
        "--prompt",
        "Hello",
        "--max-tokens",
        "6",
        "--tokens",
        "--inject-failure",
        "2:0",
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.split()) == 6
    assert "fail [0]" in result.stderr and "6 tokens, finish: length" in result.stderr
    bad = cli(
        "generate",
        "--preset",
        "tiny-mixtral",
        "--devices",
        "4",
        "--prompt",
        "Hello",
        "--max-tokens",
        "4",
        "--inject-failure",
        "1:9",
    )
    assert_user_error(bad, 1, "unknown device 9")


def test_offline_generate_from_a_hugging_face_directory_matches_transformers():
    """The fixture's greedy continuation, computed by transformers, through a device loss."""
    fixture = REPO / "tests" / "fixtures" / "hf" / "mixtral"
    expected = json.loads((fixture / "expected.json").read_text())
    result = cli(
        "generate",
        "--checkpoint",
        str(fixture),
        "--devices",
        "4",
        "--prompt-tokens",
        ",".join(map(str, expected["prompt"])),
        "--max-tokens",
        str(len(expected["greedy"])),
        "--json",
        "--inject-failure",
        "6:2",
    )
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout)
    assert done["token_ids"] == expected["greedy"]
    assert done["model"] == "mixtral" and done["final_epoch"] == 1


# ---- against the server -------------------------------------------------------------------------
def test_mesh_status_text_and_json(server):
    text = cli("mesh", "status", "--admin", server.admin)
    assert text.returncode == 0, text.stderr
    assert "mesh epoch 0" in text.stdout and "healthy" in text.stdout
    assert "min live replicas 2" in text.stdout and "no reconfiguration yet" in text.stdout
    assert "numerics invariant" in text.stdout
    status = json.loads(cli("mesh", "status", "--admin", server.admin, "--json").stdout)
    assert status["epoch"] == 0 and status["state"] == "SERVING"
    assert status["numerics"] == "invariant"
    assert [d["id"] for d in status["devices"]] == list(range(8))
    assert all(d["state"] == "HEALTHY" and d["expert_slots"] == 2 for d in status["devices"])
    assert status["num_logical_experts"] == 8 and status["num_physical_slots"] == 16
    held = sorted(e for d in status["devices"] for e in d["experts"][0])
    assert held == sorted(list(range(8)) * 2)  # two replicas of every expert
    assert status["last"] is None


def test_generate_against_the_server(server, offline_reference):
    result = cli(
        "generate",
        "--server",
        server.generation,
        "--prompt-tokens",
        "1,2,3,4,5",
        "--max-tokens",
        "32",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout)
    assert done["token_ids"] == offline_reference["token_ids"]  # same weights, greedy
    assert len(done["logprobs"]) == 32 and done["finish_reason"] == "length"
    text = cli("generate", "--server", server.generation, "--prompt", "Hi", "--max-tokens", "8")
    assert text.returncode == 0, text.stderr
    assert "[8 tokens, finish: length" in text.stderr


def test_mesh_fail_dry_run_then_fail(server):
    dry = cli("mesh", "fail", "3", "--dry-run", "--admin", server.admin, "--json")
    assert dry.returncode == 0, dry.stderr
    plan = json.loads(dry.stdout)
    assert plan["epoch"] == 0 and plan["summary"]["dry_run"] is True
    summary = plan["summary"]
    assert summary["slots_lost"] > 0  # device 3's slots, over every layer
    moves = summary["moves"]
    assert len(moves) == summary["experts_copied"] + summary["experts_restored_from_host"]
    assert all(m["to_device"] != 3 and m["from_device"] != 3 for m in moves)
    text = cli("mesh", "fail", "3", "--dry-run", "--admin", server.admin)
    assert "dry run at epoch 0" in text.stdout and "->" not in text.stdout
    assert "expert slots lost" in text.stdout and "standby programs ready" in text.stdout
    failed = cli("mesh", "fail", "3", "--reason", "ECC errors", "--admin", server.admin)
    assert failed.returncode == 0, failed.stderr
    for needle in ("epoch 1", "fail [3]: ECC errors", "pause", "transfer", "compile"):
        assert needle in failed.stdout, needle
    status = json.loads(cli("mesh", "status", "--admin", server.admin, "--json").stdout)
    device3 = status["devices"][3]
    assert status["epoch"] == 1 and device3["state"] == "FAILED" and device3["expert_slots"] == 0
    assert status["last"]["cause"] == "fail [3]: ECC errors"
    text = cli("mesh", "status", "--admin", server.admin)
    assert "failed" in text.stdout and "last reconfiguration" in text.stdout


def test_generate_on_the_shrunk_mesh(server, offline_reference):
    result = cli(
        "generate",
        "--server",
        server.generation,
        "--prompt-tokens",
        "1,2,3,4,5",
        "--max-tokens",
        "32",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout)
    assert done["token_ids"] == offline_reference["token_ids"]
    assert set(done["epochs"]) == {1}


def test_unknown_device_is_the_servers_not_found(server):
    assert_user_error(
        cli("mesh", "fail", "42", "--admin", server.admin), 1, "unknown device", "NOT_FOUND"
    )
    assert_user_error(cli("mesh", "rejoin", "5", "--admin", server.admin), 1, "already serving")


def test_mesh_rejoin_and_rebalance(server):
    rejoined = cli("mesh", "rejoin", "3", "--op-id", "rejoin-3", "--admin", server.admin, "--json")
    assert rejoined.returncode == 0, rejoined.stderr
    result = json.loads(rejoined.stdout)
    assert result["epoch"] == 2 and result["summary"]["cause"] == "rejoin [3]"
    moved = result["summary"]["experts_copied"] + result["summary"]["experts_restored_from_host"]
    assert moved > 0 and result["summary"]["kind"] == "rejoin"
    assert result["summary"]["slots_verified"] == moved  # every written slot was checked
    assert result["summary"]["slots_repaired"] == 0
    again = json.loads(
        cli("mesh", "rejoin", "3", "--op-id", "rejoin-3", "--admin", server.admin, "--json").stdout
    )
    assert again == result  # the same op id repeats nothing
    rebalanced = cli("mesh", "rebalance", "--admin", server.admin)
    assert rebalanced.returncode == 0, rebalanced.stderr
    assert "epoch 3" in rebalanced.stdout and "rebalance" in rebalanced.stdout
    status = json.loads(cli("mesh", "status", "--admin", server.admin, "--json").stdout)
    assert status["epoch"] == 3 and all(d["state"] == "HEALTHY" for d in status["devices"])


def test_mesh_verify_checks_every_slot(server):
    status = json.loads(cli("mesh", "status", "--admin", server.admin, "--json").stdout)
    checked = cli("mesh", "verify", "--check-only", "--admin", server.admin, "--json")
    assert checked.returncode == 0, checked.stderr
    report = json.loads(checked.stdout)
    layers = len(status["devices"][0]["experts"])
    assert report["slots_checked"] == layers * status["num_physical_slots"]
    assert report["mismatches"] == [] and report["epoch"] == status["epoch"]
    text = cli("mesh", "verify", "--admin", server.admin)
    assert text.returncode == 0 and f"{report['slots_checked']} expert slots checked" in text.stdout
    assert "0 wrong" in text.stdout


def test_mesh_watch_follows_until_interrupted(server):
    process = subprocess.Popen(
        [sys.executable, "-m", "elastic_moe", "mesh", "watch", "--admin", server.admin, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**ENV, "PYTHONFAULTHANDLER": "1"},
        cwd=REPO,
    )
    try:
        first = json.loads(process.stdout.readline())
        assert first["epoch"] == 3
        process.send_signal(signal.SIGINT)
        try:
            code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack
            raise
        assert code == 0, process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        print(process.stderr.read())
