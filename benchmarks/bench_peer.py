"""The peer on the same card: Hugging Face transformers (PyTorch) decoding the same model shape.

  python benchmarks/bench_peer.py --preset qwen3-30b-a3b --layers 8 --batch 64 --context 64
  python benchmarks/bench_peer.py ... --ours results.json   # also: our tokens/s over theirs

The model is built from the preset's shape with random weights (bf16 on the GPU), the batch of
random prompts is generated greedily with the KV cache, and the decode step time is the
difference between two generations of different lengths divided by the extra tokens (so the
prefill and the set-up cancel out). With --ours (a `bench_decode.py --json` file of the same
shape and batch), it prints our decode tokens/s over theirs. Needs torch and transformers, not
JAX (the preset is read from models/presets.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="qwen3-30b-a3b")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--context", type=int, default=64, help="prompt length")
    p.add_argument("--tokens", default="8,40", help="two generation lengths; the step is timed")
    p.add_argument("--device", default="", help="cuda or cpu (default: cuda when there)")
    p.add_argument("--ours", default="", help="bench_decode.py --json output to compare with")
    return p.parse_args()


def hf_config(cfg, layers: int):
    """A transformers config of the same shape as the preset (qwen3_moe or mixtral)."""
    import transformers

    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        num_hidden_layers=layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta,
        rms_norm_eps=cfg.rms_norm_eps,
        num_experts_per_tok=cfg.experts_per_token,
        tie_word_embeddings=cfg.tie_embeddings,
    )
    if cfg.architecture == "qwen3_moe":
        return transformers.Qwen3MoeConfig(
            **common,
            head_dim=cfg.head_dim,
            intermediate_size=cfg.moe_d_ff,
            moe_intermediate_size=cfg.moe_d_ff,
            num_experts=cfg.num_experts,
            norm_topk_prob=cfg.norm_topk_prob,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    if cfg.architecture == "mixtral":
        return transformers.MixtralConfig(
            **common,
            head_dim=cfg.head_dim,
            intermediate_size=cfg.moe_d_ff,
            num_local_experts=cfg.num_experts,
        )
    raise SystemExit(f"bench_peer supports qwen3_moe and mixtral presets, not {cfg.architecture}")


def main() -> int:
    args = parse()
    import torch
    import transformers

    from models.presets import get_preset

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = get_preset(args.preset)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = hf_config(cfg, args.layers or cfg.num_layers)
    torch.manual_seed(0)
    with torch.device(device):  # weights made where they run (no host copy of a big model)
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    experts = getattr(model, "get_experts_implementation", lambda: "default")()
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    print(
        f"# transformers {transformers.__version__}, torch {torch.__version__}, {name}; "
        f"{cfg.name} x{config.num_hidden_layers} layers, {dtype}, experts {experts}",
        flush=True,
    )
    prompts = torch.randint(0, cfg.vocab_size, (args.batch, args.context), device=device)
    short, long = (int(n) for n in args.tokens.split(","))

    def generate_seconds(new_tokens: int) -> float:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                prompts,
                attention_mask=torch.ones_like(prompts),
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=0,
            )
        if device == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == args.context + new_tokens
        return time.perf_counter() - start

    generate_seconds(short)  # warm-up
    step_ms = 1000 * (generate_seconds(long) - generate_seconds(short)) / (long - short)
    tokens_per_s = args.batch / (step_ms / 1000)
    print(f"transformers decode: {step_ms:.2f} ms per step, {tokens_per_s:,.0f} tokens/s")
    if args.ours:
        with open(args.ours) as f:
            ours = json.load(f)["results"][0]
        print(
            f"ours ({ours['variant']}, {ours['devices']} devices, batch {ours['batch']}): "
            f"{ours['step_ms']:.2f} ms per step, {ours['tokens_per_s']:,.0f} tokens/s, engine "
            f"{ours['engine_tokens_per_s']:,.0f}; ours / transformers: "
            f"{ours['tokens_per_s'] / tokens_per_s:.1f}x (engine "
            f"{ours['engine_tokens_per_s'] / tokens_per_s:.1f}x)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
