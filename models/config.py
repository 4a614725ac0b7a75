"""The static model configuration: one frozen dataclass, validated at construction."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

RopeScaling = Literal["none", "linear", "yarn"]
Architecture = Literal[
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "glm4_moe",
    "gpt_oss",
]
# topk_softmax (gpt-oss): top-k of the raw logits, then a softmax over those k logits only.
RouterKind = Literal["softmax", "sigmoid", "topk_softmax"]
AttentionKind = Literal["gqa", "mla"]
QKNorm = Literal["none", "per_head", "full"]
# What the KV cache of multi-head latent attention holds per token: the normalised latent and the
# shared rope key ("latent", the absorbed form DeepSeek serves with), or every head's key and
# value ("per_head", as Hugging Face computes them; kept for comparison).
MLA_CACHE_FORMS = ("latent", "per_head")


class ConfigError(ValueError):
    """A configuration whose sizes disagree; the message names the field."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    architecture: Architecture
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    moe_d_ff: int
    num_experts: int
    experts_per_token: int
    max_seq_len: int = 256
    # Dense MLP of the first `first_dense_layers` layers (DeepSeek); 0 = every layer is MoE.
    first_dense_layers: int = 0
    dense_d_ff: int = 0
    # Shared experts, always applied (DeepSeek, Qwen2-MoE); Qwen2-MoE gates them with a sigmoid.
    num_shared_experts: int = 0
    shared_d_ff: int = 0
    shared_expert_gate: bool = False
    # Router: softmax scores (Mixtral, Qwen, OLMoE, DeepSeek-V2) or sigmoid (DeepSeek-V3).
    router: RouterKind = "softmax"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    num_expert_groups: int = 1
    topk_groups: int = 1
    # DeepSeek-V3's e_score_correction_bias: used to pick experts, not to weight them.
    router_bias: bool = False
    attention: AttentionKind = "gqa"
    qk_norm: QKNorm = "none"
    attention_bias: bool = False
    # Multi-head latent attention (DeepSeek); q_lora_rank 0 = plain q projection.
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    mla_cache: str = "latent"  # one of MLA_CACHE_FORMS (a str, so a wrong one is a ConfigError)
    rope_theta: float = 10000.0
    rope_interleave: bool = False
    # RoPE scaling (models/rope.py has the math): "linear" divides the frequencies by
    # rope_factor; "yarn" blends them over rope_original_max_positions with the beta ramp and
    # scales cos/sin (and DeepSeek's softmax, by rope_mscale_all_dim). None: not set in config.json.
    rope_scaling: RopeScaling = "none"
    rope_factor: float = 1.0
    rope_original_max_positions: int = 0
    rope_beta_fast: float = 32.0
    rope_beta_slow: float = 1.0
    rope_mscale: float | None = None
    rope_mscale_all_dim: float | None = None
    rope_attention_factor: float | None = None
    rope_truncate: bool = True
    # GQA: only the first int(head_dim * partial_rotary_factor) dims of each head rotate (GLM-4.5
    # rotates half); the rest pass through unrotated.
    partial_rotary_factor: float = 1.0
    rms_norm_eps: float = 1e-6
    tie_embeddings: bool = False
    # gpt-oss attention: a learned logit per head that joins each softmax's denominator
    # (models.attention_sinks), a bias on o_proj too, and a sliding window of `sliding_window`
    # keys (the query's own included) on the layers listed in `sliding_window_layers`.
    attention_sinks: bool = False
    o_proj_bias: bool = False
    sliding_window: int = 0
    sliding_window_layers: tuple[int, ...] = ()
    # gpt-oss experts and router: per-expert biases (they live in the expert slots beside the
    # weights), the clamped SwiGLU (swiglu_limit > 0; models.moe.clamped_swiglu) and a bias on
    # the router's logits.
    expert_bias: bool = False
    swiglu_limit: float = 0.0
    swiglu_alpha: float = 1.702
    router_logit_bias: bool = False
    dtype: str = "float32"

    def __post_init__(self) -> None:
        positive = [
            "vocab_size",
            "d_model",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "moe_d_ff",
            "num_experts",
            "experts_per_token",
            "max_seq_len",
        ]
        for field in positive:
            if getattr(self, field) <= 0:
                raise ConfigError(f"{field} must be positive, got {getattr(self, field)}")
        if self.attention == "gqa":
            if self.head_dim <= 0:
                raise ConfigError(f"head_dim must be positive, got {self.head_dim}")
            if self.head_dim % 2:
                raise ConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
            if not 0 < self.partial_rotary_factor <= 1:
                raise ConfigError(
                    f"partial_rotary_factor must be in (0, 1], got {self.partial_rotary_factor}"
                )
            if self.rope_dim < 2 or self.rope_dim % 2:
                raise ConfigError(
                    f"partial_rotary_factor {self.partial_rotary_factor} gives a rotary dim of "
                    f"{self.rope_dim} (int(head_dim * factor)); it must be even and at least 2"
                )
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                f"({self.num_kv_heads})"
            )
        if self.experts_per_token > self.num_experts:
            raise ConfigError(
                f"experts_per_token ({self.experts_per_token}) exceeds num_experts "
                f"({self.num_experts})"
            )
        if not 0 <= self.first_dense_layers < self.num_layers:
            raise ConfigError(
                f"first_dense_layers ({self.first_dense_layers}) must be in [0, num_layers)"
            )
        if self.first_dense_layers and self.dense_d_ff <= 0:
            raise ConfigError("dense_d_ff must be positive when first_dense_layers > 0")
        if self.num_shared_experts and self.shared_d_ff <= 0:
            raise ConfigError("shared_d_ff must be positive when num_shared_experts > 0")
        if self.num_experts % self.num_expert_groups:
            raise ConfigError(
                f"num_experts ({self.num_experts}) must be a multiple of num_expert_groups "
                f"({self.num_expert_groups})"
            )
        if not 1 <= self.topk_groups <= self.num_expert_groups:
            raise ConfigError(f"topk_groups ({self.topk_groups}) must be in [1, num_expert_groups]")
        group_size = self.num_experts // self.num_expert_groups
        if self.topk_groups * group_size < self.experts_per_token:
            raise ConfigError(
                "topk_groups * experts per group is smaller than experts_per_token: "
                "the router could not pick enough experts"
            )
        if self.attention == "mla":
            for field in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, field) <= 0:
                    raise ConfigError(f"{field} must be positive for multi-head latent attention")
            if self.qk_rope_head_dim % 2:
                raise ConfigError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
            if self.num_kv_heads != self.num_heads:
                raise ConfigError("multi-head latent attention needs num_kv_heads == num_heads")
            if self.partial_rotary_factor != 1.0:
                raise ConfigError(
                    "partial_rotary_factor is for grouped-query attention; multi-head latent "
                    "attention sets its rotary dims with qk_rope_head_dim"
                )
        if self.mla_cache not in MLA_CACHE_FORMS:
            raise ConfigError(f"mla_cache must be one of {MLA_CACHE_FORMS}, got {self.mla_cache!r}")
        self._check_rope_scaling()
        self._check_gpt_oss_fields()
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    def _check_rope_scaling(self) -> None:
        if self.rope_scaling not in ("none", "linear", "yarn"):
            raise ConfigError(
                f"rope_scaling must be none, linear or yarn, got {self.rope_scaling!r}"
            )
        if self.rope_scaling == "none":
            return
        if not self.rope_factor > 0:
            raise ConfigError(f"rope_factor must be positive, got {self.rope_factor}")
        if self.rope_scaling == "linear":
            return
        if self.rope_factor < 1:
            raise ConfigError(f"rope_factor must be >= 1 for yarn, got {self.rope_factor}")
        if not self.rope_theta > 1:
            raise ConfigError(f"rope_theta must be > 1 for yarn, got {self.rope_theta}")
        if self.rope_original_max_positions <= 0:
            raise ConfigError("rope_original_max_positions must be positive for yarn")
        if not 0 < self.rope_beta_slow <= self.rope_beta_fast:
            raise ConfigError(
                f"yarn needs 0 < rope_beta_slow ({self.rope_beta_slow}) <= rope_beta_fast "
                f"({self.rope_beta_fast})"
            )
        for field in ("rope_mscale", "rope_mscale_all_dim", "rope_attention_factor"):
            value = getattr(self, field)
            if value is not None and not value >= 0:
                raise ConfigError(f"{field} must be >= 0, got {value}")

    def _check_gpt_oss_fields(self) -> None:
        # A JSON manifest gives a list; keep the config hashable and comparable.
        object.__setattr__(self, "sliding_window_layers", tuple(self.sliding_window_layers))
        layers = self.sliding_window_layers
        if layers and self.sliding_window <= 0:
            raise ConfigError("sliding_window must be positive when sliding_window_layers is set")
        if any(not 0 <= i < self.num_layers for i in layers):
            raise ConfigError(f"sliding_window_layers {layers} must be in [0, num_layers)")
        if self.swiglu_limit < 0:
            raise ConfigError(f"swiglu_limit must be >= 0 (0: no clamp), got {self.swiglu_limit}")
        if layers and not self.attention_sinks:
            raise ConfigError("sliding_window_layers is implemented for gpt-oss attention only")
        if self.attention_sinks and self.attention != "gqa":
            raise ConfigError("attention_sinks is implemented for grouped-query attention only")

    def window_of_layer(self, layer: int) -> int | None:
        """The sliding window of decoder layer `layer`, or None (full causal attention)."""
        return self.sliding_window if layer in self.sliding_window_layers else None

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers

    @property
    def key_head_dim(self) -> int:
        """Per-head width of a key (what a per-head cache holds; see kv_cache.cache_layout)."""
        if self.attention == "mla":
            return self.qk_nope_head_dim + self.qk_rope_head_dim
        return self.head_dim

    @property
    def value_head_dim(self) -> int:
        return self.v_head_dim if self.attention == "mla" else self.head_dim

    @property
    def rope_dim(self) -> int:
        """Rotated dims per head; int() truncates as transformers does."""
        if self.attention == "mla":
            return self.qk_rope_head_dim
        return int(self.head_dim * self.partial_rotary_factor)

    @classmethod
    def from_json_dict(cls, fields: dict) -> ModelConfig:
        """The config of a manifest's `dataclasses.asdict(cfg)` read back from JSON, where a
        tuple field (sliding_window_layers) comes back as a list."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def expert_bytes(self) -> int:
        """Bytes of one routed expert's weights (gate, up and down projections, and their
        biases where the experts have them)."""
        itemsize = 4 if self.dtype == "float32" else 2
        biases = (2 * self.moe_d_ff + self.d_model) if self.expert_bias else 0
        return (3 * self.d_model * self.moe_d_ff + biases) * itemsize
