"""Hugging Face safetensors checkpoints -> (ModelConfig, logical params), tensor by tensor.

Every parameter array is allocated once, at its `abstract_params` shape and dtype, and each
checkpoint tensor is read, transposed ([out, in] -> [in, out]) and written into its place (a
routed expert into its slot of the [num_experts, ...] stack); the model is never held twice.
Both expert layouts are accepted: one tensor per expert (hub checkpoints, and what
`save_pretrained` writes: `experts.M.gate_proj` / Mixtral's `block_sparse_moe.experts.M.w1`) and
the fused transformers-5 layout (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]).

DeepSeek's FP8 block-quantized checkpoints (`<name>.weight` F8_E4M3 + `<name>.weight_scale_inv`)
are dequantized to the model dtype while loading, 128 rows at a time (models/fp8_blocks.py).

Anything surprising is an error (`CheckpointError`) naming the file and the tensor: a tensor we
need that is missing, a shape that disagrees with config.json, a tensor we would silently drop,
a truncated or corrupt file, a NaN or infinite weight, an index that names a shard outside the
model directory. Every check the headers allow runs before any parameter is allocated, so a
config.json with sizes the files do not hold fails at once. Pickled PyTorch files are never
opened.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Literal

import jax
import ml_dtypes
import numpy as np
from safetensors import safe_open

from models.config import ConfigError, ModelConfig
from models.fp8_blocks import dequantize_fp8_blocks_into, scale_grid_shape
from models.hf_config import config_from_hf, fp8_block_size
from models.parallel_load import ParallelFill, copy_checked
from models.params import Params, abstract_params

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# safetensors dtype codes -> numpy dtypes (bf16 / fp8 through ml_dtypes, which jax ships).
SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "U8": np.dtype(np.uint8),  # MXFP4 blocks and scales (gpt-oss), nothing else
}
# Tensors a checkpoint may carry that the math does not use (rotary caches are recomputed).
_HARMLESS = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FP8_DTYPES = ("F8_E4M3", "F8_E5M2")
SCALE_SUFFIX = "_scale_inv"  # DeepSeek's FP8 scales: <name>.weight_scale_inv
log = logging.getLogger("models.hf_loader")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and, where one is at
    fault, the tensor."""


# ---- reading safetensors files -------------------------------------------------------------
@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # byte offsets into the file
    end: int


def read_header(path: Path) -> dict[str, TensorInfo]:
    """The tensors a safetensors file declares; CheckpointError if the header is corrupt or the
    file is shorter than its header says (naming the first tensor that is cut off)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, no header)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8 or header_len > 100_000_000:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors header (claims {header_len} bytes, "
                f"the file has {size})"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    base, tensors = 8 + header_len, {}
    for name, spec in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in spec["data_offsets"])
            shape = tuple(int(x) for x in spec["shape"])
            tensors[name] = TensorInfo(str(spec["dtype"]), shape, base + begin, base + end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: tensor {name}: corrupt header entry {spec!r}") from None
    for name, info in sorted(tensors.items(), key=lambda kv: kv[1].end):
        if info.end > size:
            raise CheckpointError(
                f"{path}: truncated: tensor {name} ends at byte {info.end} but the file has "
                f"only {size} bytes"
            )
        dtype = SAFETENSORS_DTYPES.get(info.dtype)
        expected = None if dtype is None else int(np.prod(info.shape)) * dtype.itemsize
        if expected is not None and info.end - info.start != expected:
            raise CheckpointError(
                f"{path}: tensor {name}: {info.end - info.start} bytes for a {info.dtype} "
                f"tensor of shape {list(info.shape)} ({expected} bytes expected)"
            )
    return tensors


class SafetensorsFile:
    """One open safetensors file: reads whole tensors, or one leading-axis slice of a tensor.

    Reads through `safetensors.safe_open(framework="numpy")`; dtypes that this safetensors
    version cannot hand to numpy (bf16 before 0.5, fp8) are read as raw bytes and viewed through
    ml_dtypes.
    """

    def __init__(self, path: Path):
        self.path = path
        self.tensors = read_header(path)
        try:
            self._handle = safe_open(str(path), framework="numpy")
        except Exception as e:  # SafetensorError is not importable on every version
            raise CheckpointError(f"{path}: corrupt safetensors file ({e})") from None
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if path.stat().st_size else None

    def close(self) -> None:
        self._handle = None

    def view(self, name: str, index: int | None = None) -> np.ndarray:
        """Tensor `name` (or its slice [index]) as a read-only view of the file's memory map:
        no copy, and safe to use from several threads (models/parallel_load.py)."""
        info = self.tensors[name]
        dtype = SAFETENSORS_DTYPES.get(info.dtype)
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name}: unsupported dtype {info.dtype}")
        array = self._map[info.start : info.end].view(dtype).reshape(info.shape)
        return array if index is None else array[index]

    def read(self, name: str, index: int | None = None) -> np.ndarray:
        """Tensor `name`, or its slice `[index]` along the first axis."""
        try:
            if index is None:
                return self._handle.get_tensor(name)
            return self._handle.get_slice(name)[index]
        except Exception as e:
            if SAFETENSORS_DTYPES.get(self.tensors[name].dtype) is None:
                raise CheckpointError(f"{self.path}: tensor {name}: unreadable ({e})") from None
            # e.g. bf16 with safetensors < 0.5: the header was validated, read the bytes.
            return self.read_raw(name, index)

    def read_raw(self, name: str, index: int | None = None) -> np.ndarray:
        """`read` without safetensors: the tensor's bytes viewed as its dtype (ml_dtypes)."""
        info = self.tensors[name]
        dtype = SAFETENSORS_DTYPES.get(info.dtype)
        if dtype is None:
            raise CheckpointError(f"{self.path}: tensor {name}: unsupported dtype {info.dtype}")
        shape, start = info.shape, info.start
        if index is not None:
            row = int(np.prod(shape[1:])) * dtype.itemsize
            shape, start = shape[1:], start + index * row
        count = int(np.prod(shape))
        with open(self.path, "rb") as f:
            f.seek(start)
            return np.fromfile(f, dtype=dtype, count=count).reshape(shape)


# ---- where each Hugging Face tensor goes -----------------------------------------------------
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


# ---- the loader ------------------------------------------------------------------------------
def checkpoint_files(directory: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The safetensors files of a model directory and, if sharded, the file of each tensor
    (the index's weight_map)."""
    index_path = directory / INDEX_FILE
    if index_path.exists():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_path}: corrupt index ({e!r})") from None
        if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
        ):
            raise CheckpointError(
                f"{index_path}: corrupt index (weight_map must map tensor names to file names)"
            )
        shards = {name: shard_path(directory, f, index_path) for name, f in weight_map.items()}
        files = sorted(set(shards.values()))
        for path in files:
            if not path.exists():
                raise CheckpointError(f"{index_path}: shard {path.name} does not exist")
        return files, shards
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files, None
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory}: only PyTorch pickle files ({', '.join(pickles)}); loading them could "
            "run arbitrary code, so they are refused. Convert the checkpoint to safetensors "
            "(e.g. `AutoModelForCausalLM.from_pretrained(d).save_pretrained(out)` with "
            "transformers, which writes safetensors)"
        )
    raise CheckpointError(f"{directory}: no *.safetensors files")


def shard_path(directory: Path, name: str, index_path: Path) -> Path:
    """The file a weight_map entry names, refused unless it is a *.safetensors file of the model
    directory or below: a name like ../../x.safetensors would read a file outside it. (Symlinks
    inside the directory are followed, as the Hugging Face cache links its snapshots to blobs.)"""
    relative = PurePosixPath(name)
    if relative.is_absolute() or ".." in relative.parts or "\\" in name or not relative.parts:
        raise CheckpointError(
            f"{index_path}: shard {name!r} is not a file inside the model directory"
        )
    if relative.suffix != ".safetensors":
        raise CheckpointError(f"{index_path}: shard {name!r} is not a .safetensors file")
    return directory / relative


def read_hf_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not a Hugging Face model directory)") from None
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        kind = "null" if config is None else f"a {type(config).__name__}"
        raise CheckpointError(f"{path}: not a JSON object but {kind}")
    return config


def _leaf(params: Params, path: tuple) -> np.ndarray:
    node: Any = params
    for key in path:
        node = node[key]
    return node


# ---- checking a checkpoint against config.json, from the headers alone -----------------------
Catalog = dict[str, tuple[Path, TensorInfo]]  # tensor name -> (its file, its header entry)


def read_catalog(files: list[Path], shards: dict[str, Path] | None) -> Catalog:
    """Every tensor the files declare, from their headers, checked against the index's
    `shards` (tensor name -> its file) when there is one."""
    listed: dict[Path, list[str]] = {}
    for name, path in (shards or {}).items():
        listed.setdefault(path, []).append(name)
    catalog: Catalog = {}
    for path in files:
        tensors = read_header(path)
        if shards is not None:
            for name in tensors:
                if shards.get(name) != path:
                    raise CheckpointError(
                        f"{path}: tensor {name} is not listed for this shard in {INDEX_FILE}"
                    )
            for name in listed.get(path, []):
                if name not in tensors:
                    raise CheckpointError(
                        f"{path}: missing tensor {name} ({INDEX_FILE} says it is in this shard)"
                    )
        for name, info in tensors.items():
            if name in catalog:
                raise CheckpointError(f"{path}: tensor {name} is also in {catalog[name][0]}")
            catalog[name] = (path, info)
    return catalog


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
        from models.hf_gpt_oss import gpt_oss_targets  # it imports this module

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


# ---- FP8 block-quantized checkpoints (models/fp8_blocks.py) ----------------------------------
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


def _fill_fp8(
    params: Params,
    file: SafetensorsFile,
    name: str,
    source: Source,
    scale: tuple[SafetensorsFile, str],
    block: tuple[int, int],
) -> None:
    """Dequantizes one FP8 weight into its place, 128 rows at a time (models/fp8_blocks.py)."""
    scale_file, scale_name = scale
    scale_inv = scale_file.view(scale_name)
    if not np.isfinite(scale_inv).all():
        raise CheckpointError(
            f"{scale_file.path}: tensor {scale_name} holds NaN or infinite values"
        )
    if source.kind == "whole":
        kernel = _leaf(params, source.leaf)
        dest = kernel.T if source.transpose else kernel
    elif source.kind == "expert":
        dest = _leaf(params, source.leaf)[source.expert].T
    else:
        raise CheckpointError(f"{file.path}: tensor {name}: FP8 in a fused expert tensor")
    try:
        dequantize_fp8_blocks_into(dest, file.view(name), scale_inv, block)
    except FloatingPointError as e:
        raise CheckpointError(f"{file.path}: tensor {name}: {e}") from None


# ---- reading the tensors into place -----------------------------------------------------------
def _finite(file: SafetensorsFile, name: str, array: np.ndarray) -> np.ndarray:
    """A NaN or Inf weight would make every output NaN, silently: refused by name."""
    if not np.isfinite(array).all():
        raise CheckpointError(f"{file.path}: tensor {name} holds NaN or infinite values")
    return array


# Source kinds `_fill` reads through file views (thread-safe); the others (gpt-oss's) read with
# the safetensors handle, which the load loop closes: they run in the loop's own thread.
_VIEW_KINDS = ("whole", "expert", "fused_gate_up", "fused_down")


def _fill(
    params: Params, file: SafetensorsFile, name: str, source: Source, catalog: Catalog
) -> None:
    """Reads one planned tensor into its place in the preallocated params (checked for NaN and
    Inf band by band, models/parallel_load.py)."""
    if source.kind not in _VIEW_KINDS:
        from models.hf_gpt_oss import fill_gpt_oss  # it imports this module

        fill_gpt_oss(params, file, name, source, catalog)
        return
    try:
        if source.kind == "whole":
            copy_checked(_leaf(params, source.leaf), file.view(name), source.transpose)
        elif source.kind == "expert":
            copy_checked(_leaf(params, source.leaf)[source.expert], file.view(name), True)
        elif source.kind == "fused_gate_up":
            w_gate = _leaf(params, source.leaf + ("w_gate",))
            w_up = _leaf(params, source.leaf + ("w_up",))
            f = w_gate.shape[-1]
            for e in range(source.shape[0]):
                both = file.view(name, e)  # [2I, H]: gate rows, then up rows
                copy_checked(w_gate[e], both[:f], True)
                copy_checked(w_up[e], both[f:], True)
        else:  # fused_down
            w_down = _leaf(params, source.leaf + ("w_down",))
            for e in range(source.shape[0]):
                copy_checked(w_down[e], file.view(name, e), True)
    except FloatingPointError as e:
        raise CheckpointError(
            f"{file.path}: tensor {name} holds NaN or infinite values ({e})"
        ) from None


def load_hf(
    directory: str | os.PathLike,
    *,
    dtype: str | None = None,
    max_seq_len: int | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> tuple[ModelConfig, Params]:
    """Loads a Hugging Face model directory (config.json + model.safetensors, or shards + index).

    dtype: parameter dtype (default: the config's); max_seq_len: KV cache length (default:
    max_position_embeddings, capped); workers: threads that fill tensors (default: one per CPU,
    models/parallel_load.py). Returns the config and the logical params (host numpy,
    shapes of `abstract_params(cfg)`). Raises CheckpointError naming file and tensor.
    Every check that needs no tensor data (names, shapes, dtypes, sizes in config.json) runs
    before any parameter is allocated.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    hf_config = read_hf_config(directory)
    config_path = directory / "config.json"
    try:
        cfg = config_from_hf(
            hf_config, directory.resolve().name, max_seq_len=max_seq_len, dtype=dtype
        )
    except (ConfigError, KeyError, TypeError, ValueError) as e:
        detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
        raise CheckpointError(f"{config_path}: {detail}") from None
    files, shards = checkpoint_files(directory)
    catalog = read_catalog(files, shards)
    # config_from_hf refused any other quantization; gpt-oss's MXFP4 is read by models.hf_gpt_oss
    block = None if cfg.architecture == "gpt_oss" else fp8_block_size(hf_config)
    scales = split_fp8_scales(catalog, block)
    check_sizes(cfg, catalog, config_path)
    if shards is not None:
        missing_where = directory / INDEX_FILE
    else:
        missing_where = files[0] if len(files) == 1 else directory
    plan = plan_load(cfg, catalog, hf_config, missing_where)

    params: Params = jax.tree.map(lambda s: np.empty(s.shape, s.dtype), abstract_params(cfg))
    total = sum(p.stat().st_size for p in files)
    label = directory.name
    if scales:
        label += f" (FP8 {list(block)} blocks -> {cfg.dtype})"
        log.info(
            "%s: %d FP8 block-quantized weights are dequantized to %s while loading",
            directory,
            len(scales),
            cfg.dtype,
        )
    opened: dict[Path, SafetensorsFile] = {}
    with _bytes_progress(progress, total, label) as advance, ParallelFill(workers, advance) as pool:
        for path, tensors in itertools.groupby(plan, key=lambda item: item[0]):
            file = SafetensorsFile(path)
            for _, name, source in tensors:
                info = file.tensors[name]
                if name in scales:
                    scale_path, scale_info = scales[name]
                    if scale_path == path:
                        scale_file = file
                    else:  # published shards keep a weight and its scale together; not required
                        scale_file = opened.get(scale_path) or SafetensorsFile(scale_path)
                        opened[scale_path] = scale_file
                    scale = (scale_file, name + SCALE_SUFFIX)
                    nbytes = info.end - info.start + scale_info.end - scale_info.start
                    pool.submit(nbytes, _fill_fp8, params, file, name, source, scale, block)
                elif source.kind in _VIEW_KINDS:
                    pool.submit(info.end - info.start, _fill, params, file, name, source, catalog)
                else:
                    _fill(params, file, name, source, catalog)
                    advance(info.end - info.start)
            file.close()
    for scale_file in opened.values():
        scale_file.close()
    return cfg, params


@contextlib.contextmanager
def _bytes_progress(enabled: bool, total: int, label: str) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over bytes read; yields `advance(n)` (a no-op when disabled)."""
    if not enabled:
        yield lambda n: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    columns = (BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(TextColumn("loading {task.description}"), *columns, transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)
