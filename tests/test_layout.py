"""The install's top-level packages (models, mesh, serve) are checked to be this project's: a
foreign package of the same name gives one clear line, not a confusing failure later."""

import os
import subprocess
import sys
from pathlib import Path

from elastic_moe.layout import foreign_siblings

REPO = Path(__file__).resolve().parent.parent


def test_the_checkout_is_its_own():
    assert foreign_siblings() == []


def run_shadowed(tmp_path, *args):
    """Runs Python with another distribution's `models` package ahead of ours."""
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "__init__.py").write_text('"""Somebody else\'s models."""\n')
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    return subprocess.run(
        [sys.executable, *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )


def test_a_foreign_models_package_is_named_by_the_cli(tmp_path):
    result = run_shadowed(tmp_path, "-m", "elastic_moe", "--version")
    assert result.returncode == 1
    assert "package 'models' at" in result.stderr and "another distribution" in result.stderr
    assert "virtual environment of its own" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_foreign_models_package_is_named_by_the_python_api(tmp_path):
    code = "import elastic_moe\ntry:\n    elastic_moe.get_preset\nexcept ImportError as e:\n"
    code += "    print(type(e).__name__, e)\n"
    result = run_shadowed(tmp_path, "-c", code)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("LayoutClash") and "package 'models'" in result.stdout
