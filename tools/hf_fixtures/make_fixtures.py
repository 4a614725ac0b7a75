"""Generate tiny Hugging Face reference checkpoints + expected outputs.

Writes ``tests/fixtures/hf/<arch>/`` for mixtral, qwen2_moe, qwen3_moe, olmoe,
deepseek_v2, deepseek_v3, glm4_moe (plus ``qwen3_moe_sharded``, and the variants of
``VARIANTS``: yarn rope, FP8 block-quantized weights, ``glm4_moe_air``), each containing:

* ``config.json``, ``generation_config.json``, ``model.safetensors`` (or shards +
  ``model.safetensors.index.json``) written by ``save_pretrained``;
* ``expected.json``: prompt (16 token ids), greedy (16 new token ids),
  logit margins, versions, and the names of the .npy files;
* ``expected_logits.npy``: float32 [16, vocab], logits of the prompt
  (one forward pass over the 16 prompt tokens);
* ``expected_greedy_logits.npy``: float32 [16, vocab], row t = logits from which
  greedy token t was chosen (last position of a full forward pass over
  prompt + greedy[:t]).

The .npy files are plain float32 arrays (``numpy.load(path)`` works without
``allow_pickle``).

This needs torch + transformers, which the project's own venv does not have.
Recreate the reference venv (outside the repo; CPU torch exists only for
Python 3.11 here) with::

    python3.11 -m venv /tmp/hfref
    /tmp/hfref/bin/pip install torch==2.13.0 transformers==5.24.0 safetensors numpy

and run from the repo root::

    /tmp/hfref/bin/python tools/hf_fixtures/make_fixtures.py [--out tests/fixtures/hf] [--only ARCH ...]

Nothing is downloaded from the hub: every model is built from a config with
``AutoConfig.for_model`` + ``AutoModelForCausalLM.from_config``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys

import numpy as np
import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

SEED = 0
VOCAB = 160
PROMPT = [3, 141, 27, 95, 8, 66, 120, 41, 150, 7, 77, 19, 102, 58, 133, 30]
N_NEW = 16
INIT_STD = 0.2  # larger than the 0.02 default so logits/routing are well separated

COMMON = dict(
    vocab_size=VOCAB,
    max_position_embeddings=128,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    rms_norm_eps=1e-6,
    tie_word_embeddings=False,
    hidden_act="silu",
    initializer_range=INIT_STD,
    attention_dropout=0.0,
    use_cache=True,
    output_router_logits=False,
    pad_token_id=None,
    bos_token_id=None,
    eos_token_id=None,
)

CONFIGS: dict[str, dict] = {
    "mixtral": dict(
        hidden_size=40,
        intermediate_size=24,  # per-expert FFN width (mixtral has no separate moe_intermediate_size)
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=2,
        router_jitter_noise=0.0,
        sliding_window=None,
    ),
    "qwen2_moe": dict(
        hidden_size=40,
        intermediate_size=40,  # only used by dense layers (none here)
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        qkv_bias=True,
        use_sliding_window=False,
    ),
    "qwen3_moe": dict(
        hidden_size=48,
        head_dim=16,  # explicit, != hidden/heads (=12), like real Qwen3-MoE
        intermediate_size=40,  # only used by dense layers (none here)
        moe_intermediate_size=24,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[],
        attention_bias=False,
        use_sliding_window=False,
    ),
    "olmoe": dict(
        hidden_size=40,
        intermediate_size=24,  # per-expert FFN width
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts=8,
        num_experts_per_tok=2,
        norm_topk_prob=False,
        clip_qkv=None,
        attention_bias=False,
    ),
    "deepseek_v2": dict(
        hidden_size=48,
        intermediate_size=40,  # dense layer 0
        moe_intermediate_size=24,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,  # MLA: must equal num_attention_heads in HF
        q_lora_rank=None,  # -> plain q_proj
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=2,
        topk_method="group_limited_greedy",
        n_group=2,  # group score = max prob in group, so topk_group must be < top_k to bind
        topk_group=1,
        routed_scaling_factor=1.5,
        norm_topk_prob=False,  # not read by HF DeepseekV2 router anyway
        attention_bias=False,
        mlp_bias=False,
    ),
    "deepseek_v3": dict(
        hidden_size=40,
        intermediate_size=40,  # dense layer 0
        moe_intermediate_size=24,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,  # MLA: must equal num_attention_heads in HF
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=12,  # distinct dims so nope/rope/v splits are checked
        v_head_dim=10,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        rope_interleave=True,
        attention_bias=False,
        num_nextn_predict_layers=0,
    ),
    "glm4_moe": dict(
        hidden_size=40,
        head_dim=16,  # explicit, != hidden/heads (=10), like real GLM-4.5 (128 vs 4096/96)
        partial_rotary_factor=0.5,  # hub-style top-level key; only 8 of 16 dims rotate
        intermediate_size=32,  # dense layer 0 (32, not 40: top-2 logit margins >= 0.04)
        moe_intermediate_size=24,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,  # group score = sum of the top-2 biased scores; 1 of 2 groups kept
        topk_group=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        attention_bias=True,  # q/k/v biases (o_proj has none)
        use_qk_norm=True,  # per-head q/k RMSNorm (GLM-4.5 / 4.6)
        num_nextn_predict_layers=0,
    ),
    "gpt_oss": dict(
        hidden_size=64,  # hidden and expert width multiples of 32: MXFP4 blocks (gpt_oss_mxfp4)
        head_dim=24,  # explicit, != hidden/heads (=16), like real gpt-oss (64 vs 2880/64 = 45)
        intermediate_size=32,  # per-expert FFN width
        num_hidden_layers=3,  # layer_types default: sliding, full, sliding
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=8,
        num_experts_per_tok=4,
        sliding_window=8,  # shorter than prompt + greedy (32): the window masks keys
        swiglu_limit=1.0,  # small so the clamp binds (gpt-oss uses 7.0 at a larger scale)
        attention_bias=True,
    ),
}

# Fixtures of an architecture above with some fields changed: name -> (model_type, changes).
VARIANTS: dict[str, tuple[str, dict]] = {
    # GLM-4.5-Air's choices: no q/k norm, no expert groups, no routed scaling.
    "glm4_moe_air": (
        "glm4_moe",
        dict(use_qk_norm=False, n_group=1, topk_group=1, routed_scaling_factor=1.0),
    ),
}


# DeepSeek as published: yarn rope (V3: factor 40 over 4096, V2-Lite: mscale 0.707) and FP8
# weights. The tiny variants stretch a 32-token context so that the ramp and the mscale act
# within the 32 positions the tests run; qk_rope_head_dim 16 gives a fractional ramp value.
FP8_BLOCK = [128, 128]
VARIANTS |= {
    "deepseek_v3_yarn": (
        "deepseek_v3",
        dict(
            qk_rope_head_dim=16,
            # beta 4 / 0.5: ramp 0, 1/3, 2/3, 1, ...; mscale != mscale_all_dim: cos/sin scaled
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 32,
                "beta_fast": 4,
                "beta_slow": 0.5,
                "mscale": 1.0,
                "mscale_all_dim": 0.8,
            },
        ),
    ),
    "deepseek_v2_yarn": (
        "deepseek_v2",
        dict(
            qk_rope_head_dim=16,
            # V2-Lite's mscale 0.707 / 0.707, default betas 32 / 1 (ramp 0, 0.5, 1, ...)
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 8.0,
                "original_max_position_embeddings": 32,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 0.707,
                "mscale_all_dim": 0.707,
            },
        ),
    ),
    # gpt-oss's published yarn (factor 32, betas 32 / 1, truncate false, theta 150000) over 32
    # original positions instead of 4096, so that it acts within the 32 the tests run: with
    # head_dim 24 the ramp is 0, 0.61, 1, ... (truncate true would make it 0, 0.5, 1, ...), and
    # cos/sin are scaled by 0.1 ln 32 + 1; the softmax scale stays head_dim^-0.5.
    "gpt_oss_yarn": (
        "gpt_oss",
        dict(
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 150000.0,
                "factor": 32.0,
                "beta_fast": 32.0,
                "beta_slow": 1.0,
                "truncate": False,
                "original_max_position_embeddings": 32,
            },
        ),
    ),
    # hidden 136 and dense width 200: the dense layer's weights span 2 x 2 blocks of 128 with a
    # ragged last block both ways; published-V3-style yarn (mscale = mscale_all_dim = 1).
    "deepseek_v3_fp8": (
        "deepseek_v3",
        dict(
            hidden_size=136,
            intermediate_size=200,
            moe_intermediate_size=16,
            rope_parameters={
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 32,
                "beta_fast": 32,
                "beta_slow": 1,
                "mscale": 1.0,
                "mscale_all_dim": 1.0,
            },
        ),
    ),
}


def build(arch: str):
    torch.manual_seed(SEED)
    model_type, changes = VARIANTS.get(arch, (arch, {}))
    kwargs = dict(COMMON)
    kwargs.update(CONFIGS[model_type])
    kwargs.update(changes)
    config = AutoConfig.for_model(model_type, **kwargs)
    config._attn_implementation = "eager"
    model = AutoModelForCausalLM.from_config(
        config, attn_implementation="eager", dtype=torch.float32
    )
    model = model.float().eval()

    # Make every parameter matter: the default init sets RMSNorm weights to 1,
    # biases to 0 and e_score_correction_bias to 0, which would hide loader bugs.
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias") or name.endswith("_proj_bias"):  # gpt_oss experts
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn(b.shape, generator=g))

    gc = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=N_NEW,
        min_new_tokens=N_NEW,
        eos_token_id=None,
        pad_token_id=0,
        bos_token_id=None,
        repetition_penalty=1.0,
        temperature=None,
        top_k=None,
        top_p=None,
    )
    model.generation_config = gc
    return model


@torch.no_grad()
def reference_outputs(model):
    ids = torch.tensor([PROMPT], dtype=torch.long)
    prompt_logits = model(ids, use_cache=False).logits[0].float().numpy()

    # Pure greedy with full recomputation (no cache, no logits processors).
    seq = list(PROMPT)
    step_logits = []
    for _ in range(N_NEW):
        out = model(torch.tensor([seq], dtype=torch.long), use_cache=False).logits[0, -1].float()
        step_logits.append(out.numpy())
        seq.append(int(torch.argmax(out)))
    greedy = seq[len(PROMPT) :]
    step_logits = np.stack(step_logits).astype(np.float32)

    # Cross-check against generate() with the KV cache.
    gen = model.generate(ids, generation_config=model.generation_config, use_cache=True)
    gen_new = gen[0, len(PROMPT) :].tolist()
    if gen_new != greedy:
        raise RuntimeError(f"generate() {gen_new} != manual greedy {greedy}")

    def margin(rows):
        s = np.sort(rows, axis=-1)
        return float(np.min(s[:, -1] - s[:, -2]))

    return (
        prompt_logits.astype(np.float32),
        step_logits,
        greedy,
        margin(step_logits),
        margin(prompt_logits),
    )


def write_fixture(model, out_dir: str, arch: str, max_shard_size=None):
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out_dir, **kw)  # safetensors, original (per-expert) key format

    prompt_logits, step_logits, greedy, greedy_margin, prompt_margin = reference_outputs(model)
    np.save(os.path.join(out_dir, "expected_logits.npy"), prompt_logits, allow_pickle=False)
    np.save(os.path.join(out_dir, "expected_greedy_logits.npy"), step_logits, allow_pickle=False)
    expected = {
        "model_type": VARIANTS.get(arch, (arch,))[0],
        "prompt": PROMPT,
        "greedy": greedy,
        "logits_file": "expected_logits.npy",
        "logits_shape": list(prompt_logits.shape),
        "greedy_logits_file": "expected_greedy_logits.npy",
        "greedy_logits_shape": list(step_logits.shape),
        "min_greedy_top2_margin": greedy_margin,
        "min_prompt_top2_margin": prompt_margin,
        "dtype": "float32",
        "attn_implementation": "eager",
        "seed": SEED,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
    }
    with open(os.path.join(out_dir, "expected.json"), "w") as f:
        f.write(
            "{\n"
            + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in expected.items())
            + "\n}\n"
        )
    return prompt_logits, greedy, greedy_margin


@torch.no_grad()
def verify(out_dir: str, prompt_logits: np.ndarray, greedy: list[int], **load_kwargs):
    m = AutoModelForCausalLM.from_pretrained(
        out_dir, dtype=torch.float32, attn_implementation="eager", **load_kwargs
    ).eval()
    ids = torch.tensor([PROMPT], dtype=torch.long)
    got = m(ids, use_cache=False).logits[0].float().numpy()
    diff = float(np.max(np.abs(got - prompt_logits)))
    if not np.array_equal(got, prompt_logits):
        raise RuntimeError(f"{out_dir}: reloaded logits differ (max abs diff {diff})")
    gen = m.generate(ids, generation_config=m.generation_config, use_cache=True)[
        0, len(PROMPT) :
    ].tolist()
    if gen != greedy:
        raise RuntimeError(f"{out_dir}: reloaded greedy {gen} != {greedy}")
    return diff


@torch.no_grad()
def write_mxfp4_fixture(model, out_dir: str):
    """gpt_oss with its experts in the published MXFP4 format: random `*_blocks` / `*_scales`
    (uint8), the float model's experts set to exactly their dequantized values
    (transformers' own convert_moe_packed_tensors), so the float model's outputs are the
    expectation. Then transformers itself must load the directory (dequantizing) to the same
    logits."""
    from safetensors.torch import load_file, save_file
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    g = torch.Generator().manual_seed(SEED + 2)
    packed = {}
    for i, layer in enumerate(model.model.layers):
        for proj in ("gate_up_proj", "down_proj"):
            param = getattr(layer.mlp.experts, proj)  # [E, in, out]
            e, d_in, d_out = param.shape
            blocks = torch.randint(
                0, 256, (e, d_out, d_in // 32, 16), generator=g, dtype=torch.uint8
            )
            # Exponents 2^-5 .. 2^-2 (scale - 127): weights of the size INIT_STD gives.
            scales = torch.randint(122, 126, (e, d_out, d_in // 32), generator=g, dtype=torch.uint8)
            param.copy_(convert_moe_packed_tensors(blocks, scales, dtype=torch.float32))
            name = f"model.layers.{i}.mlp.experts.{proj}"
            packed[name + "_blocks"], packed[name + "_scales"] = blocks, scales
    write_fixture(model, out_dir, "gpt_oss")
    path = os.path.join(out_dir, "model.safetensors")
    tensors = load_file(path)
    for name in packed:
        tensors.pop(name.removesuffix("_blocks").removesuffix("_scales"), None)
    tensors.update(packed)
    save_file(tensors, path, metadata={"format": "pt"})
    config_path = os.path.join(out_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn",
            "model.layers.*.mlp.router",
            "model.embed_tokens",
            "lm_head",
        ],
    }
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)


def write_mxfp4_dequant_reference(out_dir: str):
    """Random MXFP4 blocks and scales, and what transformers' convert_moe_packed_tensors makes
    of them in float32 and bfloat16 (a unit test of our dequantization, models/mxfp4.py)."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    os.makedirs(out_dir, exist_ok=True)
    g = torch.Generator().manual_seed(SEED + 3)
    # [E, out, in/32, 16]
    blocks = torch.randint(0, 256, (3, 5, 4, 16), generator=g, dtype=torch.uint8)
    # Exponents from 2^-127 (subnormal results) to 2^+20, and the bias itself (2^0).
    scales = torch.randint(100, 148, (3, 5, 4), generator=g, dtype=torch.uint8)
    scales[0, 0, 0], scales[0, 0, 1], scales[1, 2, 3] = 0, 127, 1
    arrays = {"blocks": blocks.numpy(), "scales": scales.numpy()}
    for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        out = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [E, in, out]
        arrays[f"expected_{name}"] = out.float().numpy()
    for name, array in arrays.items():
        np.save(os.path.join(out_dir, f"{name}.npy"), array, allow_pickle=False)
    print(f"mxfp4 dequant reference: {', '.join(arrays)} in {out_dir}")


def dir_size(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d))


# ---- published DeepSeek: FP8 block weights, yarn checks -------------------------------------
def fp8_quantized(name: str, shape: tuple) -> bool:
    """Whether published DeepSeek-V3 checkpoints store tensor `name` (as saved, per-expert
    names) in FP8: every linear weight inside the decoder layers except the router
    (`mlp.gate.weight`); never embeddings, lm_head, norms or e_score_correction_bias."""
    return (
        name.startswith("model.layers.") and len(shape) == 2 and not name.endswith(".gate.weight")
    )


def quantize_fp8_blocks(w: torch.Tensor, block: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(fp8 e4m3 [out, in], weight_scale_inv f32 [ceil(out/b0), ceil(in/b1)]) with
    w ~= fp8 * scale_inv per block; the last blocks are ragged (DeepSeek's layout)."""
    out_dim, in_dim = w.shape
    rows, cols = -(-out_dim // block[0]), -(-in_dim // block[1])
    scale_inv = torch.empty(rows, cols, dtype=torch.float32)
    q = torch.empty(out_dim, in_dim, dtype=torch.float8_e4m3fn)
    for i in range(rows):
        for j in range(cols):
            r, c = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            amax = w[r, c].abs().max().clamp(min=1e-12)
            scale_inv[i, j] = amax / 448.0  # e4m3's largest finite value
            q[r, c] = (w[r, c] / scale_inv[i, j]).to(torch.float8_e4m3fn)
    return q, scale_inv


def dequantize_fp8_blocks(q: torch.Tensor, scale_inv: torch.Tensor, block: list[int]):
    full = scale_inv.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)
    return q.to(torch.float32) * full[: q.shape[0], : q.shape[1]]


@torch.no_grad()
def write_fp8_fixture(model, out_dir: str, arch: str):
    """The model's layer linears quantized to FP8 blocks; the reference logits are those of the
    dequantized float32 model (transformers cannot dequantize ragged blocks on CPU: it derives
    the block size as rows // scale_rows)."""
    import tempfile

    from safetensors.torch import load_file, save_file

    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tensors = load_file(os.path.join(tmp, "model.safetensors"))
        quantized = {}
        for name, w in tensors.items():
            if fp8_quantized(name, tuple(w.shape)):
                q, scale_inv = quantize_fp8_blocks(w, FP8_BLOCK)
                tensors[name] = dequantize_fp8_blocks(q, scale_inv, FP8_BLOCK)
                quantized[name] = (q, scale_inv)
        save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        dequantized = AutoModelForCausalLM.from_pretrained(
            tmp, dtype=torch.float32, attn_implementation="eager"
        ).eval()
    dequantized.generation_config = model.generation_config
    logits, greedy, margin = write_fixture(dequantized, out_dir, arch)
    verify(out_dir, logits, greedy)  # the float32 dequantized weights, before they become FP8
    path = os.path.join(out_dir, "model.safetensors")
    tensors = load_file(path)
    for name, (q, scale_inv) in quantized.items():
        assert torch.equal(tensors[name], dequantize_fp8_blocks(q, scale_inv, FP8_BLOCK)), name
        tensors[name] = q
        tensors[name + "_scale_inv"] = scale_inv
    save_file(tensors, path, metadata={"format": "pt"})
    config_path = os.path.join(out_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": FP8_BLOCK,
    }
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    ragged = [
        n
        for n, (q, _) in quantized.items()
        if all(d > b and d % b for d, b in zip(q.shape, FP8_BLOCK))
    ]
    if not ragged:
        raise RuntimeError(f"{arch}: no weight has ragged blocks in both directions")
    print(f"{arch}: {len(quantized)} FP8 weights; ragged 2 x 2 block grids: {ragged}")
    return logits, greedy, margin


@torch.no_grad()
def check_scaling_matters(model, logits: np.ndarray, out_dir: str) -> None:
    """The yarn fixtures must test the scaling: plain rope on the same weights must give other
    logits (recorded in expected.json as unscaled_logits_max_diff)."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = model.config
    rotary = model.model.rotary_emb
    saved = (rotary.inv_freq.clone(), rotary.attention_scaling)
    scalings = [m.self_attn.scaling for m in model.model.layers]
    plain = dict(config.rope_parameters, rope_type="default")
    inv_freq, _ = rotary.compute_default_rope_parameters(config)
    rotary.inv_freq.copy_(inv_freq)
    rotary.attention_scaling = 1.0
    if config.model_type.startswith("deepseek"):  # its softmax scale grows with yarn's mscale
        for m in model.model.layers:
            m.self_attn.scaling = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    ids = torch.tensor([PROMPT], dtype=torch.long)
    unscaled = model(ids, use_cache=False).logits[0].float().numpy()
    truncated_diff = None
    if config.rope_parameters.get("truncate", True) is False:
        # The same yarn with truncate true (integer ramp bounds): must move the logits too.
        config.rope_parameters["truncate"] = True
        inv_freq, _ = ROPE_INIT_FUNCTIONS["yarn"](config)
        config.rope_parameters["truncate"] = False
        rotary.inv_freq.copy_(inv_freq)
        rotary.attention_scaling = saved[1]
        for m, scaling in zip(model.model.layers, scalings):
            m.self_attn.scaling = scaling
        truncated = model(ids, use_cache=False).logits[0].float().numpy()
        truncated_diff = float(np.max(np.abs(truncated - logits)))
        if truncated_diff < 1e-3:
            raise RuntimeError(f"{out_dir}: truncate changes the logits by only {truncated_diff}")
    rotary.inv_freq.copy_(saved[0])
    rotary.attention_scaling = saved[1]
    for m, scaling in zip(model.model.layers, scalings):
        m.self_attn.scaling = scaling
    diff = float(np.max(np.abs(unscaled - logits)))
    assert "yarn" in ROPE_INIT_FUNCTIONS and plain["rope_type"] == "default"
    if diff < 1e-2:
        raise RuntimeError(f"{out_dir}: yarn changes the logits by only {diff}")
    path = os.path.join(out_dir, "expected.json")
    with open(path) as f:
        expected = json.load(f)
    expected["unscaled_logits_max_diff"] = diff
    expected["rope_attention_scaling"] = float(saved[1])
    expected["rope_inv_freq"] = saved[0].tolist()
    expected["softmax_scale"] = float(scalings[0])
    if truncated_diff is not None:
        expected["truncated_logits_max_diff"] = truncated_diff
    with open(path, "w") as f:
        f.write(
            "{\n"
            + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}" for k, v in expected.items())
            + "\n}\n"
        )
    print(f"{out_dir}: plain rope would move the logits by up to {diff:.3f}")


# Published configs: transformers' yarn tables for them, for tests/test_hf_deepseek_published.py
# and tests/test_gpt_oss.py.
PUBLISHED_ROPE = {
    "deepseek-v3": ("deepseek_v3", dict(
        qk_nope_head_dim=128, qk_rope_head_dim=64, max_position_embeddings=163840, rope_scaling={
            "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
            "original_max_position_embeddings": 4096, "type": "yarn"}, rope_theta=10000)),
    "deepseek-v2-lite": ("deepseek_v2", dict(
        qk_nope_head_dim=128, qk_rope_head_dim=64, max_position_embeddings=163840, rope_scaling={
            "beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
            "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096, "type": "yarn"},
        rope_theta=10000)),
    "kimi-k2": ("deepseek_v3", dict(
        qk_nope_head_dim=128, qk_rope_head_dim=64, max_position_embeddings=131072, rope_scaling={
            "beta_fast": 1.0, "beta_slow": 1.0, "factor": 32.0, "mscale": 1.0,
            "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096, "type": "yarn"},
        rope_theta=50000.0)),
    "gpt-oss-120b": ("gpt_oss", dict(
        head_dim=64, max_position_embeddings=131072, rope_scaling={
            "beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
            "original_max_position_embeddings": 4096, "rope_type": "yarn", "truncate": False},
        rope_theta=150000)),
    "mixtral-linear": ("mixtral", dict(
        head_dim=128, rope_scaling={"type": "linear", "factor": 4.0}, rope_theta=1e6)),
}  # fmt: skip


def write_rope_reference(path: str) -> None:
    """inv_freq, the cos/sin attention factor and DeepSeek's softmax scale of each published
    rope config, as transformers computes them."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    out = {}
    for name, (model_type, kwargs) in PUBLISHED_ROPE.items():
        config = AutoConfig.for_model(model_type, **kwargs)
        params = config.rope_parameters
        inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[params["rope_type"]](config)
        entry = {
            "config": {"model_type": model_type, **kwargs},
            "rope_dim": int(inv_freq.shape[0] * 2),
            "inv_freq": inv_freq.tolist(),
            "attention_scaling": float(attention_scaling),
        }
        if model_type.startswith("deepseek"):
            module = importlib.import_module(
                f"transformers.models.{model_type}.modeling_{model_type}"
            )
            head = config.qk_nope_head_dim + config.qk_rope_head_dim
            entry["softmax_scale"] = module.yarn_apply_mscale(params, head**-0.5)
        out[name] = entry
    with open(path, "w") as f:
        json.dump(out, f, indent=1)
    print(f"{path}: {', '.join(out)}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="tests/fixtures/hf")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)  # deterministic reductions
    archs = args.only or [*CONFIGS, *VARIANTS, "rope_reference", "mxfp4_dequant"]
    total = 0
    if "mxfp4_dequant" in archs:
        write_mxfp4_dequant_reference(os.path.join(args.out, "mxfp4_dequant"))
        archs = [a for a in archs if a != "mxfp4_dequant"]
    for arch in archs:
        if arch == "rope_reference":
            write_rope_reference(os.path.join(args.out, "rope_reference.json"))
            continue
        model = build(arch)
        out_dir = os.path.join(args.out, arch)
        if arch.endswith("_fp8"):
            logits, greedy, gm = write_fp8_fixture(model, out_dir, arch)
        else:
            logits, greedy, gm = write_fixture(model, out_dir, arch)
            verify(out_dir, logits, greedy)
        if arch.endswith("_yarn") or arch.endswith("_fp8"):
            check_scaling_matters(model, logits, out_dir)
        sz = dir_size(out_dir)
        total += sz
        nparams = sum(p.numel() for p in model.parameters())
        print(
            f"{arch:18s} params={nparams:7d} size={sz / 1024:7.1f} KiB greedy_margin={gm:.4f} greedy={greedy}"
        )
        if arch == "qwen3_moe":
            sh_dir = os.path.join(args.out, "qwen3_moe_sharded")
            logits2, greedy2, _ = write_fixture(model, sh_dir, arch, max_shard_size="120KB")
            assert np.array_equal(logits, logits2) and greedy == greedy2
            shards = sorted(f for f in os.listdir(sh_dir) if f.endswith(".safetensors"))
            if len(shards) < 2 or not os.path.exists(
                os.path.join(sh_dir, "model.safetensors.index.json")
            ):
                raise RuntimeError(f"sharded save produced {shards}")
            verify(sh_dir, logits, greedy)
            sz = dir_size(sh_dir)
            total += sz
            print(f"{'qwen3_moe_sharded':18s} shards={len(shards)} size={sz / 1024:7.1f} KiB")
        if arch == "gpt_oss":
            q_dir = os.path.join(args.out, "gpt_oss_mxfp4")
            write_mxfp4_fixture(model, q_dir)  # changes the model's experts: keep it last
            with open(os.path.join(q_dir, "expected.json")) as f:
                q_expected = json.load(f)
            q_logits = np.load(os.path.join(q_dir, "expected_logits.npy"))
            # transformers dequantizes the experts at load (as we do), to float32 here.
            dequantize = transformers.Mxfp4Config(dequantize=True)
            verify(q_dir, q_logits, q_expected["greedy"], quantization_config=dequantize)
            sz = dir_size(q_dir)
            total += sz
            print(f"{'gpt_oss_mxfp4':18s} size={sz / 1024:7.1f} KiB greedy={q_expected['greedy']}")
    print(
        f"total {total / 1024:.1f} KiB; torch {torch.__version__}, transformers {transformers.__version__}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
