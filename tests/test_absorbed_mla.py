"""DeepSeek's latent attention through the GPU kernels, run interpreted: the absorbed
projections (models/absorbed_mla.py) are the einsums they replace and give a row the same bits
whatever rows share the call; the live-context attention kernel with a second query/key part
and values = keys is the latent attention's XLA form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from models import absorbed_mla
from models.attention import causal_softmax
from models.attention_kernel import SPLIT_T, live_context_attention

H, NOPE, V, LORA, ROPE = 3, 32, 64, 128, 16


def weights(dtype, seed=0):
    rng = np.random.default_rng(seed)
    w_kv = jnp.asarray(rng.standard_normal((LORA, H * (NOPE + V))) * 0.05, dtype)
    per_head = w_kv.reshape(LORA, H, NOPE + V)
    return w_kv, per_head[..., :NOPE], per_head[..., NOPE:]  # [lora, h, nope], [lora, h, v]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_absorbed_projections_are_the_einsums(dtype):
    rng = np.random.default_rng(1)
    w_kv, w_uk, w_uv = weights(dtype)
    q_nope = jnp.asarray(rng.standard_normal((21, H, NOPE)), dtype)
    latent = jnp.asarray(rng.standard_normal((21, H, LORA)), dtype)
    assert absorbed_mla.supported(NOPE, V, LORA)
    got_q = absorbed_mla.absorb_query(q_nope, w_kv, V, interpret=True)
    got_out = absorbed_mla.expand_output(latent, w_kv, V, interpret=True)
    f32 = np.float32
    want_q = np.einsum("rhn,lhn->rhl", np.asarray(q_nope, f32), np.asarray(w_uk, f32))
    want_out = np.einsum("rhl,lhv->rhv", np.asarray(latent, f32), np.asarray(w_uv, f32))
    tol = 1e-4 if dtype == jnp.float32 else 3e-2
    assert got_q.dtype == dtype and got_out.shape == (21, H, V)
    np.testing.assert_allclose(np.asarray(got_q, f32), want_q, rtol=tol, atol=tol)
    np.testing.assert_allclose(np.asarray(got_out, f32), want_out, rtol=tol, atol=tol)
    # A row alone gets the bits it gets among 21.
    alone_q = absorbed_mla.absorb_query(q_nope[:1], w_kv, V, interpret=True)
    alone_out = absorbed_mla.expand_output(latent[:1], w_kv, V, interpret=True)
    assert (np.asarray(alone_q) == np.asarray(got_q[:1])).all()
    assert (np.asarray(alone_out) == np.asarray(got_out[:1])).all()


def test_latent_attention_through_the_kernel():
    """q_latent . c + q_rope . k_rope over one shared kv head, values = the latents c."""
    rng = np.random.default_rng(2)
    b, c, t = 2, 3, SPLIT_T
    bf16 = jnp.bfloat16
    q_latent = jnp.asarray(rng.standard_normal((b, c, H, LORA)), bf16)
    q_rope = jnp.asarray(rng.standard_normal((b, c, H, ROPE)), bf16)
    latents = jnp.asarray(rng.standard_normal((b, 1, t, LORA)), bf16)
    rope_keys = jnp.asarray(rng.standard_normal((b, 1, t, ROPE)), bf16)
    positions = jnp.asarray([[5, 6, 7], [100, 101, 102]])
    scale = 0.05
    got = live_context_attention(
        q_latent,
        latents,
        latents,
        positions,
        scale,
        q_extra=q_rope,
        keys_extra=rope_keys,
        interpret=True,
    )
    f32 = jnp.float32
    with jax.default_matmul_precision("highest"):
        scores = jnp.einsum("bchl,btl->bhct", q_latent.astype(f32), latents[:, 0].astype(f32))
        scores += jnp.einsum("bchr,btr->bhct", q_rope.astype(f32), rope_keys[:, 0].astype(f32))
        probs = causal_softmax(scores * scale, positions, "fast")
        want = jnp.einsum("bhct,btl->bchl", probs, latents[:, 0].astype(f32))
    assert got.shape == (b, c, H, LORA) and got.dtype == bf16
    np.testing.assert_allclose(np.asarray(got, f32), np.asarray(want), rtol=3e-2, atol=3e-2)
    # One query position alone: the same bits as among three.
    one = live_context_attention(
        q_latent[:, 2:],
        latents,
        latents,
        positions[:, 2:],
        scale,
        q_extra=q_rope[:, 2:],
        keys_extra=rope_keys,
        interpret=True,
    )
    assert (np.asarray(one[:, 0]) == np.asarray(got[:, 2])).all()
