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

_GPT_OSS = dict(
    architecture="gpt_oss",
    router="topk_softmax",
    router_logit_bias=True,
    norm_topk_prob=False,
    attention_bias=True,
    o_proj_bias=True,
    attention_sinks=True,
    expert_bias=True,
    swiglu_limit=7.0,
    swiglu_alpha=1.702,
)

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
    "tiny-gpt-oss": ModelConfig(
        name="tiny-gpt-oss",
        **_GPT_OSS,
        vocab_size=256,
        d_model=64,
        num_layers=3,
        max_seq_len=128,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        moe_d_ff=64,
        num_experts=16,
        experts_per_token=4,
        sliding_window=16,
        sliding_window_layers=(0, 2),
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
    # openai/gpt-oss-120b's config.json (transformers' GptOssConfig defaults are the same
    # shapes). Its RoPE is yarn (factor 32 over 4096 positions, theta 150000); this preset
    # uses plain RoPE at theta 150000 until yarn is implemented, so timings hold but a loaded
    # checkpoint would refuse the yarn config rather than run with this.
    "gpt-oss-120b": ModelConfig(
        name="gpt-oss-120b",
        **_GPT_OSS,
        vocab_size=201088,
        d_model=2880,
        num_layers=36,
        num_heads=64,
        num_kv_heads=8,
        head_dim=64,
        moe_d_ff=2880,
        num_experts=128,
        experts_per_token=4,
        sliding_window=128,
        sliding_window_layers=tuple(range(0, 36, 2)),  # sliding, full, sliding, ...
        rope_theta=150000.0,
        rms_norm_eps=1e-5,
        max_seq_len=4096,
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
        fields = json.loads(manifest.read_text())["config"]
        configs[manifest.parent.name] = ModelConfig.from_json_dict(fields)
    return configs
