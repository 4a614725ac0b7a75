"""What a reconfiguration did and what the mesh looks like: plain records the faces report."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class DeviceState(enum.Enum):
    HEALTHY = "healthy"
    FAILED = "failed"
    REJOINING = "rejoining"


class MeshState(enum.Enum):
    SERVING = "serving"
    RECONFIGURING = "reconfiguring"
    DEGRADED = "degraded"  # serving, but one more loss would restore more than the policy allows
    DRAINING = "draining"
    STOPPED = "stopped"  # the runtime stopped: it cannot serve every expert, or its steps fail


class ReconfigurationRefused(RuntimeError):
    """The change would leave some expert with no slot; nothing was changed."""


class UnknownDevice(KeyError):
    """A device id that is not part of this deployment."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown device"


class ReconfigurationKind(enum.Enum):
    FAIL = "fail"  # devices declared failed (operator, API, test)
    DETECTED = "detected"  # the runtime found devices dead
    REJOIN = "rejoin"
    REBALANCE = "rebalance"


@dataclass(frozen=True)
class ExpertMove:
    """One expert written into a slot by a reconfiguration (reported by dry runs)."""

    layer: int  # MoE layer index
    expert: int
    to_device: int
    from_device: int  # device id it is copied from; -1: restored from the host copy


@dataclass
class Reconfiguration:
    from_epoch: int
    to_epoch: int
    cause: str
    kind: ReconfigurationKind = ReconfigurationKind.FAIL
    pause_ms: float = 0.0
    detect_ms: float = 0.0
    plan_ms: float = 0.0
    transfer_ms: float = 0.0
    compile_ms: float = 0.0
    experts_copied: int = 0
    experts_restored_from_host: int = 0
    requests_reprefilled: int = 0
    dry_run: bool = False
    standby_hit: bool = False  # the new mesh's programs were compiled before it was needed
    # Every slot the move wrote is checked against its expert's checksum before serving;
    # a mismatch is rewritten from the host copy (or the checkpoint) and counted here.
    slots_verified: int = 0
    slots_repaired: int = 0
    verify_ms: float = 0.0
    steps_left: int = 0  # a budgeted rebalance: steps still to go to its target
    # Dry runs only: the plan (slots the lost devices held, then every move it would make).
    slots_lost: int = 0
    moves: list[ExpertMove] = field(default_factory=list)


class ExpertIntegrityError(RuntimeError):
    """A slot still holds the wrong weights after it was rewritten from the host copy."""


@dataclass(frozen=True)
class SlotMismatch:
    """A slot whose weights are not those of the expert its placement names."""

    layer: int  # MoE layer index
    slot: int  # physical slot (mesh numbering)
    device_id: int
    expected_expert: int
    found_expert: int  # the expert whose weights it holds, or -1 when it matches none


@dataclass
class IntegrityReport:
    """What a check of expert slots found (and rewrote, when it repairs)."""

    epoch: int = 0  # the mesh epoch checked
    slots_checked: int = 0
    mismatches: list[SlotMismatch] = field(default_factory=list)
    slots_repaired: int = 0
    verify_ms: float = 0.0


@dataclass
class DeviceStatus:
    id: int
    platform: str
    state: DeviceState
    process_index: int
    expert_slots: int
    active_requests: int
    experts: list[list[int]] = field(default_factory=list)  # per MoE layer, experts held


@dataclass
class MeshStatus:
    epoch: int
    state: MeshState
    devices: list[DeviceStatus]
    num_logical_experts: int
    num_physical_slots: int
    min_live_replicas: int
    active_requests: int
    queued_requests: int
    last: Reconfiguration | None
    placement_policy: str = "auto"
    max_device_load: float = 1.0  # max / mean device load by the router's observed load
    worst_single_loss_restore: int = 0  # experts per layer one device loss leaves orphaned
    numerics: str = "invariant"  # EngineOptions.numerics: "invariant" or "fast"
