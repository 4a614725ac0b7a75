"""The GPU's kernel path, run by Pallas's interpreter on the CPU (ELASTIC_MOE_KERNELS=interpret):
the grouped matmul, the split-K dense projections and LM head, and the live-context attention,
composed in the model as on the GPU. A model shaped so that every kernel tiles it must give a
request the same tokens and logprobs, bit for bit, when it is re-prefilled as when it was
decoded, and on 1 device as on 2. (The interpreter computes each tile with XLA's CPU ops, so
this checks the kernels' tiles, masks, padding and composition, not the GPU's arithmetic: that
is benchmarks/probe_reprefill.py on a GPU.)"""

import numpy as np
import pytest

from elastic_moe import Engine, EngineOptions, Request
from models import attention_kernel, grouped_matmul, row_invariant
from models.kernel_platform import kernels_here
from models.params import init_params
from models.presets import get_preset

MAX_TOKENS = 6
AT = 3  # re-prefill after this many generated tokens


# float32 shows any change of order in a sum (bf16 rounding hides most of them); bf16, the
# serving dtype, with -m slow.
@pytest.fixture(
    scope="module", params=["float32", pytest.param("bfloat16", marks=pytest.mark.slow)]
)
def model(request):
    # Every projection a whole number of kernel tiles (K % 64, N % 128 for the experts, N % 64
    # dense), the KV window a whole number of attention splits; the router ([128, 8]) is not.
    # 24 heads: o_proj's K = 1536 is cut into 3 splits (2 would add in either order alike).
    cfg = get_preset("tiny-qwen3-moe").replace(
        d_model=128,
        num_heads=24,
        num_kv_heads=1,
        head_dim=64,
        moe_d_ff=128,
        num_experts=8,
        experts_per_token=2,
        max_seq_len=256,
        dtype=request.param,
    )
    return cfg, init_params(cfg)


@pytest.fixture
def kernels_interpreted(monkeypatch):
    """The kernel path on, and which kernels the traced programs called."""
    monkeypatch.setenv("ELASTIC_MOE_KERNELS", "interpret")
    called = set()

    def spy(module, name):
        real = getattr(module, name)

        def wrapped(*args, **kwargs):
            called.add(name)
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    spy(grouped_matmul, "grouped_matmul_kernel")
    spy(row_invariant, "split_k_matmuls")
    spy(attention_kernel, "live_context_attention")
    return called


def prompts():
    rng = np.random.default_rng(7)
    return [rng.integers(0, 256, size=int(rng.integers(3, 20))).tolist() for _ in range(6)]


def generate(engine, requests):
    for r in requests:
        engine.submit(r)
    steps = 0
    while engine.has_work():
        engine.step()
        steps += 1
        assert steps < 200
    return [(list(r.generated), list(r.logprobs)) for r in requests]


def engine_on(cfg, params, devices):
    options = EngineOptions(request_slots_per_device=6 // len(devices), prefill_rows_per_device=3)
    return Engine(cfg, params, devices, options)


def test_the_kernel_path_keeps_every_bit(model, devices, kernels_interpreted):
    cfg, params = model
    assert kernels_here()
    one = engine_on(cfg, params, devices[:1])
    decoded = generate(one, [Request(p, max_tokens=MAX_TOKENS) for p in prompts()])
    assert kernels_interpreted == {
        "grouped_matmul_kernel",
        "split_k_matmuls",
        "live_context_attention",
    }

    # Re-prefilled at token AT: the prefill's token and logprob are the decode's.
    again = generate(
        one,
        [Request(p + t[:AT], max_tokens=1) for p, (t, _) in zip(prompts(), decoded, strict=True)],
    )
    for (tokens, logprobs), (t, lp) in zip(decoded, again, strict=True):
        assert (t[0], lp[0]) == (tokens[AT], logprobs[AT])

    # Two devices: other row counts per kernel call, experts split over the devices.
    two = engine_on(cfg, params, devices[:2])
    assert generate(two, [Request(p, max_tokens=MAX_TOKENS) for p in prompts()]) == decoded
