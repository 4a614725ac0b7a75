"""Every notebook under notebooks/ runs top to bottom without an error, prints what it claims,
and is committed with its outputs stripped.

The notebooks run in a Jupyter kernel of this very interpreter: the test writes a kernelspec for
`sys.executable` into a temporary directory, so it needs nothing installed by hand (a fresh CI
machine with `pip install -e '.[dev]'` is enough). Each notebook sets up its own 8 simulated CPU
devices and runs from the notebooks/ directory, as a user's Jupyter would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK_DIR = REPO / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
# The failure walkthrough (70 s on 2 cores; its flow is also covered by tests/test_demo.py and
# tests/test_readme.py) runs with -m slow; the others in the default suite.
SLOW_NOTEBOOKS = ("02_surviving_failures",)
KERNEL = "elastic-moe-tests"


@pytest.fixture(scope="module")
def kernel_specs(tmp_path_factory) -> KernelSpecManager:
    """A kernelspec that launches an IPython kernel with the interpreter running the tests."""
    spec_dir = tmp_path_factory.mktemp("kernels") / KERNEL
    spec_dir.mkdir()
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "elastic-moe (tests)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    return KernelSpecManager(kernel_dirs=[str(spec_dir.parent)])


def test_there_are_notebooks():
    names = [p.name for p in NOTEBOOKS]
    assert names == [
        "01_quickstart.ipynb",
        "02_surviving_failures.ipynb",
        "03_placement_lab.ipynb",
    ], names


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path: Path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    with_outputs = [
        i
        for i, cell in enumerate(notebook.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not with_outputs, f"{path.name}: cells {with_outputs} have outputs; strip them"


# What each notebook must print when its claims hold (its stdout, all cells together).
MUST_PRINT = {
    "01_quickstart": ["8 devices:", "--- greedy, 160 tokens", "--- temperature 0.6"],
    "02_surviving_failures": ["(lost: 0)", "outputs equal to the failure-free run:", "-> True"],
    "03_placement_lab": ["refused (7 x S slots < 64 experts)", "max/mean = "],
}


def errors_in(notebook) -> list[str]:
    """'cell N: Name: message' for every error output of the executed notebook."""
    return [
        f"cell {i}: {output.get('ename')}: {output.get('evalue')}"
        for i, cell in enumerate(notebook.cells)
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]


def printed(notebook) -> str:
    return "".join(
        output.get("text", "")
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.get("output_type") == "stream" and output.get("name") == "stdout"
    )


@pytest.mark.parametrize(
    "path",
    [pytest.param(p, marks=pytest.mark.slow) if p.stem in SLOW_NOTEBOOKS else p for p in NOTEBOOKS],
    ids=[p.stem for p in NOTEBOOKS],
)
def test_notebook_runs(path: Path, kernel_specs: KernelSpecManager, monkeypatch, tmp_path_factory):
    # A token in the environment would make the notebook's in-process Admin API demand it.
    monkeypatch.delenv("ELASTIC_MOE_ADMIN_TOKEN", raising=False)
    # Kernel connection files and IPython's profile in a scratch directory, not $HOME.
    scratch = tmp_path_factory.mktemp("jupyter")
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(scratch / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(scratch / "ipython"))
    notebook = nbformat.read(path, as_version=4)
    manager = KernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)
    client = NotebookClient(
        notebook,
        km=manager,
        timeout=600,
        startup_timeout=120,
        allow_errors=True,  # run every cell; the errors are collected and reported below
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()
    assert not errors_in(notebook), errors_in(notebook)
    stdout = printed(notebook)
    for needle in MUST_PRINT[path.stem]:
        assert needle in stdout, (needle, stdout[-3000:])


def test_a_failing_cell_is_reported(kernel_specs: KernelSpecManager, monkeypatch, tmp_path):
    """The check above sees a cell's error (it once followed an execute() that had raised)."""
    monkeypatch.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    cells = ["print('before')", "raise ValueError('boom')", "print('after')"]
    notebook = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    manager = KernelManager(kernel_name=KERNEL, kernel_spec_manager=kernel_specs)
    NotebookClient(notebook, km=manager, timeout=60, allow_errors=True).execute()
    assert errors_in(notebook) == ["cell 1: ValueError: boom"]
    assert printed(notebook) == "before\nafter\n"
