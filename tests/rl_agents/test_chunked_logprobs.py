"""``losses.chunked_logprobs_and_entropy`` and the trainer's use of it (``config.rl.logprob_chunk``).

* values: a float64 NumPy reference of the tempered log-prob of the next token and the entropy of
  the distribution that produced it (odd T, chunk not dividing T−1, chunk > T, T ∈ {1, 2});
* gradients (hidden and unembedding) against the straightforward full-logits JAX version;
* memory at a 32k vocabulary: XLA's temporary buffers of the loss's gradient stay far below the
  float32 [B,T,V] logits and grow only by O(B·T·D) when T doubles (compile only, nothing runs);
* the trainer: chunked and full ``Trainer.logprobs`` agree within 1e-5 and match the sampler's
  behaviour log-probs; ``loss_fn`` values and gradients agree.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.configs.common import make_config
from rl_agents import losses
from rl_agents.trainer import Trainer


def np_reference(h, w, tok, temp):
    """float64 loops: logp[b,t] = log softmax(h[b,t-1] w / temp)[tok[b,t]], ent the entropy."""
    z = np.einsum("btd,dv->btv", np.float64(h), np.float64(w)) / temp
    b, t, _ = z.shape
    logp, ent = np.zeros((b, t)), np.zeros((b, t))
    for i in range(b):
        for j in range(1, t):
            row = z[i, j - 1]
            lse = row.max() + np.log(np.exp(row - row.max()).sum())
            lp = row - lse
            logp[i, j] = lp[int(tok[i, j])]
            ent[i, j] = -(np.exp(lp) * lp).sum()
    return logp, ent


def full_version(h, w, tok, temp):
    """The straightforward JAX path: full [B,T,V] logits."""
    z = jnp.einsum("btd,dv->btv", h, w, preferred_element_type=jnp.float32) / temp
    ent = losses.entropy_from_logits(z)
    ent = jnp.concatenate([jnp.zeros_like(ent[:, :1]), ent[:, :-1]], axis=1)
    return losses.sequence_logprobs(z, tok), ent


def rand_inputs(b, t, d, v, seed=0, scale=1.0):
    rng = np.random.default_rng(seed)
    h = jnp.asarray(rng.normal(size=(b, t, d)) * scale, jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)), jnp.float32)
    tok = jnp.asarray(rng.integers(0, v, size=(b, t)), jnp.int32)
    return h, w, tok


@pytest.mark.parametrize("t,chunk,temp", [(37, 5, 0.7), (37, 36, 1.0), (37, 64, 1.3), (2, 3, 1.0),
                                          (9, 1, 0.5)])
def test_values_match_numpy(t, chunk, temp):
    h, w, tok = rand_inputs(3, t, 8, 50, seed=t + chunk)
    logp, ent = losses.chunked_logprobs_and_entropy(h, w, tok, temp, chunk)
    ref_lp, ref_ent = np_reference(h, w, tok, temp)
    assert logp.shape == ent.shape == (3, t) and logp.dtype == ent.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logp), ref_lp, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent), ref_ent, rtol=1e-5, atol=1e-5)
    assert (np.asarray(logp)[:, 0] == 0).all() and (np.asarray(ent)[:, 0] == 0).all()
    # entropies are in [0, log V] and not trivially zero
    e = np.asarray(ent)[:, 1:]
    assert e.mean() > 0.3 and (e >= 0).all() and (e <= np.log(50) + 1e-5).all()


def test_single_position_and_large_logits():
    h, w, tok = rand_inputs(2, 1, 4, 7)
    logp, ent = losses.chunked_logprobs_and_entropy(h, w, tok, 1.0, 4)
    assert logp.shape == (2, 1) and (np.asarray(logp) == 0).all() and (np.asarray(ent) == 0).all()
    # huge logits (scale 1e3): still finite and equal to the reference (log-sum-exp is stable)
    h, w, tok = rand_inputs(2, 11, 4, 7, seed=1, scale=1e3)
    logp, ent = losses.chunked_logprobs_and_entropy(h, w, tok, 1.0, 4)
    ref_lp, ref_ent = np_reference(h, w, tok, 1.0)
    assert np.isfinite(np.asarray(logp)).all() and np.isfinite(np.asarray(ent)).all()
    np.testing.assert_allclose(np.asarray(logp), ref_lp, rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.asarray(ent), ref_ent, atol=1e-3)


@pytest.mark.parametrize("chunk", [4, 7, 100])
def test_gradients_match_full_logits(chunk):
    """d/d(hidden, unembed) of a masked loss mixing log-probs and entropies."""
    h, w, tok = rand_inputs(2, 23, 8, 40, seed=chunk)
    rng = np.random.default_rng(chunk)
    m = jnp.asarray(rng.random((2, 23)) < 0.6, jnp.float32)
    a = jnp.asarray(rng.normal(size=(2, 23)), jnp.float32)

    def loss(fn):
        def f(h, w):
            lp, ent = fn(h, w)
            return -(a * lp * m).sum() - 0.3 * (ent * m).sum()
        return f

    full = loss(lambda h, w: full_version(h, w, tok, 0.8))
    chunked = loss(lambda h, w: losses.chunked_logprobs_and_entropy(h, w, tok, 0.8, chunk))
    np.testing.assert_allclose(float(chunked(h, w)), float(full(h, w)), rtol=1e-5)
    g_full = jax.grad(full, argnums=(0, 1))(h, w)
    g_chunk = jax.grad(chunked, argnums=(0, 1))(h, w)
    for gf, gc in zip(g_full, g_chunk):
        assert float(jnp.abs(gf).max()) > 1e-3
        np.testing.assert_allclose(np.asarray(gc), np.asarray(gf), rtol=1e-4, atol=1e-5)
    # the last hidden state predicts nothing: zero gradient there, as in the full version
    assert float(jnp.abs(g_chunk[0][:, -1]).max()) == 0.0


def test_bad_arguments_raise():
    h, w, tok = rand_inputs(1, 4, 3, 5)
    with pytest.raises(ValueError, match="chunk=0"):
        losses.chunked_logprobs_and_entropy(h, w, tok, 1.0, 0)
    with pytest.raises(ValueError, match="chunk=True"):
        losses.chunked_logprobs_and_entropy(h, w, tok, 1.0, True)
    with pytest.raises(ValueError, match="temperature=0.0"):
        losses.chunked_logprobs_and_entropy(h, w, tok, 0.0, 2)
    with pytest.raises(ValueError, match="unembed"):
        losses.chunked_logprobs_and_entropy(h, w.T, tok, 1.0, 2)
    with pytest.raises(ValueError, match="hidden"):
        losses.chunked_logprobs_and_entropy(h, w, tok[:, :3], 1.0, 2)


# ------------------------------------------------------------------------ memory at V = 32k
B, D, V, CHUNK = 2, 64, 32_000, 64


def _grad_temp_bytes(fn, t):
    def loss(h, w, tok, m):
        lp, ent = fn(h, w, tok)
        return -(lp * m).sum() - 0.01 * (ent * m).sum()

    args = (jax.ShapeDtypeStruct((B, t, D), jnp.float32), jax.ShapeDtypeStruct((D, V), jnp.float32),
            jax.ShapeDtypeStruct((B, t), jnp.int32), jax.ShapeDtypeStruct((B, t), jnp.float32))
    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(*args).compile()
    mem = compiled.memory_analysis()
    if mem is None:
        pytest.skip("this backend reports no memory analysis")
    return mem.temp_size_in_bytes


def test_loss_grad_memory_bounded_at_32k_vocab():
    t = 1024
    logits_bytes = B * t * V * 4                                   # one float32 [B,T,V]: 262 MB
    chunked = lambda h, w, tok: losses.chunked_logprobs_and_entropy(h, w, tok, 1.0, CHUNK)
    full = lambda h, w, tok: full_version(h, w, tok, 1.0)
    full_bytes = _grad_temp_bytes(full, t)
    c1 = _grad_temp_bytes(chunked, t)
    c2 = _grad_temp_bytes(chunked, 2 * t)
    assert full_bytes >= logits_bytes, (full_bytes, logits_bytes)  # the full path builds [B,T,V]
    assert c1 < logits_bytes / 4, (c1, logits_bytes)
    assert c1 * 8 < full_bytes, (c1, full_bytes)
    # bounded: a chunk's logits (and their softmax / cotangent), the unembedding gradient, and
    # O(B·T·D) hidden-state buffers — doubling T adds far less than one more chunk of logits
    bound = lambda tt: 3 * B * CHUNK * V * 4 + 2 * D * V * 4 + 6 * B * tt * (D + 2) * 4
    assert c1 <= bound(t) and c2 <= bound(2 * t), (c1, c2, bound(t), bound(2 * t))
    assert c2 - c1 < B * CHUNK * V * 4, (c1, c2)


# ------------------------------------------------------------------------ the trainer
def tiny_config(algorithm="grpo", chunk=0, tie=False):
    c = make_config("guess_number", algorithm)
    c.model.update(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, attention_impl="xla",
                   tie_embeddings=tie)
    c.rollout.update(num_groups=2, group_size=2, temperature=0.7)
    c.rl.update(epochs=1, minibatches=1, logprob_chunk=chunk, entropy_coef=0.01, kl_coef=0.1)
    c.bc.episodes = 0
    return c


@pytest.mark.parametrize("tie", [False, True])
def test_trainer_chunked_logprobs_match_full_and_sampler(tie):
    full_tr, chunk_tr = Trainer(tiny_config(chunk=0, tie=tie)), Trainer(tiny_config(chunk=7, tie=tie))
    state = full_tr.fresh_state(jax.random.PRNGKey(0))
    params = state.params["policy"]
    traj = jax.jit(lambda p, k: full_tr._sample_groups(p, k, num_groups=2, group_size=2))(
        params, jax.random.PRNGKey(1))
    lp_f, ent_f = jax.jit(full_tr.logprobs)(params, traj.tokens, traj.valid)
    lp_c, ent_c = jax.jit(chunk_tr.logprobs)(params, traj.tokens, traj.valid)
    m = np.asarray(traj.loss_mask)
    assert m.sum() > 4
    np.testing.assert_allclose(np.asarray(lp_c), np.asarray(lp_f), atol=1e-5)
    np.testing.assert_allclose(np.asarray(ent_c), np.asarray(ent_f), atol=1e-5)
    np.testing.assert_allclose(np.asarray(lp_c)[m], np.asarray(traj.behaviour_logp)[m], atol=1e-5)
    # entropy entry t is the entropy of the tempered distribution that produced token t
    logits = full_tr.policy.apply({"params": params}, traj.tokens,
                                  segment_ids=traj.valid.astype(jnp.int32)) / 0.7
    ent_ref = np.asarray(losses.entropy_from_logits(logits))
    np.testing.assert_allclose(np.asarray(ent_c)[:, 1:], ent_ref[:, :-1], atol=1e-5)

    # loss_fn: same loss, metrics and gradients (policy loss + entropy bonus + KL)
    batch = full_tr.advantages(state, traj, jnp.ones((4,), jnp.float32))
    assert "ref_logp" in batch
    g_f, met_f = jax.jit(jax.grad(full_tr.loss_fn, has_aux=True))(state.params, batch)
    g_c, met_c = jax.jit(jax.grad(chunk_tr.loss_fn, has_aux=True))(state.params, batch)
    for k in met_f:
        np.testing.assert_allclose(float(met_c[k]), float(met_f[k]), rtol=1e-5, atol=1e-6,
                                   err_msg=k)
    assert float(met_f["policy/entropy"]) > 0.1
    leaves_f, leaves_c = jax.tree.leaves(g_f), jax.tree.leaves(g_c)
    assert max(float(jnp.abs(x).max()) for x in leaves_f) > 1e-4
    for a, b in zip(leaves_f, leaves_c):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-6)


def test_trainer_rejects_bad_chunk():
    tr = Trainer(tiny_config(chunk=-1))
    params = tr.init_params(jax.random.PRNGKey(0))["policy"]
    tok = jnp.ones((2, 5), jnp.int32)
    with pytest.raises(ValueError, match="logprob_chunk=-1"):
        tr.logprobs(params, tok, tok > 0)
