"""Decode's per-request inputs kept on the devices between steps (ServingMesh keeps the
sampling columns while they are unchanged): a request that takes over a slot with other
sampling settings must still decode with its own."""

from elastic_moe import Engine, EngineOptions, Request, SamplingParams
from models.params import init_params
from models.presets import get_preset


def run(engine, requests):
    for r in requests:
        engine.submit(r)
    while engine.has_work():
        engine.step()
    return [list(r.generated) for r in requests]


def test_a_request_taking_over_a_slot_decodes_with_its_own_sampling(devices):
    cfg = get_preset("tiny-mixtral")
    options = EngineOptions(request_slots_per_device=1, prefill_rows_per_device=1)
    engine = Engine(cfg, init_params(cfg), devices[:2], options)

    def requests():
        return [
            Request([5, 6, 7], max_tokens=3),  # greedy, ends first: its slot is taken over
            Request([9, 8, 7, 6], max_tokens=14, sampling=SamplingParams(temperature=0.9, seed=1)),
            Request(
                [1, 2], max_tokens=8, sampling=SamplingParams(temperature=0.7, top_k=5, seed=3)
            ),
            Request(
                [3, 3, 3], max_tokens=6, sampling=SamplingParams(temperature=1.2, top_p=0.8, seed=4)
            ),
        ]

    together = run(engine, requests())
    alone = [run(engine, [r])[0] for r in requests()]
    assert together == alone
    decoded = engine.mesh._sampling_on_device
    assert decoded is not None  # the columns of the last decode stayed on the devices
