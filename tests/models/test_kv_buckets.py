"""Cache-length buckets (``models.kv_cache.KV_BLOCK``): decode / prefill attend over the smallest
bucket covering every row's filled prefix, with the same outputs and cache as attending over the
whole cache, under jit + lax.scan with one compile; ``kv_buckets``; ``kv_len`` / ``write`` of the
model call."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import ModelConfig, PolicyModel, ValueModel, kv_cache
from tests.models.helpers import fwd, random_params

CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  max_seq_len=64, attention_impl="xla")


@pytest.fixture
def block(monkeypatch):
    """Set the bucket width for the running backend (the mapping is read at trace time)."""
    def set_(w):
        monkeypatch.setitem(kv_cache.KV_BLOCK, jax.default_backend(), w)
    return set_


def test_kv_buckets():
    assert kv_cache.kv_buckets(272, 64) == (64, 128, 192, 256, 272)
    assert kv_cache.kv_buckets(128, 64) == (64, 128)
    assert kv_cache.kv_buckets(96, 0) == (96,)
    assert kv_cache.kv_buckets(50, 64) == (50,)
    assert kv_cache.kv_buckets(5, 1) == (1, 2, 3, 4, 5)
    for bad in (-1, 2.0, True):
        with pytest.raises(ValueError, match="block"):
            kv_cache.kv_buckets(10, bad)


def _decode_all(model, params, toks, valid, max_len):
    """Prefill 3 tokens, then decode the rest token by token inside one jitted lax.scan."""
    @jax.jit
    def run(params, toks, valid):
        cache = models.init_cache(model.cfg, toks.shape[0], max_len)
        out0, cache = models.prefill(model, params, toks[:, :3], cache, valid[:, :3])

        def body(c, x):
            tok, v = x
            o, c = models.decode_step(model, params, tok, c, v)
            return c, o
        cache, outs = jax.lax.scan(body, cache, (toks[:, 3:].T, valid[:, 3:].T))
        return jnp.concatenate([out0, jnp.swapaxes(outs, 0, 1)], 1), cache
    return run(params, toks, valid)


@pytest.mark.parametrize("kw", [{}, {"scan_layers": True}])
def test_bucketed_decode_equals_whole_cache_and_full_forward(block, kw):
    cfg = CFG.replace(**kw)
    m = PolicyModel(cfg)
    p = random_params(m, seed=2)
    rng = np.random.default_rng(0)
    b, t = 3, 19
    toks = jnp.asarray(rng.integers(2, 64, (b, t)), jnp.int32)
    valid = np.ones((b, t), bool)
    valid[1, 5:9] = False          # row 1 lags: rows straddle different buckets
    valid[2, 3:15] = False         # row 2 stays in the first bucket most of the time
    valid = jnp.asarray(valid)
    block(0)
    ref_out, ref_cache = _decode_all(m, p, toks, valid, 24)
    block(4)                       # buckets 4, 8, ..., 24
    out, cache = _decode_all(m, p, toks, valid, 24)
    v = np.asarray(valid)
    np.testing.assert_allclose(np.asarray(out)[v], np.asarray(ref_out)[v], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(cache.lengths, ref_cache.lengths)
    np.testing.assert_array_equal(cache.lengths, v.sum(1))
    # later layers' keys / values follow attention outputs read over other bucket lengths:
    # equal up to float32 summation order (a few ulps)
    np.testing.assert_allclose(cache.k, ref_cache.k, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(cache.v, ref_cache.v, atol=1e-6, rtol=1e-5)
    # and both equal the full forward pass over the valid tokens (packed positions)
    seg = v.astype(np.int32)
    pos = np.maximum(np.cumsum(v, 1) - 1, 0)
    full = np.asarray(fwd(m)(p, toks, jnp.asarray(pos), jnp.asarray(seg)))
    np.testing.assert_allclose(np.asarray(out)[v], full[v], atol=1e-5, rtol=1e-5)


def test_bucketed_prefill_chunks_and_value_model(block):
    """Chunks of 5 crossing bucket edges (prefill), for the policy and the value model."""
    block(4)
    rng = np.random.default_rng(1)
    toks = jnp.asarray(rng.integers(2, 64, (2, 20)), jnp.int32)
    for model_cls in (PolicyModel, ValueModel):
        m = model_cls(CFG)
        p = random_params(m, seed=4)

        @jax.jit
        def run(p, toks):
            cache = models.init_cache(CFG, 2, 22)
            outs = []
            for s in range(0, 20, 5):
                o, cache = models.prefill(m, p, toks[:, s:s + 5], cache)
                outs.append(o)
            return jnp.concatenate(outs, 1), cache

        out, cache = run(p, toks)
        np.testing.assert_allclose(np.asarray(out), np.asarray(fwd(m)(p, toks)), atol=1e-5,
                                   rtol=1e-5)
        np.testing.assert_array_equal(cache.lengths, [20, 20])


def test_bucketed_scan_compiles_once_and_overflow_is_dropped(block):
    """A second call with other lengths compiles nothing; lengths past max_len (dropped
    writes) fall in the last bucket."""
    block(4)
    m = PolicyModel(CFG)
    p = random_params(m)
    step = jax.jit(lambda p, tok, c: models.decode_step(m, p, tok, c))
    cache = models.init_cache(CFG, 2, 12)
    o1, c1 = step(p, jnp.array([3, 4]), cache)
    n = step._cache_size()
    o2, c2 = step(p, jnp.array([3, 4]), c1.replace(lengths=jnp.array([11, 30], jnp.int32)))
    assert step._cache_size() == n == 1
    np.testing.assert_array_equal(c2.lengths, [12, 31])
    assert np.isfinite(np.asarray(o2)).all()


def test_kv_len_and_write_arguments():
    m = PolicyModel(CFG)
    p = random_params(m)
    cache = models.init_cache(CFG, 2, 8)
    tok = jnp.array([[5], [6]], jnp.int32)
    out, kv = m.apply({"params": p}, tok, cache=cache, kv_len=3, write=False)
    assert isinstance(kv, tuple) and kv[0].shape == (2, 2, 1, 2, 8)
    out_w, new = m.apply({"params": p}, tok, cache=cache)
    np.testing.assert_allclose(out, out_w, atol=1e-6)
    np.testing.assert_allclose(new.k[:, :, 0], kv[0][:, :, 0], atol=1e-6)
    for bad in (0, 9, 2.5, True):
        with pytest.raises(ValueError, match="kv_len"):
            m.apply({"params": p}, tok, cache=cache, kv_len=bad)
    with pytest.raises(ValueError, match="kv_len"):
        m.apply({"params": p}, tok, kv_len=3)
