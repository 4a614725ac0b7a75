"""Hugging Face checkpoints: our loader + model against what transformers computed.

The fixtures (tests/fixtures/hf, see its README) hold tiny random models of each supported
architecture with transformers' logits and greedy continuation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from models.config import ConfigError
from models.hf_config import UnsupportedConfigError, config_from_hf
from models.hf_loader import CheckpointError, SafetensorsFile, load_hf
from models.reference import forward_logits

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
ARCHS = ["mixtral", "qwen2_moe", "qwen3_moe", "qwen3_moe_sharded", "olmoe", "deepseek_v2",
         "deepseek_v3", "glm4_moe", "glm4_moe_air"]  # fmt: skip
GREEDY_PAD = 32  # prompt + greedy tokens, padded: one compile per architecture


def expected(arch: str) -> dict:
    return json.loads((FIXTURES / arch / "expected.json").read_text())


def all_logits(cfg, params, tokens: list[int]) -> np.ndarray:
    """Logits [len(tokens), vocab] of one causal pass; tokens padded to GREEDY_PAD (padding after
    the last real token cannot change earlier positions)."""
    padded = np.zeros((1, GREEDY_PAD), np.int32)
    padded[0, : len(tokens)] = tokens
    device_params = jax.tree.map(jnp.asarray, params)
    return np.asarray(forward_logits(cfg, device_params, jnp.asarray(padded)))[0, : len(tokens)]


def assert_matches_transformers(arch: str, cfg, params) -> np.ndarray:
    """The prompt's logits and every greedy step's within 1e-4 of transformers' (float32), and
    the greedy tokens equal; returns the logits of prompt + greedy."""
    want = expected(arch)
    prompt, greedy = want["prompt"], want["greedy"]
    logits = all_logits(cfg, params, prompt + greedy)
    np.testing.assert_allclose(
        logits[: len(prompt)],
        np.load(FIXTURES / arch / "expected_logits.npy"),
        rtol=1e-4,
        atol=1e-4,
    )
    # Greedy decoding by recomputation: token t is the argmax after prompt + greedy[:t]; since
    # the pass is causal, one pass over prompt + greedy gives every step's logits.
    steps = logits[len(prompt) - 1 : len(prompt) + len(greedy) - 1]
    np.testing.assert_allclose(
        steps, np.load(FIXTURES / arch / "expected_greedy_logits.npy"), rtol=1e-4, atol=1e-4
    )
    assert steps.argmax(-1).tolist() == greedy
    return logits


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_greedy_match_transformers(arch, loaded):
    assert_matches_transformers(arch, *loaded(arch))


# qwen3_moe_sharded: qwen3_moe's weights; glm4_moe_air: glm4_moe's code with options off.
@pytest.mark.parametrize(
    "arch", [a for a in ARCHS if a not in ("qwen3_moe_sharded", "glm4_moe_air")]
)
def test_engine_on_four_devices_generates_transformers_tokens(arch, loaded, devices):
    from elastic_moe.engine import Engine, EngineOptions

    cfg, params = loaded(arch)
    want = expected(arch)
    engine = Engine(cfg, params, devices[:4], EngineOptions(request_slots_per_device=1))
    (request,) = engine.generate([want["prompt"]], len(want["greedy"]))
    assert list(request.generated) == want["greedy"]


def test_sharded_checkpoint_loads_identically(loaded):
    cfg, params = loaded("qwen3_moe")
    cfg_sharded, params_sharded = loaded("qwen3_moe_sharded")
    assert cfg_sharded.replace(name=cfg.name) == cfg
    assert jax.tree.structure(params) == jax.tree.structure(params_sharded)
    jax.tree.map(np.testing.assert_array_equal, params, params_sharded)


def test_loaded_config_matches_architecture_notes(loaded):
    v3, _ = loaded("deepseek_v3")
    assert (v3.attention, v3.router, v3.router_bias, v3.rope_interleave) == (
        "mla",
        "sigmoid",
        True,
        True,
    )
    assert (v3.num_expert_groups, v3.topk_groups, v3.routed_scaling_factor) == (2, 1, 2.5)
    assert (v3.first_dense_layers, v3.dense_d_ff, v3.shared_d_ff) == (1, 40, 24)
    v2, _ = loaded("deepseek_v2")
    assert (v2.router, v2.norm_topk_prob, v2.q_lora_rank, v2.shared_d_ff) == (
        "softmax",
        False,
        0,
        48,
    )
    qwen2, _ = loaded("qwen2_moe")
    assert qwen2.attention_bias and qwen2.shared_expert_gate and qwen2.shared_d_ff == 40
    assert loaded("qwen3_moe")[0].head_dim == 16
    assert loaded("olmoe")[0].qk_norm == "full"
    assert loaded("mixtral")[0].head_dim == 10


# ---- other layouts and dtypes ---------------------------------------------------------------
def _copy_fixture(arch: str, tmp_path: Path) -> Path:
    out = tmp_path / arch
    shutil.copytree(FIXTURES / arch, out)
    return out


def _rewrite(directory: Path, edit) -> None:
    """Applies edit(dict of tensors) to the single model.safetensors of `directory`."""
    path = directory / "model.safetensors"
    tensors = dict(load_file(path))
    edit(tensors)
    save_file(tensors, path)


def test_fused_expert_layout_loads_identically(tmp_path, loaded):
    """transformers-5 in-memory names: experts.gate_up_proj [E, 2I, H], experts.down_proj."""
    cfg, params = loaded("mixtral")
    directory = _copy_fixture("mixtral", tmp_path)

    def fuse(t):
        for layer in range(cfg.num_layers):
            old = f"model.layers.{layer}.block_sparse_moe."
            new = f"model.layers.{layer}.mlp."
            pop = lambda e, w: t.pop(f"{old}experts.{e}.{w}.weight")  # noqa: B023
            experts = range(cfg.num_experts)
            t[new + "experts.gate_up_proj"] = np.stack(
                [np.concatenate([pop(e, "w1"), pop(e, "w3")]) for e in experts]
            )
            t[new + "experts.down_proj"] = np.stack([pop(e, "w2") for e in experts])
            t[new + "gate.weight"] = t.pop(old + "gate.weight")

    _rewrite(directory, fuse)
    cfg_fused, fused = load_hf(directory, progress=False)
    assert cfg_fused.replace(name=cfg.name) == cfg
    jax.tree.map(np.testing.assert_array_equal, params, fused)


def test_bfloat16_checkpoint_loads_through_ml_dtypes(tmp_path, loaded):
    cfg, params = loaded("qwen3_moe")
    directory = _copy_fixture("qwen3_moe", tmp_path)
    _rewrite(directory, lambda t: t.update({k: v.astype(ml_dtypes.bfloat16) for k, v in t.items()}))
    hf = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**hf, "dtype": "bfloat16"}))
    cfg16, params16 = load_hf(directory, progress=False)
    assert cfg16.dtype == "bfloat16"
    assert params16["layers"][0]["attn"]["q_proj"]["kernel"].dtype == jnp.bfloat16
    want = jax.tree.map(lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32), params)
    got = jax.tree.map(lambda a: a.astype(np.float32), params16)
    jax.tree.map(np.testing.assert_array_equal, want, got)
    cfg32, params32 = load_hf(directory, dtype="float32", progress=False)
    assert cfg32.dtype == "float32" and params32["embed"].dtype == np.float32
    # The raw-bytes path (for safetensors versions without bf16 in numpy) reads the same.
    file = SafetensorsFile(directory / "model.safetensors")
    name = "model.layers.1.mlp.experts.7.down_proj.weight"
    np.testing.assert_array_equal(file.read_raw(name), file.read(name))
    np.testing.assert_array_equal(file.read_raw(name, 5), file.read(name)[5])


def test_progress_bar_runs(loaded):
    cfg, params = load_hf(FIXTURES / "olmoe", progress=True)
    jax.tree.map(np.testing.assert_array_equal, loaded("olmoe")[1], params)


def test_tied_embeddings_need_no_lm_head(tmp_path, loaded):
    _, params = loaded("olmoe")
    directory = _copy_fixture("olmoe", tmp_path)
    config = hf_config("olmoe", tie_word_embeddings=True)
    (directory / "config.json").write_text(json.dumps(config))
    cfg, tied = load_hf(directory, progress=False)  # lm_head.weight present: tied, not used
    assert cfg.tie_embeddings and "lm_head" not in tied
    _rewrite(directory, lambda t: t.pop("lm_head.weight"))
    cfg, tied = load_hf(directory, progress=False)
    np.testing.assert_array_equal(tied["embed"], params["embed"])


def test_deepseek_multi_token_prediction_layers_are_skipped(tmp_path, loaded):
    _, params = loaded("deepseek_v3")
    directory = _copy_fixture("deepseek_v3", tmp_path)
    mtp = "model.layers.3.eh_proj.weight"  # the layer after the last decoder layer
    _rewrite(directory, lambda t: t.update({mtp: np.zeros((40, 80), np.float32)}))
    with pytest.raises(CheckpointError, match=rf"unexpected tensor {mtp}"):
        load_hf(directory, progress=False)
    config = hf_config("deepseek_v3", num_nextn_predict_layers=1)
    (directory / "config.json").write_text(json.dumps(config))
    jax.tree.map(np.testing.assert_array_equal, params, load_hf(directory, progress=False)[1])


# ---- config.json variants and refusals -------------------------------------------------------
def hf_config(arch: str, **changes) -> dict:
    config = json.loads((FIXTURES / arch / "config.json").read_text())
    return {**config, **changes}


def test_hub_style_config_keys_give_the_same_config():
    tf5 = config_from_hf(hf_config("qwen3_moe"), "q")
    hub = hf_config("qwen3_moe", rope_theta=10000.0, rope_scaling=None, num_experts=8)
    for key in ("rope_parameters", "num_local_experts"):
        del hub[key]
    hub["torch_dtype"] = hub.pop("dtype")
    assert config_from_hf(hub, "q") == tf5
    v3 = config_from_hf(hf_config("deepseek_v3"), "v3")
    hub = hf_config("deepseek_v3", rope_theta=10000.0, rope_scaling=None, topk_method="noaux_tc")
    hub |= {"scoring_func": "sigmoid", "moe_layer_freq": 1}
    for key in ("rope_parameters", "head_dim", "qk_head_dim", "rope_interleave"):
        del hub[key]
    assert config_from_hf(hub, "v3") == v3
    theta = hf_config("mixtral", rope_theta=1e6)
    del theta["rope_parameters"]
    assert config_from_hf(theta, "m").rope_theta == 1e6


def test_max_seq_len_is_capped_and_overridable():
    assert config_from_hf(hf_config("mixtral"), "m").max_seq_len == 128
    long = hf_config("mixtral", max_position_embeddings=131072)
    assert config_from_hf(long, "m").max_seq_len == 4096
    assert config_from_hf(long, "m", max_seq_len=512).max_seq_len == 512


@pytest.mark.parametrize(
    "arch, changes, field",
    [
        ("deepseek_v3", {"rope_parameters": {"rope_type": "dynamic", "factor": 4}}, "rope_type"),
        ("mixtral", {"rope_scaling": {"type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ("mixtral", {"sliding_window": 64}, "sliding_window"),
        ("qwen2_moe", {"use_sliding_window": True, "sliding_window": 16}, "sliding_window"),
        ("qwen2_moe", {"decoder_sparse_step": 2}, "decoder_sparse_step"),
        ("qwen3_moe", {"mlp_only_layers": [0]}, "mlp_only_layers"),
        ("olmoe", {"clip_qkv": 8.0}, "clip_qkv"),
        ("deepseek_v3", {"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
        ("deepseek_v2", {"topk_method": "noaux_tc"}, "topk_method"),
        ("mixtral", {"hidden_act": "gelu"}, "hidden_act"),
    ],
)
def test_unimplemented_config_is_refused_naming_the_field(arch, changes, field):
    with pytest.raises(UnsupportedConfigError, match=field):
        config_from_hf(hf_config(arch, **changes), arch)


def test_sliding_window_longer_than_the_cache_is_accepted():
    assert config_from_hf(hf_config("mixtral", sliding_window=4096), "m").max_seq_len == 128


def test_unsupported_model_type_names_it_and_the_supported_list(tmp_path):
    directory = _copy_fixture("mixtral", tmp_path)
    (directory / "config.json").write_text(json.dumps(hf_config("mixtral", model_type="llama")))
    with pytest.raises(CheckpointError, match=r"config\.json.*'llama'.*mixtral, qwen2_moe"):
        load_hf(directory, progress=False)
    assert issubclass(UnsupportedConfigError, ConfigError)


# ---- broken checkpoints: CheckpointError naming file and tensor ------------------------------
BROKEN = "model.layers.1.block_sparse_moe.experts.5.w3.weight"


def test_missing_tensor(tmp_path):
    directory = _copy_fixture("mixtral", tmp_path)
    _rewrite(directory, lambda t: t.pop(BROKEN))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: missing tensor {BROKEN}"):
        load_hf(directory, progress=False)


def test_shape_disagreeing_with_config(tmp_path):
    directory = _copy_fixture("mixtral", tmp_path)
    _rewrite(directory, lambda t: t.update({BROKEN: t[BROKEN][:-1]}))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {BROKEN} has shape"):
        load_hf(directory, progress=False)


def test_unexpected_tensor_is_reported_not_ignored(tmp_path):
    directory = _copy_fixture("mixtral", tmp_path)
    extra = "model.layers.0.self_attn.o_proj.bias"
    harmless = "model.layers.0.self_attn.rotary_emb.inv_freq"
    _rewrite(directory, lambda t: t.update({extra: np.zeros(40, np.float32)}))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: unexpected tensor {extra}"):
        load_hf(directory, progress=False)
    _rewrite(directory, lambda t: (t.pop(extra), t.update({harmless: np.ones(5, np.float32)})))
    load_hf(directory, progress=False)


def test_tensor_given_twice(tmp_path):
    """Per-expert and fused names for the same experts: refused, not last-one-wins."""
    directory = _copy_fixture("mixtral", tmp_path)
    fused = "model.layers.0.mlp.experts.down_proj"
    _rewrite(directory, lambda t: t.update({fused: np.zeros((8, 40, 24), np.float32)}))
    with pytest.raises(CheckpointError, match="already filled"):
        load_hf(directory, progress=False)


def test_truncated_file(tmp_path):
    directory = _copy_fixture("mixtral", tmp_path)
    path = directory / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated: tensor \S+ ends"):
        load_hf(directory, progress=False)
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        load_hf(directory, progress=False)


def test_missing_shard_and_tensor_not_in_index(tmp_path):
    directory = _copy_fixture("qwen3_moe_sharded", tmp_path)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    tensors = dict(load_file(directory / shard))
    tensors.pop(name)
    save_file(tensors, directory / shard)
    with pytest.raises(CheckpointError, match=rf"{shard}: missing tensor {name}"):
        load_hf(directory, progress=False)
    (directory / shard).unlink()
    with pytest.raises(CheckpointError, match=rf"shard {shard} does not exist"):
        load_hf(directory, progress=False)


def test_pickle_checkpoints_are_refused(tmp_path):
    directory = tmp_path / "torch_model"
    directory.mkdir()
    shutil.copy(FIXTURES / "mixtral" / "config.json", directory)
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*[Cc]onvert.*safetensors"):
        load_hf(directory, progress=False)
