"""Hugging Face `config.json` -> ModelConfig, for the eight MoE architectures we implement.

Accepts both hub-style configs (top-level `rope_theta` / `rope_scaling`, `num_experts`) and
transformers-5 configs (`rope_parameters`, `num_local_experts`, `head_dim: null`); yarn and linear
rope scaling and DeepSeek's FP8 128 x 128 block quantization are implemented. Anything that
would change the math and that we do not implement (dynamic / llama3 rope, sliding windows in
effect, dense layers interleaved with MoE layers, other quantizations, ...) is refused with an
error naming the field;
see tools/hf_fixtures/ARCHITECTURES.md for what each architecture computes.
"""

from __future__ import annotations

import math
from typing import Any

from models.config import ConfigError, ModelConfig

SUPPORTED_MODEL_TYPES = (
    "mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "glm4_moe",
    "gpt_oss",
)  # fmt: skip
# Cache sizing: max_position_embeddings is often 32k-160k; a KV cache that long is rarely wanted.
DEFAULT_MAX_SEQ_LEN_CAP = 4096
# The default rope theta of each transformers config class, for configs that omit it.
_DEFAULT_ROPE_THETA = {"mixtral": 1e6, "gpt_oss": 150000.0}
_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class UnsupportedConfigError(ConfigError):
    """A config.json that asks for something this runtime does not implement."""


def _refuse(model_type: str, field: str, value: Any, why: str) -> UnsupportedConfigError:
    return UnsupportedConfigError(f"{model_type}: config.json {field}={value!r}: {why}")


_REQUIRED = object()


def _int(hf: dict, key: str, default: object = _REQUIRED, *, minimum: int | None = 1) -> int:
    """config.json's integer `key` (null or absent: `default`); a float like 2.5, a string or
    a boolean is refused, and so is a value below `minimum` (a size of 0 would divide by 0)."""
    value = hf.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"missing field {key!r}")
        return int(default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key} must be at least {minimum}, got {value}")
    return value


def _float(hf: dict, key: str, default: float) -> float:
    """config.json's finite, positive number `key` (null or absent: `default`)."""
    value = hf.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key} must be a finite number > 0, got {value!r}")
    return float(value)


def _object(hf: dict, key: str) -> dict:
    """config.json's object `key` ({} when null or absent)."""
    value = hf.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{key} must be an object, got {value!r}")
    return value


def _rope_theta(hf: dict, model_type: str) -> float:
    """rope theta from `rope_parameters` (transformers 5) or `rope_theta` (hub); the scaling is
    read by `_rope_scaling`."""
    params = _object(hf, "rope_parameters")
    default = _float(hf, "rope_theta", _DEFAULT_ROPE_THETA.get(model_type, 10000.0))
    return _float(params, "rope_theta", default)


def _rope_number(spec: dict, field: str, key: str, default: float | None) -> float | None:
    """A number >= 0 from a rope dict (null or absent: default); errors name `field.key`."""
    value = spec.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{field}.{key} must be a finite number, got {value!r}")
    if value < 0:
        raise ConfigError(f"{field}.{key} must be >= 0, got {value!r}")
    return float(value)


def _rope_scaling(hf: dict, model_type: str) -> dict:
    """ModelConfig's rope_* scaling fields from `rope_scaling` (hub) or `rope_parameters`
    (transformers 5; a non-empty `rope_scaling` wins, as in transformers). Linear and yarn are
    implemented (models/rope.py); any other rope_type is refused naming the field."""
    field = "rope_scaling" if _object(hf, "rope_scaling") else "rope_parameters"
    spec = _object(hf, field)
    kind = spec.get("rope_type", spec.get("type")) or "default"
    if kind == "default":
        return {}
    if kind not in ("linear", "yarn"):
        raise _refuse(
            model_type,
            f"{field}.rope_type",
            kind,
            "only plain, linear and yarn RoPE are implemented (no dynamic / llama3 / longrope)",
        )
    partial = spec.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise _refuse(model_type, "partial_rotary_factor", partial, "partial rotary dims")
    factor = _rope_number(spec, field, "factor", None)
    if not factor:
        raise _refuse(model_type, f"{field}.factor", spec.get("factor"), f"{kind} needs a factor")
    out = dict(
        rope_scaling=kind,
        rope_factor=factor,
        rope_mscale_all_dim=_rope_number(spec, field, "mscale_all_dim", None),
    )
    if kind == "linear":
        return out
    # transformers prefers a top-level original_max_position_embeddings (Phi-3 style).
    original = hf.get("original_max_position_embeddings") or spec.get(
        "original_max_position_embeddings"
    )
    original = original or hf.get("max_position_embeddings")
    if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
        raise _refuse(
            model_type, f"{field}.original_max_position_embeddings", original, "must be > 0"
        )
    truncate = spec.get("truncate", True)
    if not isinstance(truncate, bool):
        raise ConfigError(f"{field}.truncate must be true or false, got {truncate!r}")
    return dict(
        out,
        rope_original_max_positions=original,
        # transformers: `beta_fast or 32`, `beta_slow or 1`: a 0 means the default too.
        rope_beta_fast=_rope_number(spec, field, "beta_fast", None) or 32.0,
        rope_beta_slow=_rope_number(spec, field, "beta_slow", None) or 1.0,
        rope_mscale=_rope_number(spec, field, "mscale", None),
        rope_attention_factor=_rope_number(spec, field, "attention_factor", None),
        rope_truncate=truncate,
    )


# The one quantization implemented: DeepSeek-V3's FP8 weights, dequantized at load
# (models/fp8_blocks.py); published V3 / R1 / Kimi K2 checkpoints all use 128 x 128 blocks.
FP8_BLOCK_SIZE = (128, 128)


def fp8_block_size(hf: dict) -> tuple[int, int] | None:
    """(rows, cols) of the weight blocks of an FP8 block-quantized checkpoint, None when the
    config has no quantization_config. Anything else is refused naming the field: another
    quant_method, fmt, activation_scheme or weight_block_size."""
    if not hf.get("quantization_config"):
        return None
    model_type = hf.get("model_type", "?")
    quant = _object(hf, "quantization_config")
    field = "quantization_config"
    method = quant.get("quant_method")
    if method != "fp8":
        raise _refuse(model_type, f"{field}.quant_method", method, "only fp8 is implemented")
    if quant.get("fmt", "e4m3") != "e4m3":
        raise _refuse(model_type, f"{field}.fmt", quant["fmt"], "only e4m3 is implemented")
    # Activations are never quantized here (weights are dequantized at load), so only the
    # scheme that stores no activation scales is accepted.
    if quant.get("activation_scheme", "dynamic") != "dynamic":
        why = "only dynamic is implemented (static needs activation scales)"
        raise _refuse(model_type, f"{field}.activation_scheme", quant["activation_scheme"], why)
    block = quant.get("weight_block_size", list(FP8_BLOCK_SIZE))  # transformers' default
    if not isinstance(block, (list, tuple)) or tuple(block) != FP8_BLOCK_SIZE:
        why = f"only {list(FP8_BLOCK_SIZE)} blocks are implemented (per-tensor scales are not)"
        raise _refuse(model_type, f"{field}.weight_block_size", block, why)
    return FP8_BLOCK_SIZE


def _sliding_window_in_effect(hf: dict, max_seq_len: int) -> int | None:
    """The window size if a sliding window would mask anything within max_seq_len tokens."""
    if "use_sliding_window" in hf and not hf["use_sliding_window"]:
        return None
    window = _int(hf, "sliding_window", 0, minimum=None)
    if window <= 0 or window >= max_seq_len:
        return None
    return window


def _dtype(hf: dict, override: str | None) -> str:
    if override is not None:
        return override
    name = hf.get("dtype") or hf.get("torch_dtype") or "float32"
    if not isinstance(name, str) or name not in _DTYPES:
        raise _refuse(hf["model_type"], "dtype", name, "expected float32, bfloat16 or float16")
    return _DTYPES[name]


def _check_qwen_all_layers_sparse(hf: dict, model_type: str) -> None:
    if hf.get("decoder_sparse_step", 1) != 1:
        raise _refuse(
            model_type,
            "decoder_sparse_step",
            hf["decoder_sparse_step"],
            "only every layer MoE (decoder_sparse_step 1) is implemented",
        )
    if hf.get("mlp_only_layers"):
        raise _refuse(
            model_type,
            "mlp_only_layers",
            hf["mlp_only_layers"],
            "dense layers between MoE layers are not implemented",
        )


def config_from_hf(
    config_json: dict,
    name: str,
    *,
    max_seq_len: int | None = None,
    dtype: str | None = None,
) -> ModelConfig:
    """The ModelConfig of a Hugging Face `config.json` (already parsed).

    max_seq_len: the KV cache length; defaults to max_position_embeddings capped at
    DEFAULT_MAX_SEQ_LEN_CAP. dtype: parameter dtype; defaults to the config's
    `dtype` / `torch_dtype`.
    Raises UnsupportedConfigError (a ConfigError, a ValueError) naming the offending field.
    """
    if not isinstance(config_json, dict):
        kind = "null" if config_json is None else f"a {type(config_json).__name__}"
        raise ConfigError(f"not a JSON object but {kind}")
    hf = config_json
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedConfigError(
            f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if model_type != "gpt_oss":  # gpt-oss's MXFP4 experts: _gpt_oss
        fp8_block_size(hf)  # refuses any quantization but DeepSeek's FP8 blocks
    if hf.get("hidden_act", "silu") != "silu":
        raise _refuse(model_type, "hidden_act", hf["hidden_act"], "only silu is implemented")
    positions = _int(hf, "max_position_embeddings", DEFAULT_MAX_SEQ_LEN_CAP)
    seq_len = max_seq_len or min(positions, DEFAULT_MAX_SEQ_LEN_CAP)
    window = None if model_type == "gpt_oss" else _sliding_window_in_effect(hf, seq_len)
    if window is not None:
        raise _refuse(
            model_type,
            "sliding_window",
            window,
            f"a sliding window shorter than max_seq_len ({seq_len}) is not implemented",
        )

    # GptOssConfig: rope_parameters null and rope_scaling null or {} give yarn ({}: plain).
    if model_type == "gpt_oss" and hf.get("rope_parameters") is None and not hf.get("rope_scaling"):
        hf = {**hf, "rope_parameters": GPT_OSS_DEFAULT_ROPE}
    d, nh = _int(hf, "hidden_size"), _int(hf, "num_attention_heads")
    common = dict(
        name=name,
        architecture=model_type,
        vocab_size=_int(hf, "vocab_size"),
        d_model=d,
        num_layers=_int(hf, "num_hidden_layers"),
        num_heads=nh,
        experts_per_token=_int(hf, "num_experts_per_tok"),
        max_seq_len=seq_len,
        rope_theta=_rope_theta(hf, model_type),
        **_rope_scaling(hf, model_type),
        rms_norm_eps=_float(hf, "rms_norm_eps", 1e-6),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype=_dtype(hf, dtype),
    )
    if model_type.startswith("deepseek"):
        return _deepseek(hf, model_type, common)
    if model_type == "glm4_moe":
        return _glm4_moe(hf, common)
    if model_type == "gpt_oss":
        return _gpt_oss(hf, common)

    nkv = _int(hf, "num_key_value_heads", nh)
    gqa = dict(common, num_kv_heads=nkv, head_dim=_int(hf, "head_dim", d // nh))
    if model_type == "mixtral":
        return ModelConfig(
            **gqa,
            moe_d_ff=_int(hf, "intermediate_size"),
            num_experts=_int(hf, "num_local_experts"),
            norm_topk_prob=True,
        )
    if model_type == "olmoe":
        if hf.get("clip_qkv") is not None:
            raise _refuse(model_type, "clip_qkv", hf["clip_qkv"], "q/k/v clamping not implemented")
        if hf.get("attention_bias"):
            raise _refuse(model_type, "attention_bias", True, "OLMoE attention biases")
        return ModelConfig(
            **gqa,
            moe_d_ff=_int(hf, "intermediate_size"),
            num_experts=_num_experts(hf),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            qk_norm="full",
        )
    _check_qwen_all_layers_sparse(hf, model_type)
    if model_type == "qwen2_moe":
        shared = _int(hf, "shared_expert_intermediate_size", 0, minimum=0)
        return ModelConfig(
            **gqa,
            moe_d_ff=_int(hf, "moe_intermediate_size"),
            num_experts=_num_experts(hf),
            norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
            # Hub Qwen2-MoE configs lack `qkv_bias`; their checkpoints always have the biases.
            attention_bias=bool(hf.get("qkv_bias", True)),
            num_shared_experts=1 if shared else 0,
            shared_d_ff=shared,
            shared_expert_gate=bool(shared),
        )
    # qwen3_moe
    if hf.get("attention_bias"):
        raise _refuse(model_type, "attention_bias", True, "o_proj bias is not implemented")
    return ModelConfig(
        **gqa,
        moe_d_ff=_int(hf, "moe_intermediate_size"),
        num_experts=_num_experts(hf),
        norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
        qk_norm="per_head",
    )


def _num_experts(hf: dict) -> int:
    """Qwen and OLMoE name it num_experts; transformers 5 num_local_experts."""
    return _int(hf, "num_experts" if hf.get("num_experts") is not None else "num_local_experts")


def _deepseek(hf: dict, model_type: str, common: dict) -> ModelConfig:
    if hf.get("attention_bias"):
        raise _refuse(model_type, "attention_bias", True, "MLA projection biases")
    if hf.get("mlp_bias"):
        raise _refuse(model_type, "mlp_bias", True, "MLP biases are not implemented")
    if hf.get("moe_layer_freq", 1) != 1:
        raise _refuse(model_type, "moe_layer_freq", hf["moe_layer_freq"], "must be 1")
    n_group = _int(hf, "n_group", 1, minimum=0) or 1  # 0 and null: no groups
    topk_group = _int(hf, "topk_group", 1, minimum=0) or 1
    if model_type == "deepseek_v2":
        # transformers' DeepseekV2TopkRouter: softmax scores, never renormalised.
        method = hf.get("topk_method", "greedy")
        if method == "greedy":
            n_group = topk_group = 1
        elif method != "group_limited_greedy":
            raise _refuse(
                model_type, "topk_method", method, "expected greedy or group_limited_greedy"
            )
        if hf.get("scoring_func", "softmax") != "softmax":
            raise _refuse(model_type, "scoring_func", hf["scoring_func"], "V2 routes by softmax")
        router = dict(router="softmax", norm_topk_prob=False, router_bias=False)
        rope_interleave = True  # V2 rotates (x[2i], x[2i+1]) pairs, always
    else:
        if hf.get("scoring_func", "sigmoid") != "sigmoid":
            raise _refuse(model_type, "scoring_func", hf["scoring_func"], "V3 routes by sigmoid")
        router = dict(
            router="sigmoid", norm_topk_prob=bool(hf.get("norm_topk_prob", True)), router_bias=True
        )
        rope_interleave = bool(hf.get("rope_interleave", True))
    moe_d_ff = _int(hf, "moe_intermediate_size")
    n_shared = _int(hf, "n_shared_experts", 0, minimum=0)
    first_dense = _int(hf, "first_k_dense_replace", 0, minimum=0)
    return ModelConfig(
        **common,
        num_kv_heads=common["num_heads"],  # HF expands MLA's K/V per head: needs nkv == nh
        head_dim=0,
        attention="mla",
        q_lora_rank=_int(hf, "q_lora_rank", 0, minimum=0),
        kv_lora_rank=_int(hf, "kv_lora_rank"),
        qk_nope_head_dim=_int(hf, "qk_nope_head_dim"),
        qk_rope_head_dim=_int(hf, "qk_rope_head_dim"),
        v_head_dim=_int(hf, "v_head_dim"),
        rope_interleave=rope_interleave,
        moe_d_ff=moe_d_ff,
        num_experts=_int(hf, "n_routed_experts"),
        num_expert_groups=n_group,
        topk_groups=topk_group,
        routed_scaling_factor=_float(hf, "routed_scaling_factor", 1.0),
        num_shared_experts=n_shared,
        shared_d_ff=moe_d_ff * n_shared,
        first_dense_layers=first_dense,
        dense_d_ff=_int(hf, "intermediate_size") if first_dense else 0,
        **router,
    )


def _refuse_scaled_rope(hf: dict, common: dict, why: str) -> None:
    """Refuses a linear / yarn rope that _rope_scaling parsed, naming the field it came from."""
    if common.get("rope_scaling", "none") != "none":
        field = "rope_scaling" if _object(hf, "rope_scaling") else "rope_parameters"
        raise _refuse(common["architecture"], f"{field}.rope_type", common["rope_scaling"], why)


def _partial_rotary_factor(hf: dict, default: float) -> float:
    """transformers 5 keeps it in rope_parameters; hub configs have it at the top level."""
    top_level = _float(hf, "partial_rotary_factor", default)
    return _float(_object(hf, "rope_parameters"), "partial_rotary_factor", top_level)


def _glm4_moe(hf: dict, common: dict) -> ModelConfig:
    """GLM-4.5 / 4.5-Air / 4.6: GQA with q/k/v biases, optional per-head q/k norm and partial
    rope (rotate_half on the first half of each head by default); the DeepSeek-V3 router
    (sigmoid, correction bias, groups by top-2 sum); one ungated shared expert; dense first
    layers. Defaults are Glm4MoeConfig's, for keys a config omits. Like transformers, every
    layer from first_k_dense_replace on is MoE whatever DeepSeek-style keys (moe_layer_freq,
    scoring_func, topk_method) a config carries; the MTP layers after the last one are skipped
    by the loader (num_nextn_predict_layers)."""
    # Neither is checked against transformers for GLM (no fixture; the published GLM-4.5
    # configs have plain rope): refused rather than guessed.
    _refuse_scaled_rope(hf, common, "linear / yarn RoPE is not checked for glm4_moe")
    if hf.get("quantization_config"):
        method = _object(hf, "quantization_config").get("quant_method")
        raise _refuse("glm4_moe", "quantization_config.quant_method", method, "quantized weights")
    d, nh = common["d_model"], common["num_heads"]
    moe_d_ff = _int(hf, "moe_intermediate_size")
    n_shared = _int(hf, "n_shared_experts", 1, minimum=0)
    first_dense = _int(hf, "first_k_dense_replace", 1, minimum=0)
    experts_key = "n_routed_experts" if hf.get("n_routed_experts") is not None else None
    return ModelConfig(
        **common,
        num_kv_heads=_int(hf, "num_key_value_heads", nh),
        head_dim=_int(hf, "head_dim", d // nh),
        partial_rotary_factor=_partial_rotary_factor(hf, 0.5),  # Glm4MoeConfig's default
        attention_bias=bool(hf.get("attention_bias", False)),
        qk_norm="per_head" if hf.get("use_qk_norm", False) else "none",
        moe_d_ff=moe_d_ff,
        num_experts=_int(hf, experts_key or "num_local_experts"),
        router="sigmoid",
        router_bias=True,
        norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        routed_scaling_factor=_float(hf, "routed_scaling_factor", 1.0),
        num_expert_groups=_int(hf, "n_group", 1, minimum=0) or 1,
        topk_groups=_int(hf, "topk_group", 1, minimum=0) or 1,
        num_shared_experts=n_shared,
        shared_d_ff=moe_d_ff * n_shared,
        first_dense_layers=first_dense,
        dense_d_ff=_int(hf, "intermediate_size") if first_dense else 0,
    )


GPT_OSS_LAYER_TYPES = ("sliding_attention", "full_attention")
# GptOssConfig's rope when a config has neither rope_parameters nor rope_scaling; the published
# configs say the same in rope_scaling. rope_theta: the top-level one, else 150000.
GPT_OSS_DEFAULT_ROPE = {
    "rope_type": "yarn",
    "factor": 32.0,
    "beta_fast": 32.0,
    "beta_slow": 1.0,
    "truncate": False,
    "original_max_position_embeddings": 4096,
}


def _gpt_oss(hf: dict, common: dict) -> ModelConfig:
    """transformers' GptOssConfig: GQA with q/k/v/o biases and attention sinks, sliding and
    full layers (`layer_types`), a biased router with a softmax over the top-k logits, and
    experts with biases and a clamped SwiGLU. MXFP4 expert weights are dequantized at load."""
    model_type = "gpt_oss"
    quant = _object(hf, "quantization_config")
    if quant and quant.get("quant_method") != "mxfp4":
        raise _refuse(
            model_type,
            "quantization_config.quant_method",
            quant.get("quant_method"),
            "only mxfp4 expert weights (dequantized at load) are implemented for gpt-oss",
        )
    layers = common["num_layers"]
    types = hf.get("layer_types")
    if types is None:  # GptOssConfig's default: sliding first, then alternating
        types = [GPT_OSS_LAYER_TYPES[i % 2] for i in range(layers)]
    if not isinstance(types, list) or len(types) != layers:
        raise ConfigError(f"layer_types must be a list of {layers} entries, got {types!r}")
    unknown = sorted(set(types) - set(GPT_OSS_LAYER_TYPES))
    if unknown:
        raise _refuse(model_type, "layer_types", unknown, f"expected {GPT_OSS_LAYER_TYPES}")
    window = _int(hf, "sliding_window", 0, minimum=0)  # null: the sliding layers see everything
    sliding = tuple(i for i, kind in enumerate(types) if kind == "sliding_attention")
    bias = bool(hf.get("attention_bias", True))  # GptOssConfig's default
    d, nh = common["d_model"], common["num_heads"]
    return ModelConfig(
        **common,
        num_kv_heads=_int(hf, "num_key_value_heads", nh),
        head_dim=_int(hf, "head_dim", d // nh),
        moe_d_ff=_int(hf, "intermediate_size"),
        num_experts=_num_experts(hf),
        router="topk_softmax",
        router_logit_bias=True,
        norm_topk_prob=False,  # not read: the softmax over the top-k already sums to 1
        attention_bias=bias,
        o_proj_bias=bias,
        attention_sinks=True,
        sliding_window=window,
        sliding_window_layers=sliding if window else (),
        expert_bias=True,
        swiglu_limit=_float(hf, "swiglu_limit", 7.0),
        swiglu_alpha=_float(hf, "swiglu_alpha", 1.702),
    )
