"""A planned reconfiguration, as data: what the coordinator decided and the engine applies.

The coordinator plans (which devices, which placement, which transfers) without touching a
device; `Engine.apply` does the device side (poison what the lost devices held, move experts and
reuse the survivors' buffers, check every written slot, switch to the new mesh's programs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import jax

from elastic_moe.reconfiguration import IntegrityReport
from mesh.placement import Placement
from mesh.transfer_plan import TransferPlan


@dataclass(frozen=True)
class MeshChange:
    devices: list[jax.Device]  # the new mesh, in position order
    # New position j was old position old_positions[j]; None: a device new to the mesh.
    old_positions: list[int | None]
    lost_positions: list[int]  # old positions that leave the mesh
    placement: Placement
    transfers: TransferPlan


@dataclass
class AppliedChange:
    """What applying a MeshChange cost and did."""

    transfer_ms: float = 0.0
    compile_ms: float = 0.0
    poison_ms: float = 0.0  # simulating the loss: not part of the recovery's pause
    requests_reprefilled: int = 0
    integrity: IntegrityReport = field(default_factory=IntegrityReport)
