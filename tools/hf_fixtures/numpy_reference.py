"""Independent NumPy re-implementation of the eight HF MoE architectures (gpt_oss included,
with its MXFP4 experts).

Purpose: an executable version of ARCHITECTURES.md. It reads only
``config.json`` + ``*.safetensors`` of a fixture dir (no torch, no
transformers), runs the forward pass and checks it against
``expected_logits.npy`` / ``expected.json``. If this passes, the math written
down in ARCHITECTURES.md is what transformers actually computes.

Needs only numpy + safetensors (works in the project's 3.12 venv too)::

    python tools/hf_fixtures/numpy_reference.py [tests/fixtures/hf]

Loader accepts both the on-disk per-expert names written by save_pretrained
(``experts.{e}.gate_proj/up_proj/down_proj`` or mixtral's
``block_sparse_moe.experts.{e}.w1/w3/w2``) and the fused in-memory names of
transformers 5.x (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj``
[E, H, I]).
"""

from __future__ import annotations

import glob
import json
import os
import re
import sys

import numpy as np
from safetensors.numpy import load_file

DT = np.float64  # compute in float64; fixtures are float32


# --------------------------------------------------------------------------- loading
def load_dir(d):
    cfg = json.load(open(os.path.join(d, "config.json")))
    w = {}
    for f in sorted(glob.glob(os.path.join(d, "*.safetensors"))):
        w.update(load_file(f))
    # normalise mixtral's original names to the generic ones
    out = {}
    for k, v in w.items():
        k = k.replace(".block_sparse_moe.", ".mlp.")
        k = re.sub(r"(experts\.\d+)\.w1\.", r"\1.gate_proj.", k)
        k = re.sub(r"(experts\.\d+)\.w3\.", r"\1.up_proj.", k)
        k = re.sub(r"(experts\.\d+)\.w2\.", r"\1.down_proj.", k)
        out[k] = v if v.dtype == np.uint8 else v.astype(DT)  # uint8: MXFP4 blocks / scales
    return cfg, out


def expert_weights(w, prefix, n_experts):
    """Return (gate [E,I,H], up [E,I,H], down [E,H,I]) in nn.Linear [out,in] orientation."""
    if prefix + "experts.gate_up_proj" in w:  # transformers 5 fused layout
        gu = w[prefix + "experts.gate_up_proj"]  # [E, 2I, H]; rows [:I]=gate, [I:]=up
        i = gu.shape[1] // 2
        return gu[:, :i], gu[:, i:], w[prefix + "experts.down_proj"]
    g = np.stack([w[f"{prefix}experts.{e}.gate_proj.weight"] for e in range(n_experts)])
    u = np.stack([w[f"{prefix}experts.{e}.up_proj.weight"] for e in range(n_experts)])
    dn = np.stack([w[f"{prefix}experts.{e}.down_proj.weight"] for e in range(n_experts)])
    return g, u, dn


# --------------------------------------------------------------------------- pieces
def rmsnorm(x, weight, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softmax(x, axis=-1):
    x = x - np.max(x, axis=axis, keepdims=True)
    e = np.exp(x)
    return e / np.sum(e, axis=axis, keepdims=True)


def linear(x, w, b=None):  # nn.Linear: y = x @ W.T + b, W is [out, in]
    y = x @ w.T
    return y if b is None else y + b


def swiglu(x, gate, up, down):  # down(silu(gate(x)) * up(x))
    return linear(silu(linear(x, gate)) * linear(x, up), down)


def rope_angles(T, dim, theta):
    inv_freq = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=DT) / dim))  # [dim/2]
    return np.arange(T, dtype=DT)[:, None] * inv_freq[None, :]  # [T, dim/2]


def rope_half(x, ang):
    """Llama/NeoX rotate_half: pairs (x[i], x[i + d/2]). x: [..., T, d]."""
    d2 = x.shape[-1] // 2
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., :d2], x[..., d2:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


def rope_interleaved(x, ang, out_layout="half"):
    """DeepSeek: pairs (x[2i], x[2i+1]). out_layout 'half' = v3 (evens then odds), 'interleaved' = v2."""
    c, s = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    r1, r2 = x1 * c - x2 * s, x2 * c + x1 * s
    if out_layout == "half":
        return np.concatenate([r1, r2], axis=-1)
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = r1, r2
    return out


def attention(q, k, v, scale, sinks=None, window=None):
    """q: [Hq,T,D], k: [Hkv,T,D], v: [Hkv,T,Dv]; GQA: q head h uses kv head h // (Hq/Hkv).
    gpt_oss: `sinks` [Hq] join each softmax and are dropped; `window` keeps keys j with
    i - window < j <= i."""
    rep = q.shape[0] // k.shape[0]
    k = np.repeat(k, rep, axis=0)
    v = np.repeat(v, rep, axis=0)
    T = q.shape[1]
    s = q @ k.transpose(0, 2, 1) * scale
    visible = np.tril(np.ones((T, T), bool))
    if window:
        i, j = np.arange(T)[:, None], np.arange(T)[None, :]
        visible &= j > i - window
    s = np.where(visible, s, -np.inf)
    if sinks is None:
        return softmax(s) @ v  # [Hq, T, Dv]
    sink = np.broadcast_to(sinks[:, None, None], (q.shape[0], T, 1))
    return softmax(np.concatenate([s, sink], -1))[..., :-1] @ v


def routed(x, idx, wts, gate, up, down):
    """x [T,H]; idx/wts [T,k]. out[t] = sum_j wts[t,j] * expert_{idx[t,j]}(x[t])."""
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for e, wt in zip(idx[t], wts[t]):
            out[t] += wt * swiglu(x[t], gate[e], up[e], down[e])
    return out


def topk(scores, k):  # indices of the k largest per row (ties: lowest index first)
    return np.argsort(-scores, axis=-1, kind="stable")[:, :k]


# --------------------------------------------------------------------------- routers
def router_softmax_topk(logits, k, renorm):
    """mixtral (renorm=True), qwen2_moe/olmoe (norm_topk_prob), qwen3_moe (norm_topk_prob)."""
    p = softmax(logits)
    idx = topk(p, k)
    wts = np.take_along_axis(p, idx, -1)
    if renorm:
        wts = wts / wts.sum(-1, keepdims=True)
    return idx, wts


def router_deepseek_v2(logits, cfg):
    E, k = cfg["n_routed_experts"], cfg["num_experts_per_tok"]
    p = softmax(logits)
    if cfg.get("topk_method", "greedy") == "group_limited_greedy":
        G, kg = cfg["n_group"], cfg["topk_group"]
        gs = p.reshape(-1, G, E // G).max(-1)  # group score = max expert prob in group
        keep = np.zeros_like(gs, bool)
        np.put_along_axis(keep, topk(gs, kg), True, -1)
        p = np.where(np.repeat(keep, E // G, -1), p, 0.0)
    idx = topk(p, k)
    wts = np.take_along_axis(p, idx, -1)  # NO renormalisation (norm_topk_prob ignored)
    return idx, wts * cfg["routed_scaling_factor"]


def router_deepseek_v3(logits, bias, cfg):
    E, k, G, kg = (
        cfg["n_routed_experts"],
        cfg["num_experts_per_tok"],
        cfg["n_group"],
        cfg["topk_group"],
    )
    s = sigmoid(logits)
    sc = s + bias  # e_score_correction_bias: selection only
    gs = np.sort(sc.reshape(-1, G, E // G), -1)[..., -2:].sum(-1)  # group score = sum of top-2
    keep = np.zeros_like(gs, bool)
    np.put_along_axis(keep, topk(gs, kg), True, -1)
    sc = np.where(np.repeat(keep, E // G, -1), sc, -np.inf)
    idx = topk(sc, k)
    wts = np.take_along_axis(s, idx, -1)  # weights from UNbiased sigmoid scores
    if cfg.get("norm_topk_prob", True):
        wts = wts / (wts.sum(-1, keepdims=True) + 1e-20)
    return idx, wts * cfg["routed_scaling_factor"]


# --------------------------------------------------------------------------- blocks
def gqa_attention(cfg, w, p, x, arch, layer=0):
    T, Hd = x.shape
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or Hd // nh
    eps = cfg["rms_norm_eps"]
    b = lambda n: w.get(p + n + ".bias")  # noqa: E731
    q = linear(x, w[p + "q_proj.weight"], b("q_proj"))
    k = linear(x, w[p + "k_proj.weight"], b("k_proj"))
    v = linear(x, w[p + "v_proj.weight"], b("v_proj"))
    if arch == "olmoe":  # q/k norm over the WHOLE projected vector, before head split
        q = rmsnorm(q, w[p + "q_norm.weight"], eps)
        k = rmsnorm(k, w[p + "k_norm.weight"], eps)
    q = q.reshape(T, nh, hd).transpose(1, 0, 2)
    k = k.reshape(T, nkv, hd).transpose(1, 0, 2)
    v = v.reshape(T, nkv, hd).transpose(1, 0, 2)
    if arch == "qwen3_moe" or cfg.get("use_qk_norm"):  # per-head q/k norm (weight [head_dim])
        q = rmsnorm(q, w[p + "q_norm.weight"], eps)
        k = rmsnorm(k, w[p + "k_norm.weight"], eps)
    # glm4_moe: partial rope, rotate_half on the first int(hd * factor) dims, the rest pass
    rot = int(hd * cfg["rope_parameters"].get("partial_rotary_factor", 1.0))
    ang = rope_angles(T, rot, cfg["rope_parameters"]["rope_theta"])
    q = np.concatenate([rope_half(q[..., :rot], ang), q[..., rot:]], -1)
    k = np.concatenate([rope_half(k[..., :rot], ang), k[..., rot:]], -1)
    sinks, window = None, None
    if arch == "gpt_oss":  # o_proj has a bias too (picked up by b("o_proj") below)
        sinks = w[p + "sinks"]
        if cfg["layer_types"][layer] == "sliding_attention":
            window = cfg["sliding_window"]
    o = attention(q, k, v, hd**-0.5, sinks, window).transpose(1, 0, 2).reshape(T, nh * hd)
    return linear(o, w[p + "o_proj.weight"], b("o_proj"))


def mla_attention(cfg, w, p, x, arch):
    T = x.shape[0]
    nh = cfg["num_attention_heads"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    r = cfg["kv_lora_rank"]
    if cfg.get("q_lora_rank") is None:
        q = linear(x, w[p + "q_proj.weight"])
    else:
        q = linear(
            rmsnorm(linear(x, w[p + "q_a_proj.weight"]), w[p + "q_a_layernorm.weight"], 1e-6),
            w[p + "q_b_proj.weight"],
        )
    q = q.reshape(T, nh, dn + dr).transpose(1, 0, 2)
    q_nope, q_rot = q[..., :dn], q[..., dn:]
    ckv = linear(x, w[p + "kv_a_proj_with_mqa.weight"])  # [T, r + dr]
    c, k_rot = ckv[:, :r], ckv[:, r:]
    c = rmsnorm(c, w[p + "kv_a_layernorm.weight"], 1e-6)
    kv = linear(c, w[p + "kv_b_proj.weight"]).reshape(T, nh, dn + dv).transpose(1, 0, 2)
    k_nope, v = kv[..., :dn], kv[..., dn:]
    ang = rope_angles(T, dr, cfg["rope_parameters"]["rope_theta"])
    if arch == "deepseek_v2":
        q_rot, k_rot = (
            rope_interleaved(q_rot, ang, "interleaved"),
            rope_interleaved(k_rot, ang, "interleaved"),
        )
    elif cfg.get("rope_interleave", True):
        q_rot, k_rot = rope_interleaved(q_rot, ang, "half"), rope_interleaved(k_rot, ang, "half")
    else:
        q_rot, k_rot = rope_half(q_rot, ang), rope_half(k_rot, ang)
    k = np.concatenate([k_nope, np.broadcast_to(k_rot[None], (nh, T, dr))], -1)
    qq = np.concatenate([q_nope, q_rot], -1)
    o = attention(qq, k, v, (dn + dr) ** -0.5).transpose(1, 0, 2).reshape(T, nh * dv)
    return linear(o, w[p + "o_proj.weight"])


FP4 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], DT)


def mxfp4(blocks, scales):
    """[..., G, 16] uint8 codes (low nibble first) + [..., G] exponents (bias 127) -> [..., G*32]."""
    vals = np.empty((*blocks.shape[:-1], 32), DT)
    vals[..., 0::2], vals[..., 1::2] = FP4[blocks & 15], FP4[blocks >> 4]
    vals = vals * 2.0 ** (scales.astype(np.int64)[..., None] - 127)
    return vals.reshape(*scales.shape[:-1], -1)


def gpt_oss_mlp(cfg, w, p, x):
    """Router: linear + bias, top-k of the logits, softmax over those k. Experts ([in, out],
    gate/up interleaved): gate = min(gate, limit), up = clip(up, +-limit),
    ((up + 1) * gate * sigmoid(alpha * gate)) @ down + down_bias."""
    logits = linear(x, w[p + "router.weight"], w[p + "router.bias"])
    idx = topk(logits, cfg["num_experts_per_tok"])
    wts = softmax(np.take_along_axis(logits, idx, -1))
    e = p + "experts."
    if e + "gate_up_proj_blocks" in w:  # published MXFP4: [E, out, in] after dequantization
        gu = mxfp4(w[e + "gate_up_proj_blocks"], w[e + "gate_up_proj_scales"]).swapaxes(1, 2)
        dn = mxfp4(w[e + "down_proj_blocks"], w[e + "down_proj_scales"]).swapaxes(1, 2)
    else:
        gu, dn = w[e + "gate_up_proj"], w[e + "down_proj"]  # [E, H, 2I], [E, I, H]
    gub, dnb = w[e + "gate_up_proj_bias"], w[e + "down_proj_bias"]
    limit, alpha = cfg["swiglu_limit"], cfg.get("swiglu_alpha", 1.702)
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for ex, wt in zip(idx[t], wts[t]):
            h = x[t] @ gu[ex] + gub[ex]
            gate, up = np.minimum(h[0::2], limit), np.clip(h[1::2], -limit, limit)
            out[t] += wt * (((up + 1) * gate * sigmoid(alpha * gate)) @ dn[ex] + dnb[ex])
    return out


def mlp(cfg, w, p, x, arch, layer):
    if arch == "gpt_oss":
        return gpt_oss_mlp(cfg, w, p, x)
    k = cfg["num_experts_per_tok"]
    if arch in ("deepseek_v2", "deepseek_v3", "glm4_moe"):  # glm4_moe routes as deepseek_v3
        if layer < cfg["first_k_dense_replace"]:
            return swiglu(
                x, w[p + "gate_proj.weight"], w[p + "up_proj.weight"], w[p + "down_proj.weight"]
            )
        E = cfg["n_routed_experts"]
        logits = linear(x, w[p + "gate.weight"])
        if arch == "deepseek_v2":
            idx, wts = router_deepseek_v2(logits, cfg)
        else:
            idx, wts = router_deepseek_v3(logits, w[p + "gate.e_score_correction_bias"], cfg)
        out = routed(x, idx, wts, *expert_weights(w, p, E))
        sp = p + "shared_experts."
        return out + swiglu(
            x, w[sp + "gate_proj.weight"], w[sp + "up_proj.weight"], w[sp + "down_proj.weight"]
        )
    E = cfg.get("num_experts") or cfg.get("num_local_experts")
    if p + "gate.weight" not in w:  # dense layer (mlp_only_layers / decoder_sparse_step)
        return swiglu(
            x, w[p + "gate_proj.weight"], w[p + "up_proj.weight"], w[p + "down_proj.weight"]
        )
    logits = linear(x, w[p + "gate.weight"])
    renorm = True if arch == "mixtral" else bool(cfg.get("norm_topk_prob", False))
    idx, wts = router_softmax_topk(logits, k, renorm)
    out = routed(x, idx, wts, *expert_weights(w, p, E))
    if arch == "qwen2_moe":
        sp = p + "shared_expert."
        sh = swiglu(
            x, w[sp + "gate_proj.weight"], w[sp + "up_proj.weight"], w[sp + "down_proj.weight"]
        )
        out = out + sigmoid(linear(x, w[p + "shared_expert_gate.weight"])) * sh
    return out


def forward(cfg, w, ids):
    arch = cfg["model_type"]
    eps = cfg["rms_norm_eps"]
    h = w["model.embed_tokens.weight"][np.asarray(ids)]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        xn = rmsnorm(h, w[p + "input_layernorm.weight"], eps)
        if arch.startswith("deepseek"):
            h = h + mla_attention(cfg, w, p + "self_attn.", xn, arch)
        else:
            h = h + gqa_attention(cfg, w, p + "self_attn.", xn, arch, i)
        xn = rmsnorm(h, w[p + "post_attention_layernorm.weight"], eps)
        h = h + mlp(cfg, w, p + "mlp.", xn, arch, i)
    h = rmsnorm(h, w["model.norm.weight"], eps)
    return linear(h, w["lm_head.weight"])


def check(d):
    cfg, w = load_dir(d)
    exp = json.load(open(os.path.join(d, "expected.json")))
    ref = np.load(os.path.join(d, exp["logits_file"]))
    got = forward(cfg, w, exp["prompt"])
    err = float(np.max(np.abs(got - ref)))
    seq = list(exp["prompt"])
    for _ in range(len(exp["greedy"])):
        seq.append(int(np.argmax(forward(cfg, w, seq)[-1])))
    ok_greedy = seq[len(exp["prompt"]) :] == exp["greedy"]
    return err, ok_greedy


def main(root="tests/fixtures/hf"):
    bad = 0
    for d in sorted(glob.glob(os.path.join(root, "*", "expected.json"))):
        d = os.path.dirname(d)
        err, ok = check(d)
        good = err < 1e-4 and ok
        bad += not good
        print(
            f"{os.path.basename(d):18s} max|dlogits|={err:.2e} greedy_match={ok} {'OK' if good else 'FAIL'}"
        )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
