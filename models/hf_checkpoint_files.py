"""The files of a Hugging Face model directory: config.json, its safetensors files (one, several,
or the shards model.safetensors.index.json lists, each kept inside the directory), and the
catalog of every tensor their headers declare. Pickled PyTorch files are refused, never opened.
"""

from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath

from models.safetensors_file import CheckpointError, TensorInfo, read_header

INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
Catalog = dict[str, tuple[Path, TensorInfo]]  # tensor name -> (its file, its header entry)


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
