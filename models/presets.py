"""Named model configurations: tiny random models for tests and the demo, real shapes for
benchmarks (random weights), and the names of the models the project trained (models/trained/,
loaded by elastic_moe.checkpoint.load_model)."""

from __future__ import annotations

import json
from pathlib import Path

from models.config import ModelConfig

TRAINED_DIR = Path(__file__).resolve().parent / "trained"
MANIFEST = "elastic_moe.json"  # the checkpoint's manifest: {"config": ModelConfig fields, ...}

_TINY = dict(vocab_size=256, d_model=64, num_layers=2, max_seq_len=128, rms_norm_eps=1e-6)

PRESETS: dict[str, ModelConfig] = {
    "tiny-mixtral": ModelConfig(
        name="tiny-mixtral",
        architecture="mixtral",
        **_TINY,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        moe_d_ff=96,
        num_experts=8,
        experts_per_token=2,
        norm_topk_prob=True,
    ),
    "tiny-qwen3-moe": ModelConfig(
        name="tiny-qwen3-moe",
        architecture="qwen3_moe",
        **_TINY,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        moe_d_ff=48,
        num_experts=16,
        experts_per_token=4,
        norm_topk_prob=True,
        qk_norm="per_head",
    ),
    "tiny-deepseek-v3": ModelConfig(
        name="tiny-deepseek-v3",
        architecture="deepseek_v3",
        vocab_size=256,
        d_model=64,
        num_layers=3,
        max_seq_len=128,
        num_heads=4,
        num_kv_heads=4,
        head_dim=0,
        attention="mla",
        q_lora_rank=32,
        kv_lora_rank=24,
        qk_nope_head_dim=16,
        qk_rope_head_dim=8,
        v_head_dim=16,
        rope_interleave=True,
        moe_d_ff=32,
        num_experts=16,
        experts_per_token=4,
        num_expert_groups=4,
        topk_groups=2,
        router="sigmoid",
        router_bias=True,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_shared_experts=1,
        shared_d_ff=32,
        first_dense_layers=1,
        dense_d_ff=128,
    ),
    "tiny-glm4-moe": ModelConfig(
        name="tiny-glm4-moe",
        architecture="glm4_moe",
        vocab_size=256,
        d_model=64,
        num_layers=3,
        max_seq_len=128,
        num_heads=4,
        num_kv_heads=2,
        head_dim=32,  # != d_model / num_heads, as in GLM-4.5
        partial_rotary_factor=0.5,
        attention_bias=True,
        qk_norm="per_head",
        moe_d_ff=32,
        num_experts=16,
        experts_per_token=4,
        num_expert_groups=4,
        topk_groups=2,
        router="sigmoid",
        router_bias=True,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_shared_experts=1,
        shared_d_ff=32,
        first_dense_layers=1,
        dense_d_ff=128,
        rms_norm_eps=1e-5,
    ),
    # Real shapes (random weights), for benchmarks.
    "mixtral-8x7b": ModelConfig(
        name="mixtral-8x7b",
        architecture="mixtral",
        vocab_size=32000,
        d_model=4096,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        moe_d_ff=14336,
        num_experts=8,
        experts_per_token=2,
        max_seq_len=4096,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        dtype="bfloat16",
    ),
    "qwen3-30b-a3b": ModelConfig(
        name="qwen3-30b-a3b",
        architecture="qwen3_moe",
        vocab_size=151936,
        d_model=2048,
        num_layers=48,
        num_heads=32,
        num_kv_heads=4,
        head_dim=128,
        moe_d_ff=768,
        num_experts=128,
        experts_per_token=8,
        norm_topk_prob=True,
        qk_norm="per_head",
        max_seq_len=4096,
        rope_theta=1e6,
        dtype="bfloat16",
    ),
    "deepseek-v3": ModelConfig(
        name="deepseek-v3",
        architecture="deepseek_v3",
        vocab_size=129280,
        d_model=7168,
        num_layers=61,
        num_heads=128,
        num_kv_heads=128,
        head_dim=0,
        attention="mla",
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        rope_interleave=True,
        moe_d_ff=2048,
        num_experts=256,
        experts_per_token=8,
        num_expert_groups=8,
        topk_groups=4,
        router="sigmoid",
        router_bias=True,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_shared_experts=1,
        shared_d_ff=2048,
        first_dense_layers=3,
        dense_d_ff=18432,
        max_seq_len=4096,
        dtype="bfloat16",
    ),
    # GLM-4.5-Air and GLM-4.5 (GLM-4.6 has GLM-4.5's shapes, with a longer context). From the
    # published config.json files; the least certain values are marked "unsure".
    "glm-4.5-air": ModelConfig(
        name="glm-4.5-air",
        architecture="glm4_moe",
        vocab_size=151552,
        d_model=4096,
        num_layers=46,  # + 1 multi-token-prediction layer in the checkpoint, not loaded
        num_heads=96,
        num_kv_heads=8,
        head_dim=128,
        partial_rotary_factor=0.5,
        attention_bias=True,
        qk_norm="none",
        moe_d_ff=1408,
        num_experts=128,
        experts_per_token=8,
        router="sigmoid",
        router_bias=True,
        norm_topk_prob=True,
        routed_scaling_factor=1.0,  # unsure
        num_shared_experts=1,
        shared_d_ff=1408,
        first_dense_layers=1,
        dense_d_ff=10944,
        max_seq_len=4096,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        dtype="bfloat16",
    ),
    "glm-4.5": ModelConfig(
        name="glm-4.5",
        architecture="glm4_moe",
        vocab_size=151552,
        d_model=5120,
        num_layers=92,  # + 1 multi-token-prediction layer in the checkpoint, not loaded
        num_heads=96,
        num_kv_heads=8,
        head_dim=128,
        partial_rotary_factor=0.5,
        attention_bias=True,
        qk_norm="per_head",
        moe_d_ff=1536,
        num_experts=160,
        experts_per_token=8,
        router="sigmoid",
        router_bias=True,
        norm_topk_prob=True,
        routed_scaling_factor=2.5,
        num_shared_experts=1,
        shared_d_ff=1536,
        first_dense_layers=3,
        dense_d_ff=12288,  # unsure
        max_seq_len=4096,
        rope_theta=1e6,
        rms_norm_eps=1e-5,
        dtype="bfloat16",
    ),
}


def get_preset(name: str) -> ModelConfig:
    """The preset called `name`; a KeyError lists the known names."""
    try:
        return PRESETS[name]
    except KeyError:
        known = ", ".join(sorted(PRESETS))
        raise KeyError(f"unknown preset {name!r}; known presets: {known}") from None


def trained_configs() -> dict[str, ModelConfig]:
    """The configs of the models trained by the project and shipped in models/trained/, by name,
    read from their manifests without loading any weight (and without importing jax)."""
    configs = {}
    for manifest in sorted(TRAINED_DIR.glob(f"*/{MANIFEST}")):
        configs[manifest.parent.name] = ModelConfig(**json.loads(manifest.read_text())["config"])
    return configs
