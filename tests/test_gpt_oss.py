"""gpt-oss (`model_type: gpt_oss`): our loader + model against transformers, the engine through a
failure and a rejoin (the experts' biases move with them), MXFP4 experts, and the refusals.

Fixtures (tests/fixtures/hf, written by tools/hf_fixtures/make_fixtures.py --only gpt_oss):
`gpt_oss/` float32 experts as save_pretrained writes them; `gpt_oss_mxfp4/` the same model with
random MXFP4 experts (`*_blocks` / `*_scales`), its logits from the float model holding exactly
the dequantized weights, and checked to load in transformers to the same logits;
`mxfp4_dequant/` random blocks and scales with transformers' own dequantization of them;
`gpt_oss_yarn/` the float model with the published yarn RoPE over 32 original positions.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from test_hf_models import FIXTURES, assert_matches_transformers, expected, hf_config

from elastic_moe import Engine, EngineOptions, Request
from elastic_moe.checkpoint import restore_checkpoint, restore_experts, save_checkpoint
from elastic_moe.coordinator import Coordinator
from models.hf_config import UnsupportedConfigError, config_from_hf
from models.hf_loader import CheckpointError, load_hf
from models.mxfp4 import dequantize_mxfp4
from models.params import EXPERT_BIASES, expert_weight_names, expert_weights, moe_layer_indices
from models.presets import get_preset
from models.reference import forward_logits
from models.rope import inverse_frequencies, yarn_attention_factor

ROPE_REFERENCE = json.loads((FIXTURES / "rope_reference.json").read_text())


@pytest.fixture(scope="module")
def gpt_oss():
    return load_hf(FIXTURES / "gpt_oss", progress=False)


# ---- the model against transformers ---------------------------------------------------------
@pytest.mark.parametrize("arch", ["gpt_oss", "gpt_oss_mxfp4", "gpt_oss_yarn"])
def test_logits_and_greedy_match_transformers(arch, gpt_oss):
    cfg, params = gpt_oss if arch == "gpt_oss" else load_hf(FIXTURES / arch, progress=False)
    assert_matches_transformers(arch, cfg, params)


@pytest.mark.slow  # three compiles (~20 s on 2 busy cores)
def test_the_fixture_exercises_every_gpt_oss_feature(gpt_oss):
    """Each feature, dropped, moves the prompt logits far beyond the 1e-4 tolerance above: the
    window (8 keys, a 32-token sequence), the sinks, the clamp, the expert and router biases."""
    cfg, params = gpt_oss
    want = np.load(FIXTURES / "gpt_oss" / "expected_logits.npy")
    assert cfg.sliding_window == 8 and cfg.sliding_window_layers == (0, 2)
    tokens = jnp.asarray([expected("gpt_oss")["prompt"]], jnp.int32)

    def forward(cfg):  # one compile per config; params are arguments
        return jax.jit(lambda p: forward_logits(cfg, p, tokens)[0])

    def zeroed(match):
        def zero(path, a):
            return np.zeros_like(a) if match([getattr(p, "key", p) for p in path]) else a

        return jax.tree_util.tree_map_with_path(zero, params)

    same_cfg = forward(cfg)
    np.testing.assert_allclose(same_cfg(params), want, atol=1e-4, rtol=1e-4)
    variants = {
        "no window": forward(cfg.replace(sliding_window_layers=()))(params),
        "no clamp": forward(cfg.replace(swiglu_limit=1e9))(params),
        "no sinks": same_cfg(zeroed(lambda keys: keys[-1] == "sinks")),
        "no expert biases": same_cfg(zeroed(lambda keys: keys[-1] in EXPERT_BIASES)),
        "no router bias": same_cfg(zeroed(lambda keys: keys[-2:] == ["router", "bias"])),
    }
    for what, got in variants.items():
        assert np.abs(np.asarray(got) - want).max() > 1e-2, what


def test_loaded_config():
    cfg = config_from_hf(hf_config("gpt_oss"), "g")
    assert (cfg.router, cfg.router_logit_bias, cfg.expert_bias) == ("topk_softmax", True, True)
    assert (cfg.attention_sinks, cfg.attention_bias, cfg.o_proj_bias) == (True, True, True)
    assert (cfg.head_dim, cfg.moe_d_ff, cfg.experts_per_token) == (24, 32, 4)
    assert (cfg.swiglu_limit, cfg.swiglu_alpha) == (1.0, 1.702)
    assert expert_weight_names(cfg) == ("w_gate", "w_up", "w_down", "b_gate", "b_up", "b_down")
    # transformers' default layer_types (absent from a config) alternate, sliding first.
    default = {k: v for k, v in hf_config("gpt_oss").items() if k != "layer_types"}
    assert config_from_hf(default, "g") == cfg
    # A hub config: rope_theta and rope_scaling at the top (plain RoPE here), no swiglu_alpha.
    hub = hf_config("gpt_oss", rope_theta=10000.0, rope_scaling={"rope_type": "default"})
    hub |= {"num_experts": hub.pop("num_local_experts"), "torch_dtype": hub.pop("dtype")}
    del hub["rope_parameters"], hub["swiglu_alpha"]
    assert config_from_hf(hub, "g") == cfg
    assert (
        config_from_hf(hf_config("gpt_oss", sliding_window=None), "g").sliding_window_layers == ()
    )


# ---- yarn RoPE (the published configs' rope) -------------------------------------------------
def test_yarn_fixture_config_and_tables_match_transformers():
    """gpt_oss_yarn: the published yarn over 32 original positions. Its ramp bounds are
    fractional (truncate false), cos/sin carry 0.1 ln 32 + 1, the softmax scale stays
    head_dim^-0.5 (DeepSeek's mscale^2 is MLA's only)."""
    cfg = config_from_hf(hf_config("gpt_oss_yarn"), "g")
    want = expected("gpt_oss_yarn")
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_theta) == ("yarn", 32.0, 150000.0)
    assert (cfg.rope_original_max_positions, cfg.rope_truncate) == (32, False)
    np.testing.assert_allclose(inverse_frequencies(cfg, cfg.head_dim), want["rope_inv_freq"], 1e-6)
    assert yarn_attention_factor(cfg) == pytest.approx(want["rope_attention_scaling"], rel=1e-12)
    assert yarn_attention_factor(cfg) == pytest.approx(0.1 * math.log(32) + 1, rel=1e-12)
    assert cfg.head_dim**-0.5 == pytest.approx(want["softmax_scale"], rel=1e-12)
    # truncate true would give other tables, and other logits far beyond the 1e-4 tolerance.
    truncated = inverse_frequencies(cfg.replace(rope_truncate=True), cfg.head_dim)
    assert np.abs(truncated - np.asarray(want["rope_inv_freq"])).max() > 1e-3
    assert want["truncated_logits_max_diff"] > 1e-2 and want["unscaled_logits_max_diff"] > 1


def test_a_config_without_rope_gets_gpt_oss_yarn_as_in_transformers():
    """GptOssConfig gives yarn when neither rope_parameters nor rope_scaling is set: the same
    config as the published rope_scaling (theta: the top-level one, else 150000)."""
    published = ROPE_REFERENCE["gpt-oss-120b"]["config"]["rope_scaling"]
    bare = hf_config("gpt_oss", rope_parameters=None)
    hub = hf_config("gpt_oss", rope_parameters=None, rope_scaling=published, rope_theta=150000)
    cfg = config_from_hf(bare, "g")
    assert cfg == config_from_hf(hub, "g")
    assert (cfg.rope_scaling, cfg.rope_factor, cfg.rope_theta) == ("yarn", 32.0, 150000.0)
    assert (cfg.rope_original_max_positions, cfg.rope_truncate) == (4096, False)
    assert (cfg.rope_beta_fast, cfg.rope_beta_slow) == (32.0, 1.0)
    assert config_from_hf({**bare, "rope_theta": 10000.0}, "g").rope_theta == 10000.0
    # An empty rope_parameters is plain rope in transformers, not the yarn default.
    assert config_from_hf(hf_config("gpt_oss", rope_parameters={}), "g").rope_scaling == "none"


def test_gpt_oss_120b_preset_has_the_published_yarn():
    """The preset's tables are transformers' for openai/gpt-oss-120b's rope_scaling."""
    cfg, entry = get_preset("gpt-oss-120b"), ROPE_REFERENCE["gpt-oss-120b"]
    assert entry["rope_dim"] == cfg.head_dim
    np.testing.assert_allclose(inverse_frequencies(cfg, cfg.head_dim), entry["inv_freq"], 1e-6)
    assert yarn_attention_factor(cfg) == pytest.approx(entry["attention_scaling"], rel=1e-12)
    hub = {**hf_config("gpt_oss", rope_parameters=None), **entry["config"]}  # published rope
    published = config_from_hf(hub, "gpt-oss-120b")
    rope_fields = [f for f in vars(cfg) if f.startswith("rope_")]
    assert {f: getattr(published, f) for f in rope_fields} == {
        f: getattr(cfg, f) for f in rope_fields
    }


# ---- the engine: 4 devices, a failure and a rejoin -------------------------------------------
@pytest.fixture(scope="module")
def engine4(gpt_oss, devices):
    """One engine for both tests below (its 4-device programs compile once); each test leaves
    it serving on the same 4 devices. 8 experts + 4 replicas in 12 slots: a failure copies
    replicas between devices and restores the rest from the host copy."""
    cfg, params = gpt_oss
    options = EngineOptions(request_slots_per_device=1, redundant_experts=4)
    engine = Engine(cfg, params, devices[:4], options)
    coordinator = Coordinator(engine, standby=False)
    yield engine, coordinator
    coordinator.close()


def test_engine_on_four_devices_generates_transformers_tokens(engine4):
    engine, _ = engine4
    want = expected("gpt_oss")
    (request,) = engine.generate([want["prompt"]], len(want["greedy"]))
    assert list(request.generated) == want["greedy"]


def _slot_arrays(engine, name: str, layer: int) -> np.ndarray:
    return np.asarray(
        expert_weights(engine.mesh.params, moe_layer_indices(engine.cfg)[layer])[name]
    )


def test_failure_and_rejoin_move_the_biases_with_their_experts(gpt_oss, engine4):
    """A device fails mid-generation (its buffers poisoned with NaN) and comes back: its
    experts, biases included, are rebuilt elsewhere and moved back, every slot is checked
    against its expert's checksums (biases included), and the tokens stay transformers'."""
    cfg, params = gpt_oss
    engine, coordinator = engine4
    want = expected("gpt_oss")
    request = engine.submit(Request(want["prompt"], max_tokens=len(want["greedy"])))
    lost = engine.mesh.devices[2].id
    results, step = [], 0
    while engine.has_work():
        if step == 3:
            results.append(coordinator.fail([lost]))
            placed = engine.mesh.placement.phy2log
            # Every slot's biases are its expert's, on the 3 survivors.
            for j, i in enumerate(moe_layer_indices(cfg)):
                for name in EXPERT_BIASES:
                    host = expert_weights(params, i)[name]
                    np.testing.assert_array_equal(_slot_arrays(engine, name, j), host[placed[j]])
        if step == 8:
            results.append(coordinator.rejoin([lost]))
        engine.step()
        step += 1
    assert list(request.generated) == want["greedy"]
    assert sum(r.experts_copied + r.experts_restored_from_host for r in results) > 0
    for r in results:  # every written slot was checked (6 checksums each); none was wrong
        assert r.slots_verified == r.experts_copied + r.experts_restored_from_host
        assert r.slots_repaired == 0
    assert engine.mesh.slot_checksums().shape[-1] == 6
    assert len(engine.mesh.devices) == 4


# ---- per-expert arrays in checkpoints -----------------------------------------------------
def test_checkpoint_saves_and_restores_the_expert_biases(gpt_oss, tmp_path):
    cfg, params = gpt_oss
    save_checkpoint(tmp_path / "ckpt", cfg, params)
    restored_cfg, restored = restore_checkpoint(tmp_path / "ckpt")
    assert restored_cfg == cfg  # sliding_window_layers survives JSON (a list there)
    jax.tree.map(np.testing.assert_array_equal, params, restored)
    one = restore_experts(tmp_path / "ckpt", cfg, [(1, 5)])[(1, 5)]
    assert sorted(one) == sorted(expert_weight_names(cfg))
    np.testing.assert_array_equal(one["b_down"], expert_weights(params, 1)["b_down"][5])


# ---- MXFP4 -----------------------------------------------------------------------------------
def test_mxfp4_dequantization_equals_transformers():
    """transformers' convert_moe_packed_tensors on random blocks / scales (exponents from 2^-127
    to 2^20), bit for bit, in float32 and after a cast to bfloat16."""
    ref = FIXTURES / "mxfp4_dequant"
    blocks, scales = np.load(ref / "blocks.npy"), np.load(ref / "scales.npy")
    ours = dequantize_mxfp4(blocks, scales).transpose(0, 2, 1)  # HF returns [E, in, out]
    np.testing.assert_array_equal(ours, np.load(ref / "expected_float32.npy"))
    as_bf16 = ours.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(as_bf16, np.load(ref / "expected_bfloat16.npy"))
    # The shape check; under the tests' jaxtyping hook its annotation refuses first.
    with pytest.raises((ValueError, TypeError), match="do not match|groups"):
        dequantize_mxfp4(blocks, scales[..., :-1])


def test_mxfp4_hand_computed_values():
    # byte 0x1A: low nibble 0xA = -1.0 (value 0), high nibble 0x1 = +0.5 (value 1).
    blocks = np.zeros((1, 16), np.uint8)
    blocks[0, 0], blocks[0, 15] = 0x1A, 0xF7  # value 30: 0x7 = 6.0, value 31: 0xF = -6.0
    got = dequantize_mxfp4(blocks, np.array([129], np.uint8))  # 2^(129 - 127) = 4
    assert got.dtype == np.float32 and got.shape == (32,)
    assert got[:2].tolist() == [-4.0, 2.0] and got[30:].tolist() == [24.0, -24.0]
    assert not got[2:30].any()


def _copy(arch: str, tmp_path: Path) -> Path:
    out = tmp_path / arch
    shutil.copytree(FIXTURES / arch, out)
    return out


def test_mxfp4_checkpoint_problems_are_refused(tmp_path):
    directory = _copy("gpt_oss_mxfp4", tmp_path)
    path = directory / "model.safetensors"
    tensors = load_file(path)
    scales = "model.layers.1.mlp.experts.down_proj_scales"
    save_file({k: v for k, v in tensors.items() if k != scales}, path)
    with pytest.raises(CheckpointError, match=rf"down_proj_blocks comes without {scales}"):
        load_hf(directory, progress=False)
    as_float = {**tensors, scales: tensors[scales].astype(np.float32)}
    save_file(as_float, path)
    with pytest.raises(CheckpointError, match=rf"{scales}: dtype F32, expected U8"):
        load_hf(directory, progress=False)
    bf16 = {**tensors, scales: tensors[scales].copy()}
    bf16[scales][0, 0, 0] = 255  # 2^128: the dequantized weights overflow
    save_file(bf16, path)
    with pytest.raises(CheckpointError, match="down_proj_blocks holds NaN or infinite"):
        load_hf(directory, progress=False)


def test_mxfp4_loads_into_bfloat16(gpt_oss):
    cfg, params = load_hf(FIXTURES / "gpt_oss_mxfp4", dtype="bfloat16", progress=False)
    _, exact = load_hf(FIXTURES / "gpt_oss_mxfp4", progress=False)
    w = expert_weights(params, 2)["w_gate"]
    assert w.dtype == ml_dtypes.bfloat16
    # MXFP4 values have two significant bits: bfloat16 holds them exactly.
    np.testing.assert_array_equal(w.astype(np.float32), expert_weights(exact, 2)["w_gate"])


# ---- refusals --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, field",
    [
        ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0}}, "rope_parameters.rope_type"),
        ({"rope_parameters": None, "rope_scaling": {"rope_type": "yarn"}}, "rope_scaling.factor"),
        ({"quantization_config": {"quant_method": "fp8"}}, "quantization_config.quant_method"),
        (
            {"layer_types": ["sliding_attention", "chunked_attention", "full_attention"]},
            "layer_types",
        ),
    ],
)
def test_unimplemented_gpt_oss_config_is_refused_naming_the_field(changes, field):
    with pytest.raises(UnsupportedConfigError, match=field):
        config_from_hf(hf_config("gpt_oss", **changes), "g")


def test_wrong_layer_types_length_is_an_error():
    with pytest.raises(ValueError, match="layer_types must be a list of 3"):
        config_from_hf(hf_config("gpt_oss", layer_types=["full_attention"]), "g")


def test_gpt_oss_presets_are_consistent():
    big = get_preset("gpt-oss-120b")
    assert (big.num_layers, big.num_experts, big.experts_per_token, big.d_model) == (
        36,
        128,
        4,
        2880,
    )
    assert (big.num_heads, big.num_kv_heads, big.head_dim, big.vocab_size) == (64, 8, 64, 201088)
    assert big.sliding_window == 128 and big.sliding_window_layers == tuple(range(0, 36, 2))
    assert big.dtype == "bfloat16" and big.swiglu_limit == 7.0
    assert get_preset("tiny-gpt-oss").sliding_window_layers == (0, 2)
