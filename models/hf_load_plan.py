"""Checking a checkpoint against config.json from its headers alone, before any parameter is
allocated: as many layers and experts as config.json says (check_sizes), every FP8 weight paired
with its scale (split_fp8_scales), and the load plan, which tensor fills which params slot, with
any tensor we would drop, shape or dtype config.json does not imply, slot filled twice or tensor
missing refused (plan_load).
"""

from __future__ import annotations

import re
from pathlib import Path

from models.config import ModelConfig
from models.fp8_blocks import scale_grid_shape
from models.hf_checkpoint_files import Catalog
from models.hf_gpt_oss import gpt_oss_targets
from models.hf_tensors import Source, expected_tensors
from models.safetensors_file import SAFETENSORS_DTYPES, CheckpointError, TensorInfo

# Tensors a checkpoint may carry that the math does not use (rotary caches are recomputed).
_HARMLESS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_EXPERT = re.compile(r"^model\.layers\.(\d+)\..*\.experts\.(\d+)\.")
_FUSED = re.compile(r"\.experts\.(gate_up_proj|down_proj)(_blocks)?$")


def check_sizes(cfg: ModelConfig, catalog: Catalog, config_path: Path) -> None:
    """Refuses a config.json with more layers or experts than the files hold, before anything
    is built for them: the work of planning a load grows with both (10^6 layers once hung it)."""
    layers = {int(m.group(1)) for name in catalog if (m := _LAYER.match(name))}
    if cfg.num_layers > len(layers):
        raise CheckpointError(
            f"{config_path}: num_hidden_layers is {cfg.num_layers}, but the safetensors files "
            f"hold tensors of {len(layers)} layers"
        )
    per_layer: dict[int, set[int]] = {}
    for name in catalog:
        if m := _EXPERT.match(name):
            per_layer.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    held = max((len(experts) for experts in per_layer.values()), default=0)
    for name, (_, info) in catalog.items():
        if _FUSED.search(name) and info.shape and info.end > info.start:  # [E, ...], not empty
            held = max(held, info.shape[0])
    if cfg.num_experts > held:
        raise CheckpointError(
            f"{config_path}: {cfg.num_experts} routed experts per layer, but the safetensors "
            f"files hold at most {held}"
        )


def _targets(source: Source) -> list[tuple[tuple, int | None]]:
    """The (params leaf, expert or None) slots a checkpoint tensor fills."""
    if source.kind == "whole":
        return [(source.leaf, None)]
    if source.kind == "expert":
        return [(source.leaf, source.expert)]
    if source.kind not in ("fused_gate_up", "fused_down"):
        return gpt_oss_targets(source)
    weights = ("w_gate", "w_up") if source.kind == "fused_gate_up" else ("w_down",)
    return [(source.leaf + (w,), e) for e in range(source.shape[0]) for w in weights]


def plan_load(
    cfg: ModelConfig, catalog: Catalog, hf_config: dict, missing_where: Path
) -> list[tuple[Path, str, Source]]:
    """(file, tensor, where it goes) for every tensor to read, in file order; CheckpointError
    for a tensor we would drop, a shape or dtype config.json does not imply, a slot filled
    twice, or a tensor missing (named after `missing_where`). Reads no tensor data."""
    names, alternatives = expected_tensors(cfg)
    pending = {target: name for name, s in names.items() for target in _targets(s)}
    filled: set[tuple] = set()
    plan = []
    for name, (path, info) in catalog.items():
        source = names.get(name) or alternatives.get(name)
        if source is None:
            if _is_harmless(name, cfg, hf_config):
                continue
            raise CheckpointError(
                f"{path}: unexpected tensor {name} (not part of a {cfg.architecture} "
                "model with this config.json; refusing to ignore it)"
            )
        if info.shape != source.shape:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {list(info.shape)}, but config.json "
                f"implies {list(source.shape)}"
            )
        if SAFETENSORS_DTYPES.get(info.dtype) is None:
            raise CheckpointError(
                f"{path}: tensor {name}: dtype {info.dtype} is not a supported float type"
            )
        if (info.dtype == "U8") != source.kind.startswith("mxfp4"):
            want = "U8 (MXFP4)" if source.kind.startswith("mxfp4") else "a float type"
            raise CheckpointError(f"{path}: tensor {name}: dtype {info.dtype}, expected {want}")
        if source.companion is not None and source.companion not in catalog:
            raise CheckpointError(
                f"{path}: tensor {name} comes without {source.companion} (MXFP4 blocks and "
                "scales go together)"
            )
        for leaf, expert in _targets(source):
            if (leaf, expert) in filled:
                where = "/".join(map(str, leaf)) + ("" if expert is None else f"[{expert}]")
                raise CheckpointError(
                    f"{path}: tensor {name} fills {where}, which another tensor already filled"
                )
            filled.add((leaf, expert))
            pending.pop((leaf, expert), None)
        plan.append((path, name, source))
    if pending:
        missing = sorted(pending.values())
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CheckpointError(f"{missing_where}: missing tensor {missing[0]}{more}")
    return plan


def _is_harmless(name: str, cfg: ModelConfig, hf_config: dict) -> bool:
    """Tensors we may skip: rotary caches, a tied lm_head, DeepSeek's multi-token-prediction
    layers (stored after the last decoder layer, not part of the causal LM)."""
    if _HARMLESS.search(name):
        return True
    if name == "lm_head.weight" and cfg.tie_embeddings:
        return True
    match = _LAYER.match(name)
    mtp = int(hf_config.get("num_nextn_predict_layers") or 0)
    return bool(match) and cfg.num_layers <= int(match.group(1)) < cfg.num_layers + mtp


# ---- FP8 block-quantized checkpoints (models/fp8_blocks.py) ----------------------------------
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
SCALE_SUFFIX = "_scale_inv"  # DeepSeek's FP8 scales: <name>.weight_scale_inv
Scales = dict[str, tuple[Path, TensorInfo]]  # FP8 weight name -> its weight_scale_inv


def split_fp8_scales(catalog: Catalog, block: tuple[int, int] | None) -> Scales:
    """Takes every `<weight>_scale_inv` out of `catalog` and pairs it with its FP8 weight.

    CheckpointError, naming file and tensor, for: a scale without an FP8 weight, an FP8 weight
    without a scale (or any FP8 tensor when config.json has no quantization_config), a scale
    whose shape is not the weight's block grid, or an FP8 weight that is not 2-D."""
    scales: Scales = {}
    for name in [n for n in catalog if n.endswith(SCALE_SUFFIX)]:
        path, info = catalog[name]
        weight = name[: -len(SCALE_SUFFIX)]
        if block is None:
            raise CheckpointError(
                f"{path}: tensor {name}: an FP8 scale, but config.json has no quantization_config"
            )
        if weight not in catalog or catalog[weight][1].dtype != "F8_E4M3":
            found = "missing" if weight not in catalog else f"{catalog[weight][1].dtype}"
            raise CheckpointError(
                f"{path}: tensor {name} scales {weight}, which is not an F8_E4M3 tensor ({found})"
            )
        w_path, w_info = catalog[weight]
        if len(w_info.shape) != 2:
            raise CheckpointError(
                f"{w_path}: tensor {weight}: FP8 weights must be 2-D [out, in] (one tensor per "
                f"expert), got shape {list(w_info.shape)}"
            )
        grid = scale_grid_shape(w_info.shape, block)
        if info.shape != grid:
            raise CheckpointError(
                f"{path}: tensor {name} has shape {list(info.shape)}, but {weight} "
                f"{list(w_info.shape)} in {list(block)} blocks needs {list(grid)}"
            )
        if info.dtype not in ("F32", "BF16", "F16"):
            raise CheckpointError(f"{path}: tensor {name}: dtype {info.dtype}, expected F32")
        scales[weight] = catalog.pop(name)
    for name, (path, info) in catalog.items():
        if info.dtype in _FP8_DTYPES and name not in scales:
            if block is None:
                raise CheckpointError(
                    f"{path}: tensor {name} is {info.dtype}, but config.json has no "
                    "quantization_config (refusing to read FP8 values without their scales)"
                )
            raise CheckpointError(
                f"{path}: tensor {name} is {info.dtype} but {name}{SCALE_SUFFIX} is missing"
            )
    return scales
