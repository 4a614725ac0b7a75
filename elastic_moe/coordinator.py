"""The coordinator: fail / rejoin / rebalance as transactions with an epoch.

Every operation runs at a step boundary (the caller guarantees no step is in flight):
plan (new device list, placement, transfers) -> [poison what the lost devices held] ->
move experts and reuse survivors' buffers -> switch to the new mesh's programs -> requeue the
lost devices' requests for re-prefill -> resume with epoch + 1. A change that cannot keep every
expert served is refused before anything changes. Operation ids make retries harmless.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Iterable, Sequence

import jax
import numpy as np

from elastic_moe.engine import Engine
from elastic_moe.mesh_change import MeshChange
from elastic_moe.reconfiguration import (
    DeviceState,
    DeviceStatus,
    ExpertMove,
    IntegrityReport,
    MeshState,
    MeshStatus,
    Reconfiguration,
    ReconfigurationKind,
    ReconfigurationRefused,
    UnknownDevice,
)
from mesh.move_budget import repair_in_steps, restore_orphans
from mesh.placement import PlacementError, repair, survivors_only
from mesh.placement_policy import placement_figures
from mesh.transfer_plan import TransferPlan, plan_transfers

# A server lives for months: what it remembers of past operations is bounded.
HISTORY_KEPT = 1000  # the newest reconfigurations in `history`
OP_IDS_KEPT = 4096  # the newest op ids; a retry of an older one runs again


class Coordinator:
    def __init__(
        self,
        engine: Engine,
        *,
        poison: bool = True,
        standby: bool = True,
        standby_delay_s: float = 0.5,
    ):
        """standby: compile the next likely meshes' programs in the background, starting
        standby_delay_s after each change so the first steps of the new epoch run first."""
        self.engine = engine
        self.standby_delay_s = standby_delay_s
        self._standby_timer: threading.Timer | None = None
        self.poison_lost = poison
        self.standby = standby
        self.pool: dict[int, jax.Device] = {d.id: d for d in engine.mesh.devices}
        self.states: dict[int, DeviceState] = {i: DeviceState.HEALTHY for i in self.pool}
        self.history: list[Reconfiguration] = []  # oldest first, the newest HISTORY_KEPT
        self._ops: collections.OrderedDict[str, tuple] = collections.OrderedDict()
        if standby:
            self.warm_standby()

    # ---- lifecycle ----------------------------------------------------------------------
    def close(self) -> None:
        """Stops the background work: the pending standby timer and the queued standby
        compiles (one already running finishes). Without it, a timer that fires after the
        program ended finds the compile pool gone. Later reconfigurations still work; they
        just compile on the critical path."""
        self.standby = False
        timer, self._standby_timer = self._standby_timer, None
        if timer is not None:
            timer.cancel()
            if timer is not threading.current_thread():
                timer.join()  # it may have fired already: let it finish queueing first
        self.engine.executables.shutdown()

    def __enter__(self) -> Coordinator:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- operations ---------------------------------------------------------------------
    def fail(
        self,
        device_ids: Iterable[int],
        *,
        reason: str = "",
        op_id: str = "",
        dry_run: bool = False,
        detect_ms: float = 0.0,
        detected: bool = False,
    ) -> Reconfiguration:
        """Declares devices failed and moves serving onto the survivors (detected: the
        runtime found them dead, rather than an operator or a test declaring it)."""
        lost = self._known(device_ids)
        if (repeat := self._repeat(op_id, "fail", lost)) is not None:
            return repeat
        current = [d.id for d in self.engine.mesh.devices]
        not_serving = [i for i in lost if i not in current]
        if not_serving:
            raise ReconfigurationRefused(f"devices {not_serving} are not in the serving mesh")
        survivors = [i for i in current if i not in lost]
        cause = f"fail {sorted(lost)}" + (f": {reason}" if reason else "")
        kind = ReconfigurationKind.DETECTED if detected else ReconfigurationKind.FAIL
        result = self._reconfigure(survivors, kind, cause, dry_run, detect_ms, fast_path=True)
        if not dry_run:
            for i in lost:
                self.states[i] = DeviceState.FAILED
        return self._remember(op_id, ("fail", lost), result)

    def rejoin(self, device_ids: Iterable[int], *, op_id: str = "") -> Reconfiguration:
        """Brings failed devices back: they get expert slots, experts and request capacity."""
        joining = self._known(device_ids)
        if (repeat := self._repeat(op_id, "rejoin", joining)) is not None:
            return repeat
        current = [d.id for d in self.engine.mesh.devices]
        already = [i for i in joining if i in current]
        if already:
            raise ReconfigurationRefused(f"devices {already} are already serving")
        for i in joining:
            self.states[i] = DeviceState.REJOINING
        try:
            result = self._reconfigure(
                sorted(current + joining), ReconfigurationKind.REJOIN, f"rejoin {joining}"
            )
        except Exception:
            for i in joining:
                self.states[i] = DeviceState.FAILED
            raise
        for i in joining:
            self.states[i] = DeviceState.HEALTHY
        return self._remember(op_id, ("rejoin", joining), result)

    def rebalance(self, *, op_id: str = "", max_copies: int = 0) -> Reconfiguration:
        """A new placement from the expert load the router observed, moved online.

        max_copies > 0: only the most useful step of at most that many expert copies toward
        it (mesh.move_budget.repair_in_steps: lone experts' second replicas first, then the
        moves that cut the max device load most), so a large repair can be spread over time
        with a small pause each; call again for the next step. The observed load is kept
        until the placement reaches its target."""
        if max_copies < 0:
            raise ValueError(f"max_copies must be >= 0, got {max_copies}")
        if (repeat := self._repeat(op_id, "rebalance", [max_copies])) is not None:
            return repeat
        current = [d.id for d in self.engine.mesh.devices]
        cause = "rebalance" + (f" (at most {max_copies} copies)" if max_copies else "")
        result = self._reconfigure(
            current,
            ReconfigurationKind.REBALANCE,
            cause,
            load=self.observed_load(),
            max_copies=max_copies,
        )
        if not result.steps_left:
            self.engine.expert_load[:] = 0
        return self._remember(op_id, ("rebalance", [max_copies]), result)

    # ---- the transaction ----------------------------------------------------------------
    def _reconfigure(
        self,
        new_ids: Sequence[int],
        kind: ReconfigurationKind,
        cause: str,
        dry_run: bool = False,
        detect_ms: float = 0.0,
        load: np.ndarray | None = None,
        fast_path: bool = False,
        max_copies: int = 0,
    ) -> Reconfiguration:
        """fast_path: leave the survivors' slots as they are when they still hold every expert
        (no copy on the critical path of a failure; a rebalance restores redundancy later);
        under the auto and balance policies, restore only the experts that lost every replica.
        max_copies (a rebalance): go only one budgeted step toward the new placement."""
        engine = self.engine
        old = engine.mesh
        started = time.perf_counter()
        old_ids = [d.id for d in old.devices]
        old_positions = [old_ids.index(i) if i in old_ids else None for i in new_ids]
        lost_positions = [p for p, i in enumerate(old_ids) if i not in new_ids]
        max_replicas = old.geometry.max_replicas
        policy = engine.options.placement
        budget = engine.options.restore_budget
        if load is None:
            load = np.maximum(self.observed_load(), 1e-3)
        steps_left = 0
        try:
            placement = None
            if fast_path:
                placement = survivors_only(old.placement, old_positions, max_replicas)
                if placement is None and policy != "survive":
                    # Only the orphans come back (from the host); a rebalance does the rest.
                    placement = restore_orphans(old.placement, old_positions, load, max_replicas)
            if placement is None:
                placement = repair(
                    old.placement,
                    old_positions,
                    load,
                    max_replicas,
                    policy=policy,
                    restore_budget=budget,
                )
            if max_copies:
                steps = repair_in_steps(old.placement, placement, load, max_copies)
                placement = steps[0] if steps else old.placement
                steps_left = max(0, len(steps) - 1)
        except PlacementError as e:
            raise ReconfigurationRefused(
                f"{cause} refused: {len(new_ids)} devices x {old.geometry.expert_slots_per_device}"
                f" slots cannot hold all {engine.cfg.num_experts} experts ({e}); nothing changed"
            ) from None
        plan = plan_transfers(old.placement, placement, old_positions)
        plan_ms = 1000 * (time.perf_counter() - started)
        result = Reconfiguration(
            from_epoch=old.epoch,
            to_epoch=old.epoch + (0 if dry_run else 1),
            cause=cause,
            kind=kind,
            detect_ms=detect_ms,
            plan_ms=plan_ms,
            experts_copied=plan.experts_copied,
            experts_restored_from_host=plan.experts_from_host,
            dry_run=dry_run,
            steps_left=steps_left,
        )
        change = MeshChange(
            devices=[self.pool[i] for i in new_ids],
            old_positions=old_positions,
            lost_positions=lost_positions,
            placement=placement,
            transfers=plan,
        )
        result.standby_hit = engine.programs_ready(change.devices)
        if dry_run:
            result.requests_reprefilled = sum(engine.active_on_device(p) for p in lost_positions)
            s = old.geometry.expert_slots_per_device
            result.slots_lost = len(lost_positions) * s * placement.num_layers
            result.moves = _moves(plan, placement.phy2log, new_ids, s)
            return result
        applied = engine.apply(change, poison_lost=self.poison_lost)
        result.transfer_ms, result.compile_ms = applied.transfer_ms, applied.compile_ms
        result.slots_verified = applied.integrity.slots_checked
        result.slots_repaired = applied.integrity.slots_repaired
        result.verify_ms = applied.integrity.verify_ms
        result.requests_reprefilled = applied.requests_reprefilled
        # The poisoning simulates the loss itself; it is not part of the recovery's pause.
        elapsed_ms = 1000 * (time.perf_counter() - started) - applied.poison_ms
        result.pause_ms = detect_ms + elapsed_ms
        remember_newest(self.history, result)
        if self.standby:
            if self._standby_timer is not None:
                self._standby_timer.cancel()
            # What to compile is read now, on the caller's (the loop's) thread; the timer
            # thread only queues the compiles.
            self._standby_timer = threading.Timer(
                self.standby_delay_s, self._queue_standby, args=self._standby_targets()
            )
            self._standby_timer.daemon = True
            self._standby_timer.start()
        return result

    def _known(self, device_ids: Iterable[int]) -> list[int]:
        return known_device_ids(device_ids, self.pool)

    def _repeat(self, op_id: str, action: str, ids: list[int]) -> Reconfiguration | None:
        """The earlier result of a retried operation (same op id, action and devices); an op
        id reused for another operation is refused (it would silently do nothing)."""
        if not op_id or op_id not in self._ops:
            return None
        done, result = self._ops[op_id]
        if done != (action, ids):
            name = done[0] + (f" {done[1]}" if done[1] else "")
            raise ValueError(f"op_id {op_id!r} was already used for {name}; use a new op id")
        return result

    def _remember(self, op_id: str, what: tuple, result: Reconfiguration) -> Reconfiguration:
        if op_id and not result.dry_run:
            self._ops[op_id] = (what, result)
            while len(self._ops) > OP_IDS_KEPT:
                self._ops.popitem(last=False)
        return result

    def warm_standby(self) -> None:
        """Compiles, in the background, the programs for the current mesh (its transfer
        programs), for every mesh one more failure would leave, and for the mesh a rejoin of
        every failed device would bring back."""
        self._queue_standby(*self._standby_targets())

    def _standby_targets(self) -> tuple:
        """(current devices, prefill lengths, extra meshes): read from the engine by its
        owner's thread, so the standby timer never touches engine state."""
        engine = self.engine
        lengths = sorted(engine.prefill_lengths_seen) or [engine.options.min_prefill_bucket]
        current = list(engine.mesh.devices)
        full = [self.pool[i] for i in sorted(self.pool)]
        extra = [current] + ([full] if len(full) != len(current) else [])
        return current, lengths, extra

    def _queue_standby(self, current, lengths, extra) -> None:
        self.engine.executables.warm_standby(current, lengths, self.engine.min_devices, also=extra)

    def verify(self, *, repair: bool = True) -> IntegrityReport:
        """Checks every expert slot of the serving mesh against its expert's checksum, on the
        devices; with `repair`, rewrites each wrong slot from the host copy (or checkpoint)."""
        return self.engine.verify_experts(repair=repair)

    # ---- reporting ----------------------------------------------------------------------
    def observed_load(self) -> np.ndarray:
        return self.engine.expert_load.astype(np.float64)

    def status(self) -> MeshStatus:
        mesh = self.engine.mesh
        return mesh_status(
            self.engine,
            mesh.placement,
            [d.id for d in mesh.devices],
            [(i, d.platform, int(d.process_index)) for i, d in sorted(self.pool.items())],
            self.states,
            self.history[-1] if self.history else None,
        )


def mesh_status(
    engine: Engine,
    placement,
    serving_ids: Sequence[int],
    known: Sequence[tuple[int, str, int]],
    states: dict[int, DeviceState],
    last: Reconfiguration | None,
) -> MeshStatus:
    """The mesh as the faces report it. placement: the serving mesh's mesh.placement.Placement;
    serving_ids: its device ids in mesh order; known: (id, platform, process index) of every
    device of the deployment, serving or not; states: each known device's state."""
    s = placement.slots_per_device
    position = {i: p for p, i in enumerate(serving_ids)}
    devices = []
    for i, platform, process_index in known:
        p = position.get(i)
        experts = (
            [
                placement.phy2log[j, p * s : (p + 1) * s].tolist()
                for j in range(placement.num_layers)
            ]
            if p is not None
            else []
        )
        devices.append(
            DeviceStatus(
                id=i,
                platform=platform,
                state=states[i],
                process_index=process_index,
                expert_slots=s if p is not None else 0,
                active_requests=engine.active_on_device(p) if p is not None else 0,
                experts=experts,
            )
        )
    load = engine.expert_load.astype(np.float64)
    min_live = int(placement.replica_count.min())
    figures = placement_figures(placement, load)
    worst_restore = int(figures.worst_restore.max())
    # Degraded: one more loss would restore more experts from the host than the
    # placement policy allows (every expert lost with its only replica is a host restore).
    budget = engine.options.restore_budget if engine.options.placement != "survive" else 0
    state = MeshState.DEGRADED if worst_restore > budget else MeshState.SERVING
    return MeshStatus(
        epoch=engine.mesh.epoch,
        state=state,
        devices=devices,
        num_logical_experts=engine.cfg.num_experts,
        num_physical_slots=placement.num_slots,
        min_live_replicas=min_live,
        placement_policy=engine.options.placement,
        max_device_load=float(figures.imbalance.max()),
        worst_single_loss_restore=worst_restore,
        numerics=engine.options.numerics,
        active_requests=len(engine.running),
        queued_requests=len(engine.waiting),
        last=last,
    )


def known_device_ids(device_ids: Iterable[int], known: Iterable[int]) -> list[int]:
    """The ids sorted, without repeats; ValueError when empty, UnknownDevice naming any id
    this deployment does not have."""
    ids = sorted({int(i) for i in device_ids})
    if not ids:
        raise ValueError("no device ids given")
    known = set(known)
    unknown = [i for i in ids if i not in known]
    if unknown:
        raise UnknownDevice(f"unknown device ids {unknown}; this deployment has {sorted(known)}")
    return ids


def remember_newest(history: list[Reconfiguration], result: Reconfiguration) -> None:
    """Appends result and keeps the newest HISTORY_KEPT entries."""
    history.append(result)
    del history[:-HISTORY_KEPT]


def _moves(
    plan: TransferPlan, phy2log: np.ndarray, new_ids: Sequence[int], slots_per_device: int
) -> list[ExpertMove]:
    """Every slot the plan writes, as (layer, expert, to device, from device or -1 = host).

    phy2log: [layers, new_num_slots] the new placement; new_ids: device id of each position."""
    moves = []
    for layer, slot in zip(*np.nonzero(~plan.keep), strict=True):
        source = int(plan.source_slot[layer, slot])
        moves.append(
            ExpertMove(
                layer=int(layer),
                expert=int(phy2log[layer, slot]),
                to_device=int(new_ids[slot // slots_per_device]),
                from_device=int(new_ids[source // slots_per_device]) if source >= 0 else -1,
            )
        )
    return moves
