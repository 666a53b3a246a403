"""cached_attention (XLA and Pallas paths) against a NumPy loop: a chunk over a cache prefix of
per-row length plus its own keys causally; the Pallas path is the one taken for short chunks."""
import functools

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


# ----------------------------------------------------------------------------- kernels on a mesh
# XLA does not partition a Pallas call: without the per-shard call the compiled program gathers
# the kernel's inputs to every device (all-gathers around it). Under ``on_mesh`` the kernels run
# per shard: the same numbers, no all-gather, the output sharded like the rows.
needs_8 = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (forced) devices")


def _mesh_and_rows(shape=(2, 2, 2)):
    from jax.sharding import NamedSharding, PartitionSpec as P
    from models.sharding import make_mesh
    mesh = make_mesh(shape, devices=jax.devices()[:8])
    return mesh, NamedSharding(mesh, P(("data", "fsdp")))


@needs_8
@pytest.mark.parametrize("b,hkv", [(4, 1), (3, 2)])   # rows split (heads not) / heads split
def test_flash_attention_runs_per_shard_on_a_mesh(b, hkv):
    from models.sharding import on_mesh
    mesh, rows = _mesh_and_rows()
    if b % 4:                                      # rows that do not split: replicated
        rows = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    t, h, d = 8, 4, 8
    ks = jax.random.split(jax.random.PRNGKey(b * 10 + hkv), 4)
    q = jax.random.normal(ks[0], (b, t, h, d))
    k, v = (jax.random.normal(kk, (b, t, hkv, d)) for kk in ks[1:3])
    seg = jnp.ones((b, t), jnp.int32).at[0, 5:].set(0).at[b - 1, :3].set(2)
    flash = functools.partial(pallas_kernels.flash_attention, causal=True, sm_scale=0.3)

    def loss(q, k, v, seg):
        o = attention._flash_attention_per_shard(flash, q, k, v, seg)
        return (o * jnp.cos(o)).sum(), o

    grad = jax.grad(loss, argnums=(0, 1, 2), has_aux=True)
    want_g, want_o = jax.jit(grad)(q, k, v, seg)          # no mesh: the kernel called directly
    placed = [jax.device_put(x, rows) for x in (q, k, v, seg)]
    sharded = jax.jit(on_mesh(grad, mesh)).lower(*placed).compile()
    got_g, got_o = sharded(*placed)
    np.testing.assert_allclose(got_o, want_o, atol=1e-5)
    for g_got, g_want in zip(got_g, want_g):
        np.testing.assert_allclose(g_got, g_want, atol=1e-5)
    assert "all-gather" not in sharded.as_text()
    if b % 4 == 0:
        assert got_o.sharding.spec[0] in (("data", "fsdp"), "data")   # rows stay split
        plain = jax.jit(lambda *a: loss(*a)[1]).lower(*placed).compile().as_text()
        assert "all-gather" in plain                    # what the per-shard call avoids


@needs_8
def test_cached_pallas_attention_runs_per_shard_on_a_mesh():
    from models.sharding import on_mesh
    mesh, rows = _mesh_and_rows()
    q, kn, vn, kc, vc = inputs(7, 4, 1, 16, 4, 2, 8)
    lengths = jnp.array([0, 16, 5, 11], jnp.int32)
    args = [jax.device_put(x, rows) for x in (q, kn, vn, kc, vc, lengths)]
    f = lambda *a: cached_attention(*a, 0.3, impl="pallas")      # noqa: E731
    sharded = jax.jit(on_mesh(f, mesh)).lower(*args).compile()
    np.testing.assert_allclose(sharded(*args), numpy_cached(q, kn, vn, kc, vc, lengths, 0.3),
                               atol=2e-5)
    assert "all-gather" not in sharded.as_text()
    assert "all-gather" in jax.jit(f).lower(*args).compile().as_text()


@needs_8
def test_auto_picks_the_kernels_under_a_context_mesh_only_on_an_accelerator(monkeypatch):
    from models.sharding import on_mesh
    mesh, _ = _mesh_and_rows()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention.resolve_attention_impl("auto") == "xla"          # 8 devices, no mesh
    assert on_mesh(lambda: attention.resolve_attention_impl("auto"), mesh)() == "pallas"
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert on_mesh(lambda: attention.resolve_attention_impl("auto"), mesh)() == "xla"
