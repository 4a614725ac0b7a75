"""Compiled programs keyed by device set, with standby compiles in the background.

After each reconfiguration (and at start) the programs of every mesh that one more failure
would produce are compiled on a background thread, so the next recovery finds them ready.
The JAX persistent compilation cache is on too, so a restart skips XLA compiles it has seen.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import jax

from elastic_moe.steps import MeshPrograms, StepGeometry
from mesh.device_mesh import build_mesh
from mesh.reshard import SlotTransfer, SlotWriter
from mesh.slot_checksum import SlotChecksums
from models.config import ModelConfig
from models.params import abstract_params, expert_weight_names, expert_weights

DeviceKey = tuple[int, ...]


def enable_persistent_cache(directory: str | None = None) -> str:
    """Turns on JAX's persistent compilation cache (ELASTIC_MOE_CACHE_DIR overrides)."""
    directory = (
        directory
        or os.environ.get("ELASTIC_MOE_CACHE_DIR")
        or os.path.join(os.path.expanduser("~"), ".cache", "elastic-moe", "jax")
    )
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return directory


class MeshExecutables:
    """Everything compiled for one mesh: prefill/decode, expert transfers and their checks."""

    def __init__(self, cfg: ModelConfig, devices: Sequence[jax.Device], geometry: StepGeometry):
        self.mesh = build_mesh(devices)
        self.programs = MeshPrograms(cfg, self.mesh, geometry)
        experts = expert_weights(
            abstract_params(cfg, geometry.num_expert_slots), cfg.first_dense_layers
        )
        shapes = [experts[name] for name in expert_weight_names(cfg)]
        self.transfer = SlotTransfer(self.mesh, shapes)
        self.writer = SlotWriter(self.mesh, shapes)
        self.checksums = SlotChecksums(self.mesh, shapes)

    def warm(self, prefill_lengths: Sequence[int]) -> None:
        """Compiles decode, prefill at each length, and the expert transfer and check
        programs."""
        self.transfer.compile()
        self.writer.compile()
        self.checksums.compile()
        self.programs.compile_decode()
        for length in prefill_lengths:
            self.programs.compile_prefill(length)


class ExecutableCache:
    def __init__(self, cfg: ModelConfig, geometry_for: Callable[[int], StepGeometry]):
        self.cfg = cfg
        self.geometry_for = geometry_for
        self._entries: dict[DeviceKey, MeshExecutables] = {}
        self._lock = threading.Lock()
        # A few compiles at once where there are cores to spare (XLA compiles mostly serially).
        workers = max(1, min(4, (os.cpu_count() or 1) // 4))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="standby-compile")
        self._pending: list[Future] = []
        self.hits = 0
        self.misses = 0

    def get(self, devices: Sequence[jax.Device]) -> MeshExecutables:
        key = tuple(d.id for d in devices)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                entry = MeshExecutables(self.cfg, devices, self.geometry_for(len(devices)))
                self._entries[key] = entry
            else:
                self.hits += 1
            return entry

    @property
    def size(self) -> int:
        """Meshes held here: compiled, being compiled, or queued for a standby compile."""
        return len(self._entries)

    def is_warm(self, devices: Sequence[jax.Device]) -> bool:
        entry = self._entries.get(tuple(d.id for d in devices))
        return entry is not None and entry.programs.compiled_count > 0

    def warm_standby(
        self,
        devices: Sequence[jax.Device],
        prefill_lengths: Sequence[int],
        min_devices: int,
        also: Sequence[Sequence[jax.Device]] = (),
    ) -> list[Future]:
        """Compiles, in the background, the programs of the meshes in `also` and of every mesh
        one failure of `devices` would leave (those too small to hold the experts excepted)."""
        for stale in self._pending:  # meant for a mesh that is no longer current
            stale.cancel()  # only those not started yet; a running compile finishes
        meshes = [list(m) for m in also]
        if len(devices) - 1 >= min_devices:
            meshes += [
                [d for i, d in enumerate(devices) if i != lost] for lost in range(len(devices))
            ]
        futures = [self._pool.submit(self.get(m).warm, prefill_lengths) for m in meshes]
        self._pending = futures
        return futures

    def wait_standby(self) -> None:
        for f in self._pending:
            f.result()

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
