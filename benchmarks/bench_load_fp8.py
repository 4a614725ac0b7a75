"""Load a DeepSeek-V3 checkpoint in its published FP8 layout, then serve it through a failure.

Writes a random-weight checkpoint exactly as DeepSeek-V3 is published (tensor names, shapes
and dtypes: FP8 e4m3 linears with float32 `weight_scale_inv` [ceil(out/128), ceil(in/128)],
bf16 embeddings / norms / router, f32 e_score_correction_bias; config.json with its
quantization_config and yarn rope_scaling; ~5 GB shards and an index), with `--layers` decoder
layers of which the first is dense (3 layers: ~27 GB). Then times `load_hf` on it (FP8
dequantized to bf16 at load; bytes read / seconds), builds the engine on the visible devices,
generates a few requests, and, with 2 devices or more, generates them again while one device
fails and checks that every token is unchanged. Each row is printed as soon as it is known.

    python -m benchmarks.bench_load_fp8 [--layers 3] [--dir DIR] [--keep]   # the GPU machine
    python -m benchmarks.bench_load_fp8 --tiny                              # CPU, small shapes

The random bytes come from a 64 MiB pool (valid e4m3 values in [0.125, 3.75], never NaN) read
at random offsets, so writing runs at disk speed; scales are ~1e-3, so weights are ~1e-3.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

if __name__ == "__main__":  # simulated CPU devices off-GPU: before jax starts
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from benchmarks.common import simulate_devices_unless_gpu

    simulate_devices_unless_gpu(2)

BLOCK = 128
# The published DeepSeek-V3 config.json (its own keys and values), but first_k_dense_replace 1
# and num_hidden_layers from --layers; the multi-token-prediction layer is not written.
V3_CONFIG = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001,
    "bos_token_id": 0,
    "eos_token_id": 1,
    "ep_size": 1,
    "first_k_dense_replace": 1,
    "hidden_act": "silu",
    "hidden_size": 7168,
    "initializer_range": 0.02,
    "intermediate_size": 18432,
    "kv_lora_rank": 512,
    "max_position_embeddings": 163840,
    "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048,
    "moe_layer_freq": 1,
    "n_group": 8,
    "n_routed_experts": 256,
    "n_shared_experts": 1,
    "norm_topk_prob": True,
    "num_attention_heads": 128,
    "num_experts_per_tok": 8,
    "num_hidden_layers": 3,
    "num_key_value_heads": 128,
    "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "quantization_config": {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
    },
    "rms_norm_eps": 1e-06,
    "rope_scaling": {
        "beta_fast": 32,
        "beta_slow": 1,
        "factor": 40,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
        "original_max_position_embeddings": 4096,
        "type": "yarn",
    },
    "rope_theta": 10000,
    "routed_scaling_factor": 2.5,
    "scoring_func": "sigmoid",
    "seq_aux": True,
    "tie_word_embeddings": False,
    "topk_group": 4,
    "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16",
    "use_cache": True,
    "v_head_dim": 128,
    "vocab_size": 129280,
}
# Small shapes for CPU: hidden 320 and dense width 400 leave ragged 128-blocks both ways.
TINY = dict(
    hidden_size=320,
    intermediate_size=400,
    moe_intermediate_size=160,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=96,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=16,
    n_group=4,
    topk_group=2,
    num_experts_per_tok=4,
    vocab_size=512,
)
SAFETENSORS_CODES = {
    np.dtype(ml_dtypes.float8_e4m3fn): "F8_E4M3",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype(np.float32): "F32",
}
FP8, BF16, F32 = (np.dtype(ml_dtypes.float8_e4m3fn), np.dtype(ml_dtypes.bfloat16), np.dtype("f4"))


def _bytes(array: np.ndarray) -> memoryview:
    """The array's bytes (a buffer of bf16 / fp8 items cannot be exported directly)."""
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8).data


def row(text: str) -> None:
    print(text, flush=True)


# ---- the checkpoint's tensors ----------------------------------------------------------------
def checkpoint_tensors(cfg: dict) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
    """Every tensor of the published layout: name -> (dtype, shape), FP8 weights followed by
    their weight_scale_inv."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    rq, r, f = cfg["q_lora_rank"], cfg["kv_lora_rank"], cfg["moe_intermediate_size"]
    out: dict[str, tuple[np.dtype, tuple[int, ...]]] = {}

    def linear(name: str, d_out: int, d_in: int) -> None:
        out[name + ".weight"] = (FP8, (d_out, d_in))
        out[name + ".weight_scale_inv"] = (F32, (-(-d_out // BLOCK), -(-d_in // BLOCK)))

    def swiglu(prefix: str, width: int) -> None:
        linear(prefix + "gate_proj", width, h)
        linear(prefix + "up_proj", width, h)
        linear(prefix + "down_proj", h, width)

    out["model.embed_tokens.weight"] = (BF16, (cfg["vocab_size"], h))
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (BF16, (h,))
        out[p + "post_attention_layernorm.weight"] = (BF16, (h,))
        a = p + "self_attn."
        linear(a + "q_a_proj", rq, h)
        out[a + "q_a_layernorm.weight"] = (BF16, (rq,))
        linear(a + "q_b_proj", heads * (nope + rope), rq)
        linear(a + "kv_a_proj_with_mqa", r + rope, h)
        out[a + "kv_a_layernorm.weight"] = (BF16, (r,))
        linear(a + "kv_b_proj", heads * (nope + v), r)
        linear(a + "o_proj", h, heads * v)
        if i < cfg["first_k_dense_replace"]:
            swiglu(p + "mlp.", cfg["intermediate_size"])
            continue
        out[p + "mlp.gate.weight"] = (BF16, (cfg["n_routed_experts"], h))
        out[p + "mlp.gate.e_score_correction_bias"] = (F32, (cfg["n_routed_experts"],))
        for e in range(cfg["n_routed_experts"]):
            swiglu(f"{p}mlp.experts.{e}.", f)
        swiglu(p + "mlp.shared_experts.", f * cfg["n_shared_experts"])
    out["model.norm.weight"] = (BF16, (h,))
    out["lm_head.weight"] = (BF16, (cfg["vocab_size"], h))
    return out


class RandomBytes:
    """Random tensors fast: slices of a pool (64 MiB) per dtype, at random offsets."""

    def __init__(self, seed: int = 0, pool_bytes: int = 64 << 20):
        self.rng = np.random.default_rng(seed)
        self.POOL = pool_bytes
        bits = self.rng.integers(0, 256, self.POOL, dtype=np.uint8)
        # e4m3: sign | exponent field 4..8 | mantissa: magnitudes 2^-3 .. 1.875 * 2, never NaN
        exponent = (4 + bits % 5).astype(np.uint8) << 3
        self.fp8 = (bits & 0x80) | exponent | (self.rng.integers(0, 8, self.POOL, np.uint8))
        normal = 0.02 * self.rng.standard_normal(self.POOL // 2, np.float32)
        self.bf16 = normal.astype(ml_dtypes.bfloat16).view(np.uint8)

    def chunks(self, name: str, dtype: np.dtype, shape: tuple[int, ...]) -> Iterator[bytes]:
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if dtype == FP8 or (dtype == BF16 and not name.endswith("norm.weight")):
            pool = self.fp8 if dtype == FP8 else self.bf16
            while nbytes:
                start = int(self.rng.integers(0, self.POOL // 2)) & ~1  # bf16-aligned
                take = min(nbytes, self.POOL - start)
                yield pool[start : start + take].data
                nbytes -= take
        elif dtype == BF16:  # norm weights: near 1
            yield _bytes((1 + 0.1 * self.rng.standard_normal(shape)).astype(ml_dtypes.bfloat16))
        elif name.endswith("_scale_inv"):
            yield _bytes(self.rng.uniform(0.5e-3, 1.5e-3, shape).astype(np.float32))
        else:  # e_score_correction_bias
            yield _bytes((0.01 * self.rng.standard_normal(shape)).astype(np.float32))


def write_safetensors(
    path: Path,
    specs: dict[str, tuple[np.dtype, tuple[int, ...]]],
    chunks: Callable[[str, np.dtype, tuple[int, ...]], Iterator[bytes]],
) -> int:
    """Writes a safetensors file tensor by tensor (the header first, from the shapes alone), so
    nothing is held in memory; chunks(name, dtype, shape) yields each tensor's bytes.
    Returns the bytes written."""
    header, offset = {}, 0
    for name, (dtype, shape) in specs.items():
        nbytes = int(np.prod(shape)) * dtype.itemsize
        entry = {"dtype": SAFETENSORS_CODES[dtype], "shape": list(shape)}
        header[name] = entry | {"data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, (dtype, shape) in specs.items():
            for chunk in chunks(name, dtype, shape):
                f.write(chunk)
    return 8 + len(raw) + offset


def save_tensors(path: Path, tensors: dict[str, np.ndarray]) -> None:
    """`safetensors.numpy.save_file` for any dtype here, FP8 included (which it cannot write)."""
    specs = {name: (a.dtype, a.shape) for name, a in tensors.items()}
    write_safetensors(path, specs, lambda name, *_: iter([_bytes(tensors[name])]))


def write_checkpoint(directory: Path, cfg: dict, shard_bytes: float = 5e9) -> int:
    """config.json, shards of about `shard_bytes` (a weight and its scale never split) and the
    index; returns the bytes written."""
    specs = checkpoint_tensors(cfg)
    shards: list[dict] = [{}]
    size = 0
    for name, (dtype, shape) in specs.items():
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if size + nbytes > shard_bytes and shards[-1] and not name.endswith("_scale_inv"):
            shards.append({})
            size = 0
        shards[-1][name] = (dtype, shape)
        size += nbytes
    pool = min(64 << 20, max(1 << 20, sum(int(np.prod(s)) for _, s in specs.values()) // 8))
    source, total, weight_map = RandomBytes(pool_bytes=pool), 0, {}
    for k, shard in enumerate(shards):
        filename = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(directory / filename, shard, source.chunks)
        weight_map |= dict.fromkeys(shard, filename)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (directory / "config.json").write_text(json.dumps(cfg, indent=2))
    return total


# ---- serving it -------------------------------------------------------------------------------
def generate(engine, prompts: list[list[int]], max_tokens: int, fail_at: int | None = None):
    """Runs the prompts to completion; with fail_at, the mesh's last device fails before that
    step (through the coordinator, as an operator or the watchdog would)."""
    from elastic_moe import Request
    from elastic_moe.coordinator import Coordinator

    coordinator = Coordinator(engine, standby=False) if fail_at is not None else None
    requests = [engine.submit(Request(p, max_tokens=max_tokens)) for p in prompts]
    step = 0
    while engine.has_work():
        if step == fail_at:
            lost = engine.mesh.devices[-1].id
            result = coordinator.fail([lost])
            row(f"failed device {lost} before step {step}: {result.cause}")
        engine.step()
        step += 1
    return [list(r.generated) for r in requests], (sum(r.reprefills for r in requests))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=3, help="decoder layers, the first dense")
    parser.add_argument("--tiny", action="store_true", help="small shapes (CPU)")
    parser.add_argument("--dir", type=Path, default=None, help="write here (default: a tmp dir)")
    parser.add_argument("--keep", action="store_true", help="reuse --dir if it holds one")
    parser.add_argument("--devices", type=int, default=0, help="devices to serve on (0: all)")
    parser.add_argument("--experts", type=int, default=0, help="routed experts (0: 256)")
    parser.add_argument("--load-only", action="store_true", help="write and load, no engine")
    parser.add_argument("--workers", type=int, default=None, help="load threads (default: CPUs)")
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=12)
    args = parser.parse_args(argv)

    cfg = dict(V3_CONFIG, num_hidden_layers=args.layers)
    if args.tiny:
        cfg |= TINY
    if args.experts:
        cfg["n_routed_experts"] = args.experts
    with tempfile.TemporaryDirectory(prefix="bench_load_fp8_") as tmp:
        directory = args.dir or Path(tmp)
        directory.mkdir(parents=True, exist_ok=True)
        if args.keep and (directory / "config.json").exists():
            total = sum(p.stat().st_size for p in directory.glob("*.safetensors"))
            row(f"checkpoint: reusing {directory} ({total / 1e9:.3f} GB)")
        else:
            start = time.perf_counter()
            total = write_checkpoint(directory, cfg, 5e9 if not args.tiny else 2e6)
            seconds = time.perf_counter() - start
            shards = len(list(directory.glob("*.safetensors")))
            row(
                f"checkpoint: deepseek_v3 FP8, {args.layers} layers (1 dense), "
                f"{cfg['n_routed_experts']} experts, {total / 1e9:.3f} GB in {shards} shards, "
                f"written in {seconds:.1f} s ({total / 1e9 / seconds:.2f} GB/s)"
            )
        return serve(directory, total, args)


def serve(directory: Path, total: int, args) -> dict:
    import jax

    from elastic_moe import Engine, EngineOptions
    from models.hf_loader import load_hf

    start = time.perf_counter()
    cfg, params = load_hf(directory, max_seq_len=64, progress=False, workers=args.workers)
    seconds = time.perf_counter() - start
    rate = total / 1e9 / seconds
    workers = args.workers or "all CPUs"
    row(
        f"load_hf: {total / 1e9:.3f} GB (FP8 -> {cfg.dtype}) in {seconds:.1f} s, {rate:.2f} GB/s "
        f"({workers} workers)"
    )
    if args.load_only:
        return {"load_gb_per_s": rate, "baseline": None, "unchanged": None}
    devices = jax.devices()[: args.devices or None]
    rng = np.random.default_rng(1)
    prompts = [
        rng.integers(2, cfg.vocab_size, int(rng.integers(4, 20))).tolist()
        for _ in range(args.requests)
    ]
    start = time.perf_counter()
    slots = max(1, -(-args.requests // len(devices)))
    # Enough expert slots that the survivors of one failure hold every expert.
    n, experts = len(devices), cfg.num_experts
    redundant = n * -(-experts // (n - 1)) - experts if n > 1 else 0
    options = EngineOptions(request_slots_per_device=slots, redundant_experts=redundant)
    engine = Engine(cfg, params, devices, options)
    del params
    seconds = time.perf_counter() - start
    row(f"engine on {len(devices)} x {devices[0].platform}: built in {seconds:.1f} s")
    start = time.perf_counter()
    baseline, _ = generate(engine, prompts, args.max_tokens)
    seconds = time.perf_counter() - start
    row(f"generated {args.requests} x {args.max_tokens} tokens in {seconds:.1f} s (with compiles)")
    for tokens in baseline:
        row(f"  tokens: {tokens}")
    result = {"load_gb_per_s": rate, "baseline": baseline, "unchanged": None}
    if len(devices) < 2:
        row("one device: no failure run")
        return result
    start = time.perf_counter()
    tokens, reprefills = generate(engine, prompts, args.max_tokens, fail_at=args.max_tokens // 2)
    unchanged = tokens == baseline
    row(
        f"through a failure: {reprefills} requests re-prefilled, tokens "
        f"{'UNCHANGED' if unchanged else 'CHANGED'} ({time.perf_counter() - start:.1f} s)"
    )
    result["unchanged"] = unchanged
    return result


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome["unchanged"] in (True, None) else 1)
