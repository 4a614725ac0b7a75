"""The frontend's stand-in for a ServingMesh whose devices belong to worker processes.

It has the part of ServingMesh's interface that the engine's steps use (`geometry`, `epoch`,
`prefill`, `decode`, `cache`, `discard_cache`, `reset_cache`) and forwards each call to every
worker through the WorkerPool; the workers run the real ServingMesh over the global mesh and
send back their own rows, which are put together here. Nothing device-side lives here.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from elastic_moe.steps import StepGeometry
from elastic_moe.worker_pool import WorkerPool

log = logging.getLogger("elastic_moe.workers")


class RemoteStepOutput(NamedTuple):
    """What the engine reads of a step's StepOutput, on the host."""

    tokens: np.ndarray  # [b] int32
    logprobs: np.ndarray  # [b] float32
    expert_load: np.ndarray  # [moe_layers, experts]


def assemble(replies: Sequence[dict], name: str, rows: int) -> np.ndarray:
    """The [rows] array whose pieces the workers sent as [(first row, values)]."""
    pieces = [(first, values) for reply in replies for first, values in reply[name]]
    out = np.empty((rows,), pieces[0][1].dtype)
    covered = np.zeros((rows,), bool)
    for first, values in pieces:
        out[first : first + len(values)] = values
        covered[first : first + len(values)] = True
    if not covered.all():
        raise RuntimeError(f"the workers sent {name} for {covered.sum()} of {rows} rows")
    return out


class RemoteMesh:
    def __init__(
        self,
        pool: WorkerPool,
        geometry: StepGeometry,
        device_ids: list[int],
        *,
        epoch: int = 0,
        step_timeout_s: float = 60.0,
    ):
        self.pool, self.geometry, self.device_ids = pool, geometry, device_ids
        self.epoch = epoch
        self.step_timeout_s = step_timeout_s
        self._compiled_lengths: set[int] = set()
        self._has_cache = True
        self.placement = None  # mesh.placement.Placement, set by deploy
        self.last_step_ms: list[float] = []  # each worker's time in the last step

    @classmethod
    def deploy(
        cls,
        pool: WorkerPool,
        model: str,
        options: dict[str, Any],
        *,
        device_ids: Sequence[int] | None = None,
        prefill_lengths: Sequence[int] = (),
        epoch: int = 0,
        timeout_s: float = 600.0,
    ) -> RemoteMesh:
        """Every live worker builds the model's serving state over `device_ids` (default: all
        devices of the cluster) and compiles its programs."""
        payload = {
            "model": model,
            "options": options,
            "device_ids": None if device_ids is None else list(device_ids),
            "prefill_lengths": list(prefill_lengths),
        }
        replies = pool.request("deploy", payload, timeout_s=timeout_s)
        geometries = {tuple(sorted(r["geometry"].items())) for r in replies}
        if len(geometries) != 1:
            raise RuntimeError(f"the workers built different geometries: {geometries}")
        mesh = cls(
            pool, StepGeometry(**replies[0]["geometry"]), replies[0]["device_ids"], epoch=epoch
        )
        mesh._compiled_lengths.update(int(n) for n in prefill_lengths)
        mesh.placement = replies[0]["placement"]  # where the experts are (the same in all)
        mesh.deploy_replies = replies
        return mesh

    def standby(self, prefill_lengths: Sequence[int], *, timeout_s: float = 600.0) -> list[dict]:
        """Every worker compiles ahead the programs of the meshes one worker's death would
        leave (see Worker.standby); returns their replies (compile_ms, meshes)."""
        return self.pool.request(
            "standby", {"prefill_lengths": [int(n) for n in prefill_lengths]}, timeout_s=timeout_s
        )

    # ---- the engine's interface -----------------------------------------------------------
    @property
    def cache(self) -> object | None:
        """Not the cache (it lives on the workers): None after discard_cache, as ServingMesh."""
        return True if self._has_cache else None

    def prefill(self, tokens, positions, rows, last, sampling) -> RemoteStepOutput:
        length = int(tokens.shape[1])
        if length not in self._compiled_lengths:  # compile outside the step, in every worker
            replies = self.pool.request("compile", {"prefill_lengths": [length]}, timeout_s=600.0)
            self._compiled_lengths.add(length)
            log.info(
                "prefill length %d compiled in every worker while serving (%.0f ms)",
                length,
                max(r["compile_ms"] for r in replies),
            )
        return self._step("prefill", (tokens, positions, rows, last, sampling))

    def decode(self, tokens, positions, sampling) -> RemoteStepOutput:
        return self._step("decode", (tokens, positions, sampling))

    def discard_cache(self) -> None:
        self._has_cache = False
        self.pool.request("discard_cache", timeout_s=self.step_timeout_s)

    def reset_cache(self) -> None:
        self.pool.request("reset_cache", timeout_s=self.step_timeout_s)
        self._has_cache = True

    def _step(self, kind: str, args: tuple) -> RemoteStepOutput:
        replies = self.pool.request(kind, args, timeout_s=self.step_timeout_s)
        rows = int(args[0].shape[0])
        self.last_step_ms = [r["step_ms"] for r in replies]
        return RemoteStepOutput(
            assemble(replies, "tokens", rows),
            assemble(replies, "logprobs", rows),
            replies[0]["expert_load"],
        )
