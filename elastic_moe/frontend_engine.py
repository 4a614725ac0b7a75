"""The engine's request state in the frontend, stepping a RemoteMesh (worker processes).

The journal, the queue, slot ownership, token recording and re-prefill are the Engine's own
code, unchanged: only the mesh underneath is remote. The Engine builds its ServingMesh in its
constructor, so this subclass sets up the same request state around a mesh it is given. It
stands in for a hook in engine.py (docs/WORKERS.md, "The engine hook"): once Engine can be built
around a given mesh, this class reduces to that call.
"""

from __future__ import annotations

import collections

import numpy as np

from elastic_moe.engine import Engine, EngineOptions
from elastic_moe.remote_mesh import RemoteMesh
from elastic_moe.requests import Journal
from models.config import ModelConfig


class FrontendEngine(Engine):
    """Engine.submit / step / abort / generate / requeue_in_flight over worker processes.

    Reconfiguration (`apply`, expert moves, checksums, standby compiles) is not available here:
    those run inside the workers and are the next phase (docs/WORKERS.md)."""

    def __init__(self, cfg: ModelConfig, mesh: RemoteMesh, options: EngineOptions):
        # Engine.__init__ deploys on local devices; the request state below is the rest of it.
        self.cfg, self.options, self.mesh = cfg, options, mesh
        self.host_params = None  # the host copies live in the workers
        self.prefill_lengths_seen: set[int] = set()
        self.journal = Journal()
        self.waiting: collections.deque[str] = collections.deque()
        self.slot_owner: list[str | None] = [None] * mesh.geometry.num_request_slots
        self.expert_load = np.zeros((cfg.num_moe_layers, cfg.num_experts), np.int64)
        self.steps_run = 0
        self._events = []
        self._finished = []
        self.in_flight_untrusted = False
        self.fault_point = None

    def use_mesh(self, mesh: RemoteMesh) -> int:
        """Serving moves to `mesh` (a new deployment after workers died): every running request
        goes back to be re-prefilled from its journal (the in-flight step is not trusted, nor
        any survivor's cache). Returns how many. Slot counts follow the new geometry."""
        running = [o for o in self.slot_owner if o is not None]
        for request_id in reversed(running):
            self.journal.get(request_id).reprefills += 1
            self.waiting.appendleft(request_id)
        self.mesh = mesh
        self.slot_owner = [None] * mesh.geometry.num_request_slots
        self.in_flight_untrusted = False
        return len(running)


def recover_on_survivors(
    engine: FrontendEngine,
    model: str,
    options: dict,
    *,
    prefill_lengths=(),
) -> int:
    """After a WorkerFailure: the live workers deploy the model again over their own devices
    (from their host copies; nothing is reused yet) and every request in flight is re-prefilled
    from the journal. Returns how many requests were requeued."""
    pool = engine.mesh.pool
    live = [w.process_id for w in pool.live_workers]
    mesh = RemoteMesh.deploy(
        pool,
        model,
        options,
        device_ids=pool.device_ids(live),
        prefill_lengths=sorted(set(prefill_lengths) | engine.prefill_lengths_seen),
        epoch=engine.mesh.epoch + 1,
    )
    return engine.use_mesh(mesh)
