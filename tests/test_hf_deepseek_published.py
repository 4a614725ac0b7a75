"""DeepSeek checkpoints as published: yarn RoPE and FP8 block-quantized weights.

The fixtures (tests/fixtures/hf/deepseek_v3_yarn, deepseek_v2_yarn, deepseek_v3_fp8; written by
tools/hf_fixtures/make_fixtures.py) hold transformers' float32 logits; rope_reference.json holds
transformers' yarn tables for the published DeepSeek-V3, V2-Lite and Kimi K2 configs.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from test_hf_models import FIXTURES, assert_matches_transformers, expected

from benchmarks.bench_load_fp8 import TINY, V3_CONFIG, save_tensors, write_checkpoint
from benchmarks.bench_load_fp8 import main as bench_main
from elastic_moe import Engine, EngineOptions, Request
from elastic_moe.coordinator import Coordinator
from models.config import ConfigError
from models.fp8_blocks import E4M3_TABLE, dequantize_fp8_blocks_into
from models.hf_config import UnsupportedConfigError, config_from_hf
from models.hf_loader import CheckpointError, SafetensorsFile, load_hf
from models.presets import get_preset
from models.rope import inverse_frequencies, mla_softmax_scale, yarn_attention_factor

PUBLISHED = ["deepseek_v3_yarn", "deepseek_v2_yarn", "deepseek_v3_fp8"]
ROPE_REFERENCE = json.loads((FIXTURES / "rope_reference.json").read_text())
FP8_WEIGHT = "model.layers.0.mlp.gate_proj.weight"  # [200, 136]: 2 x 2 blocks, ragged both ways


# ---- against transformers -------------------------------------------------------------------
@pytest.mark.parametrize("arch", PUBLISHED)
def test_logits_and_greedy_match_transformers(arch, loaded):
    cfg, params = loaded(arch)
    assert cfg.rope_scaling == "yarn"
    # The fixture exercises the scaling: plain rope moves transformers' logits this much.
    assert expected(arch)["unscaled_logits_max_diff"] > 1.0
    assert_matches_transformers(arch, cfg, params)


@pytest.mark.parametrize("arch", PUBLISHED)
def test_yarn_tables_and_softmax_scale_of_the_fixture_match_transformers(arch, loaded):
    cfg, _ = loaded(arch)
    want = expected(arch)
    np.testing.assert_allclose(
        inverse_frequencies(cfg, cfg.qk_rope_head_dim), want["rope_inv_freq"], rtol=1e-6
    )
    assert yarn_attention_factor(cfg) == pytest.approx(want["rope_attention_scaling"], rel=1e-12)
    assert mla_softmax_scale(cfg) == pytest.approx(want["softmax_scale"], rel=1e-12)


def _published_config(entry: dict) -> dict:
    """A loadable config.json around a published rope config (sizes are irrelevant to rope)."""
    sizes = dict(
        hidden_size=64,
        num_attention_heads=2,
        num_hidden_layers=2,
        vocab_size=16,
        num_experts_per_tok=1,
        n_routed_experts=2,
        num_local_experts=2,
        kv_lora_rank=8,
        v_head_dim=8,
        moe_intermediate_size=4,
        intermediate_size=4,
    )
    return {**sizes, **entry["config"]}


@pytest.mark.parametrize("name", sorted(ROPE_REFERENCE))
def test_published_rope_configs_match_transformers(name):
    entry = ROPE_REFERENCE[name]
    cfg = config_from_hf(_published_config(entry), name)
    scaling = entry["config"]["rope_scaling"]
    assert cfg.rope_scaling == scaling.get("type", scaling.get("rope_type"))  # hub: either key
    np.testing.assert_allclose(
        inverse_frequencies(cfg, entry["rope_dim"]), entry["inv_freq"], rtol=1e-6
    )
    if cfg.rope_scaling == "yarn":
        assert yarn_attention_factor(cfg) == pytest.approx(entry["attention_scaling"], rel=1e-12)
    if "softmax_scale" in entry:
        assert mla_softmax_scale(cfg) == pytest.approx(entry["softmax_scale"], rel=1e-12)


@pytest.mark.parametrize(
    "preset, published", [("deepseek-v3", "deepseek-v3"), ("kimi-k2", "kimi-k2")]
)
def test_presets_have_the_published_yarn(preset, published):
    cfg, entry = get_preset(preset), ROPE_REFERENCE[published]
    # rtol 1e-6 (a few float32 ulps): numpy's float32 power moved by an ulp between releases
    np.testing.assert_allclose(
        inverse_frequencies(cfg, cfg.qk_rope_head_dim), entry["inv_freq"], rtol=1e-6
    )
    assert mla_softmax_scale(cfg) == pytest.approx(entry["softmax_scale"], rel=1e-12)
    assert yarn_attention_factor(cfg) == entry["attention_scaling"] == 1.0


def test_hub_rope_scaling_and_transformers_rope_parameters_give_the_same_config():
    tf5 = json.loads((FIXTURES / "deepseek_v3_yarn" / "config.json").read_text())
    hub = {k: v for k, v in tf5.items() if k not in ("rope_parameters", "head_dim", "qk_head_dim")}
    scaling = {
        k: v for k, v in tf5["rope_parameters"].items() if k not in ("rope_type", "rope_theta")
    }
    hub |= {"rope_theta": 10000.0, "rope_scaling": {**scaling, "type": "yarn"}}
    assert config_from_hf(hub, "v3") == config_from_hf(tf5, "v3")
    # `rope_scaling` wins over `rope_parameters`, as in transformers.
    both = {**tf5, "rope_scaling": {**scaling, "type": "yarn", "factor": 8.0}}
    assert config_from_hf(both, "v3").rope_factor == 8.0
    linear = config_from_hf({**tf5, "rope_parameters": {"rope_type": "linear", "factor": 2}}, "v3")
    assert (linear.rope_scaling, linear.rope_factor) == ("linear", 2.0)


@pytest.mark.parametrize(
    "rope, field",
    [
        ({"rope_type": "dynamic", "factor": 2.0}, "rope_parameters.rope_type"),
        ({"rope_type": "yarn", "original_max_position_embeddings": 32}, "rope_parameters.factor"),
        ({"rope_type": "yarn", "factor": 4, "mscale": -1}, "rope_parameters.mscale"),
        ({"rope_type": "yarn", "factor": 4, "partial_rotary_factor": 0.5}, "partial_rotary_factor"),
        ({"rope_type": "yarn", "factor": 4, "beta_fast": 1, "beta_slow": 2}, "rope_beta_slow"),
        ({"rope_type": "yarn", "factor": 0.5}, "rope_factor"),
    ],
)
def test_bad_rope_scaling_is_refused_naming_the_field(rope, field):
    config = json.loads((FIXTURES / "deepseek_v3_yarn" / "config.json").read_text())
    with pytest.raises(ConfigError, match=field):
        config_from_hf({**config, "rope_parameters": {"rope_theta": 10000.0, **rope}}, "v3")


# ---- the engine: 4 devices, a failure and a rejoin --------------------------------------------
# deepseek_v3_fp8 on 4 devices runs in the failure test below; v3_yarn adds little to v2_yarn.
ENGINE_ARCHS = [
    "deepseek_v2_yarn",
    *(pytest.param(a, marks=pytest.mark.slow) for a in PUBLISHED[::2]),
]


@pytest.mark.parametrize("arch", ENGINE_ARCHS)
def test_engine_on_four_devices_generates_transformers_tokens(arch, loaded, devices):
    cfg, params = loaded(arch)
    want = expected(arch)
    engine = Engine(cfg, params, devices[:4], EngineOptions(request_slots_per_device=1))
    (request,) = engine.generate([want["prompt"]], len(want["greedy"]))
    assert list(request.generated) == want["greedy"]


def test_tokens_unchanged_through_a_failure_and_a_rejoin(loaded, devices):
    """FP8 + yarn (the published layout) on 4 devices: 8 requests run failure-free, then again
    while device 2 fails mid-decode and later rejoins; its requests are re-prefilled on the
    survivors and every token is the failure-free one (the first prompt's: transformers')."""
    cfg, params = loaded("deepseek_v3_fp8")
    want = expected("deepseek_v3_fp8")
    p = want["prompt"]
    prompts = [p, p[:9], p[3:], p[::2], p[5:12], p[1:], p[::-1], p[2:14]]
    n_new = len(want["greedy"])
    # 4 redundant slots: 3 survivors x 4 slots still hold the 8 experts.
    options = EngineOptions(request_slots_per_device=2, redundant_experts=4)
    engine = Engine(cfg, params, devices[:4], options)
    baseline = [list(r.generated) for r in engine.generate(prompts, n_new)]
    assert baseline[0] == want["greedy"]
    coordinator = Coordinator(engine, standby=False)
    requests = [engine.submit(Request(prompt, max_tokens=n_new)) for prompt in prompts]
    lost = engine.mesh.devices[2].id
    step = 0
    while engine.has_work():
        if step == 4:
            coordinator.fail([lost])
        if step == 9:
            coordinator.rejoin([lost])
        engine.step()
        step += 1
        assert step < 200
    causes = [h.cause for h in coordinator.history]
    assert causes[0].startswith(f"fail [{lost}]") and causes[1].startswith("rejoin")
    assert sum(r.reprefills for r in requests) >= 1
    assert [list(r.generated) for r in requests] == baseline


# ---- FP8 block weights ------------------------------------------------------------------------
def _random_fp8(shape, rng) -> np.ndarray:
    codes = rng.integers(0, 256, size=shape, dtype=np.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0x38  # 0x7F / 0xFF are NaN in e4m3fn; 0x38 is 1.0
    return codes.view(ml_dtypes.float8_e4m3fn)


def test_fp8_dequantization_of_a_ragged_tensor_in_128_blocks():
    """[300, 200] in [128, 128] blocks: a 3 x 2 scale grid, the last blocks 44 rows / 72 cols."""
    rng = np.random.default_rng(0)
    weight = _random_fp8((300, 200), rng)
    scale_inv = rng.uniform(1e-4, 1e-2, size=(3, 2)).astype(np.float32)
    rows, cols = np.arange(300)[:, None] // 128, np.arange(200)[None, :] // 128
    want = weight.astype(np.float64) * scale_inv[rows, cols].astype(np.float64)  # per element
    got = np.empty((300, 200), np.float32)
    dequantize_fp8_blocks_into(got, weight, scale_inv, (128, 128))
    np.testing.assert_allclose(got, want, rtol=1e-7)
    # Into a transposed bfloat16 kernel [in, out], as the loader writes it.
    kernel = np.empty((200, 300), ml_dtypes.bfloat16)
    dequantize_fp8_blocks_into(kernel.T, weight, scale_inv, (128, 128))
    np.testing.assert_array_equal(kernel.T, got.astype(ml_dtypes.bfloat16))
    with pytest.raises(ValueError, match=r"weight_scale_inv has shape \[2, 2\].*needs \[3, 2\]"):
        dequantize_fp8_blocks_into(got, weight, scale_inv[:2], (128, 128))
    nan = weight.copy()
    nan.view(np.uint8)[299, 150] = 0x7F
    with pytest.raises(FloatingPointError, match=r"\[299, 150\]"):
        dequantize_fp8_blocks_into(got, nan, scale_inv, (128, 128))


def test_fp8_checkpoint_holds_fp8_and_loads_in_bfloat16(loaded):
    cfg, params = loaded("deepseek_v3_fp8")
    tensors = _tensors("deepseek_v3_fp8")
    assert tensors[FP8_WEIGHT].dtype == ml_dtypes.float8_e4m3fn
    assert tensors[FP8_WEIGHT + "_scale_inv"].shape == (2, 2)
    assert tensors["model.layers.1.mlp.gate.weight"].dtype == np.float32  # router: not FP8
    cfg16, params16 = load_hf(FIXTURES / "deepseek_v3_fp8", dtype="bfloat16", progress=False)
    assert cfg16.dtype == "bfloat16"
    assert params16["layers"][0]["mlp"]["gate"]["kernel"].dtype == ml_dtypes.bfloat16
    # Dequantized in float32, then rounded once to bfloat16 (leaves the model keeps in float32,
    # such as the router, stay float32).
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a.astype(b.dtype), b), params, params16)


# ---- refusals -------------------------------------------------------------------------------
def _tensors(arch: str) -> dict[str, np.ndarray]:
    """Every tensor of the fixture (safetensors.numpy cannot read FP8; ml_dtypes can)."""
    file = SafetensorsFile(FIXTURES / arch / "model.safetensors")
    return {name: file.read_raw(name) for name in file.tensors}


def _broken_fp8(tmp_path: Path, edit=None, config_edit=None) -> Path:
    directory = tmp_path / "deepseek_v3_fp8"
    shutil.copytree(FIXTURES / "deepseek_v3_fp8", directory)
    if edit is not None:
        tensors = _tensors("deepseek_v3_fp8")
        edit(tensors)
        save_tensors(directory / "model.safetensors", tensors)
    if config_edit is not None:
        config = json.loads((directory / "config.json").read_text())
        config_edit(config)
        (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize(
    "quant, field",
    [
        ({"quant_method": "awq"}, "quant_method"),
        ({"fmt": "e5m2"}, "fmt"),
        ({"activation_scheme": "static"}, "activation_scheme"),
        ({"weight_block_size": [64, 64]}, "weight_block_size"),
        ({"weight_block_size": None}, "weight_block_size"),
    ],
)
def test_other_quantization_is_refused_naming_the_field(quant, field):
    config = json.loads((FIXTURES / "deepseek_v3_fp8" / "config.json").read_text())
    config["quantization_config"] = {**config["quantization_config"], **quant}
    with pytest.raises(UnsupportedConfigError, match=rf"quantization_config\.{field}"):
        config_from_hf(config, "v3")


SCALE = FP8_WEIGHT + "_scale_inv"
ROUTER = "model.layers.1.mlp.gate.weight"


@pytest.mark.parametrize(
    "edit, config_edit, message",
    [
        (lambda t: t.pop(SCALE), None, rf"tensor {FP8_WEIGHT} is F8_E4M3 but {SCALE} is missing"),
        (
            lambda t: t.update({SCALE: t[SCALE][:1]}),
            None,
            rf"tensor {SCALE} has shape \[1, 2\].*needs \[2, 2\]",
        ),
        (
            lambda t: t.update({ROUTER + "_scale_inv": np.ones((1, 2), np.float32)}),
            None,
            rf"tensor {ROUTER}_scale_inv scales {ROUTER}, which is not an F8_E4M3 tensor \(F32\)",
        ),
        (
            lambda t: t.pop(FP8_WEIGHT),
            None,
            rf"tensor {SCALE} scales {FP8_WEIGHT}, which is not an F8_E4M3 tensor \(missing\)",
        ),
        (None, lambda c: c.pop("quantization_config"), r"FP8 scale, but config\.json has no"),
        (
            lambda t: t.update({SCALE: np.full((2, 2), np.inf, np.float32)}),
            None,
            rf"tensor {SCALE} holds NaN or infinite",
        ),
        (
            lambda t: t[FP8_WEIGHT].view(np.uint8).__setitem__((199, 135), 0xFF),
            None,
            rf"tensor {FP8_WEIGHT}: NaN or infinite value after dequantization at \[199, 135\]",
        ),
    ],
)
def test_broken_fp8_checkpoints_are_refused_naming_file_and_tensor(
    tmp_path, edit, config_edit, message
):
    directory = _broken_fp8(tmp_path, edit, config_edit)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: .*{message}"):
        load_hf(directory, progress=False)


def test_fp8_weights_without_quantization_config_are_refused(tmp_path):
    def strip_scales(t):
        for name in [n for n in t if n.endswith("_scale_inv")]:
            del t[name]

    directory = _broken_fp8(tmp_path, strip_scales, lambda c: c.pop("quantization_config"))
    with pytest.raises(CheckpointError, match=r"is F8_E4M3, but config\.json has no quantization"):
        load_hf(directory, progress=False)


# ---- the GPU machine's script, on CPU ---------------------------------------------------------
def test_bench_checkpoint_has_the_published_layout_and_loads(tmp_path):
    cfg = dict(V3_CONFIG, **TINY, num_hidden_layers=2)
    total = write_checkpoint(tmp_path, cfg, shard_bytes=2e6)
    files = sorted(tmp_path.glob("*.safetensors"))
    assert len(files) >= 2 and total == sum(f.stat().st_size for f in files)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    weight = "model.layers.0.mlp.down_proj.weight"  # [320, 400]: 3 x 4 blocks, ragged both ways
    file = SafetensorsFile(tmp_path / index["weight_map"][weight])
    assert file.tensors[weight].dtype == "F8_E4M3" and file.tensors[weight].shape == (320, 400)
    assert file.tensors[weight + "_scale_inv"].shape == (3, 4)
    assert index["weight_map"][weight + "_scale_inv"] == index["weight_map"][weight]
    assert file.tensors["model.layers.0.input_layernorm.weight"].dtype == "BF16"
    loaded_cfg, params = load_hf(tmp_path, progress=False)
    assert (loaded_cfg.dtype, loaded_cfg.rope_scaling, loaded_cfg.rope_factor) == (
        "bfloat16",
        "yarn",
        40,
    )
    kernel = params["layers"][0]["mlp"]["down"]["kernel"].astype(np.float32)  # [400, 320]
    assert kernel.shape == (400, 320) and 1e-4 < np.abs(kernel).mean() < 1e-2


@pytest.mark.slow
def test_bench_load_fp8_tiny_serves_through_a_failure(tmp_path):
    argv = ["--tiny", "--layers", "2", "--dir", str(tmp_path), "--devices", "2"]
    outcome = bench_main([*argv, "--requests", "2", "--max-tokens", "5"])
    assert outcome["unchanged"] is True and len(outcome["baseline"]) == 2


# ---- parallel loading (models/parallel_load.py) ---------------------------------------------
def test_parallel_load_is_bit_identical_to_one_worker_and_names_a_broken_tensor(tmp_path):
    """A tiny real-layout FP8 checkpoint (ragged 128-blocks, bf16 embeddings and norms, fp32
    router bias) in several shards: 4 threads give exactly the params of 1; the FP8 path agrees
    with the float32 lookup-table reference; a NaN in one late tensor (a worker's, not the
    first) fails the load naming its file and tensor."""
    cfg = dict(V3_CONFIG, num_hidden_layers=2) | TINY
    write_checkpoint(tmp_path, cfg, shard_bytes=2e5)
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    _, serial = load_hf(tmp_path, progress=False, workers=1)
    _, parallel = load_hf(tmp_path, progress=False, workers=4)
    same = jax.tree.map(
        lambda a, b: a.dtype == b.dtype and a.tobytes() == b.tobytes(), serial, parallel
    )
    assert all(jax.tree.leaves(same))
    # The FP8 kernels equal float32(table[byte]) * scale rounded once to bfloat16.
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    file = SafetensorsFile(tmp_path / index[name])
    scale_file = SafetensorsFile(tmp_path / index[name + "_scale_inv"])
    codes, scale = file.read_raw(name).view(np.uint8), scale_file.read_raw(name + "_scale_inv")
    rows, cols = np.arange(codes.shape[0])[:, None] // 128, np.arange(codes.shape[1])[None] // 128
    want = (E4M3_TABLE[codes] * scale[rows, cols]).astype(ml_dtypes.bfloat16)
    got = parallel["layers"][1]["mlp"]["experts"]["w_down"][3]
    np.testing.assert_array_equal(got.T.view(np.uint16), want.view(np.uint16))

    broken = "model.layers.1.mlp.experts.11.up_proj.weight"
    path = tmp_path / index[broken]
    info = SafetensorsFile(path).tensors[broken]
    raw = bytearray(path.read_bytes())
    raw[info.start + 5 * info.shape[1] + 7] = 0xFF  # NaN at [5, 7]
    path.write_bytes(bytes(raw))
    message = (
        rf"{path.name}: tensor {broken}: NaN or infinite value after dequantization at \[5, 7\]"
    )
    for workers in (1, 4):
        with pytest.raises(CheckpointError, match=message):
            load_hf(tmp_path, progress=False, workers=workers)
