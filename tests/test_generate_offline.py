"""`elastic-moe generate` offline, run as a user runs it (a subprocess, with the persistent
compilation cache): the comparison with a failure-free run, what the run reports, the progress
display on a terminal, and model text with its control characters escaped."""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

from test_cli import ENV, REPO, cli

from serve.cli_generate import TextStream

RUN = ["generate", "--preset", "tiny-mixtral", "--devices", "4", "--prompt-tokens", "1,2,3"]
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")  # all but \t and \n


def test_a_failure_on_the_requests_device_is_compared_with_a_failure_free_run():
    faults = ["--inject-failure", "2:0", "--inject-failure", "40:1"]
    result = cli(*RUN, "--max-tokens", "6", "--json", *faults)
    assert result.returncode == 0, result.stderr
    done = json.loads(result.stdout)
    # Device 0 held the request: it was re-prefilled on the survivors.
    assert done["reprefills"] == 1 and done["reconfigurations"][0]["requests_reprefilled"] == 1
    assert done["serving_devices"] == [1, 2, 3]
    assert done["tokens_equal"] is True
    assert done["reference_token_ids"] == done["token_ids"] and len(done["token_ids"]) == 6
    # 6 tokens: steps 0 (2 tokens), 1, 2 (failed), 3 (re-prefill: 2 tokens), 4.
    assert done["steps"] == 5
    assert "--inject-failure 40:1 never fired: the request finished after 5 steps (0 to 4;" in (
        result.stderr
    )


def test_text_run_shows_progress_on_a_terminal_and_reports_the_comparison():
    result = subprocess.run(
        [sys.executable, "-m", "elastic_moe", *RUN, "--max-tokens", "48"]
        + ["--inject-failure", "3:0"],
        capture_output=True,
        text=True,
        timeout=240,
        env={**ENV, "TTY_COMPATIBLE": "1"},  # rich: stderr is a terminal
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    err = result.stderr
    assert "loading tiny-mixtral" in err and "deploying on 4 cpu devices" in err
    assert "started on 4 devices and ended on 3" in err
    assert "a failure-free run of the same request: tokens equal: yes" in err
    # Random weights make any byte; the text on stdout carries none as a control character.
    assert not CONTROL.search(result.stdout), repr(result.stdout)
    assert re.search(r"\\x[0-9a-f]{2}|\\r", result.stdout), "the premise: there was one to escape"


def test_a_difference_from_the_failure_free_run_says_no_and_exits_1():
    """The reference run is made to differ at token 3 (as a broken recovery would)."""
    script = """if True:
        import sys
        from serve import cli_offline
        from serve.cli import main
        real = cli_offline._run_without_faults
        def changed(engine, request):
            reference = real(engine, request)
            reference.generated[3] = (reference.generated[3] + 1) % 256
            return reference
        cli_offline._run_without_faults = changed
        sys.exit(main(sys.argv[1:]))
    """
    result = subprocess.run(
        [sys.executable, "-c", script, *RUN, "--max-tokens", "6", "--tokens", "--compare"],
        capture_output=True,
        text=True,
        timeout=240,
        env=ENV,
        cwd=REPO,
    )
    assert result.returncode == 1, result.stderr
    assert "tokens equal: no" in result.stderr
    assert "first difference at token 3" in result.stderr


def test_text_stream_escapes_control_characters_but_keeps_lines_and_tabs():
    sink = io.StringIO()
    stream = TextStream(out=sink)
    stream.push_text("a\x1b[2Jb\x07\r\n\tc\x00d\x9be")
    stream.close()
    assert sink.getvalue() == "a\\x1b[2Jb\\x07\\r\n\tc\\x00d\\x9be\n"
