"""Filling preallocated parameters from memory-mapped safetensors files on a pool of threads.

A checkpoint load is many independent tensor copies (read, check, convert, transpose) into
disjoint parts of arrays allocated once. numpy releases the GIL inside its array loops, so a
thread pool over tensors scales with cores without a second process or a second copy of the
model. Tensors are read through read-only memory maps of their files (SafetensorsFile.view): no
per-tensor buffer (the page cache holds the bytes), and a worker's temporaries are one band of
rows at a time.

Errors: a failing tensor's own exception is raised (a CheckpointError names file and tensor),
after the tasks already running finish; tasks not yet started are skipped. With several broken
tensors, the first failed one in submission (file) order among those that ran is raised.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import ml_dtypes
import numpy as np
from jaxtyping import Shaped

BAND_ROWS = 256  # rows of a source tensor converted at a time: a few MiB of temporaries


def default_workers() -> int:
    """One worker per CPU this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _bits(array: np.ndarray) -> tuple[np.ndarray, int] | None:
    """(unsigned view, exponent mask) for 16-bit floats, whose numpy isfinite is slow
    (bfloat16 goes through ml_dtypes element by element); None for native float types."""
    if array.dtype == ml_dtypes.bfloat16:
        return array.view(np.uint16), 0x7F80
    if array.dtype == np.float16:
        return array.view(np.uint16), 0x7C00
    return None


def first_nonfinite(array: Shaped[np.ndarray, "..."]) -> tuple[int, ...] | None:
    """Index of the first NaN or infinite element (row-major), or None."""
    bits = _bits(array)
    if bits is None:
        bad = ~np.isfinite(array)
    else:
        view, mask = bits
        bad = (view & mask) == mask
    if not bad.any():
        return None
    return tuple(int(x) for x in np.argwhere(bad)[0])


def copy_checked(
    dest: Shaped[np.ndarray, "..."], source: Shaped[np.ndarray, "..."], transpose: bool
) -> None:
    """dest[...] = source.T if transpose else source, in dest's dtype, BAND_ROWS source rows at
    a time (a band transposes in cache; a whole-tensor transpose strides through memory).
    FloatingPointError at the first NaN or infinite value of `source`, or of dest after the
    cast (an overflow into float16)."""
    rows = source.shape[0] if source.ndim else 1
    same = dest.dtype == source.dtype
    for r in range(0, rows, BAND_ROWS) if source.ndim else [None]:
        part = source if r is None else source[r : r + BAND_ROWS]
        where = first_nonfinite(part)
        if where is not None:
            raise FloatingPointError(f"NaN or infinite value at {list(_shift(where, r))}")
        target = (
            dest
            if r is None
            else (dest[:, r : r + BAND_ROWS] if transpose else dest[r : r + BAND_ROWS])
        )
        value = part.T if transpose else part
        if same and (bits := _bits(part)) is not None:  # copy 16-bit floats as integers: faster
            np.copyto(target.view(bits[0].dtype), value.view(bits[0].dtype))
        else:
            np.copyto(target, value, casting="unsafe")
            if not same and (where := first_nonfinite(target)) is not None:
                where = where[::-1] if transpose else where
                raise FloatingPointError(
                    f"value out of range of {dest.dtype} at {list(_shift(where, r))}"
                )


def _shift(where: tuple[int, ...], r: int | None) -> tuple[int, ...]:
    return where if r is None else (where[0] + r, *where[1:])


class ParallelFill:
    """Runs tensor-filling tasks on `workers` threads (in the caller's thread for 1).

    submit(nbytes, fn, *args): fn(*args) fills one tensor; `advance(nbytes)` is called when it
    is done (rich's Progress is thread-safe). Leaving the `with` block waits for every task and
    raises the error of the first failed task in submission order."""

    def __init__(self, workers: int | None, advance: Callable[[int], None]):
        self.workers = default_workers() if workers is None else int(workers)
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        self.advance = advance
        self.futures: list[Future] = []
        self.pool = ThreadPoolExecutor(self.workers) if self.workers > 1 else None
        self.failed = threading.Event()

    def __enter__(self) -> ParallelFill:
        return self

    def submit(self, nbytes: int, fn: Callable, *args) -> None:
        if self.pool is None:
            fn(*args)
            self.advance(nbytes)
            return
        future = self.pool.submit(self._run, nbytes, fn, *args)
        self.futures.append(future)

    def _run(self, nbytes: int, fn: Callable, *args) -> None:
        if self.failed.is_set():  # another tensor failed: the load is over, skip the work
            return
        try:
            fn(*args)
        except BaseException:
            self.failed.set()
            raise
        self.advance(nbytes)

    def __exit__(self, *exc) -> None:
        if self.pool is None:
            return
        if exc[0] is not None:
            self.failed.set()
        wait(self.futures)
        self.pool.shutdown()
        if exc[0] is None:
            for future in self.futures:  # submission order: the first failed tensor
                if (error := future.exception()) is not None:
                    raise error
