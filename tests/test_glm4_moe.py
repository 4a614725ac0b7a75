"""GLM-4.5 / 4.6 (`glm4_moe`): config mapping, refusals, the multi-token-prediction layer, and
the transformers tokens through a failure and a rejoin.

Logits against transformers (glm4_moe and the glm4_moe_air variant) and the 4-device engine run
are in test_hf_models.py with the other architectures.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from elastic_moe import Engine, EngineOptions, Request
from elastic_moe.coordinator import Coordinator
from elastic_moe.faults import FaultInjector, GuardedStepper
from models.config import ConfigError
from models.hf_config import UnsupportedConfigError, config_from_hf
from models.hf_loader import CheckpointError, load_hf
from models.reference import forward_logits

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
GLM = FIXTURES / "glm4_moe"


@pytest.fixture(scope="module")
def glm():
    return load_hf(GLM, progress=False)


def hf_config(arch: str = "glm4_moe", **changes) -> dict:
    return {**json.loads((FIXTURES / arch / "config.json").read_text()), **changes}


def expected(arch: str = "glm4_moe") -> dict:
    return json.loads((FIXTURES / arch / "expected.json").read_text())


# ---- config.json -> ModelConfig ---------------------------------------------------------------
def test_config_maps_every_glm_field(glm):
    cfg, _ = glm
    assert (cfg.attention, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == ("gqa", 4, 2, 16)
    assert (cfg.partial_rotary_factor, cfg.rope_dim) == (0.5, 8)
    assert cfg.attention_bias and cfg.qk_norm == "per_head"
    assert (cfg.router, cfg.router_bias, cfg.norm_topk_prob) == ("sigmoid", True, True)
    assert (cfg.num_expert_groups, cfg.topk_groups, cfg.routed_scaling_factor) == (2, 1, 2.5)
    assert (cfg.first_dense_layers, cfg.dense_d_ff) == (1, 32)
    assert (cfg.num_shared_experts, cfg.shared_d_ff, cfg.shared_expert_gate) == (1, 24, False)
    air = config_from_hf(hf_config("glm4_moe_air"), "air")
    assert air.qk_norm == "none" and air.num_expert_groups == 1
    assert air.routed_scaling_factor == 1.0


def test_hub_style_config_gives_the_same_config():
    """Hub GLM-4.5 configs: top-level rope_theta / partial_rotary_factor, rope_scaling null,
    torch_dtype, one MTP layer; transformers-5 configs nest the rope keys in rope_parameters."""
    tf5 = config_from_hf(hf_config(), "glm")
    hub = hf_config(rope_theta=10000.0, partial_rotary_factor=0.5, rope_scaling=None)
    hub |= {"torch_dtype": hub.pop("dtype"), "num_nextn_predict_layers": 1}
    del hub["rope_parameters"]
    assert config_from_hf(hub, "glm") == tf5
    # Glm4MoeConfig's defaults: half the head rotates, one shared expert, the first layer dense.
    bare = dict(hub)
    for key in ("partial_rotary_factor", "n_shared_experts", "first_k_dense_replace"):
        del bare[key]
    assert config_from_hf(bare, "glm") == tf5
    # rope_parameters wins over the top-level key, as in transformers' standardisation.
    nested = hf_config(partial_rotary_factor=1.0)
    assert config_from_hf(nested, "glm").rope_dim == 8
    full = hf_config(rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                      "partial_rotary_factor": 1.0})  # fmt: skip
    assert config_from_hf(full, "glm").rope_dim == 16


@pytest.mark.parametrize(
    "changes, error, field",
    [
        ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}},
         UnsupportedConfigError, "rope_type"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, UnsupportedConfigError,
         "rope_scaling"),
        ({"quantization_config": {"quant_method": "awq"}}, UnsupportedConfigError,
         "quantization_config"),
        ({"hidden_act": "gelu"}, UnsupportedConfigError, "hidden_act"),
        ({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 1.5}}, ConfigError,
         "partial_rotary_factor"),
        # int(16 * 0.3125) = 5 rotary dims: odd, transformers' rotate_half would misalign.
        ({"rope_parameters": {"rope_theta": 1e4, "partial_rotary_factor": 0.3125}}, ConfigError,
         "partial_rotary_factor"),
        ({"partial_rotary_factor": "half", "rope_parameters": None}, ConfigError,
         "partial_rotary_factor"),
        ({"n_group": 3}, ConfigError, "num_expert_groups"),
    ],
)  # fmt: skip
def test_unimplemented_or_inconsistent_config_is_refused_naming_the_field(changes, error, field):
    with pytest.raises(error, match=field):
        config_from_hf(hf_config(**changes), "glm")


# ---- the checkpoint ---------------------------------------------------------------------------
def test_multi_token_prediction_layer_is_skipped(tmp_path, glm):
    """GLM-4.5 checkpoints carry one MTP layer after the last decoder layer (model.layers.46 of
    Air, 92 of GLM-4.5): a whole decoder layer plus eh_proj / enorm / hnorm / shared_head."""
    _, params = glm
    directory = tmp_path / "glm4_moe"
    shutil.copytree(GLM, directory)
    path = directory / "model.safetensors"
    tensors = dict(load_file(path))
    last, mtp = "model.layers.2.", "model.layers.3."
    extra = {mtp + k[len(last) :]: v for k, v in tensors.items() if k.startswith(last)}
    extra |= {
        mtp + "eh_proj.weight": np.zeros((40, 80), np.float32),
        mtp + "enorm.weight": np.ones(40, np.float32),
        mtp + "hnorm.weight": np.ones(40, np.float32),
        mtp + "shared_head.norm.weight": np.ones(40, np.float32),
    }
    save_file(tensors | extra, path)
    with pytest.raises(CheckpointError, match=r"unexpected tensor model\.layers\.3\."):
        load_hf(directory, progress=False)
    (directory / "config.json").write_text(json.dumps(hf_config(num_nextn_predict_layers=1)))
    cfg, loaded = load_hf(directory, progress=False)
    assert cfg.num_layers == 3
    jax.tree.map(np.testing.assert_array_equal, params, loaded)


def test_missing_q_norm_is_reported(tmp_path):
    """use_qk_norm decides which tensors are expected: a checkpoint without them is refused."""
    directory = tmp_path / "glm4_moe_air"
    shutil.copytree(FIXTURES / "glm4_moe_air", directory)
    (directory / "config.json").write_text(json.dumps(hf_config("glm4_moe_air", use_qk_norm=True)))
    with pytest.raises(
        CheckpointError, match=r"missing tensor model\.layers\.\d\.self_attn\.k_norm"
    ):
        load_hf(directory, progress=False)


# ---- serving through a failure and a rejoin -------------------------------------------------
OPTIONS = EngineOptions(request_slots_per_device=2, redundant_experts=4)  # 3 slots per device


def _prompts(vocab: int) -> list[Request]:
    """The fixture prompt (request 0) and three other prompts, greedy."""
    rng = np.random.default_rng(5)
    others = [rng.integers(0, vocab, size=n).tolist() for n in (5, 11, 23)]
    n_new = len(expected()["greedy"])
    return [Request(p, max_tokens=n_new) for p in [expected()["prompt"], *others]]


def _serve(cfg, params, devices, requests, script=None):
    """Serves `requests` on 4 devices; script(step, coordinator, injector) acts before each
    step."""
    engine = Engine(cfg, params, devices[:4], OPTIONS)
    coordinator = Coordinator(engine, standby=False)
    injector = FaultInjector()
    stepper = GuardedStepper(coordinator, injector)
    for request in requests:
        engine.submit(request)
    step = 0
    while engine.has_work():
        if script is not None:
            script(step, coordinator, injector)
        stepper.step()
        step += 1
        assert step < 200
    return coordinator, stepper


def _reference_argmaxes(cfg, params, requests: list[Request]) -> list[list[int]]:
    """For each request, the single-device reference's argmax after prompt + generated[:t], for
    every t: one causal pass over prompt + generated gives them all. A continuation is the
    reference's greedy one exactly when it equals this list."""
    padded = np.zeros((len(requests), 48), np.int32)
    for i, r in enumerate(requests):
        padded[i, : len(r.prompt) + len(r.generated)] = list(r.prompt) + list(r.generated)
    logits = np.asarray(forward_logits(cfg, jax.tree.map(jnp.asarray, params), padded))
    return [
        logits[i, len(r.prompt) - 1 : len(r.prompt) + len(r.generated) - 1].argmax(-1).tolist()
        for i, r in enumerate(requests)
    ]


@pytest.mark.slow  # ~45 s of CPU: the engine compiles for 4, 3 and again 4 devices
def test_failure_and_rejoin_change_no_token(glm, devices):
    cfg, params = glm
    requests = _prompts(cfg.vocab_size)
    lost = []

    def script(step, coordinator, injector):
        engine = coordinator.engine
        if step == 3:  # break the device serving the fixture prompt: it must re-prefill
            (slot,) = [s for s, o in enumerate(engine.slot_owner) if o == requests[0].request_id]
            lost.append(engine.mesh.devices[slot // OPTIONS.request_slots_per_device].id)
            injector.break_devices(lost)  # detected by the next step
        if step == 8:
            injector.repair_devices(lost)
            coordinator.rejoin(lost)

    coordinator, stepper = _serve(cfg, params, devices, requests, script)
    assert list(requests[0].generated) == expected()["greedy"]  # transformers' tokens
    want = _reference_argmaxes(cfg, params, requests)
    assert [list(r.generated) for r in requests] == want
    assert requests[0].reprefills >= 1 and len(stepper.detections) == 1
    causes = [h.cause for h in coordinator.history]
    assert causes[0].startswith(f"fail {lost}") and causes[1].startswith("rejoin")
    assert len(coordinator.engine.mesh.devices) == 4
