"""Counts XLA backend compilations (jax.monitoring), to prove a path does not recompile."""

from __future__ import annotations

import contextlib
import threading

import jax.monitoring

_lock = threading.Lock()
_count = 0
_installed = False


def _listener(name: str, duration: float, **_: object) -> None:
    global _count
    if name == "/jax/core/compile/backend_compile_duration":
        with _lock:
            _count += 1


def compiles() -> int:
    global _installed
    if not _installed:
        jax.monitoring.register_event_duration_secs_listener(_listener)
        _installed = True
    return _count


@contextlib.contextmanager
def count_compiles():
    """with count_compiles() as counted: ...; counted() is the number compiled inside."""
    start = compiles()
    yield lambda: compiles() - start
