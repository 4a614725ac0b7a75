"""The model on a sharded mesh equals the single-device reference, whatever the mesh size or
the placement of experts, and a new placement does not recompile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from compile_counter import count_compiles
from jax.sharding import PartitionSpec as P
from jaxtyping import TypeCheckError

from elastic_moe import Engine, EngineOptions, Request, RequestError, SamplingParams
from elastic_moe.coordinator import Coordinator
from mesh.device_mesh import EXPERT_AXIS, build_mesh
from mesh.placement import place
from models.moe import ExpertTables, expert_parallel_ffn, physical_slots
from models.params import init_params
from models.presets import get_preset
from models.reference import forward_logits
from models.router import route

MAX_TOKENS = 10


def prompts(n=6, seed=0, vocab=256):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=int(rng.integers(3, 30))).tolist() for _ in range(n)]


def capture_logits(engine):
    """Records (request id, position, logits row) of every prefill and decode."""
    seen = []
    mesh = engine.mesh
    prefill, decode = mesh.prefill, mesh.decode

    def on_prefill(tokens, positions, rows, last, sampling):
        out = prefill(tokens, positions, rows, last, sampling)
        logits = np.asarray(out.logits)
        per = engine.options.request_slots_per_device
        per_rows = engine.options.prefill_rows_per_device
        for r in range(tokens.shape[0]):
            if rows[r] < per:
                slot = (r // per_rows) * per + int(rows[r])
                seen.append((engine.slot_owner[slot], int(last[r]), logits[r]))
        return out

    def on_decode(tokens, positions, sampling):
        out = decode(tokens, positions, sampling)
        logits = np.asarray(out.logits)
        for s, owner in enumerate(engine.slot_owner):
            if owner is not None:
                seen.append((owner, int(positions[s]), logits[s]))
        return out

    mesh.prefill, mesh.decode = on_prefill, on_decode
    return seen


@pytest.fixture(scope="module")
def tiny():
    cfg = get_preset("tiny-mixtral")
    return cfg, init_params(cfg)


@pytest.mark.parametrize(
    # 50 s each; the default suite checks mesh sizes in tests/test_invariant_numerics.py
    # (bit-equal tokens on 8 / 4 / 2 / 1 devices) and against transformers on 1 and 4 devices.
    "preset",
    [
        pytest.param("tiny-mixtral", marks=pytest.mark.slow),
        pytest.param("tiny-deepseek-v3", marks=pytest.mark.slow),
    ],
)
def test_same_tokens_and_reference_logits_on_8_4_2_1_devices(preset, devices):
    cfg = get_preset(preset)
    params = init_params(cfg)
    device_params = jax.tree.map(jnp.asarray, params)
    batch = prompts(vocab=cfg.vocab_size)
    results = {}
    for n in (8, 4, 2, 1):
        # Step by step: each decode's logits are read as it runs (overlap would also compute a
        # row for a request its previous token stopped, which the reference does not have).
        options = EngineOptions(request_slots_per_device=8 // n, overlap_steps=False)
        engine = Engine(cfg, params, devices[:n], options)
        seen = capture_logits(engine)
        requests = engine.generate(batch, MAX_TOKENS)
        results[n] = [r.generated for r in requests]
        # Every logits row equals the single-device float32 reference at that position. The
        # reference is causal, so one padded pass over the whole sequences gives all of them.
        padded = np.zeros((len(requests), 48), np.int32)
        for i, r in enumerate(requests):
            padded[i, : len(r.context)] = r.context
        want = np.asarray(forward_logits(cfg, device_params, padded))
        row_of = {r.request_id: i for i, r in enumerate(requests)}
        assert len(seen) == len(batch) * MAX_TOKENS
        for request_id, position, row in seen:
            expected = want[row_of[request_id], position]
            np.testing.assert_allclose(row, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert results[4] == results[8] and results[2] == results[8] and results[1] == results[8]


def naive_moe(x, weights, experts, w_gate, w_up, w_down):
    """sum_k weights * SwiGLU_expert(x), one token and one expert at a time (in float64 when
    x is float64)."""
    out = np.zeros_like(x)
    for t in range(x.shape[0]):
        for k in range(experts.shape[1]):
            e = experts[t, k]
            h = x[t] @ w_gate[e]
            h = h / (1 + np.exp(-h)) * (x[t] @ w_up[e])
            out[t] += weights[t, k] * (h @ w_down[e])
    return out


@pytest.mark.parametrize("num_devices, redundant", [(1, 0), (4, 8), (8, 8)])
def test_moe_layer_matches_per_token_loop(num_devices, redundant, devices):
    cfg = get_preset("tiny-mixtral")
    rng = np.random.default_rng(1)
    e, d, f, t = cfg.num_experts, cfg.d_model, cfg.moe_d_ff, 32
    w_gate = rng.normal(size=(e, d, f)).astype(np.float32) / np.sqrt(d)
    w_up = rng.normal(size=(e, d, f)).astype(np.float32) / np.sqrt(d)
    w_down = rng.normal(size=(e, f, d)).astype(np.float32) / np.sqrt(f)
    x = rng.normal(size=(t, d)).astype(np.float32)
    router = rng.normal(size=(d, e)).astype(np.float32)
    weights, experts = route(jnp.asarray(x @ router), cfg)
    weights, experts = np.asarray(weights), np.asarray(experts)
    want = naive_moe(*(a.astype(np.float64) for a in (x, weights)), experts, w_gate, w_up, w_down)

    slots_per_device = -(-(e + redundant) // num_devices)
    load = rng.uniform(1, 10, size=(1, e))
    placement = place(load, num_devices, slots_per_device, max_replicas=num_devices)
    phy2log = placement.phy2log[0]
    mesh = build_mesh(devices[:num_devices])
    tables = ExpertTables(
        jnp.asarray(placement.log2phy[0]), jnp.asarray(placement.replica_count[0])
    )

    def local(x, weights, experts, g, u, dn):
        first = jax.lax.axis_index(EXPERT_AXIS) * x.shape[0]
        ids = first + jnp.arange(x.shape[0], dtype=jnp.int32)
        slots = physical_slots(experts, tables, ids)
        return expert_parallel_ffn(x, slots, weights, g, u, dn, EXPERT_AXIS)

    shard = P(EXPERT_AXIS)
    run = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=(shard,) * 6, out_specs=shard))
    got = run(
        jnp.asarray(x),
        jnp.asarray(weights),
        jnp.asarray(experts),
        jnp.asarray(w_gate[phy2log]),
        jnp.asarray(w_up[phy2log]),
        jnp.asarray(w_down[phy2log]),
    )
    # top-2: the two expert outputs are summed once, whichever device computed them.
    # Equal to float32 rounding: the float64 loop and XLA's float32 matmuls differ only in the
    # order of the d_model / d_ff sums (a few ulps), never in which experts or weights apply.
    np.testing.assert_allclose(np.asarray(got), want, rtol=0, atol=4e-6)


def test_new_placement_changes_nothing_and_does_not_recompile(tiny, devices):
    cfg, params = tiny
    batch = prompts(8)
    # 24 slots for 8 experts: room beyond two replicas each, so replicas can follow load.
    engine = Engine(
        cfg, params, devices, EngineOptions(request_slots_per_device=2, redundant_experts=16)
    )
    before = [r.generated for r in engine.generate(batch, MAX_TOKENS)]
    coordinator = Coordinator(engine, standby=False)
    old = engine.mesh.placement.phy2log.copy()
    skew = np.zeros_like(engine.expert_load)
    skew[:, 0] = 1000  # expert 0 suddenly hot: it gets more replicas
    engine.expert_load[:] = skew
    engine.mesh.compiled.warm(sorted(engine.prefill_lengths_seen))  # transfer programs too
    with count_compiles() as counted:
        result = coordinator.rebalance()
        after = [r.generated for r in engine.generate(batch, MAX_TOKENS)]
    assert not np.array_equal(engine.mesh.placement.phy2log, old)
    assert result.experts_copied > 0
    assert after == before
    assert counted() == 0
    assert engine.mesh.placement.replica_count[:, 0].max() > 2


def test_seeded_sampling_repeats_and_differs_by_seed(tiny, devices):
    cfg, params = tiny
    engine = Engine(cfg, params, devices[:2], EngineOptions(request_slots_per_device=4))
    batch = prompts(3)

    def run(seed):
        sampling = SamplingParams(temperature=1.0, top_k=50, top_p=0.9, seed=seed)
        return [r.generated for r in engine.generate(batch, MAX_TOKENS, sampling)]

    assert run(7) == run(7)
    assert run(7) != run(8)


def test_out_of_vocabulary_tokens_are_rejected(tiny, devices):
    cfg, params = tiny
    engine = Engine(cfg, params, devices[:1], EngineOptions(request_slots_per_device=1))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.submit(Request([1, 2, cfg.vocab_size], max_tokens=4))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        engine.submit(Request([-1], max_tokens=4))
    with pytest.raises(RequestError, match="max_seq_len"):
        engine.submit(Request([1], max_tokens=cfg.max_seq_len))
    with pytest.raises(RequestError, match="empty"):
        engine.submit(Request([], max_tokens=4))
    assert not engine.has_work()


def test_shape_annotations_are_checked_at_run_time():
    """The jaxtyping hook (conftest.py) refuses the wrong rank before route() runs: the error
    names the parameter and its annotation, which no error from inside route() would."""
    cfg = get_preset("tiny-mixtral")
    annotation = r"(?s)parameter 'logits'.*Expected type: <class 'Float\[Array, 't e'\]'>"
    with pytest.raises(TypeCheckError, match=annotation):
        route(jnp.zeros((cfg.num_experts,)), cfg)  # [t, e] expected
