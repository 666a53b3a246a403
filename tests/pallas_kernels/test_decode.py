"""flash_decode (interpret mode) vs decode_reference and a NumPy loop, GQA, lengths 0..S."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk


def numpy_decode(q, kc, vc, lengths, scale):
    q, kc, vc = (np.asarray(x, np.float64) for x in (q, kc, vc))
    b, h, d = q.shape
    g = h // kc.shape[2]
    out = np.zeros((b, h, d))
    for bi in range(b):
        n = int(lengths[bi])
        for hi in range(h):
            if n == 0:
                continue
            lg = scale * kc[bi, :n, hi // g] @ q[bi, hi]
            p = np.exp(lg - lg.max())
            out[bi, hi] = (p / p.sum()) @ vc[bi, :n, hi // g]
    return out


def inputs(seed, b, s, h, hkv, d, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    return (jax.random.normal(ks[0], (b, h, d), dtype),
            jax.random.normal(ks[1], (b, s, hkv, d), dtype),
            jax.random.normal(ks[2], (b, s, hkv, d), dtype))


@pytest.mark.parametrize("s,h,hkv,d,block_k,splits,backend", [
    (50, 4, 2, 16, 16, None, None),     # S not a multiple of the block, GQA 2
    (64, 8, 2, 8, 16, 2, None),         # split-K merge, GQA 4
    (37, 2, 2, 16, 8, 3, "tpu"),        # TPU layout (SMEM lengths) in interpret mode
])
def test_decode_matches_references(s, h, hkv, d, block_k, splits, backend):
    b = 5
    q, kc, vc = inputs(s, b, s, h, hkv, d)
    lengths = jnp.array([0, s, 1, s // 2, s - 1], jnp.int32)
    fn = jax.jit(lambda *a: pk.flash_decode(*a, block_k=block_k, num_splits=splits,
                                            backend=backend,
                                            interpret=True if backend else None))
    got = np.asarray(fn(q, kc, vc, lengths))
    assert np.isfinite(got).all()
    assert np.all(got[0] == 0), "length 0 must give zeros"
    np.testing.assert_allclose(got, pk.decode_reference(q, kc, vc, lengths), atol=2e-5)
    np.testing.assert_allclose(got, numpy_decode(q, kc, vc, lengths, 1 / np.sqrt(d)),
                               atol=2e-5)


@pytest.mark.parametrize("splits,backend", [(1, None), (3, None), (2, "tpu")])
def test_decode_log_sum_exp(splits, backend):
    """return_lse: the output in float32 and lse_bh = log Σ_{j<L_b} exp(scale q·k_j), −inf at L_b = 0."""
    b, s, h, hkv, d = 4, 48, 6, 2, 8
    q, kc, vc = inputs(11, b, s, h, hkv, d)
    lengths = jnp.array([0, s, 5, 30], jnp.int32)
    out, lse = jax.jit(lambda *a: pk.flash_decode(
        *a, block_k=8, num_splits=splits, return_lse=True, backend=backend,
        interpret=True if backend else None))(q, kc, vc, lengths)
    assert out.dtype == lse.dtype == jnp.float32 and lse.shape == (b, h)
    np.testing.assert_allclose(out, numpy_decode(q, kc, vc, lengths, 1 / np.sqrt(d)), atol=2e-5)
    qn, kn = np.asarray(q, np.float64), np.asarray(kc, np.float64)
    g = h // hkv
    for bi in range(b):
        for hi in range(h):
            n = int(lengths[bi])
            if n == 0:
                assert lse[bi, hi] == -np.inf
                continue
            lg = kn[bi, :n, hi // g] @ qn[bi, hi] / np.sqrt(d)
            want = lg.max() + np.log(np.exp(lg - lg.max()).sum())
            np.testing.assert_allclose(lse[bi, hi], want, rtol=1e-5, atol=1e-5)


def test_decode_matches_flash_attention_last_row():
    """Decoding the last token equals causal flash attention's last query row."""
    s, h, hkv, d = 24, 4, 1, 16
    q, kc, vc = inputs(7, 2, s, h, hkv, d)
    qfull = jax.random.normal(jax.random.PRNGKey(8), (2, s, h, d)).at[:, -1].set(q)
    full = pk.attention_reference(qfull, kc, vc, causal=True)
    got = jax.jit(lambda *a: pk.flash_decode(*a, block_k=8))(q, kc, vc, jnp.array([s, s]))
    np.testing.assert_allclose(got, full[:, -1], atol=2e-5)


def test_decode_bfloat16_and_sm_scale():
    q, kc, vc = inputs(9, 3, 40, 4, 2, 16, jnp.bfloat16)
    lengths = jnp.array([40, 0, 13], jnp.int32)
    got = jax.jit(lambda *a: pk.flash_decode(*a, sm_scale=0.2, block_k=16))(q, kc, vc, lengths)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32),
                               numpy_decode(q.astype(jnp.float32), kc.astype(jnp.float32),
                                            vc.astype(jnp.float32), lengths, 0.2), atol=3e-2)


def test_decode_bad_inputs():
    q, kc, vc = np.zeros((2, 3, 8), np.float32), np.zeros((2, 16, 2, 8), np.float32), \
        np.zeros((2, 16, 2, 8), np.float32)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        pk.flash_decode(q, kc, vc, jnp.array([1, 2]))
    q = np.zeros((2, 4, 8), np.float32)
    with pytest.raises(ValueError, match="lengths"):
        pk.flash_decode(q, kc, vc, jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="block_k"):
        pk.flash_decode(q, kc, vc, jnp.array([1, 2]), block_k=12)
