"""KV cache bytes of multi-head latent attention: the latent (absorbed) form against per head.

  python benchmarks/bench_kv_cache.py                                   # sizes only, no device
  python benchmarks/bench_kv_cache.py --hbm-gb 141 --devices 16 --weight-bytes 1
  python benchmarks/bench_kv_cache.py --decode --decode-preset deepseek-v3 --devices 8 \
      --layers 4 --batch-per-device 16 --max-seq-len 4096                 # GPU: time both forms

For each shape and form: the cached bytes of one token in one layer and in the whole model, the
ratio per_head / latent, and the decode batch that fits a device's HBM once its weights are in
(request slots hold max_seq_len positions each, as the engine allocates them). Weights per
device: attention, dense layers, shared experts, embeddings and the head replicated (data-
parallel attention), routed experts split over the devices (mesh.sharding's rules).

With --decode, bench_decode.py times decode steps of one preset with each form (one process
per form, so the first form's buffers are gone before the second starts); its rows print as
they come.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
# bench_decode.py picks its own platform, and imports this checkout's models.
_PATH = [REPO, os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [REPO]
CHILD_ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(_PATH))
os.environ["JAX_PLATFORMS"] = "cpu"  # sizes need no device: leave the GPU's memory to the child

from models.config import ModelConfig  # noqa: E402
from models.kv_cache import cache_layout, kv_bytes_per_token  # noqa: E402
from models.presets import PRESETS  # noqa: E402

FORMS = ("per_head", "latent")

# DeepSeek-V2-Lite's shapes (its config.json on the hub): no q LoRA, 16 heads, 27 layers.
DEEPSEEK_V2_LITE_LIKE = ModelConfig(
    name="deepseek-v2-lite-like",
    architecture="deepseek_v2",
    vocab_size=102400,
    d_model=2048,
    num_layers=27,
    num_heads=16,
    num_kv_heads=16,
    head_dim=0,
    attention="mla",
    q_lora_rank=0,
    kv_lora_rank=512,
    qk_nope_head_dim=128,
    qk_rope_head_dim=64,
    v_head_dim=128,
    moe_d_ff=1408,
    num_experts=64,
    experts_per_token=6,
    num_shared_experts=2,
    shared_d_ff=2816,
    first_dense_layers=1,
    dense_d_ff=10944,
    max_seq_len=4096,
    dtype="bfloat16",
)


def shapes() -> list[ModelConfig]:
    """deepseek-v3 and, once it is a preset, kimi-k2; a DeepSeek-V2-Lite-like shape."""
    found = [PRESETS[name] for name in ("deepseek-v3", "kimi-k2") if name in PRESETS]
    return [*found, DEEPSEEK_V2_LITE_LIKE]


def weight_bytes_per_device(cfg: ModelConfig, devices: int, bytes_per_param: float) -> float:
    """Replicated weights in full, routed experts split evenly over `devices` (no redundancy)."""
    import numpy as np
    from jax import tree_util

    from models.params import abstract_params, is_expert_path

    total = 0.0
    for path, leaf in tree_util.tree_leaves_with_path(abstract_params(cfg)):
        params = float(np.prod(leaf.shape))
        total += params / devices if is_expert_path(path) else params
    return total * bytes_per_param


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--hbm-gb", type=float, default=141.0, help="HBM per device, GB (H200: 141)")
    p.add_argument("--devices", type=int, default=8, help="devices the routed experts split over")
    p.add_argument(
        "--weight-bytes",
        type=float,
        default=0.0,
        help="bytes per weight (0: the config dtype's; 1 for FP8 weights)",
    )
    p.add_argument("--max-seq-len", type=int, default=0, help="positions per request slot")
    p.add_argument("--decode", action="store_true", help="time decode with each form")
    p.add_argument("--decode-preset", default="deepseek-v3")
    p.add_argument("--layers", type=int, default=4, help="--decode: layers to build (0: all)")
    p.add_argument("--batch-per-device", type=int, default=8, help="--decode")
    p.add_argument("--context", type=int, default=128, help="--decode: prompt length")
    p.add_argument("--steps", type=int, default=20, help="--decode")
    p.add_argument("--hbm-gbs", type=float, default=4800.0, help="--decode: HBM GB/s (H200)")
    return p.parse_args()


def size_rows(args: argparse.Namespace) -> None:
    head = (
        f"{'shape':24s} {'form':8s} {'cached per token, layer':>24s} {'B/token/layer':>13s} "
        f"{'KB/token':>9s} {'ratio':>6s} {'weights GB/dev':>14s} {'KV MB/request':>13s} "
        f"{'batch/dev':>9s} {'batch':>7s}"
    )
    print(
        f"# HBM {args.hbm_gb:g} GB per device, {args.devices} devices; KB/token: all layers; "
        f"batch: request slots of max_seq_len positions that fit beside the weights"
    )
    print(head)
    print("-" * len(head), flush=True)
    for base in shapes():
        if args.max_seq_len:
            base = base.replace(max_seq_len=args.max_seq_len)
        per_weight = args.weight_bytes or (2 if base.dtype != "float32" else 4)
        weights = weight_bytes_per_device(base, args.devices, per_weight)
        per_token = {}
        for form in FORMS:
            cfg = base.replace(mla_cache=form)
            heads, key_dim, value_dim = cache_layout(cfg)
            per_token[form] = kv_bytes_per_token(cfg)
            model_bytes = per_token[form] * cfg.num_layers
            request = model_bytes * cfg.max_seq_len
            free = args.hbm_gb * 1e9 - weights
            per_device = max(0, int(free // request))
            ratio = per_token["per_head"] / per_token[form]
            print(
                f"{cfg.name:24s} {form:8s} {f'{heads} x ({key_dim} + {value_dim})':>24s} "
                f"{per_token[form]:13d} {model_bytes / 1e3:9.1f} {ratio:5.1f}x "
                f"{weights / 1e9:14.1f} {request / 1e6:13.1f} {per_device:9d} "
                f"{per_device * args.devices:7d}"
                + ("  (weights alone exceed the HBM)" if free <= 0 else ""),
                flush=True,
            )


def decode_rows(args: argparse.Namespace) -> None:
    """bench_decode.py once per form; its output streams through, then a comparison."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bench_decode.py")
    steps = {}
    for form in FORMS:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "decode.json")
            command = [
                sys.executable,
                script,
                f"--preset={args.decode_preset}",
                f"--mla-cache={form}",
                f"--devices={args.devices}",
                f"--layers={args.layers}",
                f"--batch-per-device={args.batch_per_device}",
                f"--context={args.context}",
                f"--steps={args.steps}",
                f"--hbm-gbs={args.hbm_gbs}",
                f"--json={out}",
            ]
            if args.max_seq_len:
                command.append(f"--max-seq-len={args.max_seq_len}")
            print(f"# {form}: {' '.join(command[1:])}", flush=True)
            done = subprocess.run(command, check=False, env=CHILD_ENV)
            if done.returncode != 0:
                print(f"# {form}: bench_decode.py exited with {done.returncode}", flush=True)
                continue
            with open(out) as f:
                steps[form] = json.load(f)["results"][0]
    if len(steps) == len(FORMS):
        per_head, latent = steps["per_head"], steps["latent"]
        print(
            f"decode step, batch {latent['batch']}: per_head {per_head['step_ms']:.3f} ms, "
            f"latent {latent['step_ms']:.3f} ms (per_head / latent "
            f"{per_head['step_ms'] / latent['step_ms']:.2f}); roofline floor "
            f"{per_head['floor_ms']:.3f} vs {latent['floor_ms']:.3f} ms",
            flush=True,
        )


def main() -> int:
    args = parse()
    size_rows(args)
    if args.decode:
        decode_rows(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
