"""Where each Hugging Face tensor goes: for a ModelConfig, every checkpoint tensor name and the
`Source` saying which params leaf it fills, its shape on disk, and how. Both expert layouts are
listed: one tensor per expert (hub checkpoints, and what `save_pretrained` writes:
`experts.M.gate_proj` / Mixtral's `block_sparse_moe.experts.M.w1`) and the fused transformers-5
layout (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]); gpt-oss's names come
from models/hf_gpt_oss.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from models.config import ModelConfig


@dataclass(frozen=True)
class Source:
    """How one checkpoint tensor fills the params.

    kind: "whole" (the tensor is one parameter), "expert" (one expert's slot of a stack),
    "fused_gate_up" ([E, 2I, H] -> w_gate and w_up) or "fused_down" ([E, H, I] -> w_down);
    gpt-oss's kinds are models.hf_gpt_oss.GPT_OSS_KINDS.
    """

    kind: Literal[
        "whole",
        "expert",
        "fused_gate_up",
        "fused_down",
        "gpt_oss_gate_up",
        "gpt_oss_gate_up_bias",
        "expert_stack",
        "mxfp4_gate_up",
        "mxfp4_down",
        "mxfp4_scales",
    ]
    leaf: tuple  # path into params, e.g. ("layers", 0, "attn", "q_proj", "kernel")
    shape: tuple[int, ...]  # shape on disk, from config.json
    transpose: bool = False
    expert: int | None = None
    companion: str | None = None  # MXFP4: the scales of these blocks, or the blocks of these scales


def _linear(leaf: tuple, d_in: int, d_out: int) -> Source:
    return Source("whole", leaf + ("kernel",), (d_out, d_in), transpose=True)


def _vector(leaf: tuple, n: int) -> Source:
    return Source("whole", leaf, (n,))


def expected_tensors(cfg: ModelConfig) -> tuple[dict[str, Source], dict[str, Source]]:
    """(hub layout, alternative names): checkpoint name -> Source.

    The first dict is the layout hub checkpoints (and `save_pretrained`) use, one tensor per
    expert; the second holds the names of transformers' fused in-memory layout, which may stand
    in for each MoE layer's per-expert tensors.
    """
    d, v, e_count, f = cfg.d_model, cfg.vocab_size, cfg.num_experts, cfg.moe_d_ff
    names: dict[str, Source] = {
        "model.embed_tokens.weight": Source("whole", ("embed",), (v, d)),
        "model.norm.weight": _vector(("final_norm", "scale"), d),
    }
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = _linear(("lm_head",), d, v)
    alternatives: dict[str, Source] = {}
    for i in range(cfg.num_layers):
        hf, ours = f"model.layers.{i}.", ("layers", i)
        names[hf + "input_layernorm.weight"] = _vector(ours + ("attn_norm", "scale"), d)
        names[hf + "post_attention_layernorm.weight"] = _vector(ours + ("mlp_norm", "scale"), d)
        for name, source in _attention_tensors(cfg, ours + ("attn",)).items():
            names[hf + "self_attn." + name] = source
        mlp = ours + ("mlp",)
        if cfg.architecture == "gpt_oss":
            from models.hf_gpt_oss import gpt_oss_moe_tensors  # it imports this module

            required, alternative = gpt_oss_moe_tensors(cfg, i)
            names.update(required)
            alternatives.update(alternative)
            continue
        if i < cfg.first_dense_layers:
            for name, source in _swiglu_tensors(mlp, d, cfg.dense_d_ff).items():
                names[hf + "mlp." + name] = source
            continue
        moe = hf + ("block_sparse_moe." if cfg.architecture == "mixtral" else "mlp.")
        names[moe + "gate.weight"] = _linear(mlp + ("router",), d, e_count)
        if cfg.router_bias:
            names[moe + "gate.e_score_correction_bias"] = _vector(mlp + ("router_bias",), e_count)
        projections = ("w1", "w3", "w2") if cfg.architecture == "mixtral" else None
        for e in range(e_count):
            gate, up, down = projections or ("gate_proj", "up_proj", "down_proj")
            x = f"{moe}experts.{e}."
            ex = mlp + ("experts",)
            names[x + gate + ".weight"] = Source("expert", ex + ("w_gate",), (f, d), True, e)
            names[x + up + ".weight"] = Source("expert", ex + ("w_up",), (f, d), True, e)
            names[x + down + ".weight"] = Source("expert", ex + ("w_down",), (d, f), True, e)
        # transformers-5 in-memory names (save_original_format=False); Mixtral's
        # block_sparse_moe is called mlp there, router included.
        ex = mlp + ("experts",)
        for prefix in dict.fromkeys([moe, hf + "mlp."]):
            alternatives[prefix + "experts.gate_up_proj"] = Source(
                "fused_gate_up", ex, (e_count, 2 * f, d)
            )
            alternatives[prefix + "experts.down_proj"] = Source("fused_down", ex, (e_count, d, f))
            alternatives.setdefault(prefix + "gate.weight", names[moe + "gate.weight"])
        if cfg.num_shared_experts:
            shared = "shared_expert." if cfg.architecture == "qwen2_moe" else "shared_experts."
            for name, source in _swiglu_tensors(mlp + ("shared",), d, cfg.shared_d_ff).items():
                names[hf + "mlp." + shared + name] = source
        if cfg.shared_expert_gate:
            names[hf + "mlp.shared_expert_gate.weight"] = _linear(mlp + ("shared_gate",), d, 1)
    return names, alternatives


def _swiglu_tensors(leaf: tuple, d: int, d_ff: int) -> dict[str, Source]:
    return {
        "gate_proj.weight": _linear(leaf + ("gate",), d, d_ff),
        "up_proj.weight": _linear(leaf + ("up",), d, d_ff),
        "down_proj.weight": _linear(leaf + ("down",), d_ff, d),
    }


def _attention_tensors(cfg: ModelConfig, leaf: tuple) -> dict[str, Source]:
    d, h = cfg.d_model, cfg.num_heads
    if cfg.attention == "mla":
        qk = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
        r = cfg.kv_lora_rank
        out = {
            "kv_a_proj_with_mqa.weight": _linear(
                leaf + ("kv_a_proj",), d, r + cfg.qk_rope_head_dim
            ),
            "kv_a_layernorm.weight": _vector(leaf + ("kv_a_norm", "scale"), r),
            "kv_b_proj.weight": _linear(
                leaf + ("kv_b_proj",), r, h * (cfg.qk_nope_head_dim + cfg.v_head_dim)
            ),
            "o_proj.weight": _linear(leaf + ("o_proj",), h * cfg.v_head_dim, d),
        }
        if cfg.q_lora_rank:
            rq = cfg.q_lora_rank
            out["q_a_proj.weight"] = _linear(leaf + ("q_a_proj",), d, rq)
            out["q_a_layernorm.weight"] = _vector(leaf + ("q_a_norm", "scale"), rq)
            out["q_b_proj.weight"] = _linear(leaf + ("q_b_proj",), rq, h * qk)
        else:
            out["q_proj.weight"] = _linear(leaf + ("q_proj",), d, h * qk)
        return out
    hd, q_dim, kv_dim = cfg.head_dim, h * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    out = {
        "q_proj.weight": _linear(leaf + ("q_proj",), d, q_dim),
        "k_proj.weight": _linear(leaf + ("k_proj",), d, kv_dim),
        "v_proj.weight": _linear(leaf + ("v_proj",), d, kv_dim),
        "o_proj.weight": _linear(leaf + ("o_proj",), q_dim, d),
    }
    if cfg.attention_bias:
        for name, n in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
            out[name + ".bias"] = _vector(leaf + (name, "bias"), n)
    if cfg.o_proj_bias:  # gpt-oss
        out["o_proj.bias"] = _vector(leaf + ("o_proj", "bias"), d)
    if cfg.attention_sinks:  # gpt-oss
        out["sinks"] = _vector(leaf + ("sinks",), h)
    if cfg.qk_norm == "per_head":
        out["q_norm.weight"] = _vector(leaf + ("q_norm", "scale"), hd)
        out["k_norm.weight"] = _vector(leaf + ("k_norm", "scale"), hd)
    elif cfg.qk_norm == "full":
        out["q_norm.weight"] = _vector(leaf + ("q_norm", "scale"), q_dim)
        out["k_norm.weight"] = _vector(leaf + ("k_norm", "scale"), kv_dim)
    return out
