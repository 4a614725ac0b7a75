"""Per-layer programs (EngineOptions.layer_programs, elastic_moe/layer_programs.py): the tokens
and logprobs of the whole-step program, through a failure and a rejoin, from a number of
compiled programs that does not grow with depth."""

import numpy as np
import pytest
from compile_counter import count_compiles

from elastic_moe import Engine, EngineOptions, Request, SamplingParams
from elastic_moe.coordinator import Coordinator
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


def run(cfg, params, devices, layer_programs, script=None):
    options = EngineOptions(**BASE, layer_programs=layer_programs)
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


# Dense first layers and latent attention (deepseek); sliding-window and full layers, sinks
# and expert biases (gpt-oss); an LM head tied to the embedding (mixtral, changed).
@pytest.mark.parametrize(
    "preset",
    [
        "tiny-deepseek-v3",
        pytest.param("tiny-gpt-oss", marks=pytest.mark.slow),
        pytest.param("tied tiny-mixtral", marks=pytest.mark.slow),
    ],
)
def test_same_outputs_as_the_whole_step_program(preset, devices):
    cfg = get_preset(preset.split()[-1])
    if preset.startswith("tied"):
        cfg = cfg.replace(tie_embeddings=True)
    params = init_params(cfg)
    whole = run(cfg, params, devices[:4], layer_programs=False)
    assert run(cfg, params, devices[:4], layer_programs=True) == whole


def test_a_failure_and_a_rejoin_change_no_output(devices):
    cfg = get_preset("tiny-mixtral")
    params = init_params(cfg)

    def script(step, coordinator):
        if step == 4:
            coordinator.fail([1, 6])
        if step == 10:
            coordinator.rejoin([1, 6])

    failure_free = run(cfg, params, devices, layer_programs=True)
    assert run(cfg, params, devices, layer_programs=True, script=script) == failure_free


def test_a_deeper_model_compiles_the_same_programs(devices):
    """Layers of one kind share an executable: 2 and 6 MoE layers compile as many programs."""
    base = get_preset("tiny-deepseek-v3")  # one dense layer first: two layer kinds
    counted = []
    for layers in (2, 6):
        cfg = base.replace(num_layers=layers)
        geometry = StepGeometry(
            num_devices=2,
            expert_slots_per_device=cfg.num_experts // 2,
            request_slots_per_device=2,
            prefill_rows_per_device=1,
            max_replicas=1,
            layer_programs=True,
        )
        programs = MeshPrograms(cfg, build_mesh(devices[:2]), geometry)
        with count_compiles() as compiled:
            chain = programs.compile_decode()
            programs.compile_prefill(16)
        assert len(chain.layers) == 2  # dense, MoE
        counted.append(compiled())
    assert counted[0] == counted[1]
