"""Hugging Face safetensors checkpoints -> (ModelConfig, logical params), tensor by tensor.

Every parameter array is allocated once, at its `abstract_params` shape and dtype, and each
checkpoint tensor is read, transposed ([out, in] -> [in, out]) and written into its place (a
routed expert into its slot of the [num_experts, ...] stack); the model is never held twice.
DeepSeek's FP8 block-quantized checkpoints (`<name>.weight` F8_E4M3 + `<name>.weight_scale_inv`)
are dequantized to the model dtype while loading, 128 rows at a time (models/fp8_blocks.py).

Anything surprising is an error (`CheckpointError`) naming the file and the tensor: a tensor we
need that is missing, a shape that disagrees with config.json, a tensor we would silently drop,
a truncated or corrupt file, a NaN or infinite weight, an index that names a shard outside the
model directory. Every check the headers allow runs before any parameter is allocated, so a
config.json with sizes the files do not hold fails at once. Pickled PyTorch files are never
opened.

This file is the entry point (`load_hf`) and the fill loop. The model directory's files and the
tensors they declare: models/hf_checkpoint_files.py; reading one safetensors file:
models/safetensors_file.py; the tensor names of each architecture, both expert layouts:
models/hf_tensors.py; the checks from the headers alone, and the load plan:
models/hf_load_plan.py.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jax
import numpy as np

from models.config import ConfigError, ModelConfig
from models.fp8_blocks import dequantize_fp8_blocks_into
from models.hf_checkpoint_files import (
    INDEX_FILE,
    PICKLE_SUFFIXES,
    Catalog,
    checkpoint_files,
    read_catalog,
    read_hf_config,
    shard_path,
)
from models.hf_config import config_from_hf, fp8_block_size
from models.hf_load_plan import SCALE_SUFFIX, Scales, check_sizes, plan_load, split_fp8_scales
from models.hf_tensors import Source, expected_tensors
from models.parallel_load import ParallelFill, copy_checked
from models.params import Params, abstract_params
from models.safetensors_file import (
    SAFETENSORS_DTYPES,
    CheckpointError,
    SafetensorsFile,
    TensorInfo,
    read_header,
)

# The loader's public names, wherever they are defined, stay importable from here.
__all__ = [
    "INDEX_FILE",
    "PICKLE_SUFFIXES",
    "SAFETENSORS_DTYPES",
    "SCALE_SUFFIX",
    "Catalog",
    "CheckpointError",
    "SafetensorsFile",
    "Scales",
    "Source",
    "TensorInfo",
    "check_sizes",
    "checkpoint_files",
    "expected_tensors",
    "load_hf",
    "plan_load",
    "read_catalog",
    "read_header",
    "read_hf_config",
    "shard_path",
    "split_fp8_scales",
]

log = logging.getLogger("models.hf_loader")


# ---- reading the tensors into place -----------------------------------------------------------
def _leaf(params: Params, path: tuple) -> np.ndarray:
    node: Any = params
    for key in path:
        node = node[key]
    return node


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


# ---- the loader ------------------------------------------------------------------------------
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
