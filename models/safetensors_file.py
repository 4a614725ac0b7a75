"""Reading safetensors files: the header (each tensor's dtype, shape and byte range, checked
against the file's size) and the tensors, whole or one leading-axis slice, as memory-map views
or copies. CheckpointError, raised by every part of the Hugging Face loader
(models/hf_loader.py), is defined here, at the bottom of that stack.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors import safe_open

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


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded; the message names the file and, where one is at
    fault, the tensor."""


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
