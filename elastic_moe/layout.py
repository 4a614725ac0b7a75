"""The top-level packages installed beside elastic_moe must be this distribution's own.

The repository's layout is fixed (models/, mesh/ and serve/ beside elastic_moe/), so an install
puts four top-level packages into site-packages, and `models` in particular is a common name.
Another distribution's package of that name would shadow ours (or overwrite its files) and fail
later with a confusing ImportError; the `elastic-moe` command and the Python API check first and
say what clashes. The check reads no module: it finds each package and looks for the marker
line of our `__init__.py`. Install into a virtual environment of its own (what `make` does) and
nothing can clash.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

SIBLINGS = ("models", "mesh", "serve")
MARKER = "Part of the elastic-moe distribution"


class LayoutClash(ImportError):
    """Another distribution's package has the name of one of ours."""


def foreign_siblings() -> list[str]:
    """One line per sibling package that is missing, shadowed or not ours."""
    problems = []
    for name in SIBLINGS:
        spec = importlib.util.find_spec(name)
        places = list(spec.submodule_search_locations or []) if spec else []
        if len(places) != 1:
            where = ", ".join(places) or "nowhere"
            problems.append(f"package {name!r} is found at {where}, not as one package")
            continue
        init = Path(places[0]) / "__init__.py"
        head = init.read_text(errors="replace")[:600] if init.is_file() else ""
        if MARKER not in head:
            problems.append(f"package {name!r} at {places[0]} belongs to another distribution")
    return problems


def check_layout() -> None:
    """Raises LayoutClash, naming each clash and the way out."""
    problems = foreign_siblings()
    if problems:
        raise LayoutClash(
            "elastic-moe cannot run in this environment: "
            + "; ".join(problems)
            + ". elastic-moe installs the top-level packages models, mesh and serve: install it"
            " in a virtual environment of its own (`make demo` makes one in .venv)."
        )
