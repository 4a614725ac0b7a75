"""Decode's per-request inputs kept on the devices between steps (ServingMesh keeps the
sampling columns while they are unchanged): a request that takes over a slot with other
sampling settings must still decode with its own."""

import pytest

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


@pytest.mark.parametrize("per_program", [0, 2])
def test_the_step_programs_never_make_the_host_wait(devices, per_program):
    """No conditional or while loop in the decode program: XLA's GPU runtime runs those on the
    host, copying a predicate back and waiting for it, so the launch of a step would return
    only when the step was done. (A `lax.cond` between greedy and sampled rows did that; the
    sampled rows are now drawn by a program of their own.)"""
    cfg = get_preset("tiny-mixtral")
    options = EngineOptions(layers_per_program=per_program)
    engine = Engine(cfg, init_params(cfg), devices[:2], options)
    text = engine.mesh.programs.compile_decode().as_text()
    assert " conditional(" not in text and " while(" not in text
    sorts = [line for line in text.splitlines() if " sort(" in line]
    assert sorts and not [line for line in sorts if "/sampling/" in line]  # dispatch's only


def test_only_steps_with_a_sampled_row_run_the_sampling_program(devices, monkeypatch):
    cfg = get_preset("tiny-mixtral")
    engine = Engine(cfg, init_params(cfg), devices[:2], EngineOptions())
    programs = engine.mesh.programs
    draws = []
    compiled_draw = programs.compiled_draw
    monkeypatch.setattr(
        programs, "compiled_draw", lambda rows: draws.append(rows) or compiled_draw(rows)
    )
    run(engine, [Request([5, 6, 7], max_tokens=4)])
    assert draws == []
    sampled = SamplingParams(temperature=0.9, seed=1)
    greedy_and_sampled = run(
        engine, [Request([5, 6, 7], max_tokens=4), Request([1, 2], max_tokens=4, sampling=sampled)]
    )
    assert len(draws) >= 4  # its prefill and its decode steps
    assert greedy_and_sampled[0] == run(engine, [Request([5, 6, 7], max_tokens=4)])[0]
