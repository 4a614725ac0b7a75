"""Overlapped decode (EngineOptions.overlap_steps): each decode is launched before the previous
one is read back, and the outputs are those of the step-by-step engine, through stop tokens,
lengths, aborts, failures and rejoins."""

import jax
import numpy as np
import pytest

from elastic_moe import Engine, EngineOptions, Request, SamplingParams
from elastic_moe.coordinator import Coordinator
from models.params import init_params
from models.presets import get_preset

BASE = dict(request_slots_per_device=2, redundant_experts=8)


@pytest.fixture(scope="module")
def model():
    cfg = get_preset("tiny-mixtral")
    return cfg, init_params(cfg)


def workload(stop_ids=()):
    rng = np.random.default_rng(21)
    return [
        Request(
            rng.integers(0, 256, size=int(rng.integers(3, 14))).tolist(),
            max_tokens=19 if i == 1 else int(rng.integers(1, 20)),  # r1 runs until aborted
            sampling=SamplingParams(temperature=0.9, seed=i) if i % 3 == 0 else SamplingParams(),
            stop_token_ids=tuple(stop_ids),
            request_id=f"r{i}",
        )
        for i in range(22)  # more than the 16 slots of 8 devices: admission while decoding
    ]


def run(model, devices, overlap, script=None, stop_ids=()):
    cfg, params = model
    engine = Engine(cfg, params, devices, EngineOptions(**BASE, overlap_steps=overlap))
    coordinator = Coordinator(engine, standby=False)
    requests = [engine.submit(r) for r in workload(stop_ids)]
    step = 0
    while engine.has_work():
        if script is not None:
            script(step, engine, coordinator)
        engine.step()
        step += 1
        assert step < 300
    return {r.request_id: (r.generated, r.logprobs, r.finish_reason, r.error) for r in requests}


def common_tokens(model, devices):
    """Tokens the greedy requests produce often: as stop tokens, they end requests midway."""
    outputs = run(model, devices, overlap=False)
    counts = np.bincount(np.concatenate([o[0] for o in outputs.values() if o[0]]))
    return tuple(int(t) for t in np.argsort(counts)[-3:])


@pytest.mark.slow  # overlap_steps is the default: the abort / fail / rejoin test is in the suite
def test_same_outputs_with_stop_tokens_and_lengths(model, devices):
    stop = common_tokens(model, devices)
    sync = run(model, devices, overlap=False, stop_ids=stop)
    assert any(o[2].value == "stop" for o in sync.values()), "the test needs stops midway"
    assert run(model, devices, overlap=True, stop_ids=stop) == sync


def test_same_outputs_through_abort_fail_and_rejoin(model, devices):
    def script(step, engine, coordinator):
        if step == 3:
            engine.abort("r1")  # running
            engine.abort("r20")  # still waiting
        if step == 5:
            coordinator.fail([2, 6])  # with a decode launched and not read back
        if step == 12:
            coordinator.rejoin([2, 6])
        if step == 15:
            coordinator.rebalance()

    sync = run(model, devices, overlap=False, script=script)
    overlapped = run(model, devices, overlap=True, script=script)
    # An abort cuts a request where it is: with a step launched and not read back, one token
    # earlier. What it did produce is the same.
    aborted, cut = sync.pop("r1"), overlapped.pop("r1")
    assert aborted[2].value == cut[2].value == "aborted"
    n = len(cut[0])
    assert n >= len(aborted[0]) - 1 and (cut[0], cut[1]) == (aborted[0][:n], aborted[1][:n])
    assert overlapped == sync


def test_steady_decode_feeds_the_devices_own_tokens(model, devices):
    """Overlap really happens: in steady decode a step's input tokens are the previous step's
    output on the devices (not yet read back), and a step hands out the previous step's
    tokens."""
    cfg, params = model
    engine = Engine(cfg, params, devices, EngineOptions(**BASE, overlap_steps=True))
    inputs = []
    decode = engine.mesh.decode

    def spy(tokens, positions, sampling):
        inputs.append(isinstance(tokens, jax.Array))
        return decode(tokens, positions, sampling)

    engine.mesh.decode = spy
    request = engine.submit(Request([1, 2, 3], max_tokens=10))
    first = engine.step()  # prefill (token 0) + decode launched (token 1)
    assert [e.index for e in first] == [0] and len(request.generated) == 1
    second = engine.step()  # decode 2 launched, then decode 1 read back
    assert [e.index for e in second] == [1]
    while engine.has_work():
        engine.step()
    assert len(request.generated) == 10
    assert inputs[0] is False and all(inputs[1:]) and len(inputs) == 9  # no step wasted
