"""Layer-group programs (EngineOptions.layers_per_program, elastic_moe/layer_programs.py): the
tokens and logprobs of the whole-step program, through a failure and a rejoin, from a number of
compiled programs that does not grow with depth."""

import numpy as np
import pytest
from compile_counter import count_compiles

from elastic_moe import Engine, EngineOptions, Request, SamplingParams
from elastic_moe.coordinator import Coordinator
from elastic_moe.layer_programs import layer_groups
from elastic_moe.steps import MeshPrograms, StepGeometry
from mesh.device_mesh import build_mesh
from models.params import init_params
from models.presets import get_preset

BASE = dict(request_slots_per_device=2, redundant_experts=8)


def workload():
    rng = np.random.default_rng(5)
    return [
        Request(
            rng.integers(0, 256, size=int(rng.integers(3, 12))).tolist(),  # one prefill bucket
            max_tokens=int(rng.integers(2, 10)),
            sampling=SamplingParams(temperature=0.8, seed=i) if i % 3 == 0 else SamplingParams(),
            request_id=f"r{i}",
        )
        for i in range(12)
    ]


def run(cfg, params, devices, per_program, script=None):
    options = EngineOptions(**BASE, layers_per_program=per_program)
    engine = Engine(cfg, params, devices, options)
    coordinator = Coordinator(engine, standby=False)
    requests = [engine.submit(r) for r in workload()]
    step = 0
    while engine.has_work():
        if script is not None:
            script(step, coordinator)
        engine.step()
        step += 1
        assert step < 200
    return {r.request_id: (r.generated, r.logprobs, r.finish_reason, r.error) for r in requests}


# Dense first layers and latent attention (deepseek: 1 dense + 3 MoE layers, in groups of 2:
# dense, MoE x 2, MoE x 1); sliding-window and full layers, sinks and expert biases (gpt-oss);
# an LM head tied to the embedding (mixtral, changed).
@pytest.mark.parametrize(
    "preset,per_program",
    [
        ("tiny-deepseek-v3", 2),
        pytest.param("tiny-deepseek-v3", 1, marks=pytest.mark.slow),
        pytest.param("tiny-gpt-oss", 1, marks=pytest.mark.slow),
        pytest.param("tied tiny-mixtral", 3, marks=pytest.mark.slow),
    ],
)
def test_same_outputs_as_the_whole_step_program(preset, per_program, devices):
    cfg = get_preset(preset.split()[-1])
    if preset.startswith("tied"):
        cfg = cfg.replace(tie_embeddings=True)
    params = init_params(cfg)
    whole = run(cfg, params, devices[:4], per_program=0)
    assert run(cfg, params, devices[:4], per_program) == whole


def test_a_failure_and_a_rejoin_change_no_output(devices):
    cfg = get_preset("tiny-mixtral")
    params = init_params(cfg)

    def script(step, coordinator):
        if step == 4:
            coordinator.fail([1, 6])
        if step == 10:
            coordinator.rejoin([1, 6])

    failure_free = run(cfg, params, devices, per_program=1)
    assert run(cfg, params, devices, per_program=1, script=script) == failure_free


def test_layers_are_grouped_by_kind_in_order():
    cfg = get_preset("tiny-deepseek-v3").replace(num_layers=6)  # dense, then 5 MoE layers
    dense, moe = (False, None), (True, None)
    assert layer_groups(cfg, 2) == [
        ((dense, 1), [0]),
        ((moe, 2), [1, 2]),
        ((moe, 2), [3, 4]),
        ((moe, 1), [5]),
    ]
    gpt = get_preset("tiny-gpt-oss")  # sliding and full attention alternate
    assert [len(g) for _, g in layer_groups(gpt, 4)] == [1] * gpt.num_layers


def test_a_deeper_model_compiles_the_same_programs(devices):
    """Groups of one kind and size share an executable: 5 and 9 MoE layers (after a dense
    one) in groups of 2 compile the same programs (dense x 1, MoE x 2, MoE x 1)."""
    base = get_preset("tiny-deepseek-v3")
    counted = []
    for layers in (6, 10):
        cfg = base.replace(num_layers=layers)
        geometry = StepGeometry(
            num_devices=2,
            expert_slots_per_device=cfg.num_experts // 2,
            request_slots_per_device=2,
            prefill_rows_per_device=1,
            max_replicas=1,
            layers_per_program=2,
        )
        programs = MeshPrograms(cfg, build_mesh(devices[:2]), geometry)
        with count_compiles() as compiled:
            chain = programs.compile_decode()
            programs.compile_prefill(16)
        assert len(chain.layers) == 3
        counted.append(compiled())
    assert counted[0] == counted[1]
