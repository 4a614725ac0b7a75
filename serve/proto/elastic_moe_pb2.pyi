from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    STOP: _ClassVar[FinishReason]
    LENGTH: _ClassVar[FinishReason]
    ABORTED: _ClassVar[FinishReason]

class DeviceState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DEVICE_STATE_UNSPECIFIED: _ClassVar[DeviceState]
    HEALTHY: _ClassVar[DeviceState]
    FAILED: _ClassVar[DeviceState]
    REJOINING: _ClassVar[DeviceState]

class MeshState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MESH_STATE_UNSPECIFIED: _ClassVar[MeshState]
    SERVING: _ClassVar[MeshState]
    RECONFIGURING: _ClassVar[MeshState]
    DEGRADED: _ClassVar[MeshState]
    DRAINING: _ClassVar[MeshState]
    STOPPED: _ClassVar[MeshState]

class ReconfigurationKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RECONFIGURATION_KIND_UNSPECIFIED: _ClassVar[ReconfigurationKind]
    KIND_FAIL: _ClassVar[ReconfigurationKind]
    KIND_DETECTED: _ClassVar[ReconfigurationKind]
    KIND_REJOIN: _ClassVar[ReconfigurationKind]
    KIND_REBALANCE: _ClassVar[ReconfigurationKind]
FINISH_REASON_UNSPECIFIED: FinishReason
STOP: FinishReason
LENGTH: FinishReason
ABORTED: FinishReason
DEVICE_STATE_UNSPECIFIED: DeviceState
HEALTHY: DeviceState
FAILED: DeviceState
REJOINING: DeviceState
MESH_STATE_UNSPECIFIED: MeshState
SERVING: MeshState
RECONFIGURING: MeshState
DEGRADED: MeshState
DRAINING: MeshState
STOPPED: MeshState
RECONFIGURATION_KIND_UNSPECIFIED: ReconfigurationKind
KIND_FAIL: ReconfigurationKind
KIND_DETECTED: ReconfigurationKind
KIND_REJOIN: ReconfigurationKind
KIND_REBALANCE: ReconfigurationKind

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "text", "tokens", "max_tokens", "sampling", "stop_token_ids")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    STOP_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    text: str
    tokens: TokenIds
    max_tokens: int
    sampling: SamplingParams
    stop_token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, request_id: _Optional[str] = ..., text: _Optional[str] = ..., tokens: _Optional[_Union[TokenIds, _Mapping]] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., stop_token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("request_id", "chunk", "complete")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    chunk: Chunk
    complete: Complete
    def __init__(self, request_id: _Optional[str] = ..., chunk: _Optional[_Union[Chunk, _Mapping]] = ..., complete: _Optional[_Union[Complete, _Mapping]] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("token_ids", "text", "offset", "mesh_epoch", "logprobs")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    MESH_EPOCH_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    offset: int
    mesh_epoch: int
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., offset: _Optional[int] = ..., mesh_epoch: _Optional[int] = ..., logprobs: _Optional[_Iterable[float]] = ...) -> None: ...

class Complete(_message.Message):
    __slots__ = ("finish_reason", "prompt_tokens", "completion_tokens", "reprefills", "ttft_ms")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPREFILLS_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    finish_reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    reprefills: int
    ttft_ms: float
    def __init__(self, finish_reason: _Optional[_Union[FinishReason, str]] = ..., prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., reprefills: _Optional[int] = ..., ttft_ms: _Optional[float] = ...) -> None: ...

class AbortRequest(_message.Message):
    __slots__ = ("request_ids",)
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class AbortResponse(_message.Message):
    __slots__ = ("aborted",)
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    aborted: int
    def __init__(self, aborted: _Optional[int] = ...) -> None: ...

class ModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "architecture", "vocab_size", "num_layers", "num_experts", "experts_per_token", "max_seq_len", "num_moe_layers", "tokenizer", "numerics")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    NUM_MOE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    TOKENIZER_FIELD_NUMBER: _ClassVar[int]
    NUMERICS_FIELD_NUMBER: _ClassVar[int]
    name: str
    architecture: str
    vocab_size: int
    num_layers: int
    num_experts: int
    experts_per_token: int
    max_seq_len: int
    num_moe_layers: int
    tokenizer: str
    numerics: str
    def __init__(self, name: _Optional[str] = ..., architecture: _Optional[str] = ..., vocab_size: _Optional[int] = ..., num_layers: _Optional[int] = ..., num_experts: _Optional[int] = ..., experts_per_token: _Optional[int] = ..., max_seq_len: _Optional[int] = ..., num_moe_layers: _Optional[int] = ..., tokenizer: _Optional[str] = ..., numerics: _Optional[str] = ...) -> None: ...

class MeshStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Device(_message.Message):
    __slots__ = ("id", "platform", "state", "process_index", "expert_slots", "active_requests", "experts")
    ID_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROCESS_INDEX_FIELD_NUMBER: _ClassVar[int]
    EXPERT_SLOTS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    id: int
    platform: str
    state: DeviceState
    process_index: int
    expert_slots: int
    active_requests: int
    experts: _containers.RepeatedCompositeFieldContainer[ExpertIds]
    def __init__(self, id: _Optional[int] = ..., platform: _Optional[str] = ..., state: _Optional[_Union[DeviceState, str]] = ..., process_index: _Optional[int] = ..., expert_slots: _Optional[int] = ..., active_requests: _Optional[int] = ..., experts: _Optional[_Iterable[_Union[ExpertIds, _Mapping]]] = ...) -> None: ...

class ExpertIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Reconfiguration(_message.Message):
    __slots__ = ("from_epoch", "to_epoch", "cause", "pause_ms", "detect_ms", "plan_ms", "transfer_ms", "compile_ms", "experts_copied", "experts_restored_from_host", "requests_reprefilled", "standby_hit", "dry_run", "slots_verified", "slots_repaired", "verify_ms", "kind", "slots_lost", "moves", "steps_left")
    FROM_EPOCH_FIELD_NUMBER: _ClassVar[int]
    TO_EPOCH_FIELD_NUMBER: _ClassVar[int]
    CAUSE_FIELD_NUMBER: _ClassVar[int]
    PAUSE_MS_FIELD_NUMBER: _ClassVar[int]
    DETECT_MS_FIELD_NUMBER: _ClassVar[int]
    PLAN_MS_FIELD_NUMBER: _ClassVar[int]
    TRANSFER_MS_FIELD_NUMBER: _ClassVar[int]
    COMPILE_MS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_COPIED_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_RESTORED_FROM_HOST_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_REPREFILLED_FIELD_NUMBER: _ClassVar[int]
    STANDBY_HIT_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    SLOTS_VERIFIED_FIELD_NUMBER: _ClassVar[int]
    SLOTS_REPAIRED_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SLOTS_LOST_FIELD_NUMBER: _ClassVar[int]
    MOVES_FIELD_NUMBER: _ClassVar[int]
    STEPS_LEFT_FIELD_NUMBER: _ClassVar[int]
    from_epoch: int
    to_epoch: int
    cause: str
    pause_ms: float
    detect_ms: float
    plan_ms: float
    transfer_ms: float
    compile_ms: float
    experts_copied: int
    experts_restored_from_host: int
    requests_reprefilled: int
    standby_hit: bool
    dry_run: bool
    slots_verified: int
    slots_repaired: int
    verify_ms: float
    kind: ReconfigurationKind
    slots_lost: int
    moves: _containers.RepeatedCompositeFieldContainer[ExpertMove]
    steps_left: int
    def __init__(self, from_epoch: _Optional[int] = ..., to_epoch: _Optional[int] = ..., cause: _Optional[str] = ..., pause_ms: _Optional[float] = ..., detect_ms: _Optional[float] = ..., plan_ms: _Optional[float] = ..., transfer_ms: _Optional[float] = ..., compile_ms: _Optional[float] = ..., experts_copied: _Optional[int] = ..., experts_restored_from_host: _Optional[int] = ..., requests_reprefilled: _Optional[int] = ..., standby_hit: _Optional[bool] = ..., dry_run: _Optional[bool] = ..., slots_verified: _Optional[int] = ..., slots_repaired: _Optional[int] = ..., verify_ms: _Optional[float] = ..., kind: _Optional[_Union[ReconfigurationKind, str]] = ..., slots_lost: _Optional[int] = ..., moves: _Optional[_Iterable[_Union[ExpertMove, _Mapping]]] = ..., steps_left: _Optional[int] = ...) -> None: ...

class ExpertMove(_message.Message):
    __slots__ = ("layer", "expert", "to_device", "from_device")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    TO_DEVICE_FIELD_NUMBER: _ClassVar[int]
    FROM_DEVICE_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    to_device: int
    from_device: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ..., to_device: _Optional[int] = ..., from_device: _Optional[int] = ...) -> None: ...

class MeshStatus(_message.Message):
    __slots__ = ("epoch", "state", "devices", "num_logical_experts", "num_physical_slots", "min_live_replicas", "active_requests", "queued_requests", "last", "placement_policy", "max_device_load", "worst_single_loss_restore", "numerics")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    DEVICES_FIELD_NUMBER: _ClassVar[int]
    NUM_LOGICAL_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    NUM_PHYSICAL_SLOTS_FIELD_NUMBER: _ClassVar[int]
    MIN_LIVE_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    QUEUED_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_POLICY_FIELD_NUMBER: _ClassVar[int]
    MAX_DEVICE_LOAD_FIELD_NUMBER: _ClassVar[int]
    WORST_SINGLE_LOSS_RESTORE_FIELD_NUMBER: _ClassVar[int]
    NUMERICS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    state: MeshState
    devices: _containers.RepeatedCompositeFieldContainer[Device]
    num_logical_experts: int
    num_physical_slots: int
    min_live_replicas: int
    active_requests: int
    queued_requests: int
    last: Reconfiguration
    placement_policy: str
    max_device_load: float
    worst_single_loss_restore: int
    numerics: str
    def __init__(self, epoch: _Optional[int] = ..., state: _Optional[_Union[MeshState, str]] = ..., devices: _Optional[_Iterable[_Union[Device, _Mapping]]] = ..., num_logical_experts: _Optional[int] = ..., num_physical_slots: _Optional[int] = ..., min_live_replicas: _Optional[int] = ..., active_requests: _Optional[int] = ..., queued_requests: _Optional[int] = ..., last: _Optional[_Union[Reconfiguration, _Mapping]] = ..., placement_policy: _Optional[str] = ..., max_device_load: _Optional[float] = ..., worst_single_loss_restore: _Optional[int] = ..., numerics: _Optional[str] = ...) -> None: ...

class FailDevicesRequest(_message.Message):
    __slots__ = ("device_ids", "reason", "op_id", "dry_run")
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    DRY_RUN_FIELD_NUMBER: _ClassVar[int]
    device_ids: _containers.RepeatedScalarFieldContainer[int]
    reason: str
    op_id: str
    dry_run: bool
    def __init__(self, device_ids: _Optional[_Iterable[int]] = ..., reason: _Optional[str] = ..., op_id: _Optional[str] = ..., dry_run: _Optional[bool] = ...) -> None: ...

class RejoinDevicesRequest(_message.Message):
    __slots__ = ("device_ids", "op_id")
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    device_ids: _containers.RepeatedScalarFieldContainer[int]
    op_id: str
    def __init__(self, device_ids: _Optional[_Iterable[int]] = ..., op_id: _Optional[str] = ...) -> None: ...

class RebalanceRequest(_message.Message):
    __slots__ = ("op_id", "max_copies")
    OP_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_COPIES_FIELD_NUMBER: _ClassVar[int]
    op_id: str
    max_copies: int
    def __init__(self, op_id: _Optional[str] = ..., max_copies: _Optional[int] = ...) -> None: ...

class ReconfigureResult(_message.Message):
    __slots__ = ("epoch", "summary")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    summary: Reconfiguration
    def __init__(self, epoch: _Optional[int] = ..., summary: _Optional[_Union[Reconfiguration, _Mapping]] = ...) -> None: ...

class DrainRequest(_message.Message):
    __slots__ = ("timeout_s",)
    TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    timeout_s: int
    def __init__(self, timeout_s: _Optional[int] = ...) -> None: ...

class DrainResult(_message.Message):
    __slots__ = ("completed", "aborted")
    COMPLETED_FIELD_NUMBER: _ClassVar[int]
    ABORTED_FIELD_NUMBER: _ClassVar[int]
    completed: int
    aborted: int
    def __init__(self, completed: _Optional[int] = ..., aborted: _Optional[int] = ...) -> None: ...

class VerifyExpertsRequest(_message.Message):
    __slots__ = ("check_only",)
    CHECK_ONLY_FIELD_NUMBER: _ClassVar[int]
    check_only: bool
    def __init__(self, check_only: _Optional[bool] = ...) -> None: ...

class SlotMismatch(_message.Message):
    __slots__ = ("layer", "slot", "device_id", "expected_expert", "found_expert")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    SLOT_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_EXPERT_FIELD_NUMBER: _ClassVar[int]
    FOUND_EXPERT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    slot: int
    device_id: int
    expected_expert: int
    found_expert: int
    def __init__(self, layer: _Optional[int] = ..., slot: _Optional[int] = ..., device_id: _Optional[int] = ..., expected_expert: _Optional[int] = ..., found_expert: _Optional[int] = ...) -> None: ...

class VerifyExpertsResult(_message.Message):
    __slots__ = ("epoch", "slots_checked", "mismatches", "slots_repaired", "verify_ms")
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    SLOTS_CHECKED_FIELD_NUMBER: _ClassVar[int]
    MISMATCHES_FIELD_NUMBER: _ClassVar[int]
    SLOTS_REPAIRED_FIELD_NUMBER: _ClassVar[int]
    VERIFY_MS_FIELD_NUMBER: _ClassVar[int]
    epoch: int
    slots_checked: int
    mismatches: _containers.RepeatedCompositeFieldContainer[SlotMismatch]
    slots_repaired: int
    verify_ms: float
    def __init__(self, epoch: _Optional[int] = ..., slots_checked: _Optional[int] = ..., mismatches: _Optional[_Iterable[_Union[SlotMismatch, _Mapping]]] = ..., slots_repaired: _Optional[int] = ..., verify_ms: _Optional[float] = ...) -> None: ...
