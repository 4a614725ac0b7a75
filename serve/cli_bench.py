"""`elastic-moe bench [NAME [ARGS...]]`: runs benchmarks/bench_NAME.py of the checkout.

The benchmarks are scripts of the repository, not of the installed package: they are found next
to the `serve` package (an editable install or a checkout) or in the working directory, and run
as `python -m benchmarks.bench_NAME ARGS...` from the repository root.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
from pathlib import Path

from serve.cli_common import CliError

PREFIX = "bench_"


def benchmarks_root() -> Path:
    """The directory that holds benchmarks/ (the repository root)."""
    for root in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (root / "benchmarks").is_dir():
            return root
    raise CliError(
        "no benchmarks/ directory: run `elastic-moe bench` from a checkout of elastic-moe "
        "(the benchmarks are not part of the installed package)"
    )


def available(root: Path) -> dict[str, Path]:
    return {
        path.stem.removeprefix(PREFIX): path
        for path in sorted((root / "benchmarks").glob(f"{PREFIX}*.py"))
    }


def summary(path: Path) -> str:
    """The first line of the script's docstring."""
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    except (OSError, SyntaxError):
        return ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


def run_bench(args: argparse.Namespace) -> int:
    root = benchmarks_root()
    scripts = available(root)
    if args.list:
        for name, path in scripts.items():
            print(f"{name:<12} {summary(path)}")
        return 0
    if args.name is None:
        if not scripts:
            raise CliError(f"no benchmarks in {root / 'benchmarks'}")
        failed = [name for name in scripts if _run(root, name, list(args.args)) != 0]
        if failed:
            raise CliError(f"benchmarks failed: {', '.join(failed)}")
        return 0
    name = args.name.removesuffix(".py").removeprefix("benchmarks/").removeprefix(PREFIX)
    if name not in scripts:
        known = ", ".join(scripts) or "none yet"
        raise CliError(
            f"no benchmark {args.name!r}: benchmarks/{PREFIX}{name}.py does not exist "
            f"(available: {known})"
        )
    code = _run(root, name, list(args.args))
    if code != 0:
        raise CliError(f"benchmark {name} failed (exit status {code})")
    return 0


def _run(root: Path, name: str, extra: list[str]) -> int:
    if extra[:1] == ["--"]:
        extra = extra[1:]
    command = [sys.executable, "-m", f"benchmarks.{PREFIX}{name}", *extra]
    print(f"$ python {' '.join(command[1:])}", file=sys.stderr, flush=True)
    return subprocess.run(command, cwd=root).returncode
