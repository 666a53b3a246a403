"""cached_attention (XLA and Pallas paths) against a NumPy loop: a chunk over a cache prefix of
per-row length plus its own keys causally; the Pallas path is the one taken for short chunks."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from models import attention
from models.attention import cached_attention


def numpy_cached(q, k_new, v_new, k_cache, v_cache, lengths, scale):
    q, k_new, v_new, k_cache, v_cache = (np.asarray(x, np.float64)
                                         for x in (q, k_new, v_new, k_cache, v_cache))
    b, c, h, d = q.shape
    g = h // k_new.shape[2]
    out = np.zeros((b, c, h, d))
    for bi in range(b):
        n = int(lengths[bi])
        for i in range(c):
            for hi in range(h):
                keys = np.concatenate([k_cache[bi, :n, hi // g], k_new[bi, :i + 1, hi // g]])
                vals = np.concatenate([v_cache[bi, :n, hi // g], v_new[bi, :i + 1, hi // g]])
                s = scale * keys @ q[bi, i, hi]
                p = np.exp(s - s.max())
                out[bi, i, hi] = p @ vals / p.sum()
    return out


def inputs(seed, b, c, s, h, hkv, d, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    return (jax.random.normal(ks[0], (b, c, h, d), dtype) * 2,
            jax.random.normal(ks[1], (b, c, hkv, d), dtype),
            jax.random.normal(ks[2], (b, c, hkv, d), dtype),
            jax.random.normal(ks[3], (b, s, hkv, d), dtype),
            jax.random.normal(ks[4], (b, s, hkv, d), dtype))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("c,h,hkv", [(1, 4, 2), (3, 4, 1), (2, 2, 2)])
def test_cached_attention_matches_numpy(impl, c, h, hkv):
    s, d = 20, 8
    q, kn, vn, kc, vc = inputs(c * 10 + h, 4, c, s, h, hkv, d)
    lengths = jnp.array([0, s, 7, 13], jnp.int32)     # an empty cache, a full one, mixed depths
    got = jax.jit(lambda *a: cached_attention(*a, 0.3, impl=impl))(q, kn, vn, kc, vc, lengths)
    np.testing.assert_allclose(got, numpy_cached(q, kn, vn, kc, vc, lengths, 0.3), atol=2e-5)


def test_pallas_path_bfloat16_close_to_xla():
    q, kn, vn, kc, vc = inputs(3, 3, 1, 40, 4, 2, 16, jnp.bfloat16)
    lengths = jnp.array([40, 0, 21], jnp.int32)
    x = cached_attention(q, kn, vn, kc, vc, lengths, 0.25, impl="xla")
    p = jax.jit(lambda *a: cached_attention(*a, 0.25, impl="pallas"))(q, kn, vn, kc, vc, lengths)
    assert p.dtype == jnp.bfloat16
    ref = numpy_cached(*(a.astype(jnp.float32) for a in (q, kn, vn, kc, vc)), lengths, 0.25)
    np.testing.assert_allclose(np.asarray(p, np.float32), ref, atol=3e-2)
    np.testing.assert_allclose(np.asarray(p, np.float32), np.asarray(x, np.float32), atol=3e-2)


def test_pallas_kernel_is_called_for_short_chunks_only(monkeypatch):
    calls = []
    real = pallas_kernels.flash_decode

    def counted(*a, **kw):
        calls.append(a[0].shape)
        return real(*a, **kw)
    monkeypatch.setattr(pallas_kernels, "flash_decode", counted)
    h, hkv = 4, 2
    for c in (1, attention.PALLAS_CACHED_MAX_GROUP // 2, attention.PALLAS_CACHED_MAX_GROUP // 2 + 1):
        q, kn, vn, kc, vc = inputs(c, 2, c, 8, h, hkv, 8)
        lengths = jnp.array([3, 8], jnp.int32)
        got = cached_attention(q, kn, vn, kc, vc, lengths, 0.3, impl="pallas")
        want = cached_attention(q, kn, vn, kc, vc, lengths, 0.3, impl="xla")
        np.testing.assert_allclose(got, want, atol=2e-5)
    # the kernel sees the C·G queries of each kv head as rows: [B, Hkv·C·G, D]
    assert calls == [(2, h, 8), (2, h * attention.PALLAS_CACHED_MAX_GROUP // 2, 8)]


def test_cached_path_uses_pallas_only_when_named():
    assert attention.cached_attention_impl("pallas") == "pallas"
    assert attention.cached_attention_impl("auto") == "xla"
    assert attention.cached_attention_impl("xla") == "xla"
    with pytest.raises(ValueError, match="'triton'"):
        attention.cached_attention_impl("triton")
