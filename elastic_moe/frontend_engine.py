"""The frontend's engine: the Engine's request state (journal, queue, slots, re-prefill)
around a RemoteMesh of worker processes (`Engine.around`), and its recovery after a worker died.
"""

from __future__ import annotations

from elastic_moe.engine import Engine, EngineOptions
from elastic_moe.remote_mesh import RemoteMesh
from models.config import ModelConfig


def frontend_engine(cfg: ModelConfig, mesh: RemoteMesh, options: EngineOptions) -> Engine:
    """Engine.submit / step / abort / generate over worker processes. Reconfiguration (expert
    moves, checksums, standby compiles) runs inside the workers (docs/WORKERS.md)."""
    return Engine.around(cfg, mesh, options)


def recover_on_survivors(
    engine: Engine,
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
    return engine.replace_mesh(mesh)
