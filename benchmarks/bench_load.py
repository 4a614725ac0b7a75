"""How fast `load_hf` turns a Hugging Face safetensors checkpoint into params (seconds per GB).

Writes a random checkpoint in the hub layout (one tensor per expert, [out, in] weights, sharded
with an index) of a scaled-down qwen3_moe to a temporary directory, then times `load_hf` on it.
The files were just written, so they sit in the page cache: this measures parsing, transposing
and copying into the params, not the disk. A plain read of the same files is timed alongside.

    python -m benchmarks.bench_load [--size-mb 200] [--dtype bfloat16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from models.hf_loader import load_hf

# A scaled-down Qwen3-30B-A3B: same structure, smaller widths; the layer count sets the size.
BASE_CONFIG = {
    "architectures": ["Qwen3MoeForCausalLM"],
    "model_type": "qwen3_moe",
    "hidden_size": 1024,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "head_dim": 64,
    "moe_intermediate_size": 256,
    "intermediate_size": 3072,
    "num_experts": 32,
    "num_experts_per_tok": 4,
    "norm_topk_prob": True,
    "vocab_size": 8192,
    "max_position_embeddings": 4096,
    "rope_theta": 1e6,
    "rope_scaling": None,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "use_sliding_window": False,
    "sliding_window": None,
    "hidden_act": "silu",
}
NP_DTYPES = {"bfloat16": np.dtype(ml_dtypes.bfloat16), "float32": np.dtype(np.float32)}


def layer_tensors(cfg: dict, i: int) -> dict[str, tuple[int, ...]]:
    """Checkpoint names and [out, in] shapes of decoder layer i."""
    h, hd, f = cfg["hidden_size"], cfg["head_dim"], cfg["moe_intermediate_size"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    p = f"model.layers.{i}."
    shapes = {
        p + "input_layernorm.weight": (h,),
        p + "post_attention_layernorm.weight": (h,),
        p + "self_attn.q_proj.weight": (q, h),
        p + "self_attn.k_proj.weight": (kv, h),
        p + "self_attn.v_proj.weight": (kv, h),
        p + "self_attn.o_proj.weight": (h, q),
        p + "self_attn.q_norm.weight": (hd,),
        p + "self_attn.k_norm.weight": (hd,),
        p + "mlp.gate.weight": (cfg["num_experts"], h),
    }
    for e in range(cfg["num_experts"]):
        x = f"{p}mlp.experts.{e}."
        shapes |= {x + "gate_proj.weight": (f, h), x + "up_proj.weight": (f, h)}
        shapes[x + "down_proj.weight"] = (h, f)
    return shapes


def write_checkpoint(directory: Path, size_mb: float, dtype: str, shard_mb: float = 100) -> int:
    """Writes config.json, shards and the index; returns the total tensor bytes."""
    itemsize = NP_DTYPES[dtype].itemsize
    cfg = dict(BASE_CONFIG, torch_dtype=dtype)
    h, v = cfg["hidden_size"], cfg["vocab_size"]
    outer = {
        "model.embed_tokens.weight": (v, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (v, h),
    }
    per_layer = sum(int(np.prod(s)) for s in layer_tensors(cfg, 0).values()) * itemsize
    outer_bytes = sum(int(np.prod(s)) for s in outer.values()) * itemsize
    cfg["num_hidden_layers"] = max(1, round((size_mb * 2**20 - outer_bytes) / per_layer))
    groups = [outer] + [layer_tensors(cfg, i) for i in range(cfg["num_hidden_layers"])]
    rng = np.random.default_rng(0)
    weight_map, shard, shard_bytes, shards, total = {}, {}, 0, [], 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        if shard:
            shards.append(shard)
            shard, shard_bytes = {}, 0

    for group in groups:
        for name, shape in group.items():
            array = (0.02 * rng.standard_normal(shape, np.float32)).astype(NP_DTYPES[dtype])
            shard[name] = array
            shard_bytes += array.nbytes
            total += array.nbytes
        if shard_bytes >= shard_mb * 2**20:
            flush()
    flush()
    for k, tensors in enumerate(shards):
        filename = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, directory / filename)
        weight_map |= dict.fromkeys(tensors, filename)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    return total


def read_files(directory: Path) -> float:
    """Seconds to read every shard into memory (the I/O floor for load_hf)."""
    start = time.perf_counter()
    for path in sorted(directory.glob("*.safetensors")):
        np.fromfile(path, dtype=np.uint8)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, default=200.0, help="checkpoint size")
    parser.add_argument("--dtype", choices=sorted(NP_DTYPES), default="bfloat16")
    parser.add_argument("--repeat", type=int, default=3, help="timed loads (best is reported)")
    parser.add_argument("--dir", type=Path, default=None, help="write here instead of a tmp dir")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        directory = args.dir or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        total = write_checkpoint(directory, args.size_mb, args.dtype)
        write_s = time.perf_counter() - start
        cfg = json.loads((directory / "config.json").read_text())
        gb = total / 1e9
        print(
            f"checkpoint: qwen3_moe, {cfg['num_hidden_layers']} layers x {cfg['num_experts']} "
            f"experts, {args.dtype}, {gb:.3f} GB in "
            f"{len(list(directory.glob('*.safetensors')))} shards (written in {write_s:.1f} s)"
        )
        read_s = min(read_files(directory) for _ in range(args.repeat))
        times = []
        for _ in range(args.repeat):
            start = time.perf_counter()
            _, params = load_hf(directory, progress=False)
            times.append(time.perf_counter() - start)
            del params
        best = min(times)
        print(f"plain read of the files: {read_s:.3f} s, {gb / read_s:.2f} GB/s")
        print(
            f"load_hf: {gb:.3f} GB, best {best:.3f} s of {args.repeat} "
            f"({', '.join(f'{t:.3f}' for t in times)}), {gb / best:.2f} GB/s, "
            f"{best / gb:.2f} s/GB"
        )


if __name__ == "__main__":
    main()
