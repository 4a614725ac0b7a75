"""Hostile command lines (issue 11): out-of-range numbers are usage errors (exit 2) and more
devices than exist is one line (exit 1), never a traceback or a run that never ends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from serve import cli_common
from serve.cli import main

REPO = Path(__file__).resolve().parent.parent
GENERATE = ["generate", "--preset", "tiny-mixtral", "--devices", "2"]


def run(capsys, *args: str) -> tuple[int, list[str]]:
    """main(args) in this process: (exit status, stderr lines)."""
    try:
        code = main(list(args))
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    return code, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize(
    "flag, value, needle",
    [
        ("--seed", str(2**32), "expected a seed in [0, 2**32)"),
        ("--seed", "99999999999999999999", "expected a seed in [0, 2**32)"),
        ("--top-k", str(2**31), "below 2**31"),
        ("--max-tokens", str(2**31), "below 2**31"),
        ("--max-tokens", "-3", "a positive integer"),
        ("--prompt-tokens", f"1,{2**31}", "token ids are in [0, 2**31)"),
        ("--prompt-tokens", "-1", "token ids are in [0, 2**31)"),
        ("--stop-token-ids", "99999999999", "token ids are in [0, 2**31)"),
        ("--devices", str(10**20), "below 2**31"),
    ],
)
def test_out_of_range_numbers_are_usage_errors(capsys, flag, value, needle):
    args = {"--prompt-tokens": "1,2", "--max-tokens": "2", flag: value}
    flat = [item for pair in args.items() for item in pair]
    code, lines = run(capsys, "generate", "--server", "127.0.0.1:1", *flat)
    assert code == 2, lines
    assert lines[0].startswith("usage:") and needle in lines[-1], lines


def test_stop_ids_outside_the_vocabulary_are_one_line(capsys, monkeypatch):
    monkeypatch.setenv("ELASTIC_MOE_NO_COMPILATION_CACHE", "1")
    args = ["--prompt-tokens", "1,2", "--max-tokens", "2", "--stop-token-ids", "5,999"]
    code, lines = run(capsys, *GENERATE, *args)
    assert code == 1 and len(lines) == 1, lines
    assert "stop_token_ids outside the vocabulary [0, 256): [999]" in lines[0]


def test_too_many_devices_are_not_simulated(monkeypatch):
    """XLA would make every simulated device at start-up: 9999 ran until killed."""
    monkeypatch.setattr(cli_common, "_backends_started", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1")
    cli_common.simulate_devices(9999)
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_foo=1"
    cli_common.simulate_devices(cli_common.MAX_SIMULATED_DEVICES)
    assert os.environ["XLA_FLAGS"].endswith(f"_count={cli_common.MAX_SIMULATED_DEVICES}")


def test_more_devices_than_exist_fail_at_once_saying_how_many_exist():
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "ELASTIC_MOE_NO_COMPILATION_CACHE": "1"}
    env.pop("XLA_FLAGS", None)  # as a user runs it: the CLI simulates the devices it is asked
    args = ["--devices", "9999", "--prompt-tokens", "1,2", "--max-tokens", "2"]
    result = subprocess.run(
        [sys.executable, "-m", "elastic_moe", "generate", "--preset", "tiny-mixtral", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=REPO,
    )
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert "--devices 9999: this machine has 1 cpu device (simulated: --devices N" in lines[0]
