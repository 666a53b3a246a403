"""Chunked log-probs keep the loss's peak memory bounded at a 32k vocabulary.

``losses.chunked_sequence_logprobs`` never materialises float32 ``[B, T, V]`` logits: a
``lax.map`` over T-chunks of ``c`` positions, each chunk rematerialised in the backward pass.
Bound on XLA's temporary buffers of the gradient (w.r.t. hidden states and unembedding):

    temp ≤ 3·B·c·V·4        (a chunk's logits, their softmax / cotangent, one spare)
         + 2·D·V·4          (the unembedding gradient's accumulator and one partial)
         + 4·B·T·(D+1)·4    (hidden-state gradients, the stacked chunk inputs / outputs)

independent of B·T·V, whereas the plain ``sequence_logprobs(hidden @ W)`` keeps at least the
``B·T·V`` logits (in practice ~3 copies) alive between forward and backward. Numbers are read
from the compiled executable's ``memory_analysis()`` (nothing runs at the big shapes).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_agents import losses

B, D, V, CHUNK = 2, 64, 32_000, 64


def plain_loss(h, w, tok, m):
    return -(losses.sequence_logprobs(jnp.einsum("btd,dv->btv", h, w), tok) * m).sum()


def chunked_loss(h, w, tok, m):
    return -(losses.chunked_sequence_logprobs(h, w, tok, chunk=CHUNK) * m).sum()


def grad_temp_bytes(loss, t):
    args = (jax.ShapeDtypeStruct((B, t, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32),
            jax.ShapeDtypeStruct((B, t), jnp.int32), jax.ShapeDtypeStruct((B, t), jnp.float32))
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile()
    mem = compiled.memory_analysis()
    if mem is None:
        pytest.skip("this backend reports no memory analysis")
    return mem.temp_size_in_bytes


def bound(t):
    return 3 * B * CHUNK * V * 4 + 2 * D * V * 4 + 4 * B * t * (D + 1) * 4


def test_chunked_grad_memory_is_bounded_and_far_below_plain():
    t = 1024
    logits_bytes = B * t * V * 4
    plain = grad_temp_bytes(plain_loss, t)
    chunked = grad_temp_bytes(chunked_loss, t)
    chunked_2t = grad_temp_bytes(chunked_loss, 2 * t)
    assert plain >= logits_bytes                 # the plain loss does materialise [B,T,V]
    assert chunked <= bound(t), (chunked, bound(t))
    assert chunked_2t <= bound(2 * t), (chunked_2t, bound(2 * t))
    assert chunked * 8 < plain, (chunked, plain)
    # doubling T adds only the O(B·T·D) part, never another [B,T,V]-sized buffer
    assert chunked_2t - chunked < B * CHUNK * V * 4, (chunked, chunked_2t)


def test_chunked_matches_plain_values_and_grads():
    """The two losses being compared compute the same thing (small V, NumPy reference)."""
    rng = np.random.default_rng(0)
    b, t, d, v = 2, 37, 8, 50
    h = jnp.asarray(rng.normal(size=(b, t, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    tok = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    m = jnp.asarray(rng.random((b, t)) < 0.7, jnp.float32)
    logits = np.einsum("btd,dv->btv", np.float64(h), np.float64(w))
    lse = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    ref = np.zeros((b, t))
    for i in range(b):
        for j in range(1, t):
            ref[i, j] = logits[i, j - 1, int(tok[i, j])] - lse[i, j - 1]
    lp = losses.chunked_sequence_logprobs(h, w, tok, chunk=5)
    np.testing.assert_allclose(np.asarray(lp), ref, rtol=1e-4, atol=1e-4)

    def chunk5(h, w, tok, m):
        return -(losses.chunked_sequence_logprobs(h, w, tok, chunk=5) * m).sum()

    g_plain = jax.grad(plain_loss, argnums=(0, 1))(h, w, tok, m)
    g_chunk = jax.grad(chunk5, argnums=(0, 1))(h, w, tok, m)
    for a, c in zip(g_plain, g_chunk):
        np.testing.assert_allclose(np.asarray(c), np.asarray(a), rtol=1e-4, atol=1e-4)
