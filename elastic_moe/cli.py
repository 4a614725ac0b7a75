"""The `elastic-moe` command's entry point: check the install, then run the CLI (serve.cli)."""

from __future__ import annotations

import sys

from elastic_moe.layout import LayoutClash, check_layout


def main(argv: list[str] | None = None) -> int:
    try:
        check_layout()
    except LayoutClash as clash:
        print(f"elastic-moe: error: {clash}", file=sys.stderr)
        return 1
    from serve.cli import main as cli_main

    return cli_main(argv)
