"""Orbax checkpoints of a model, with every routed expert stored on its own, and model loading.

A checkpoint directory written by `save_checkpoint`:

    elastic_moe.json   {"format": ..., "version": 1, "config": ModelConfig as a dict}
    state/             one orbax PyTree: {"dense": params without the routed experts,
                       "experts": {"<moe layer j>": {"<expert e>": {w_gate, w_up, w_down}}}}
                       (gpt-oss experts also hold b_gate, b_up, b_down)
    tokenizer.json     (optional) a Hugging Face tokenizer

Storing each expert as its own arrays lets a repair or a rejoin read exactly the experts it
needs (`restore_experts`) without touching the rest. `load_model_dir` / `load_model` accept
such a directory, a Hugging Face model directory or a preset name.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from models.config import ModelConfig
from models.hf_loader import CheckpointError, load_hf
from models.params import (
    Params,
    abstract_params,
    expert_weight_names,
    init_params,
    moe_layer_indices,
)
from models.presets import PRESETS
from models.tokenizer import TOKENIZER_FILE, ByteTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "CheckpointError",
    "load_model",
    "load_model_dir",
    "restore_checkpoint",
    "restore_experts",
    "save_checkpoint",
]

MANIFEST = "elastic_moe.json"
STATE_DIR = "state"
FORMAT = "elastic-moe-checkpoint"
VERSION = 1
EXPERT_RESTORE_BYTES = 4 << 30  # experts read per orbax call by restore_checkpoint
ExpertWeights = dict[str, np.ndarray]  # {"w_gate": [d, f], "w_up": [d, f], "w_down": [f, d]}


# ---- tree plumbing: orbax stores string keys; params use int keys for layers -----------------
def _str_keys(tree: Any) -> Any:
    if isinstance(tree, dict):
        return {str(k): _str_keys(v) for k, v in tree.items()}
    return tree


def _int_layer_keys(tree: Any) -> Any:
    """Inverse of _str_keys for params: the children of "layers" are decoder layer indices."""
    if not isinstance(tree, dict):
        return tree
    return {
        k: (
            {int(i): _int_layer_keys(v) for i, v in c.items()}
            if k == "layers"
            else _int_layer_keys(c)
        )
        for k, c in tree.items()
    }


def _dense_part(params: Params, cfg: ModelConfig) -> Params:
    """params without each MoE layer's "experts" (a shallow copy; arrays are shared)."""
    layers = dict(params["layers"])
    for i in moe_layer_indices(cfg):
        layers[i] = dict(layers[i])
        layers[i]["mlp"] = {k: v for k, v in layers[i]["mlp"].items() if k != "experts"}
    return {**params, "layers": layers}


def _check_shapes(cfg: ModelConfig, params: Params) -> None:
    expected = abstract_params(cfg)
    want = jax.tree_util.tree_flatten_with_path(expected)[0]
    got = dict(jax.tree_util.tree_flatten_with_path(params)[0])
    if len(got) != len(want):
        raise CheckpointError(f"params have {len(got)} arrays, config {cfg.name} needs {len(want)}")
    for path, spec in want:
        array = got.get(path)
        name = jax.tree_util.keystr(path)
        if array is None:
            raise CheckpointError(f"params lack {name}")
        if tuple(array.shape) != spec.shape:
            raise CheckpointError(f"params{name} has shape {array.shape}, expected {spec.shape}")


def _read_manifest(directory: Path) -> ModelConfig:
    path = directory / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (not an elastic-moe checkpoint)") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        raise CheckpointError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r}; "
            f"this build reads {FORMAT!r} version {VERSION}"
        )
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(manifest["config"]) - fields)
    if unknown:
        raise CheckpointError(
            f"{path}: unknown config fields {unknown} (written by a newer build?)"
        )
    return ModelConfig.from_json_dict(manifest["config"])


def _numpy_restore_args(item: Any) -> Any:
    return jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)


def _restore(directory: Path, item: Any, restore_args: Any) -> Any:
    """Partial restore: only the leaves of `item` are read."""
    with ocp.PyTreeCheckpointer() as checkpointer:
        return checkpointer.restore(
            (directory / STATE_DIR).resolve(),
            args=ocp.args.PyTreeRestore(item=item, restore_args=restore_args, partial_restore=True),
        )


def _expert_item(cfg: ModelConfig, pairs: Iterable[tuple[int, int]]) -> dict:
    """The "experts" subtree of the (moe layer j, expert e) pairs, as shape/dtype leaves."""
    shapes = abstract_params(cfg)
    layers = moe_layer_indices(cfg)
    item: dict[str, dict[str, dict]] = {}
    for j, e in pairs:
        if not (0 <= j < len(layers) and 0 <= e < cfg.num_experts):
            raise CheckpointError(
                f"no expert ({j}, {e}): {len(layers)} MoE layers x {cfg.num_experts} experts"
            )
        stacked = shapes["layers"][layers[j]]["mlp"]["experts"]
        item.setdefault(str(j), {})[str(e)] = {
            w: jax.ShapeDtypeStruct(stacked[w].shape[1:], stacked[w].dtype)
            for w in expert_weight_names(cfg)
        }
    return item


# ---- the public API ------------------------------------------------------------------------
def save_checkpoint(
    directory: str | os.PathLike,
    cfg: ModelConfig,
    params: Params,
    tokenizer_json: str | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Writes logical params (experts [num_experts, ...] per MoE layer; numpy or jax arrays)
    as an orbax checkpoint with one entry per expert, plus the config and tokenizer."""
    directory = Path(directory)
    _check_shapes(cfg, params)
    if directory.exists() and any(directory.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{directory}: exists and is not empty (pass overwrite=True)")
        shutil.rmtree(directory)
    directory.mkdir(parents=True, exist_ok=True)
    experts = {}
    names = expert_weight_names(cfg)
    for j, i in enumerate(moe_layer_indices(cfg)):
        stacks = {w: np.asarray(params["layers"][i]["mlp"]["experts"][w]) for w in names}
        experts[str(j)] = {str(e): {w: stacks[w][e] for w in names} for e in range(cfg.num_experts)}
    state = {"dense": _str_keys(_dense_part(params, cfg)), "experts": experts}
    with ocp.PyTreeCheckpointer() as checkpointer:
        checkpointer.save((directory / STATE_DIR).resolve(), args=ocp.args.PyTreeSave(state))
    if tokenizer_json is not None:
        (directory / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
    manifest = {"format": FORMAT, "version": VERSION, "config": dataclasses.asdict(cfg)}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2))
    return directory


def _refuse_non_finite(directory: Path, tree: Any, prefix: str = "") -> None:
    """A NaN or Inf weight makes every output NaN without a word: refused, naming the tensor.
    Device arrays are checked where they are (no copy to the host)."""
    for path, array in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if isinstance(array, jax.Array):
            finite = bool(jnp.isfinite(array).all())
        else:
            finite = bool(np.isfinite(array).all())
        if not finite:
            name = prefix + "/".join(str(getattr(key, "key", key)) for key in path)
            raise CheckpointError(f"{directory}: tensor {name} holds NaN or infinite values")


def restore_experts(
    directory: str | os.PathLike, cfg: ModelConfig, pairs: Iterable[tuple[int, int]]
) -> dict[tuple[int, int], ExpertWeights]:
    """Reads only the listed experts: pairs of (MoE layer index j, logical expert e).

    Returns {(j, e): {"w_gate": [d, f], "w_up": [d, f], "w_down": [f, d]}} as host numpy (and
    gpt-oss's "b_gate" [f], "b_up" [f], "b_down" [d]).
    """
    pairs = list(dict.fromkeys((int(j), int(e)) for j, e in pairs))
    if not pairs:
        return {}
    item = {"experts": _expert_item(cfg, pairs)}
    restored = _restore(Path(directory), item, _numpy_restore_args(item))["experts"]
    _refuse_non_finite(Path(directory), restored, "MoE layer/expert ")
    return {(j, e): restored[str(j)][str(e)] for j, e in pairs}


def restore_checkpoint(
    directory: str | os.PathLike, *, shardings: Any = None
) -> tuple[ModelConfig, Params]:
    """The config and logical params of a checkpoint written by `save_checkpoint`.

    shardings: None restores everything to host numpy. Otherwise a jax Sharding for every dense
    (non-expert) leaf, or a tree of Shardings shaped like the dense params; the dense leaves are
    then restored straight onto those devices as jax Arrays. Routed experts always come back as
    host numpy [num_experts, ...] stacks (a deployment gathers them into slots).
    """
    directory = Path(directory)
    cfg = _read_manifest(directory)
    shapes = abstract_params(cfg)
    dense = _str_keys(_dense_part(shapes, cfg))
    if shardings is None:
        dense_args = _numpy_restore_args(dense)
    else:
        if isinstance(shardings, jax.sharding.Sharding):
            tree = jax.tree.map(lambda _: shardings, dense)
        else:
            tree = _str_keys(shardings)
        dense_args = jax.tree.map(
            lambda spec, s: ocp.ArrayRestoreArgs(
                restore_type=jax.Array, sharding=s, global_shape=spec.shape, dtype=spec.dtype
            ),
            dense,
            tree,
        )
    params = _int_layer_keys(_restore(directory, {"dense": dense}, {"dense": dense_args})["dense"])
    _refuse_non_finite(directory, params)
    # A few MoE layers per orbax call (each call parses the whole tree's metadata); their
    # per-expert arrays are stacked into [num_experts, ...] and dropped before the next call.
    moe_layers = moe_layer_indices(cfg)
    per_call = max(1, EXPERT_RESTORE_BYTES // (cfg.num_experts * cfg.expert_bytes()))
    for first in range(0, len(moe_layers), per_call):
        chunk = range(first, min(first + per_call, len(moe_layers)))
        pairs = [(j, e) for j in chunk for e in range(cfg.num_experts)]
        restored = restore_experts(directory, cfg, pairs)
        for j in chunk:
            stacks = shapes["layers"][moe_layers[j]]["mlp"]["experts"]
            stacked = {w: np.empty(s.shape, s.dtype) for w, s in stacks.items()}
            for e in range(cfg.num_experts):
                weights = restored.pop((j, e))
                for w in expert_weight_names(cfg):
                    stacked[w][e] = weights[w]
            params["layers"][moe_layers[j]]["mlp"]["experts"] = stacked
    return cfg, params


def load_model_dir(
    path: str | os.PathLike, *, progress: bool = False
) -> tuple[ModelConfig, Params, Tokenizer]:
    """(config, host params, tokenizer) of an elastic-moe checkpoint or a Hugging Face model
    directory (config.json + *.safetensors); CheckpointError for anything else."""
    directory = Path(path)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory")
    if (directory / MANIFEST).exists():
        cfg, params = restore_checkpoint(directory)
    elif (directory / "config.json").exists():
        cfg, params = load_hf(directory, progress=progress)  # also refuses pickle-only dirs
    else:
        raise CheckpointError(
            f"{directory}: neither an elastic-moe checkpoint ({MANIFEST} + {STATE_DIR}/) nor a "
            "Hugging Face model directory (config.json + *.safetensors)"
        )
    return cfg, params, load_tokenizer(directory, cfg.vocab_size)


TRAINED_DIR = Path(__file__).resolve().parent.parent / "models" / "trained"


def trained_models() -> list[str]:
    """Names of the checkpoints trained by the project and shipped in models/trained/."""
    if not TRAINED_DIR.is_dir():
        return []
    return sorted(p.parent.name for p in TRAINED_DIR.glob("*/elastic_moe.json"))


def load_model(preset_or_path: str | os.PathLike) -> tuple[ModelConfig, Params, Tokenizer]:
    """A preset name (random weights, seed 0, byte tokenizer) or a model directory."""
    if str(preset_or_path) in PRESETS and not Path(preset_or_path).exists():
        cfg = PRESETS[str(preset_or_path)]
        return cfg, init_params(cfg, seed=0), ByteTokenizer(cfg.vocab_size)
    if Path(preset_or_path).is_dir():
        return load_model_dir(preset_or_path)
    shipped = TRAINED_DIR / str(preset_or_path)
    if (shipped / "elastic_moe.json").exists():
        return load_model_dir(shipped)
    known = ", ".join(sorted(PRESETS) + trained_models())
    raise CheckpointError(
        f"{preset_or_path!r} is neither a directory nor a preset; presets: {known}"
    )
