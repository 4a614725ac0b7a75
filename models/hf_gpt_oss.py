"""gpt-oss checkpoints: where each tensor of a GptOssForCausalLM goes (models.hf_loader does
the reading; this file knows the names, the layouts and the MXFP4 experts).

Unlike the other architectures, gpt-oss stores its experts fused and **[in, out]**:

    model.layers.N.mlp.router.weight / .bias         [E, H] / [E]
    model.layers.N.mlp.experts.gate_up_proj          [E, H, 2I]  gate [..., ::2], up [..., 1::2]
    model.layers.N.mlp.experts.gate_up_proj_bias     [E, 2I]     interleaved the same way
    model.layers.N.mlp.experts.down_proj             [E, I, H]
    model.layers.N.mlp.experts.down_proj_bias        [E, H]
    model.layers.N.self_attn.sinks                   [heads]

The published checkpoints hold the expert weights in MXFP4 instead (models.mxfp4), [out, in]:
`experts.gate_up_proj_blocks` uint8 [E, 2I, H/32, 16] + `experts.gate_up_proj_scales` uint8
[E, 2I, H/32], and `experts.down_proj_blocks` [E, H, I/32, 16] + `_scales` [E, H, I/32]. They
are dequantized here, at load, to the model's dtype: the model itself computes with plain
expert weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from models.config import ModelConfig
from models.mxfp4 import BLOCK, dequantize_mxfp4

if TYPE_CHECKING:
    from models.hf_checkpoint_files import Catalog
    from models.hf_tensors import Source
    from models.safetensors_file import SafetensorsFile

GPT_OSS_KINDS = (
    "gpt_oss_gate_up",
    "gpt_oss_gate_up_bias",
    "expert_stack",
    "mxfp4_gate_up",
    "mxfp4_down",
    "mxfp4_scales",
)


def gpt_oss_moe_tensors(cfg: ModelConfig, layer: int) -> tuple[dict, dict]:
    """(required, alternative) checkpoint names of MoE layer `layer`: the float experts that
    save_pretrained writes, or their MXFP4 form (when H and I are multiples of 32)."""
    from models.hf_tensors import Source, _linear, _vector

    d, e, f = cfg.d_model, cfg.num_experts, cfg.moe_d_ff
    hf, mlp = f"model.layers.{layer}.mlp.", ("layers", layer, "mlp")
    ex = mlp + ("experts",)
    names = {
        hf + "router.weight": _linear(mlp + ("router",), d, e),
        hf + "router.bias": _vector(mlp + ("router", "bias"), e),
        hf + "experts.gate_up_proj": Source("gpt_oss_gate_up", ex, (e, d, 2 * f)),
        hf + "experts.gate_up_proj_bias": Source("gpt_oss_gate_up_bias", ex, (e, 2 * f)),
        hf + "experts.down_proj": Source("expert_stack", ex + ("w_down",), (e, f, d)),
        hf + "experts.down_proj_bias": Source("expert_stack", ex + ("b_down",), (e, d)),
    }
    alternatives = {}
    if d % BLOCK == 0 and f % BLOCK == 0:
        for proj, kind, leaf, rows, cols in (
            ("gate_up_proj", "mxfp4_gate_up", ex, 2 * f, d),
            ("down_proj", "mxfp4_down", ex + ("w_down",), d, f),
        ):
            blocks, scales = f"{hf}experts.{proj}_blocks", f"{hf}experts.{proj}_scales"
            shape = (e, rows, cols // BLOCK)
            alternatives[blocks] = Source(kind, leaf, (*shape, BLOCK // 2), companion=scales)
            alternatives[scales] = Source("mxfp4_scales", leaf, shape, companion=blocks)
    return names, alternatives


def gpt_oss_targets(source: Source) -> list[tuple[tuple, int | None]]:
    """The (params leaf, expert) slots a gpt-oss expert tensor fills."""
    experts = range(source.shape[0])
    if source.kind in ("gpt_oss_gate_up", "mxfp4_gate_up"):
        return [(source.leaf + (w,), e) for e in experts for w in ("w_gate", "w_up")]
    if source.kind == "gpt_oss_gate_up_bias":
        return [(source.leaf + (b,), e) for e in experts for b in ("b_gate", "b_up")]
    if source.kind == "mxfp4_scales":
        return []  # read with its blocks
    return [(source.leaf, e) for e in experts]  # expert_stack, mxfp4_down


def fill_gpt_oss(
    params: dict, file: SafetensorsFile, name: str, source: Source, catalog: Catalog
) -> None:
    """Reads one gpt-oss expert tensor (expert by expert) into its place in params."""
    from models.hf_loader import _finite, _leaf
    from models.safetensors_file import SafetensorsFile

    if source.kind == "mxfp4_scales":
        return
    if source.kind.startswith("mxfp4"):
        scales_path = catalog[source.companion][0]
        scales = file if scales_path == file.path else SafetensorsFile(scales_path)

        def read(e: int) -> np.ndarray:  # [out, in] float32
            deq = dequantize_mxfp4(file.read(name, e), scales.read(source.companion, e))
            return _finite(file, name, deq)
    else:

        def read(e: int) -> np.ndarray:
            return _finite(file, name, file.read(name, e))

    for e in range(source.shape[0]):
        value = read(e)
        if source.kind == "gpt_oss_gate_up":  # [H, 2I], [in, out]: no transpose
            _leaf(params, source.leaf + ("w_gate",))[e] = value[:, 0::2]
            _leaf(params, source.leaf + ("w_up",))[e] = value[:, 1::2]
        elif source.kind == "gpt_oss_gate_up_bias":
            _leaf(params, source.leaf + ("b_gate",))[e] = value[0::2]
            _leaf(params, source.leaf + ("b_up",))[e] = value[1::2]
        elif source.kind == "mxfp4_gate_up":  # [2I, H], [out, in]
            _leaf(params, source.leaf + ("w_gate",))[e] = value[0::2].T
            _leaf(params, source.leaf + ("w_up",))[e] = value[1::2].T
        elif source.kind == "mxfp4_down":  # [H, I]
            _leaf(params, source.leaf)[e] = value.T
        else:  # expert_stack: [E, ...] already in our layout
            _leaf(params, source.leaf)[e] = value
    if source.kind.startswith("mxfp4") and scales is not file:
        scales.close()
