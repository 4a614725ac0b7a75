"""Orbax checkpoints: round trips, per-expert partial restore, sharded restore, model loading."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest
import tensorstore as ts

from elastic_moe.checkpoint import (
    CheckpointError,
    load_model,
    load_model_dir,
    restore_checkpoint,
    restore_experts,
    save_checkpoint,
)
from models.hf_loader import load_hf
from models.params import abstract_params, init_params, moe_layer_indices
from models.presets import get_preset
from models.tokenizer import ByteTokenizer, HFTokenizer

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def assert_same_params(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        assert np.asarray(x).dtype == np.asarray(y).dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def random_params(cfg, seed: int):
    """Random arrays of the params' shapes and dtypes (faster than init_params for round trips)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: rng.standard_normal(s.shape, np.float32).astype(s.dtype), abstract_params(cfg)
    )


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """tiny-deepseek-v3 (dense first layer, router bias, shared expert) saved once."""
    cfg = get_preset("tiny-deepseek-v3")
    params = random_params(cfg, seed=3)
    directory = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "v3", cfg, params)
    return directory, cfg, params


def test_round_trip_on_host(saved):
    directory, cfg, params = saved
    restored_cfg, restored = restore_checkpoint(directory)
    assert restored_cfg == cfg
    assert all(isinstance(a, np.ndarray) for a in jax.tree.leaves(restored))
    assert_same_params(params, restored)


def test_round_trip_one_moe_layer_per_orbax_call(saved, monkeypatch):
    import elastic_moe.checkpoint as checkpoint

    directory, _, params = saved
    monkeypatch.setattr(checkpoint, "EXPERT_RESTORE_BYTES", 1)
    assert_same_params(params, restore_checkpoint(directory)[1])


def test_save_from_device_arrays(tmp_path, devices):
    cfg = get_preset("tiny-qwen3-moe")
    params = random_params(cfg, seed=2)
    mesh = jax.sharding.Mesh(np.array(devices[:2]), ("x",))
    on_devices = jax.device_put(params, jax.sharding.NamedSharding(mesh, jax.P()))
    save_checkpoint(tmp_path / "dev", cfg, on_devices)
    assert_same_params(params, restore_checkpoint(tmp_path / "dev")[1])


def test_round_trip_bfloat16(tmp_path):
    cfg = get_preset("tiny-mixtral").replace(dtype="bfloat16")
    params = random_params(cfg, seed=1)
    save_checkpoint(tmp_path / "bf16", cfg, params)
    restored_cfg, restored = restore_checkpoint(tmp_path / "bf16")
    assert restored_cfg.dtype == "bfloat16"
    assert_same_params(params, restored)


def test_checkpoint_stores_each_expert_separately(saved):
    directory, cfg, _ = saved
    manifest = json.loads((directory / "elastic_moe.json").read_text())
    assert manifest["config"]["name"] == cfg.name
    tree = json.loads((directory / "state" / "_METADATA").read_text())["tree_metadata"]
    keys = {k for k in tree if k.startswith("('experts'")}
    assert len(keys) == cfg.num_moe_layers * cfg.num_experts * 3
    assert "('experts', '1', '15', 'w_down')" in keys


def _file_bytes_read() -> int:
    metrics = ts.experimental_collect_matching_metrics("/tensorstore/kvstore/file/bytes_read")
    return sum(v["value"] for m in metrics for v in m["values"])


def test_restore_experts_reads_only_the_chosen_experts(saved):
    directory, cfg, params = saved
    chosen = [(0, 3), (1, 15), (1, 0)]
    before = _file_bytes_read()
    experts = restore_experts(directory, cfg, chosen)
    read = _file_bytes_read() - before
    assert sorted(experts) == sorted(chosen)
    for (j, e), weights in experts.items():
        stacks = params["layers"][moe_layer_indices(cfg)[j]]["mlp"]["experts"]
        assert sorted(weights) == ["w_down", "w_gate", "w_up"]
        for name, array in weights.items():
            np.testing.assert_array_equal(array, stacks[name][e])
    one_expert = cfg.expert_bytes()  # float32: 3 * d * f * 4
    all_experts = cfg.num_moe_layers * cfg.num_experts * one_expert
    assert read < 2 * len(chosen) * one_expert < all_experts / 4, (read, all_experts)
    with pytest.raises(CheckpointError, match=r"no expert \(2, 0\)"):
        restore_experts(directory, cfg, [(2, 0)])


def test_restore_dense_leaves_to_shardings(saved, devices):
    directory, cfg, params = saved
    mesh = jax.sharding.Mesh(np.array(devices[:4]), ("x",))
    replicated = jax.sharding.NamedSharding(mesh, jax.P())
    _, restored = restore_checkpoint(directory, shardings=replicated)
    embed = restored["layers"][1]["attn"]["q_b_proj"]["kernel"]
    assert isinstance(embed, jax.Array) and embed.sharding == replicated
    assert isinstance(restored["layers"][1]["mlp"]["experts"]["w_gate"], np.ndarray)
    assert_same_params(params, restored)


def test_save_refuses_wrong_shapes_and_existing_dirs(saved, tmp_path):
    directory, cfg, params = saved
    with pytest.raises(CheckpointError, match="not empty"):
        save_checkpoint(directory, cfg, params)
    other = get_preset("tiny-mixtral")
    with pytest.raises(CheckpointError, match="params"):
        save_checkpoint(tmp_path / "bad", other, params)


def test_hf_checkpoint_through_orbax_and_tokenizer(tmp_path):
    cfg, params = load_hf(FIXTURES / "deepseek_v2", progress=False)
    tokenizer_json = _word_level_json(cfg.vocab_size)
    save_checkpoint(tmp_path / "v2", cfg, params, tokenizer_json)
    restored_cfg, restored, tokenizer = load_model_dir(tmp_path / "v2")
    assert restored_cfg == cfg
    assert_same_params(params, restored)
    assert isinstance(tokenizer, HFTokenizer)
    assert tokenizer.decode(tokenizer.encode("hello world")) == "hello world"


def _word_level_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece()  # joins words with spaces
    assert tokenizer.get_vocab_size() <= vocab_size
    return tokenizer.to_str()


def test_load_model_dir_detects_the_format(tmp_path):
    cfg, params, tokenizer = load_model_dir(FIXTURES / "qwen3_moe_sharded")
    assert cfg.architecture == "qwen3_moe" and isinstance(tokenizer, ByteTokenizer)
    assert tokenizer.vocab_size == cfg.vocab_size
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "notes.txt").write_text("nothing here")
    with pytest.raises(CheckpointError, match="neither an elastic-moe checkpoint"):
        load_model_dir(tmp_path / "junk")
    with pytest.raises(CheckpointError, match="no such directory"):
        load_model_dir(tmp_path / "absent")


def test_load_model_accepts_a_preset_or_a_directory(saved):
    cfg, params, tokenizer = load_model("tiny-mixtral")
    assert cfg == get_preset("tiny-mixtral")
    assert_same_params(init_params(cfg, seed=0), params)
    assert tokenizer.encode("hi") == [104, 105]
    directory, saved_cfg, _ = saved
    assert load_model(str(directory))[0] == saved_cfg
    with pytest.raises(CheckpointError, match="tiny-mixtral"):
        load_model("no-such-model")


def test_saved_on_eight_devices_restored_on_three_generates_the_same(tmp_path, devices):
    """Arrays split over 8 devices are saved by orbax shard by shard, and restored straight onto
    a 3-device mesh: the values and the generated tokens are those of the host copy."""
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from elastic_moe.engine import Engine, EngineOptions

    cfg = get_preset("tiny-mixtral")
    params = init_params(cfg, seed=7)
    prompts = [[5, 17, 99, 3], [200, 1, 42]]
    eight_engine = Engine(cfg, params, devices[:8], EngineOptions())
    before = [r.generated for r in eight_engine.generate(prompts, 8)]

    eight = Mesh(np.array(devices[:8]), ("d",))

    def split_over_eight(x):  # the leading axis over the 8 devices where it divides
        spec = P("d") if x.ndim and x.shape[0] % 8 == 0 else P()
        return jax.device_put(x, NamedSharding(eight, spec))

    on_devices = jax.tree.map(split_over_eight, params)
    leaves = jax.tree.leaves(on_devices)
    assert all(len(x.sharding.device_set) == 8 for x in leaves)
    assert sum(not x.sharding.is_fully_replicated for x in leaves) > len(leaves) // 2
    save_checkpoint(tmp_path / "ckpt", cfg, on_devices)

    three = NamedSharding(Mesh(np.array(devices[:3]), ("d",)), P())
    restored_cfg, restored = restore_checkpoint(tmp_path / "ckpt", shardings=three)
    dense = [x for x in jax.tree.leaves(restored) if isinstance(x, jax.Array)]
    assert dense and all(x.sharding.device_set == set(devices[:3]) for x in dense)
    assert_same_params(params, restored)
    after = Engine(restored_cfg, restored, devices[:3], EngineOptions()).generate(prompts, 8)
    assert [r.generated for r in after] == before
