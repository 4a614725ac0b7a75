"""Redundancy and balance restored in the background after a loss or a rejoin, a byte budget
at a time.

A failure's critical path moves only what it must (mesh.move_budget.restore_orphans); a rejoin
brings devices back with the old placement's shape. What is left (second replicas, the
load-following replicas) can be a large copy: 77 GB at 32 devices for DeepSeek-V3. The runtime
moves it in steps of at most `bytes_per_interval`, one step every `interval_s`, each a budgeted
rebalance (`Coordinator.rebalance(max_copies=...)`, most useful copies first) at a step
boundary, so serving pauses only for one small step at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh.move_budget import copies_per_step


@dataclass(frozen=True)
class RepairBudget:
    """At most `bytes_per_interval` of expert copies every `interval_s` seconds."""

    bytes_per_interval: int
    interval_s: float = 1.0

    def __post_init__(self) -> None:
        if self.bytes_per_interval < 1:
            raise ValueError(f"bytes_per_interval must be >= 1, got {self.bytes_per_interval}")
        if not self.interval_s > 0:
            raise ValueError(f"interval_s must be > 0, got {self.interval_s}")

    def copies(self, bytes_per_expert: int) -> int:
        """Expert copies per step (at least one, even when one expert exceeds the budget)."""
        return copies_per_step(self.bytes_per_interval, bytes_per_expert)


class RepairSchedule:
    """When the next budgeted step is due. Used by the runtime's loop thread only."""

    def __init__(self, budget: RepairBudget | None):
        self.budget = budget
        self.due_at: float | None = None
        self.steps_taken = 0

    @property
    def pending(self) -> bool:
        return self.due_at is not None

    def arm(self, now: float) -> None:
        """A change left work to do: the next step runs one interval from now."""
        if self.budget is not None:
            self.due_at = now + self.budget.interval_s

    def seconds_until_due(self, now: float) -> float | None:
        return None if self.due_at is None else max(0.0, self.due_at - now)

    def is_due(self, now: float) -> bool:
        return self.due_at is not None and now >= self.due_at

    def stepped(self, now: float, steps_left: int, copied: int) -> None:
        """After a step: again in one interval while the repair has steps left."""
        self.steps_taken += 1
        if steps_left > 0 and copied > 0:
            self.arm(now)
        else:
            self.due_at = None

    def cancel(self) -> None:
        self.due_at = None
