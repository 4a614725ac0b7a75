"""Hostile model directories (issue 11): configs of the wrong shape or size, corrupt tokenizers,
NaN weights, shard names that leave the directory. The loader refuses each with an error naming
the file (and the tensor), before it builds anything; the CLI prints that as one line, exit 1.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from elastic_moe.checkpoint import restore_checkpoint, restore_experts, save_checkpoint
from models.hf_loader import CheckpointError, load_hf
from models.params import init_params, moe_layer_indices
from models.presets import get_preset
from models.tokenizer import load_tokenizer
from serve.cli import main

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
EXPERT = "model.layers.1.block_sparse_moe.experts.5.w3.weight"


@pytest.fixture
def mixtral(tmp_path) -> Path:
    """A copy of the tiny Mixtral fixture (2 layers, 8 experts, hidden 40) to break."""
    return Path(shutil.copytree(FIXTURES / "mixtral", tmp_path / "mixtral"))


def edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def edit_tensors(directory: Path, edit) -> None:
    tensors = dict(load_file(directory / "model.safetensors"))
    edit(tensors)
    save_file(tensors, directory / "model.safetensors")


def generate(directory: Path, capsys, monkeypatch) -> str:
    """`elastic-moe generate --checkpoint DIR ...` in this process: its one stderr line."""
    monkeypatch.setenv("ELASTIC_MOE_NO_COMPILATION_CACHE", "1")
    args = ["generate", "--checkpoint", str(directory), "--prompt-tokens", "1,2"]
    code = main([*args, "--max-tokens", "2", "--devices", "2"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 1 and len(lines) == 1, (code, lines)
    assert lines[0].startswith("elastic-moe: error: "), lines
    return lines[0]


# ---- config.json ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "content, needle",
    [
        ("[1, 2]", "not a JSON object but a list"),
        ("null", "not a JSON object but null"),
        ('"mixtral"', "not a JSON object but a str"),
    ],
)
def test_a_config_that_is_not_an_object(mixtral, capsys, monkeypatch, content, needle):
    (mixtral / "config.json").write_text(content)
    assert f"config.json: {needle}" in generate(mixtral, capsys, monkeypatch)


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"num_attention_heads": 0}, "num_attention_heads must be at least 1, got 0"),
        ({"num_hidden_layers": 2.5}, "num_hidden_layers must be an integer, got 2.5"),
        ({"hidden_size": "40"}, "hidden_size must be an integer, got '40'"),
        ({"num_local_experts": True}, "num_local_experts must be an integer, got True"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps must be a finite number"),
        ({"rope_parameters": [1]}, "rope_parameters must be an object"),
        ({"quantization_config": "fp8"}, "quantization_config must be an object"),
    ],
)
def test_config_fields_of_the_wrong_type_or_range(mixtral, capsys, monkeypatch, changes, needle):
    edit_config(mixtral, **changes)
    with pytest.raises(CheckpointError, match="config.json: " + needle.replace("(", r"\(")):
        load_hf(mixtral, progress=False)
    assert needle in generate(mixtral, capsys, monkeypatch)


def test_a_config_that_is_not_utf8_is_named(mixtral, capsys, monkeypatch):
    (mixtral / "config.json").write_bytes(b'{"model_type": "mixtral\xff\xfe"}')
    assert "config.json: not UTF-8 text" in generate(mixtral, capsys, monkeypatch)


@pytest.mark.parametrize(
    "changes, needle",
    [
        ({"num_hidden_layers": 1_000_000}, "num_hidden_layers is 1000000, but the safetensors"),
        ({"num_local_experts": 10**9}, "1000000000 routed experts per layer, but the safetensors"),
        ({"hidden_size": 10**9, "head_dim": 10}, "has shape [160, 40], but config.json implies"),
        ({"intermediate_size": 10**9}, "has shape [24, 40], but config.json implies"),
    ],
)
def test_sizes_the_files_do_not_hold_fail_before_anything_is_built(mixtral, changes, needle):
    """The loader once built the abstract model of 10^6 layers before looking at a tensor."""
    edit_config(mixtral, **changes)
    started = time.perf_counter()
    with pytest.raises(CheckpointError) as error:
        load_hf(mixtral, progress=False)
    assert needle in str(error.value)
    assert time.perf_counter() - started < 5, "the loader did work proportional to config sizes"


# ---- weights ---------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_weights_are_refused_naming_the_tensor(mixtral, capsys, monkeypatch, bad):
    def poison(tensors):
        tensors[EXPERT] = tensors[EXPERT].copy()
        tensors[EXPERT][3, 7] = bad

    edit_tensors(mixtral, poison)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: tensor {EXPERT} holds NaN"):
        load_hf(mixtral, progress=False)
    assert f"tensor {EXPERT} holds NaN or infinite values" in generate(mixtral, capsys, monkeypatch)


def test_nan_in_a_fused_expert_tensor_is_refused(mixtral):
    """transformers-5 layout: [E, 2I, H], read one expert at a time."""

    def fuse(tensors):
        for layer in (0, 1):
            moe = f"model.layers.{layer}.block_sparse_moe."
            gate_up = [
                np.concatenate([tensors.pop(f"{moe}experts.{e}.w1.weight"),
                                tensors.pop(f"{moe}experts.{e}.w3.weight")])
                for e in range(8)
            ]  # fmt: skip
            down = [tensors.pop(f"{moe}experts.{e}.w2.weight") for e in range(8)]
            tensors[f"{moe}experts.gate_up_proj"] = np.stack(gate_up)
            tensors[f"{moe}experts.down_proj"] = np.stack(down)
        tensors["model.layers.1.block_sparse_moe.experts.down_proj"][6, 0, 0] = np.nan

    edit_tensors(mixtral, fuse)
    with pytest.raises(CheckpointError, match="experts.down_proj holds NaN"):
        load_hf(mixtral, progress=False)


def test_nan_in_an_orbax_checkpoint_is_refused_naming_the_tensor(tmp_path, capsys, monkeypatch):
    cfg = get_preset("tiny-mixtral")
    params = init_params(cfg, seed=0)
    q_proj = params["layers"][1]["attn"]["q_proj"]
    q_proj["kernel"] = np.array(q_proj["kernel"])  # a writable copy
    q_proj["kernel"][2, 3] = np.nan
    directory = save_checkpoint(tmp_path / "orbax", cfg, params)
    line = generate(directory, capsys, monkeypatch)
    assert "tensor layers/1/attn/q_proj/kernel holds NaN or infinite values" in line


# ---- tokenizer.json and the shard index ---------------------------------------------------
@pytest.mark.parametrize(
    "content, needle",
    [
        (b"{not json", "not a tokenizer the tokenizers library reads"),
        (b'{"model": 3}', "not a tokenizer the tokenizers library reads"),
        (b"\xff\xfe\x00", "not UTF-8 text"),
    ],
)
def test_a_corrupt_tokenizer_is_named(mixtral, capsys, monkeypatch, content, needle):
    (mixtral / "tokenizer.json").write_bytes(content)
    with pytest.raises(ValueError, match=f"tokenizer.json: {needle}"):
        load_tokenizer(mixtral, 160)
    assert f"tokenizer.json: {needle}" in generate(mixtral, capsys, monkeypatch)


@pytest.fixture
def sharded(tmp_path) -> Path:
    return Path(shutil.copytree(FIXTURES / "qwen3_moe_sharded", tmp_path / "sharded"))


def edit_index(directory: Path, edit) -> None:
    path = directory / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    edit(index["weight_map"])
    path.write_text(json.dumps(index))


@pytest.mark.parametrize(
    "shard, needle",
    [
        ("../../outside/x.safetensors", "is not a file inside the model directory"),
        ("/etc/x.safetensors", "is not a file inside the model directory"),
        ("sub/../../x.safetensors", "is not a file inside the model directory"),
        ("config.json", "is not a .safetensors file"),
    ],
)
def test_a_shard_outside_the_model_directory_is_refused(sharded, tmp_path, shard, needle):
    outside = tmp_path / "outside"
    outside.mkdir()
    first = next(iter(json.loads((sharded / "model.safetensors.index.json").read_text())
                      ["weight_map"].values()))  # fmt: skip
    shutil.copy(sharded / first, outside / "x.safetensors")  # a real file, so only the name fails
    edit_index(sharded, lambda weights: weights.update({next(iter(weights)): shard}))
    with pytest.raises(CheckpointError, match=rf"index\.json: shard '{shard}' {needle}"):
        load_hf(sharded, progress=False)


def test_an_index_of_the_wrong_shape_is_refused(sharded):
    edit_index(sharded, lambda weights: weights.update({next(iter(weights)): 7}))
    with pytest.raises(CheckpointError, match="weight_map must map tensor names to file names"):
        load_hf(sharded, progress=False)


def test_nan_in_a_restored_expert_is_refused_by_the_restore_itself(tmp_path):
    """A restore after a failure reads experts straight from the checkpoint: checked there."""
    cfg = get_preset("tiny-mixtral")
    params = init_params(cfg, seed=0)
    moe = moe_layer_indices(cfg)[0]
    experts = params["layers"][moe]["mlp"]["experts"]
    experts["w_up"] = np.array(experts["w_up"])
    experts["w_up"][5, 0, 1] = np.inf
    directory = save_checkpoint(tmp_path / "orbax", cfg, params)
    assert restore_experts(directory, cfg, [(0, 4)])[(0, 4)]["w_up"].shape
    with pytest.raises(CheckpointError, match="MoE layer/expert 0/5/w_up holds NaN or infinite"):
        restore_experts(directory, cfg, [(0, 4), (0, 5)])
    with pytest.raises(CheckpointError, match="holds NaN or infinite"):
        restore_checkpoint(directory)
