"""The latent (absorbed) MLA cache against the per-head one and against transformers.

The fixtures' deepseek_v2 / deepseek_v3 checkpoints load with mla_cache="latent" (the default),
so test_hf_models's logits, greedy and 4-device engine tests run the latent form; here the
per-head form is checked against transformers too, and the two forms against each other on the
same parameters, through a real decode that reads every earlier token back from the cache.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from test_hf_models import assert_matches_transformers, expected

from models.kv_cache import cache_shapes, kv_bytes_per_token
from models.presets import get_preset

ARCHS = ["deepseek_v2", "deepseek_v3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_checkpoints_serve_the_latent_cache(arch, loaded):
    cfg, _ = loaded(arch)
    assert cfg.mla_cache == "latent"
    k, v = cache_shapes(cfg, 3)[0]
    assert k == ((3, 1, cfg.max_seq_len, cfg.qk_rope_head_dim), jnp.dtype(cfg.dtype))
    assert v == ((3, 1, cfg.max_seq_len, cfg.kv_lora_rank), jnp.dtype(cfg.dtype))
    per_head = cfg.replace(mla_cache="per_head")
    k, v = cache_shapes(per_head, 3)[0]
    assert k[0] == (3, cfg.num_heads, cfg.max_seq_len, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    assert v[0] == (3, cfg.num_heads, cfg.max_seq_len, cfg.v_head_dim)


def test_deepseek_v3_latent_cache_is_71_times_smaller():
    cfg = get_preset("deepseek-v3")
    assert kv_bytes_per_token(cfg) == (512 + 64) * 2
    assert kv_bytes_per_token(cfg.replace(mla_cache="per_head")) == 128 * (192 + 128) * 2


@pytest.mark.parametrize("arch", ARCHS)
def test_both_forms_match_transformers_and_each_other(arch, loaded):
    cfg, params = loaded(arch)
    forms = {
        form: assert_matches_transformers(arch, cfg.replace(mla_cache=form), params)
        for form in ("latent", "per_head")
    }
    np.testing.assert_allclose(forms["latent"], forms["per_head"], rtol=1e-5, atol=1e-5)
    assert not np.array_equal(forms["latent"], forms["per_head"])  # two computations, not one


# About 50 s per case on a shared CPU; test_hf_models's 4-device engine test runs the latent
# form's decode against transformers' greedy tokens in the default suite.
@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
def test_engine_decodes_the_same_with_either_cache(arch, loaded, devices):
    """Prefill + decode on 2 devices: each generated token's logprob comes from a step that read
    the earlier tokens from the cache, so a wrong latent cache changes tokens or logprobs."""
    from elastic_moe.engine import Engine, EngineOptions

    cfg, params = loaded(arch)
    want = expected(arch)
    rng = np.random.default_rng(3)
    prompts = [want["prompt"]] + [rng.integers(0, cfg.vocab_size, 9).tolist() for _ in range(3)]
    out = {}
    for form in ("latent", "per_head"):
        engine = Engine(
            cfg.replace(mla_cache=form),
            params,
            devices[:2],
            EngineOptions(request_slots_per_device=2),
        )
        out[form] = [
            (r.generated, r.logprobs) for r in engine.generate(prompts, len(want["greedy"]))
        ]
    assert out["latent"][0][0] == want["greedy"]
    for (tokens, logprobs), (tokens_ph, logprobs_ph) in zip(
        out["latent"], out["per_head"], strict=True
    ):
        assert tokens == tokens_ph
        np.testing.assert_allclose(logprobs, logprobs_ph, rtol=1e-4, atol=1e-4)
