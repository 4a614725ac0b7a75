"""The continuous-batching engine over one device mesh.

The interface the frontend drives is small (in the spirit of JetStream's engine_api):
`submit` a request, `step` the engine (admit and prefill waiting requests, then one batched
decode step for every running one), read the `TokenEvent`s it returns, `abort` a request.
Request slots are split evenly over the devices; a request's KV cache lives on its slot's device.
The coordinator (elastic_moe.coordinator) swaps the mesh underneath between two steps.

A step that raises midway keeps what it already recorded: those tokens are in the requests'
journals, and `take_events()` hands their events out, so no stream misses a token. The step's
device state is not trusted after that (`in_flight_untrusted`): `requeue_in_flight()` sends every
running request back to be re-prefilled from its journal.
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

from elastic_moe.executables import ExecutableCache
from elastic_moe.expert_checksums import ExpertChecksums
from elastic_moe.expert_source import ExpertSource, without_host_experts
from elastic_moe.mesh_change import AppliedChange, MeshChange
from elastic_moe.reconfiguration import IntegrityReport
from elastic_moe.requests import FinishReason, Journal, Request, RequestError, SamplingParams
from elastic_moe.serving_mesh import ServingMesh, expert_slots_per_device
from elastic_moe.steps import NUMERICS_MODES, Sampling, StepGeometry
from mesh.placement_policy import POLICIES as PLACEMENT_POLICIES
from models.config import ModelConfig
from models.params import Params


@dataclass(frozen=True)
class TokenEvent:
    request_id: str
    index: int  # index of the token among the request's generated tokens
    token: int
    logprob: float
    epoch: int
    finish_reason: FinishReason | None  # set on the request's last token


@dataclass(frozen=True)
class EngineOptions:
    request_slots_per_device: int = 4
    prefill_rows_per_device: int = 1
    redundant_experts: int = 0  # extra expert slots over the whole mesh, beyond num_experts
    min_prefill_bucket: int = 16
    # "auto": prefill spreads tokens over every replica of an expert (many rows per device:
    # compute and the all-to-all volume count), decode uses each expert's primary replica (few
    # rows: a step reads each expert's weights once, so redundancy costs no bandwidth).
    # "primary" / "spread": one rule for both.
    replica_routing: str = "auto"
    # Where expert replicas go (mesh/placement_policy.py): "auto" balances load first while no
    # single device loss leaves more than `restore_budget` experts per layer to restore from
    # the host; "survive" gives every expert a second replica first (zero-copy single loss,
    # but no slot left to follow load at R = E); "balance" is pure EPLB.
    placement: str = "auto"
    restore_budget: int = 2
    # Keep a host copy of every expert (restores are host-to-device). Without it, an expert
    # whose replicas all died is read back from `expert_checkpoint` (an orbax checkpoint
    # written by elastic_moe.checkpoint.save_checkpoint).
    host_expert_copy: bool = True
    expert_checkpoint: str | None = None
    # "invariant": every reduction a token depends on has a fixed order and split whatever the
    # mesh size, so a failure or rejoin changes no token (even in bf16); "fast": XLA's choice.
    numerics: str = "invariant"
    # Launch each decode step before reading the previous one back, so the host's work (the
    # launch itself, recording tokens) overlaps the device's. Tokens then come out one step
    # later; the outputs are the same. On one H100 (2026-12-07) it lifted the engine from 68%
    # to 97% of the device's tokens/s, once no conditional in the step made the launch wait
    # for it (benchmarks/RESULTS.md).
    overlap_steps: bool = True
    # G > 0: the step as programs of G layers of one kind each, chained (embedding, groups,
    # head), instead of one program with every layer unrolled (0): a mesh's compile time stops
    # growing with depth (the standby compiles of a deep model, and a cold compile on a
    # recovery's path), for one launch per group: on one H100 at G = 1 the same device step,
    # 14% fewer engine tokens/s when the host is the bottleneck (elastic_moe/layer_programs.py;
    # benchmarks/RESULTS.md).
    layers_per_program: int = 0

    def __post_init__(self) -> None:
        if self.replica_routing not in ("auto", "primary", "spread"):
            raise ValueError(
                "replica_routing must be 'auto', 'primary' or 'spread', "
                f"got {self.replica_routing!r}"
            )
        for name in ("request_slots_per_device", "prefill_rows_per_device", "min_prefill_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.host_expert_copy and not self.expert_checkpoint:
            raise ValueError("host_expert_copy=False needs an expert_checkpoint to restore from")
        if self.numerics not in NUMERICS_MODES:
            raise ValueError(f"numerics must be one of {NUMERICS_MODES}, got {self.numerics!r}")
        if self.placement not in PLACEMENT_POLICIES:
            raise ValueError(
                f"placement must be one of {PLACEMENT_POLICIES}, got {self.placement!r}"
            )
        if self.layers_per_program < 0:
            raise ValueError(f"layers_per_program must be >= 0, got {self.layers_per_program}")
        if self.restore_budget < 0:
            raise ValueError(f"restore_budget must be >= 0, got {self.restore_budget}")
        if self.redundant_experts < 0:
            raise ValueError(f"redundant_experts must be >= 0, got {self.redundant_experts}")


def prefill_bucket(length: int, minimum: int, maximum: int) -> int:
    """Padded prompt length: the next power of two >= length (one compile per bucket)."""
    bucket = minimum
    while bucket < length:
        bucket *= 2
    return min(bucket, maximum)


FINISHED_KEPT = 4096


@dataclass
class _Launched:
    """A decode launched on the devices, not read back yet: its output and each row's
    request (None: the row was not decoded)."""

    out: Any
    owners: list[Request | None]


class Engine:
    def __init__(
        self,
        cfg: ModelConfig,
        host_params: Params,
        devices: Sequence[jax.Device],
        options: EngineOptions = EngineOptions(),
    ):
        self.cfg, self.options = cfg, options
        self.host_params = host_params  # the host copy of every weight, experts included
        devices = list(devices)
        slots = expert_slots_per_device(cfg, len(devices), options.redundant_experts)
        max_replicas = max(1, min(len(devices), len(devices) * slots - cfg.num_experts + 1))
        self.min_devices = math.ceil(cfg.num_experts / slots)

        def geometry_for(n: int) -> StepGeometry:
            return StepGeometry(
                num_devices=n,
                expert_slots_per_device=slots,
                request_slots_per_device=options.request_slots_per_device,
                prefill_rows_per_device=options.prefill_rows_per_device,
                max_replicas=max_replicas,
                numerics=options.numerics,
                layers_per_program=options.layers_per_program,
            )

        self.executables = ExecutableCache(cfg, geometry_for)
        self.mesh = ServingMesh.create(
            cfg,
            host_params,
            devices,
            self.executables,
            replica_routing=options.replica_routing,
            placement_policy=options.placement,
            restore_budget=options.restore_budget,
        )
        # What every slot a reconfiguration writes must match, taken on the devices now.
        self.expert_checksums = ExpertChecksums.from_deployment(
            self.mesh.placement, self.mesh.slot_checksums()
        )
        if not options.host_expert_copy:
            self.host_params = without_host_experts(cfg, host_params)
        self.expert_source = ExpertSource(cfg, self.host_params, options.expert_checkpoint)
        self._init_requests()

    @classmethod
    def around(cls, cfg: ModelConfig, mesh, options: EngineOptions = EngineOptions()) -> Engine:
        """An engine that schedules requests over a mesh deployed elsewhere: anything with
        ServingMesh's step interface (geometry, epoch, cache, prefill, decode, discard_cache,
        reset_cache), e.g. elastic_moe.remote_mesh.RemoteMesh over worker processes. There is
        no local deployment: reconfiguration (apply, verify_experts, programs_ready) runs
        where the mesh is, and `replace_mesh` moves the requests onto a new one."""
        engine = cls.__new__(cls)
        engine.cfg, engine.options, engine.mesh = cfg, options, mesh
        engine.host_params = None
        engine.executables = None  # marks an engine without a local deployment
        engine._init_requests()
        return engine

    def _init_requests(self) -> None:
        cfg = self.cfg
        self.prefill_lengths_seen: set[int] = set()
        self.journal = Journal()
        self.waiting: collections.deque[str] = collections.deque()
        self.slot_owner: list[str | None] = [None] * self.mesh.geometry.num_request_slots
        self.expert_load = np.zeros((cfg.num_moe_layers, cfg.num_experts), np.int64)
        self.steps_run = 0
        self._events: list[TokenEvent] = []  # recorded, not yet handed out
        # Finished, not yet handed out (take_finished); bounded for users who never read it.
        self._finished: collections.deque[Request] = collections.deque(maxlen=FINISHED_KEPT)
        self._launched: _Launched | None = None  # a decode launched and not yet read back
        self.in_flight_untrusted = False  # a step failed after device work had started
        # Called with a point's name ("prefill", "decode") right after that phase's program
        # ran and before its output is read: where a device failure mid-step is injected.
        self.fault_point: Callable[[str], None] | None = None

    # ---- the frontend's interface -------------------------------------------------------
    def submit(self, request: Request) -> Request:
        """Validates and queues a request; raises RequestError for bad input."""
        request.validate(self.cfg.vocab_size, self.cfg.max_seq_len)
        return self.enqueue(request)

    def enqueue(self, request: Request) -> Request:
        """Queues a request its caller validated already (the runtime does, at admission);
        raises RequestError for an id that is running."""
        self.journal.add(request)
        self.waiting.append(request.request_id)
        return request

    def abort(self, request_id: str) -> bool:
        """Stops a request and frees its slot at once; unknown or finished ids are ignored."""
        request = self.journal.get(request_id)
        if request is None or request.done:
            return False
        request.finish_reason = FinishReason.ABORTED
        self._release(request_id)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting) or any(o is not None for o in self.slot_owner)

    def step(self) -> list[TokenEvent]:
        """Admits waiting requests (prefill), then runs one decode step for all running ones.

        With `overlap_steps` the decode is launched and the previous step's decode is read
        back while it runs, so its tokens come out one step later. If it raises, the tokens
        recorded before the error stay pending: take_events()."""
        self.in_flight_untrusted = True  # until the step's device work is done
        if self._launched is not None and self.waiting and None in self.slot_owner:
            self.settle()  # admission needs every running request's last token on the host
        self._admit()
        self._decode()
        self.in_flight_untrusted = False
        self.steps_run += 1
        return self.take_events()

    def take_events(self) -> list[TokenEvent]:
        """The token events recorded since the last call (a failed step's included)."""
        events, self._events = self._events, []
        return events

    def take_finished(self) -> list[Request]:
        """The requests that finished (stop token or length) since the last call; the journal
        no longer holds them (the newest FINISHED_KEPT are kept until read)."""
        finished = list(self._finished)
        self._finished.clear()
        return finished

    def settle(self) -> None:
        """Reads back a launched decode and records its tokens (events pending in
        take_events()). Called before anything that changes slots or the mesh."""
        launched, self._launched = self._launched, None
        if launched is not None:
            self._read_back(launched)

    def requeue_in_flight(self) -> int:
        """Every running request goes back to the front of the queue, to be re-prefilled
        from its journal, and the KV cache is discarded: after a step failed midway its
        buffers (donated to the failed program) cannot be trusted. Returns how many."""
        self._launched = None  # its output went with the failed step: never read
        running = self._requeue_for_reprefill(self.running)
        self.slot_owner = [None] * len(self.slot_owner)
        self.mesh.discard_cache()
        self.in_flight_untrusted = False
        return len(running)

    def ensure_cache(self) -> None:
        """A fresh KV cache when the last one was discarded and the mesh stayed the same."""
        if self.mesh.cache is None:
            self.mesh.reset_cache()

    def finish_with_error(self, request_ids: Sequence[str], error: str) -> list[Request]:
        """Ends requests that cannot be served (aborted, with `error` for their callers)."""
        ended = []
        for request_id in request_ids:
            request = self.journal.get(request_id)
            if request is None or request.done:
                continue
            request.finish_reason = FinishReason.ABORTED
            request.error = error
            self._release(request_id)
            ended.append(request)
        return ended

    def _fault_point(self, name: str) -> None:
        if self.fault_point is not None:
            self.fault_point(name)

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        max_tokens: int,
        sampling: SamplingParams = SamplingParams(),
    ) -> list[Request]:
        """Runs `prompts` to completion (a plain batch generate); returns the finished requests."""
        requests = [
            self.submit(Request(list(p), max_tokens=max_tokens, sampling=sampling)) for p in prompts
        ]
        while any(not r.done for r in requests):
            self.step()
        return requests

    # ---- reconfiguration (planned by the coordinator) -----------------------------------
    def replace_mesh(self, mesh) -> int:
        """Serving moves to `mesh`, deployed from scratch (a new deployment after a worker
        process died): every running request goes back to be re-prefilled from its journal,
        since neither the failed step nor any survivor's cache is trusted. Returns how many."""
        self._launched = None  # launched on the old mesh: not trusted
        running = self._requeue_for_reprefill(self.running)
        self.mesh = mesh
        self.slot_owner = [None] * mesh.geometry.num_request_slots
        self.in_flight_untrusted = False
        return len(running)

    def _require_local_deployment(self, what: str) -> None:
        if self.executables is None:
            raise NotImplementedError(
                f"{what}: this engine schedules over a mesh deployed elsewhere (Engine.around); "
                "reconfigure it where it runs"
            )

    def apply(self, change: MeshChange, *, poison_lost: bool = True) -> AppliedChange:
        """Moves serving onto the planned mesh, between two steps.

        poison_lost: first overwrite what the lost devices held with NaN (the simulation of the
        loss: any later read of it changes an output). Then the survivors' buffers are reused
        in place, experts are copied or restored as planned and every written slot is checked
        against its expert's checksum, and the lost devices' requests are requeued.
        """
        self._require_local_deployment("apply")
        self.settle()  # the launched step ran on the old mesh and its slots
        applied = AppliedChange()
        if poison_lost and change.lost_positions:
            started = time.perf_counter()
            self.mesh.poison(change.lost_positions)
            applied.poison_ms = 1000 * (time.perf_counter() - started)
        new_mesh, stats = self.mesh.moved_to(
            change.devices,
            change.old_positions,
            change.placement,
            change.transfers,
            self.host_params,
            self.executables,
            self.expert_source,
            self.expert_checksums,
        )
        applied.transfer_ms, applied.compile_ms = stats.transfer_ms, stats.compile_ms
        applied.integrity = stats.integrity
        applied.requests_reprefilled = self._switch_mesh(new_mesh, change.old_positions)
        return applied

    def verify_experts(self, *, repair: bool = True) -> IntegrityReport:
        """Checks every expert slot against its expert's checksum, on the devices; with
        `repair`, each wrong slot is rewritten from the host copy (or the checkpoint)."""
        self._require_local_deployment("verify_experts")
        source = self.expert_source if repair else None
        return self.mesh.verify_experts(self.expert_checksums, source=source)

    def programs_ready(self, devices: Sequence[jax.Device]) -> bool:
        """Whether the programs of a mesh over `devices` are compiled already (standby)."""
        self._require_local_deployment("programs_ready")
        return self.executables.is_warm(devices)

    def _switch_mesh(self, new_mesh: ServingMesh, old_positions: Sequence[int | None]) -> int:
        """Moves serving onto `new_mesh` (new position j was old position old_positions[j]).

        Requests on kept devices keep their slot and KV cache; those on lost devices go to the
        front of the queue to be re-prefilled from the journal. Returns how many were requeued.
        """
        per = self.options.request_slots_per_device
        owners: list[str | None] = [None] * (len(old_positions) * per)
        for j, old in enumerate(old_positions):
            if old is not None:
                owners[j * per : (j + 1) * per] = self.slot_owner[old * per : (old + 1) * per]
        kept = {o for o in owners if o is not None}
        lost = self._requeue_for_reprefill([o for o in self.running if o not in kept])
        self.slot_owner = owners
        self.mesh = new_mesh
        return len(lost)

    # ---- bookkeeping --------------------------------------------------------------------
    def _requeue_for_reprefill(self, request_ids: list[str]) -> list[str]:
        """Puts running requests first in line, in slot order, to be re-prefilled from their
        journals (their slots are the caller's to clear). Returns request_ids."""
        for request_id in reversed(request_ids):
            self.journal.get(request_id).reprefills += 1
            self.waiting.appendleft(request_id)
        return request_ids

    @property
    def running(self) -> list[str]:
        return [o for o in self.slot_owner if o is not None]

    def slots_of_device(self, position: int) -> range:
        per = self.options.request_slots_per_device
        return range(position * per, (position + 1) * per)

    def active_on_device(self, position: int) -> int:
        return sum(self.slot_owner[s] is not None for s in self.slots_of_device(position))

    def _release(self, request_id: str) -> None:
        if request_id in self.waiting:
            self.waiting.remove(request_id)
        for s, owner in enumerate(self.slot_owner):
            if owner == request_id:
                self.slot_owner[s] = None
        self.journal.remove(request_id)

    def _record(self, request: Request, token: int, logprob: float) -> TokenEvent:
        if request.first_token_at is None:
            request.first_token_at = time.monotonic()
        request.generated.append(token)
        request.logprobs.append(logprob)
        request.epochs.append(self.mesh.epoch)
        if token in request.stop_token_ids:
            request.finish_reason = FinishReason.STOP
        elif len(request.generated) >= request.max_tokens:
            request.finish_reason = FinishReason.LENGTH
        event = TokenEvent(
            request.request_id,
            len(request.generated) - 1,
            token,
            logprob,
            self.mesh.epoch,
            request.finish_reason,
        )
        if request.done:
            self._release(request.request_id)
            self._finished.append(request)
        self._events.append(event)
        return event

    def _sampling(self, requests: list[Request | None], ahead: int = 0) -> Sampling:
        """ahead: tokens each row has produced but not recorded yet (a launched step's)."""

        def col(fn, dtype):
            return np.array([fn(r) if r is not None else 0 for r in requests], dtype)

        return Sampling(
            col(lambda r: r.sampling.temperature, np.float32),
            col(lambda r: r.sampling.top_k, np.int32),
            col(lambda r: r.sampling.top_p, np.float32),
            col(lambda r: r.sampling.seed, np.uint32),
            col(lambda r: len(r.generated) + ahead, np.int32),
        )

    # ---- prefill ------------------------------------------------------------------------
    def _admit(self) -> list[TokenEvent]:
        """Prefills up to `prefill_rows_per_device` waiting requests per device."""
        geometry, per_dev = self.mesh.geometry, self.options.prefill_rows_per_device
        rows: list[tuple[int, int, Request]] = []  # (prefill row, local slot, request)
        used = [0] * geometry.num_devices
        while self.waiting:
            position = self._device_with_room(used)
            if position is None:
                break
            request = self.journal.get(self.waiting.popleft())
            if request is None:
                continue
            slot = next(s for s in self.slots_of_device(position) if self.slot_owner[s] is None)
            self.slot_owner[slot] = request.request_id
            if request.admitted_at is None:
                request.admitted_at = time.monotonic()
            local = slot - position * self.options.request_slots_per_device
            rows.append((position * per_dev + used[position], local, request))
            used[position] += 1
        if not rows:
            return []
        self.ensure_cache()
        cfg = self.cfg
        longest = max(r.context_length for _, _, r in rows)
        length = prefill_bucket(longest, self.options.min_prefill_bucket, cfg.max_seq_len)
        self.prefill_lengths_seen.add(length)
        p = geometry.num_prefill_rows
        tokens = np.zeros((p, length), np.int32)
        positions = np.full((p, length), cfg.max_seq_len, np.int32)  # padding: not cached
        local_rows = np.full((p,), self.options.request_slots_per_device, np.int32)
        last = np.zeros((p,), np.int32)
        by_row: list[Request | None] = [None] * p
        for row, local, request in rows:
            context = request.context
            tokens[row, : len(context)] = context
            positions[row, : len(context)] = np.arange(len(context))
            local_rows[row] = local
            last[row] = len(context) - 1
            by_row[row] = request
        try:
            out = self.mesh.prefill(tokens, positions, local_rows, last, self._sampling(by_row))
        except Exception:
            # Nothing was recorded: give the slots back and keep the requests first in line.
            for _, _, request in reversed(rows):
                self.slot_owner[self.slot_owner.index(request.request_id)] = None
                self.waiting.appendleft(request.request_id)
            raise
        self._fault_point("prefill")
        self.expert_load += np.asarray(out.expert_load)
        next_tokens, logprobs = np.asarray(out.tokens), np.asarray(out.logprobs)
        return [
            self._record(request, int(next_tokens[row]), float(logprobs[row]))
            for row, _, request in rows
        ]

    def _device_with_room(self, used: list[int]) -> int | None:
        best, best_free = None, 0
        for position in range(self.mesh.geometry.num_devices):
            if used[position] >= self.options.prefill_rows_per_device:
                continue
            free = sum(self.slot_owner[s] is None for s in self.slots_of_device(position))
            if free > best_free:
                best, best_free = position, free
        return best

    # ---- decode -------------------------------------------------------------------------
    def _decode(self) -> None:
        """Launches one decode for every running request, then reads back the step launched
        before (overlap_steps) or this one."""
        previous, self._launched = self._launched, None
        owners = [self.journal.get(o) if o is not None else None for o in self.slot_owner]
        if previous is not None and any(
            r is not None and previous.owners[s] is not r for s, r in enumerate(owners)
        ):  # a request the previous step did not decode: its input token is on the host
            self._read_back(previous)
            previous = None
            owners = [self.journal.get(o) if o is not None else None for o in self.slot_owner]
        b = len(owners)
        tokens = np.zeros((b,), np.int32)
        positions = np.full((b,), self.cfg.max_seq_len, np.int32)  # padding: not cached
        if previous is None:
            ahead = 0
            for s, r in enumerate(owners):
                if r is not None:
                    tokens[s] = r.generated[-1]
                    positions[s] = r.context_length - 1
        else:
            # Every running request is a row of the previous step; its input is that step's
            # token, still on the device. A row whose request the previous token finishes
            # (its length) is not launched again.
            ahead = 1
            tokens = previous.out.tokens
            for s, r in enumerate(owners):
                if r is not None and len(r.generated) + 1 >= r.max_tokens:
                    owners[s] = None
            for s, r in enumerate(owners):
                if r is not None:
                    positions[s] = r.context_length
        if any(r is not None for r in owners):
            out = self.mesh.decode(tokens, positions, self._sampling(owners, ahead))
            self._launched = _Launched(out, owners)
            self._fault_point("decode")
        if previous is not None:
            self._read_back(previous)
        if not self.options.overlap_steps:
            self.settle()

    def _read_back(self, launched: _Launched) -> None:
        out = launched.out
        self.expert_load += np.asarray(out.expert_load)
        next_tokens, logprobs = np.asarray(out.tokens), np.asarray(out.logprobs)
        for s, r in enumerate(launched.owners):
            # A request aborted, ended or re-queued since the launch keeps no token of it.
            if r is not None and not r.done and self.slot_owner[s] == r.request_id:
                self._record(r, int(next_tokens[s]), float(logprobs[s]))


__all__ = ["Engine", "EngineOptions", "RequestError", "TokenEvent"]
