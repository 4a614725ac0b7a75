"""Trains `tiny-fables`: a small Mixtral-style MoE on Aesop's fables, byte-level, on the CPU.

    .venv/bin/python training/train_tiny_moe.py            # writes models/trained/tiny-fables/
    .venv/bin/python training/train_tiny_moe.py --steps 50 --out build/tiny-fables  # smoke run

The model is the project's own `MoETransformer` (Flax NNX, `models/`): its parameters come from
`models.params.init_params` and every module of the forward pass (embedding, norms, attention
projections, RoPE, `attend`, router, experts, LM head) is the served model's. Only the routed
experts are computed another way while training: the (token, expert) pairs are sorted by expert
and padded to blocks of 32 rows, and each block is multiplied by its expert's weights (a dropless
block-sparse grouped matmul, `_moe`). That is the same function as the served grouped matmul
(`models.moe.expert_parallel_ffn`), with about a quarter of the FLOPs of `jax.lax.ragged_dot` on
a CPU, where it falls back to a masked dense product over every expert slot. After training the
script checks the claim: the held-out loss computed by the training forward and by the serving
reference (`models.reference.forward_logits`) must agree.

Training: AdamW (optax) with warm-up and cosine decay, gradient clipping, and a small Switch-style
load-balancing loss so that the 8 experts share the tokens. Data: every `training/data/*.txt`
(public domain, see training/README.md) as UTF-8 bytes (vocab 256), the last 5% held out.
The result is saved with `elastic_moe.checkpoint.save_checkpoint` and loads with
`elastic_moe.checkpoint.load_model_dir("models/trained/tiny-fables")`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from elastic_moe.checkpoint import save_checkpoint  # noqa: E402
from models.attention import attend  # noqa: E402
from models.config import ModelConfig  # noqa: E402
from models.params import Params, init_params, model_graph  # noqa: E402
from models.reference import forward_logits  # noqa: E402
from models.rope import apply_rope, rope_tables  # noqa: E402
from models.router import route  # noqa: E402
from models.tokenizer import ByteTokenizer  # noqa: E402

DATA_DIR = REPO / "training" / "data"
OUT_DIR = REPO / "models" / "trained" / "tiny-fables"
BLOCK = 32  # rows per block of the training MoE

CONFIG = ModelConfig(
    name="tiny-fables",
    architecture="mixtral",
    vocab_size=256,
    d_model=128,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    head_dim=32,
    moe_d_ff=64,
    num_experts=8,
    experts_per_token=2,
    max_seq_len=256,
    norm_topk_prob=True,
    rms_norm_eps=1e-5,
)


# ---- data ----------------------------------------------------------------------------------
def load_corpus(data_dir: Path = DATA_DIR) -> np.ndarray:
    """Every *.txt under data_dir (sorted by name), joined by blank lines, as uint8 bytes."""
    files = sorted(data_dir.glob("*.txt"))
    if not files:
        raise SystemExit(f"no *.txt files in {data_dir}")
    text = "\n\n\n".join(f.read_text(encoding="utf-8").strip() for f in files) + "\n"
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)


def batches(data: np.ndarray, batch: int, seq: int, rng: np.random.Generator):
    """Endless (inputs, targets) pairs of [batch, seq] int32: random windows of the corpus."""
    while True:
        start = rng.integers(0, len(data) - seq - 1, size=batch)
        window = data[start[:, None] + np.arange(seq + 1)].astype(np.int32)
        yield window[:, :-1], window[:, 1:]


# ---- the training forward ------------------------------------------------------------------
def _attention(attn, x, positions, cfg: ModelConfig):
    """GroupedQueryAttention of a whole sequence without a KV cache (same math as serving)."""
    b, c, _ = x.shape
    q = attn.q_proj(x).reshape(b, c, cfg.num_heads, cfg.head_dim)
    k = attn.k_proj(x).reshape(b, c, cfg.num_kv_heads, cfg.head_dim)
    v = attn.v_proj(x).reshape(b, c, cfg.num_kv_heads, cfg.head_dim)
    cos, sin = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    out = attend(q, k, v, positions, cfg.head_dim**-0.5, "fast")  # training: XLA's softmax
    return attn.o_proj(out.reshape(b, c, -1))


def _moe(mlp, h, cfg: ModelConfig, block: int = BLOCK):
    """Top-k routed experts as a dropless block-sparse grouped matmul.

    The t*k (token, expert) pairs are sorted by expert; each expert's run is padded to a
    multiple of `block` rows, and every block is multiplied by its expert's weights (gathered
    per block). Returns the output [t, d] and the Switch-style balance loss.
    """
    t, d = h.shape
    k, num_experts = cfg.experts_per_token, cfg.num_experts
    logits = h.astype(jnp.float32) @ mlp.router.kernel[...]
    weights, experts = route(logits, cfg)  # [t, k] each
    pair_expert = experts.reshape(-1)  # [t*k]
    n = t * k
    order = jnp.argsort(pair_expert, stable=True)
    sizes = jnp.bincount(pair_expert, length=num_experts)
    padded = (sizes + block - 1) // block * block
    padded_end = jnp.cumsum(padded)
    sorted_expert = pair_expert[order]
    row = (
        (padded_end - padded)[sorted_expert]
        + jnp.arange(n)
        - (jnp.cumsum(sizes) - sizes)[sorted_expert]
    )
    num_blocks = n // block + num_experts  # static bound on sum(ceil(sizes / block))
    rows = num_blocks * block
    token_of_row = jnp.zeros((rows,), jnp.int32).at[row].set((order // k).astype(jnp.int32))
    weight_of_row = jnp.zeros((rows,), h.dtype).at[row].set(weights.reshape(-1)[order])
    block_expert = jnp.minimum(
        jnp.searchsorted(padded_end, jnp.arange(num_blocks) * block, side="right"),
        num_experts - 1,
    )
    x = h[token_of_row].reshape(num_blocks, block, d)
    e = mlp.experts
    gate = jnp.einsum("nbd,ndf->nbf", x, e.w_gate[...][block_expert])
    up = jnp.einsum("nbd,ndf->nbf", x, e.w_up[...][block_expert])
    out = jnp.einsum("nbf,nfd->nbd", jax.nn.silu(gate) * up, e.w_down[...][block_expert])
    out = out.reshape(rows, d) * weight_of_row[:, None]  # padding rows have weight 0
    y = jnp.zeros((t, d), out.dtype).at[token_of_row].add(out)
    # Switch Transformer balance loss: E * sum_e (share of pairs routed to e) * (mean prob of e).
    share = sizes / n
    probs = jax.nn.softmax(logits, axis=-1).mean(0)
    return y.astype(h.dtype), num_experts * jnp.sum(share * probs)


def train_logits(model, tokens, cfg: ModelConfig):
    """[b, c, vocab] logits of every position, and the mean balance loss over MoE layers."""
    b, c = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
    x = jnp.take(model.embed[...], tokens, axis=0)
    balance = []
    for layer in model.layers:
        x = x + _attention(layer.attn, layer.attn_norm(x, "fast"), positions, cfg)
        y, aux = _moe(layer.mlp, layer.mlp_norm(x, "fast").reshape(b * c, -1), cfg)
        x = x + y.reshape(b, c, -1)
        balance.append(aux)
    logits = model.final_norm(x, "fast").astype(jnp.float32) @ model.lm_head.kernel[...]
    return logits, jnp.mean(jnp.stack(balance))


def make_step(cfg: ModelConfig, optimizer, balance_coef: float):
    graph = model_graph(cfg)

    def loss_fn(params, inputs, targets):
        logits, balance = train_logits(nnx.merge(graph, params), inputs, cfg)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
        return ce + balance_coef * balance, (ce, balance)

    @jax.jit
    def step(params, opt_state, inputs, targets):
        (_, (ce, balance)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            params, inputs, targets
        )
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, ce, balance

    @jax.jit
    def eval_ce(params, inputs, targets):
        logits, _ = train_logits(nnx.merge(graph, params), inputs, cfg)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()

    return step, eval_ce


def eval_windows(data: np.ndarray, seq: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` evenly spaced, non-random windows of held-out data: (inputs, targets)."""
    starts = np.linspace(0, len(data) - seq - 2, count).astype(np.int64)
    window = data[starts[:, None] + np.arange(seq + 1)].astype(np.int32)
    return window[:, :-1], window[:, 1:]


def sample_text(cfg: ModelConfig, params: Params, prompts: list[str], max_tokens: int) -> list[str]:
    """Greedy continuations through the serving engine on one device."""
    from elastic_moe import Engine, EngineOptions

    tokenizer = ByteTokenizer(cfg.vocab_size)
    engine = Engine(cfg, params, jax.devices()[:1], EngineOptions(request_slots_per_device=4))
    done = engine.generate([tokenizer.encode(p) for p in prompts], max_tokens)
    return [tokenizer.decode(r.generated) for r in done]


# ---- main ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=900)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--balance-coef", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args(argv)

    cfg = CONFIG
    corpus = load_corpus()
    split = int(len(corpus) * 0.95)
    train, held_out = corpus[:split], corpus[split:]
    print(
        f"corpus: {len(corpus):,} bytes ({len(train):,} train, {len(held_out):,} held out); "
        f"{len(jax.devices())} {jax.devices()[0].platform} device(s) visible, "
        f"{os.cpu_count()} CPU cores"
    )

    params = jax.tree.map(jnp.asarray, init_params(cfg, seed=args.seed))
    n_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, args.lr, args.warmup, max(args.steps, args.warmup + 1), end_value=args.lr * 0.05
    )
    optimizer = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=args.weight_decay),
    )
    opt_state = optimizer.init(params)
    step, eval_ce = make_step(cfg, optimizer, args.balance_coef)
    val_inputs, val_targets = eval_windows(held_out, args.seq, 32)
    print(f"model: {n_params:,} parameters; {args.steps} steps of {args.batch}x{args.seq} bytes")

    data = batches(train, args.batch, args.seq, np.random.default_rng(args.seed))
    started = time.perf_counter()
    ema = None
    for i in range(1, args.steps + 1):
        inputs, targets = next(data)
        params, opt_state, ce, balance = step(params, opt_state, inputs, targets)
        if i % args.log_every == 0 or i == args.steps:
            ce = float(ce)
            ema = ce if ema is None else 0.8 * ema + 0.2 * ce
            elapsed = time.perf_counter() - started
            tokens_per_s = i * args.batch * args.seq / elapsed
            print(
                f"step {i:5d}  loss {ce:.3f} (avg {ema:.3f})  balance {float(balance):.3f}  "
                f"{elapsed:6.1f} s  {tokens_per_s:,.0f} bytes/s",
                flush=True,
            )
    train_s = time.perf_counter() - started

    host = jax.tree.map(np.asarray, params)
    final_train = float(
        np.mean([eval_ce(params, *next(data)) for _ in range(8)])
    )  # fresh random windows of the training text
    val_train_forward = float(eval_ce(params, val_inputs, val_targets))
    logits = forward_logits(cfg, host, val_inputs)  # the serving reference (grouped matmul)
    val_reference = float(
        optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(val_targets)).mean()
    )
    if not math.isclose(val_reference, val_train_forward, rel_tol=1e-3):
        raise SystemExit(
            f"training forward ({val_train_forward:.5f}) and serving reference "
            f"({val_reference:.5f}) disagree"
        )
    print(
        f"trained in {train_s:.0f} s; loss (nats/byte): train {final_train:.3f}, "
        f"held out {val_reference:.3f} (serving reference; training forward "
        f"{val_train_forward:.3f})"
    )
    prompts = ["THE FOX AND THE ", "A Lion was ", "The Mouse said"]
    for prompt, text in zip(prompts, sample_text(cfg, host, prompts, 160), strict=True):
        print(f"--- {prompt!r} ->\n{prompt}{text}")

    if not args.no_save:
        save_checkpoint(args.out, cfg, host, overwrite=True)
        summary = {
            "steps": args.steps,
            "batch": args.batch,
            "seq": args.seq,
            "train_seconds": round(train_s, 1),
            "train_loss": round(final_train, 4),
            "held_out_loss": round(val_reference, 4),
            "parameters": n_params,
            "corpus_bytes": int(len(corpus)),
            "seed": args.seed,
        }
        (args.out / "training.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
