"""Conversions between the runtime's records and the gRPC messages (elastic_moe.v1)."""

from __future__ import annotations

from elastic_moe.reconfiguration import IntegrityReport, MeshStatus, Reconfiguration
from elastic_moe.requests import FinishReason
from models.config import ModelConfig
from serve.proto import elastic_moe_pb2 as pb

FINISH_REASONS = {
    FinishReason.STOP: pb.STOP,
    FinishReason.LENGTH: pb.LENGTH,
    FinishReason.ABORTED: pb.ABORTED,
}
FINISH_REASON_NAMES = {
    pb.STOP: "stop",
    pb.LENGTH: "length",
    pb.ABORTED: "aborted",
    pb.FINISH_REASON_UNSPECIFIED: "",
}


def finish_reason_to_proto(reason: FinishReason | None) -> int:
    return FINISH_REASONS.get(reason, pb.ABORTED) if reason is not None else pb.ABORTED


def reconfiguration_to_proto(r: Reconfiguration) -> pb.Reconfiguration:
    return pb.Reconfiguration(
        from_epoch=r.from_epoch,
        to_epoch=r.to_epoch,
        cause=r.cause,
        pause_ms=r.pause_ms,
        detect_ms=r.detect_ms,
        plan_ms=r.plan_ms,
        transfer_ms=r.transfer_ms,
        compile_ms=r.compile_ms,
        experts_copied=r.experts_copied,
        experts_restored_from_host=r.experts_restored_from_host,
        requests_reprefilled=r.requests_reprefilled,
        standby_hit=bool(getattr(r, "standby_hit", False)),
        dry_run=bool(getattr(r, "dry_run", False)),
        slots_verified=r.slots_verified,
        slots_repaired=r.slots_repaired,
        verify_ms=r.verify_ms,
        kind=pb.ReconfigurationKind.Value(f"KIND_{r.kind.name}"),
        slots_lost=r.slots_lost,
        steps_left=r.steps_left,
        moves=[
            pb.ExpertMove(
                layer=m.layer, expert=m.expert, to_device=m.to_device, from_device=m.from_device
            )
            for m in r.moves
        ],
    )


def integrity_report_to_proto(report: IntegrityReport) -> pb.VerifyExpertsResult:
    return pb.VerifyExpertsResult(
        epoch=report.epoch,
        slots_checked=report.slots_checked,
        mismatches=[
            pb.SlotMismatch(
                layer=m.layer,
                slot=m.slot,
                device_id=m.device_id,
                expected_expert=m.expected_expert,
                found_expert=m.found_expert,
            )
            for m in report.mismatches
        ],
        slots_repaired=report.slots_repaired,
        verify_ms=report.verify_ms,
    )


def reconfigure_result(r: Reconfiguration) -> pb.ReconfigureResult:
    """The mesh epoch after the operation (unchanged for a dry run) and what it did."""
    return pb.ReconfigureResult(epoch=r.to_epoch, summary=reconfiguration_to_proto(r))


def mesh_status_to_proto(s: MeshStatus) -> pb.MeshStatus:
    message = pb.MeshStatus(
        epoch=s.epoch,
        state=pb.MeshState.Value(s.state.name),
        num_logical_experts=s.num_logical_experts,
        num_physical_slots=s.num_physical_slots,
        min_live_replicas=s.min_live_replicas,
        active_requests=s.active_requests,
        queued_requests=s.queued_requests,
        placement_policy=s.placement_policy,
        max_device_load=s.max_device_load,
        worst_single_loss_restore=s.worst_single_loss_restore,
        numerics=s.numerics,
    )
    for d in s.devices:
        message.devices.append(
            pb.Device(
                id=d.id,
                platform=d.platform,
                state=pb.DeviceState.Value(d.state.name),
                process_index=d.process_index,
                expert_slots=d.expert_slots,
                active_requests=d.active_requests,
                experts=[pb.ExpertIds(ids=layer) for layer in getattr(d, "experts", [])],
            )
        )
    if s.last is not None:
        message.last.CopyFrom(reconfiguration_to_proto(s.last))
    return message


def model_info(cfg: ModelConfig, tokenizer_kind: str, numerics: str) -> pb.ModelInfo:
    return pb.ModelInfo(
        name=cfg.name,
        architecture=cfg.architecture,
        vocab_size=cfg.vocab_size,
        num_layers=cfg.num_layers,
        num_experts=cfg.num_experts,
        experts_per_token=cfg.experts_per_token,
        max_seq_len=cfg.max_seq_len,
        num_moe_layers=cfg.num_moe_layers,
        tokenizer=tokenizer_kind,
        numerics=numerics,
    )
