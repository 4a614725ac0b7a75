"""The device-side state of one mesh epoch: parameters, KV cache, placement tables, programs.

`ServingMesh.create` deploys from the host copy; `ServingMesh.moved_to` builds the next epoch's
state from this one: survivors' buffers are reused as they are, expert slots are filled by
device-to-device copies (or from the host copy when no replica survived), and new devices get
their share.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np

from elastic_moe.deployment import place_params
from elastic_moe.executables import ExecutableCache, MeshExecutables
from elastic_moe.expert_checksums import ExpertChecksums
from elastic_moe.expert_source import ExpertSource
from elastic_moe.reconfiguration import ExpertIntegrityError, IntegrityReport, SlotMismatch
from elastic_moe.steps import Sampling, StepGeometry, StepOutput
from mesh.placement import Placement, place, primary_first
from mesh.reshard import poison, reassemble
from mesh.transfer_plan import TransferPlan, schedule_rounds
from models.config import ModelConfig
from models.params import (
    Params,
    expert_weight_names,
    expert_weights,
    is_expert_path,
    moe_layer_indices,
    path_keys,
)

log = logging.getLogger("elastic_moe.integrity")


def expert_slots_per_device(cfg: ModelConfig, num_devices: int, redundant: int) -> int:
    """S: enough slots for every expert plus `redundant` replicas over the whole mesh."""
    return max(1, math.ceil((cfg.num_experts + redundant) / num_devices))


@dataclass
class MoveStats:
    experts_copied: int = 0
    experts_restored_from_host: int = 0
    transfer_rounds: int = 0
    transfer_ms: float = 0.0
    compile_ms: float = 0.0
    integrity: IntegrityReport = field(default_factory=IntegrityReport)


@dataclass
class ServingMesh:
    cfg: ModelConfig
    devices: list[jax.Device]
    compiled: MeshExecutables  # this mesh's programs (from the engine's ExecutableCache)
    geometry: StepGeometry
    params: Params
    cache: list
    placement: Placement
    epoch: int = 0
    replica_routing: str = "primary"
    tables: tuple[jax.Array, jax.Array] = field(init=False)  # decode's
    prefill_tables: tuple[jax.Array, jax.Array] = field(init=False)
    # (host columns, their device copies) of the last decode's sampling (_resident_sampling)
    _sampling_on_device: tuple | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._upload_tables()

    @classmethod
    def create(
        cls,
        cfg: ModelConfig,
        host_params: Params,
        devices: Sequence[jax.Device],
        programs_cache: ExecutableCache,
        *,
        replica_routing: str = "auto",
        placement_policy: str = "auto",
        restore_budget: int = 2,
        load: np.ndarray | None = None,
    ) -> ServingMesh:
        devices = list(devices)
        entry = programs_cache.get(devices)
        geometry = entry.programs.geometry
        if load is None:
            load = np.ones((cfg.num_moe_layers, cfg.num_experts))
        placement = place(
            load,
            len(devices),
            geometry.expert_slots_per_device,
            geometry.max_replicas,
            policy=placement_policy,
            restore_budget=restore_budget,
        )
        programs = entry.programs
        params = place_params(cfg, host_params, placement.phy2log, programs.param_shardings)
        return cls(
            cfg,
            devices,
            entry,
            geometry,
            params,
            programs.empty_cache(),
            placement,
            replica_routing=replica_routing,
        )

    # ---- running the programs ---------------------------------------------------------
    @property
    def programs(self):
        return self.compiled.programs

    def _upload_tables(self) -> None:
        """The routing tables the programs take: `tables` for decode, `prefill_tables` for
        prefill. Spread: tokens over every live replica; primary: each expert's first replica
        only (column 0 balanced over devices). "auto" spreads prefill (many rows: compute per
        device counts) and keeps decode on the primaries (few rows: each expert's weights are
        read once, whatever the redundancy)."""
        replicated = self.programs.replicated
        counts = self.placement.replica_count.astype(np.int32)

        def upload(log2phy, counts):
            return (
                jax.device_put(log2phy.astype(np.int32), replicated),
                jax.device_put(counts, replicated),
            )

        spread = upload(self.placement.log2phy, counts)
        primary = upload(primary_first(self.placement), np.minimum(counts, 1))
        self.tables = spread if self.replica_routing == "spread" else primary
        self.prefill_tables = primary if self.replica_routing == "primary" else spread

    def set_placement(self, placement: Placement) -> None:
        self.placement = placement
        self._upload_tables()

    def prefill(self, tokens, positions, rows, last, sampling) -> StepOutput:
        run = self.programs.compile_prefill(tokens.shape[1])
        out = run(
            self.params, self.cache, *self.prefill_tables, tokens, positions, rows, last, sampling
        )
        self.cache = out.cache
        return self._draw_sampled_rows(out, sampling.temperature, sampling)

    def decode(self, tokens, positions, sampling: Sampling) -> StepOutput:
        run = self.programs.compile_decode()
        resident = self._resident_sampling(sampling)
        out = run(self.params, self.cache, *self.tables, tokens, positions, resident)
        self.cache = out.cache
        return self._draw_sampled_rows(out, sampling.temperature, resident)

    def _draw_sampled_rows(self, out: StepOutput, temperature, sampling: Sampling) -> StepOutput:
        """The step's programs pick every row greedily; when the host's columns say some row
        samples, the sampling program redraws the step's tokens from its logits, on the
        devices (a choice inside the step would make the GPU runtime wait on the host)."""
        if not np.any(np.asarray(temperature) > 0):
            return out
        draw = self.programs.compiled_draw(out.logits.shape[0])
        tokens, logprobs = draw(out.logits, sampling)
        return out._replace(tokens=tokens, logprobs=logprobs)

    def _resident_sampling(self, sampling: Sampling) -> Sampling:
        """The per-request columns (temperature, top-k, top-p, seed) change only when a slot
        changes hands, so the device copies of the last decode are reused while the host
        columns are equal: 3 transfers a step instead of 7 (only tokens, positions and the
        token index change every step)."""
        columns = sampling[:4]
        kept = self._sampling_on_device
        if kept is None or not all(
            isinstance(new, np.ndarray) and np.array_equal(new, old)
            for new, old in zip(columns, kept[0], strict=True)
        ):
            host = tuple(np.array(c) for c in columns)
            kept = (host, tuple(jax.device_put(c, self.programs.batch) for c in host))
            self._sampling_on_device = kept
        return Sampling(*kept[1], sampling.step)

    # ---- failure handling ---------------------------------------------------------------
    def discard_cache(self) -> None:
        """Drops the KV cache (a step failed midway: its contents cannot be trusted). Every
        request must be re-prefilled; the next epoch, or reset_cache(), builds a fresh one."""
        for leaf in jax.tree.leaves(self.cache):
            if not leaf.is_deleted():
                leaf.delete()
        self.cache = None

    def reset_cache(self) -> None:
        """A zeroed KV cache on this mesh (after discard_cache, when the mesh stays)."""
        self.discard_cache()
        self.cache = self.programs.empty_cache()

    def poison(self, lost_positions: Sequence[int]) -> None:
        """Overwrites everything the lost devices held with NaN and never reads it again."""
        self.params = jax.tree.map(lambda a: poison(a, lost_positions), self.params)
        self.cache = jax.tree.map(lambda a: poison(a, lost_positions), self.cache)

    def moved_to(
        self,
        new_devices: Sequence[jax.Device],
        keep: Sequence[int | None],
        new_placement: Placement,
        plan: TransferPlan,
        host_params: Params,
        programs_cache: ExecutableCache,
        source: ExpertSource,
        checksums: ExpertChecksums,
    ) -> tuple[ServingMesh, MoveStats]:
        """The next epoch's state on `new_devices` (new position j was old position keep[j]).

        Every slot the move wrote is checked against its expert's checksum before the new
        state is returned; a wrong one is rewritten from `source` (stats.integrity says so)."""
        stats = MoveStats()
        t0 = time.perf_counter()
        entry = programs_cache.get(list(new_devices))
        if entry.programs.compiled_count == 0:
            entry.programs.compile_decode()
        stats.compile_ms = 1000 * (time.perf_counter() - t0)
        t1 = time.perf_counter()
        programs = entry.programs

        def move(path, array, sharding):
            if is_expert_path(path):
                return reassemble(array, keep, sharding)  # new devices' slots filled below
            host = _lookup(host_params, path_keys(path))
            return reassemble(array, keep, sharding, fill=lambda _j: host)

        params = jax.tree_util.tree_map_with_path(move, self.params, programs.param_shardings)
        geometry = programs.geometry
        if self.cache is None:  # discarded after a failed step: every request re-prefills
            cache = programs.empty_cache()
        else:
            cache = jax.tree.map(
                lambda a, s: reassemble(a, keep, s), self.cache, programs.cache_shardings
            )
        stats.transfer_rounds = self._move_experts(
            params,
            plan,
            new_placement.phy2log,
            source,
            entry,
            geometry.expert_slots_per_device,
        )
        jax.block_until_ready(params)
        stats.transfer_ms = 1000 * (time.perf_counter() - t1)
        stats.experts_copied = plan.experts_copied
        stats.experts_restored_from_host = plan.experts_from_host
        moved = ServingMesh(
            self.cfg,
            list(new_devices),
            entry,
            geometry,
            params,
            cache,
            new_placement,
            self.epoch + 1,
            self.replica_routing,
        )
        stats.integrity = moved.verify_experts(checksums, written=~plan.keep, source=source)
        return moved, stats

    # ---- expert integrity ---------------------------------------------------------------
    def verify_experts(
        self,
        checksums: ExpertChecksums,
        written: np.ndarray | None = None,
        source: ExpertSource | None = None,
    ) -> IntegrityReport:
        """Checks on the devices that every slot in `written` ([moe_layers, num_slots] bool;
        every slot when None) holds, bit for bit, the expert its placement names.

        With a `source`, each wrong slot is rewritten from it (host copy or checkpoint) and
        checked again; one still wrong raises ExpertIntegrityError (it must never serve).
        """
        started = time.perf_counter()
        report = IntegrityReport(epoch=self.epoch)
        s = self.geometry.expert_slots_per_device
        phy2log = self.placement.phy2log
        names = expert_weight_names(self.cfg)
        for j, i in enumerate(moe_layer_indices(self.cfg)):
            mask = np.ones(phy2log.shape[1], bool) if written is None else written[j]
            if not mask.any():
                continue
            weights = expert_weights(self.params, i)
            arrays = tuple(weights[name] for name in names)
            found = self._slot_checksums(arrays, mask)
            bad = mask & (found != checksums.expected(j, phy2log[j])).any(axis=1)
            report.slots_checked += int(mask.sum())
            for slot in np.flatnonzero(bad).tolist():
                mismatch = SlotMismatch(
                    layer=j,
                    slot=slot,
                    device_id=int(self.devices[slot // s].id),
                    expected_expert=int(phy2log[j, slot]),
                    found_expert=checksums.identify(j, found[slot]),
                )
                report.mismatches.append(mismatch)
                log.error(
                    "expert slot %d of MoE layer %d (device %d) holds %s, its placement says "
                    "expert %d%s",
                    slot,
                    j,
                    mismatch.device_id,
                    f"expert {mismatch.found_expert}'s weights"
                    if mismatch.found_expert >= 0
                    else "weights of no expert",
                    mismatch.expected_expert,
                    "; rewriting it from the host copy" if source is not None else "",
                )
            if source is None or not bad.any():
                continue
            arrays = _write_from_source(arrays, bad, j, source, self.compiled, s, phy2log)
            again = self._slot_checksums(arrays, bad)
            if (bad & (again != checksums.expected(j, phy2log[j])).any(axis=1)).any():
                raise ExpertIntegrityError(
                    f"MoE layer {j}: slots {np.flatnonzero(bad).tolist()} still hold the wrong "
                    "weights after a rewrite from the host copy"
                )
            for name, array in zip(names, arrays, strict=True):
                weights[name] = array
            report.slots_repaired += int(bad.sum())
        report.verify_ms = 1000 * (time.perf_counter() - started)
        return report

    def slot_checksums(self) -> np.ndarray:
        """[moe_layers, num_slots, weights] the on-device checksum of every expert slot."""
        every = np.ones(self.placement.num_slots, bool)
        names = expert_weight_names(self.cfg)
        return np.stack(
            [
                self._slot_checksums(tuple(expert_weights(self.params, i)[n] for n in names), every)
                for i in moe_layer_indices(self.cfg)
            ]
        )

    def _slot_checksums(self, arrays: tuple[jax.Array, ...], mask: np.ndarray) -> np.ndarray:
        """[num_slots, weights] on-device checksums of the slots in `mask` (0 elsewhere)."""
        n, s = len(self.devices), self.geometry.expert_slots_per_device
        local = np.full((n, s), -1, np.int32)
        for d in range(n):
            listed = np.flatnonzero(mask[d * s : (d + 1) * s])
            local[d, : listed.size] = listed
        sums = self.compiled.checksums(arrays, local)  # [weights, n, s], packed per device
        out = np.zeros((n * s, sums.shape[0]), np.uint32)
        for d in range(n):
            listed = local[d][local[d] >= 0]
            out[d * s + listed] = sums[:, d, : listed.size].T
        return out

    def _move_experts(
        self,
        params: Params,
        plan: TransferPlan,
        phy2log: np.ndarray,
        source: ExpertSource,
        entry: MeshExecutables,
        slots_per_device: int,
    ) -> int:
        n = len(entry.mesh.devices.flat)
        rounds = schedule_rounds(plan, n, slots_per_device)
        names = expert_weight_names(self.cfg)
        for j, i in enumerate(moe_layer_indices(self.cfg)):
            weights = expert_weights(params, i)
            arrays = tuple(weights[name] for name in names)
            for r in range(rounds.send_slot.shape[0]):
                arrays = entry.transfer(arrays, rounds.send_slot[r, j], rounds.recv_slot[r, j])
            arrays = _write_from_source(
                arrays, plan.from_host[j], j, source, entry, slots_per_device, phy2log
            )
            for name, array in zip(names, arrays, strict=True):
                weights[name] = array
        return int(rounds.send_slot.shape[0])


def _lookup(tree: Any, keys: list) -> Any:
    for k in keys:
        tree = tree[k]
    return tree


def _write_from_source(
    arrays: tuple[jax.Array, ...],
    slots: np.ndarray,
    layer: int,
    source: ExpertSource,
    entry: MeshExecutables,
    slots_per_device: int,
    phy2log: np.ndarray,
) -> tuple[jax.Array, ...]:
    """Writes every slot in `slots` ([num_slots] bool) of MoE layer `layer` with its expert
    from the source (the host copy, else the checkpoint), one slot per device per call."""
    n = len(entry.mesh.devices.flat)
    pending: list[list[int]] = [[] for _ in range(n)]
    for slot in np.flatnonzero(slots):
        pending[slot // slots_per_device].append(int(slot))
    if not any(pending):
        return arrays
    needed = sorted({int(phy2log[layer, p]) for slots in pending for p in slots})
    host = source.fetch(layer, needed)
    while any(pending):
        slot = np.full((n,), -1, np.int32)
        expert = np.full((n,), -1, np.int64)
        for d in range(n):
            if pending[d]:
                p = pending[d].pop()
                slot[d], expert[d] = p % slots_per_device, phy2log[layer, p]
        values = [
            (lambda d, name=name, expert=expert: host[int(expert[d])][name])
            for name in expert_weight_names(source.cfg)
        ]
        arrays = entry.writer(arrays, slot, values)
    return arrays
