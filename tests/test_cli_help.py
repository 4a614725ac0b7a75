"""What the CLI tells a newcomer without running a model: --version, `presets`, the help pages
and usage errors. Each runs the CLI in a subprocess, as a user does (none imports jax)."""

from __future__ import annotations

import json
from importlib.metadata import version

import pytest
from test_cli import assert_user_error, cli

from models.presets import PRESETS


def test_version():
    result = cli("--version", script=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"elastic-moe {version('elastic-moe')}"


def test_presets_lists_every_named_model_with_its_shape():
    listed = cli("presets", "--json", script=True)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)["presets"]}
    assert list(rows) == [*PRESETS, "tiny-fables"]
    assert rows["tiny-fables"]["weights"] == "trained"
    assert (rows["tiny-fables"]["layers"], rows["tiny-fables"]["d_model"]) == (4, 128)
    mixtral = rows["mixtral-8x7b"]
    assert mixtral["weights"] == "random" and mixtral["d_model"] == 4096
    assert (mixtral["experts"], mixtral["experts_per_token"]) == (8, 2)
    table = cli("presets", script=True)
    assert table.returncode == 0, table.stderr
    line = next(row for row in table.stdout.splitlines() if "tiny-qwen3-moe" in row)
    assert "qwen3_moe" in line and "16 (4)" in line  # experts (top-k)


@pytest.mark.parametrize("action", ["status", "watch", "fail", "rejoin", "rebalance"])
def test_every_mesh_action_help_has_a_description(action):
    result = cli("mesh", action, "--help", script=True)
    assert result.returncode == 0, result.stderr
    # argparse prints: usage, a blank line, then the description (if any) before the options.
    after_usage = result.stdout.split("\n\n", 1)[1].lstrip()
    assert not after_usage.startswith(("positional arguments:", "options:")), result.stdout


@pytest.mark.parametrize("flag", [["--inject-failure", "1:2"], ["--compare"]])
def test_offline_only_flags_against_a_server_print_the_generate_usage(flag):
    offline_only = ["generate", "--server", "127.0.0.1:1", "--prompt", "x", "--max-tokens", "1"]
    result = cli(*offline_only, *flag, script=True)
    stderr = assert_user_error(result, 2, "works offline only")
    assert stderr.startswith("usage: elastic-moe generate"), stderr


def test_help_documents_the_defaults_a_newcomer_trips_on():
    generate = cli("generate", "--help", script=True).stdout
    assert "steps 0 to N-2" in generate and "tokens equal: yes" in generate
    serve = " ".join(cli("serve", "--help", script=True).stdout.split())
    assert "EngineOptions.redundant_experts defaults to 0" in serve
    assert "the model's expert count" in serve
    assert "0: any free port" in serve and "(default, and 0: off)" in serve
