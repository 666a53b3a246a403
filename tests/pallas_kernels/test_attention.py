"""flash_attention (interpret mode) vs attention_reference, a NumPy reference and
jax.nn.dot_product_attention: forward and dq / dk / dv, GQA, segments, odd / unequal lengths."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pallas_kernels as pk

SMALL = pk.BlockSizes(block_q=16, block_k=16, block_q_dq=16, block_k_dq=16, block_q_dkv=16,
                      block_k_dkv=16)


def numpy_attention(q, k, v, causal, seg, scale):
    """Independent float64 loop-over-heads reference."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, d = q.shape
    s, hkv = k.shape[1], k.shape[2]
    out = np.zeros((b, t, h, d))
    for bi in range(b):
        for hi in range(h):
            kh = hi // (h // hkv)
            logits = scale * q[bi, :, hi] @ k[bi, :, kh].T          # [t, s]
            vis = np.ones((t, s), bool)
            if causal:
                vis &= np.arange(s)[None, :] <= np.arange(t)[:, None] + (s - t)
            if seg is not None:
                sg = np.asarray(seg[bi])
                vis &= (sg[:, None] == sg[None, :]) & (sg[None, :] != 0)
            for i in range(t):
                if vis[i].any():
                    lg = np.where(vis[i], logits[i], -np.inf)
                    p = np.exp(lg - lg.max())
                    out[bi, i, hi] = (p / p.sum()) @ v[bi, :, kh]
    return out


def make_inputs(seed, b, t, s, h, hkv, d, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (b, t, h, d), dtype)
    k = jax.random.normal(ks[1], (b, s, hkv, d), dtype)
    v = jax.random.normal(ks[2], (b, s, hkv, d), dtype)
    ct = jax.random.normal(ks[3], (b, t, h, d), jnp.float32)
    return q, k, v, ct


def random_segments(rng, b, t):
    """Packed segments 1..n with a padded (id 0) tail, plus one fully padded row if b > 1."""
    seg = np.zeros((b, t), np.int32)
    for i in range(b):
        pos, sid = 0, 1
        stop = rng.integers(max(1, t // 2), t + 1)
        while pos < stop:
            n = int(rng.integers(1, max(2, t // 2)))
            seg[i, pos:min(stop, pos + n)] = sid
            pos, sid = pos + n, sid + 1
    if b > 1:
        seg[-1] = 0
    return jnp.asarray(seg)


@functools.lru_cache(maxsize=None)
def _fns(causal, has_seg, bs, backend):
    def kern(q, k, v, seg):
        return pk.flash_attention(q, k, v, causal=causal, segment_ids=seg, block_sizes=bs,
                                  backend=backend, interpret=True if backend else None)

    def ref(q, k, v, seg):
        return pk.attention_reference(q, k, v, causal=causal, segment_ids=seg)

    def with_grads(f):
        def g(q, k, v, seg, ct):
            out, vjp = jax.vjp(lambda a, b_, c: f(a, b_, c, seg), q, k, v)
            return (out, *vjp(ct.astype(out.dtype)))
        return jax.jit(g)

    return with_grads(kern), with_grads(ref)


def check(q, k, v, ct, causal, seg, bs=SMALL, atol=2e-5, backend=None, numpy_check=True):
    kern, ref = _fns(causal, seg is not None, bs, backend)
    got = kern(q, k, v, seg, ct)
    want = ref(q, k, v, seg, ct)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        a32, b32 = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert np.isfinite(a32).all(), f"{name} has non-finite values"
        np.testing.assert_allclose(a32, b32, atol=atol, rtol=atol, err_msg=name)
    if numpy_check:
        scale = 1 / np.sqrt(q.shape[-1])
        np.testing.assert_allclose(np.asarray(got[0], np.float32),
                                   numpy_attention(q, k, v, causal, seg, scale),
                                   atol=max(atol, 1e-5), rtol=max(atol, 1e-5))
    return got


@settings(max_examples=8, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(b=st.integers(1, 2), t=st.integers(1, 70), s=st.integers(1, 70),
       hkv=st.sampled_from([1, 2]), ratio=st.sampled_from([1, 2, 4]),
       d=st.sampled_from([8, 16]), causal=st.booleans(),
       mode=st.sampled_from(["self", "cross", "seg"]),
       seed=st.integers(0, 2**16))
def test_matches_reference_random_shapes(b, t, s, hkv, ratio, d, causal, mode, seed):
    if mode != "cross":
        s = t
    q, k, v, ct = make_inputs(seed, b, t, s, hkv * ratio, hkv, d)
    seg = random_segments(np.random.default_rng(seed), b, t) if mode == "seg" else None
    check(q, k, v, ct, causal, seg)


@pytest.mark.parametrize("t,s,hkv,ratio,causal", [(33, 33, 2, 2, True), (20, 45, 1, 4, False)])
def test_matches_jax_dot_product_attention(t, s, hkv, ratio, causal):
    """jax.nn.dot_product_attention supports GQA, no mask or top-left causal (T == S here)."""
    q, k, v, ct = make_inputs(t + s, 2, t, s, hkv * ratio, hkv, 16)
    f = lambda q, k, v: pk.flash_attention(q, k, v, causal=causal, block_sizes=SMALL)  # noqa
    g = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=causal)  # noqa
    o1, vjp1 = jax.vjp(jax.jit(f), q, k, v)
    o2, vjp2 = jax.vjp(g, q, k, v)
    np.testing.assert_allclose(o1, o2, atol=2e-5, rtol=2e-5)
    for a, b_ in zip(vjp1(ct), vjp2(ct)):
        np.testing.assert_allclose(a, b_, atol=2e-5, rtol=2e-5)


def test_causal_t_longer_than_s_aligns_to_end_and_gives_zero_rows():
    """T > S: queries i < T - S see no key -> output 0, no NaN, zero gradient rows."""
    t, s = 40, 23
    q, k, v, ct = make_inputs(1, 1, t, s, 4, 2, 16)
    out, dq, dk, dv = check(q, k, v, ct, True, None)
    assert np.all(np.asarray(out)[:, : t - s] == 0)
    assert np.all(np.asarray(dq)[:, : t - s] == 0)
    # the last query sees every key: equals unmasked attention for that row
    full = pk.attention_reference(q, k, v, causal=False)
    np.testing.assert_allclose(out[:, -1], full[:, -1], atol=1e-5)


def test_fully_padded_rows_give_zero_output_and_gradients():
    t = 37
    q, k, v, ct = make_inputs(2, 2, t, t, 2, 1, 8)
    seg = np.ones((2, t), np.int32)
    seg[0, 30:] = 0          # padded tail
    seg[1, :] = 0            # everything padded
    seg = jnp.asarray(seg)
    for causal in (True, False):
        out, dq, dk, dv = check(q, k, v, ct, causal, seg)
        assert np.all(np.asarray(out)[1] == 0) and np.all(np.asarray(out)[0, 30:] == 0)
        for g in (dq, dk, dv):
            assert np.all(np.asarray(g)[1] == 0) and np.all(np.asarray(g)[0, 30:] == 0)


def test_bfloat16_with_looser_tolerance():
    q, k, v, ct = make_inputs(3, 2, 50, 50, 4, 2, 16, jnp.bfloat16)
    seg = random_segments(np.random.default_rng(3), 2, 50)
    kern, _ = _fns(True, True, SMALL, None)
    got = kern(q, k, v, seg, ct)
    want = _fns(True, True, SMALL, None)[1](q.astype(jnp.float32), k.astype(jnp.float32),
                                            v.astype(jnp.float32), seg, ct)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.dtype == jnp.bfloat16, name
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=6e-2, rtol=6e-2,
                                   err_msg=name)


def test_default_block_sizes_and_sm_scale():
    q, k, v, ct = make_inputs(4, 1, 70, 70, 2, 2, 16)
    out = jax.jit(lambda q, k, v: pk.flash_attention(q, k, v, sm_scale=0.3))(q, k, v)
    np.testing.assert_allclose(out, pk.attention_reference(q, k, v, sm_scale=0.3), atol=2e-5)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, True, None, 0.3), atol=2e-5)


def test_tpu_layout_in_interpret_mode():
    """The [B, H, T, D] (Mosaic) layout path, run in interpret mode."""
    q, k, v, ct = make_inputs(5, 2, 29, 29, 4, 2, 8)
    seg = random_segments(np.random.default_rng(5), 2, 29)
    check(q, k, v, ct, True, seg, backend="tpu")
    q, k, v, _ = make_inputs(6, 1, 21, 40, 4, 1, 16)   # cross attention, forward only
    out = jax.jit(lambda q, k, v: pk.flash_attention(q, k, v, causal=False, block_sizes=SMALL,
                                                     backend="tpu", interpret=True))(q, k, v)
    np.testing.assert_allclose(out, numpy_attention(q, k, v, False, None, 0.25), atol=2e-5)


def test_block_sizes_dataclass():
    bs = pk.BlockSizes.default("gpu")
    assert bs.block_q >= 16 and bs.block_k >= 16
    with pytest.raises(Exception):
        bs.block_q = 32  # frozen
    assert pk.BlockSizes.default("tpu").block_q % 128 == 0
    with pytest.raises(ValueError, match="block_k"):
        pk.BlockSizes(block_q=16, block_k=24)
    with pytest.raises(ValueError, match="backend"):
        pk.BlockSizes.default("quantum")


def np_inputs(b, t, s, h, hkv, d):
    return (np.zeros((b, t, h, d), np.float32), np.zeros((b, s, hkv, d), np.float32),
            np.zeros((b, s, hkv, d), np.float32), None)


def test_bad_inputs_raise_clear_errors():
    q, k, v, _ = np_inputs(1, 8, 8, 3, 2, 8)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        pk.flash_attention(q, k, v)
    q, k, v, _ = np_inputs(1, 8, 9, 2, 2, 8)
    with pytest.raises(ValueError, match="T == S"):
        pk.flash_attention(q, k, v, segment_ids=jnp.ones((1, 8), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        pk.flash_attention(q, q, q, segment_ids=jnp.ones((1, 7), jnp.int32))
    with pytest.raises(ValueError, match="q must be"):
        pk.flash_attention(q[0], k, v)
    with pytest.raises(ValueError, match="interpret=False"):
        pk.flash_attention(q, k, v, interpret=False, backend="cpu")
    with pytest.raises(ValueError, match="block_sizes"):
        pk.flash_attention(q, k, v, block_sizes=(16, 16))
