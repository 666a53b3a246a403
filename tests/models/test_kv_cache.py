"""KV cache: decode / chunked prefill with pads equal the full forward pass; jit + lax.scan with
fixed shapes (one compile); scan_layers; GQA / MQA / MHA; value model; bf16; cache errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import ModelConfig, PolicyModel, ValueModel
from tests.models.helpers import fwd, random_params

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
            max_seq_len=64, attention_impl="xla")


def cfg_(**kw):
    return ModelConfig(**{**BASE, **kw})


def tokens_(b, t, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(2, 64, (b, t)), jnp.int32)


_prefill = jax.jit(models.prefill, static_argnums=0)
_decode = jax.jit(models.decode_step, static_argnums=0)


@pytest.mark.parametrize("kw", [{}, {"n_kv_heads": 1}, {"n_kv_heads": 4}, {"scan_layers": True},
                                {"qkv_bias": True, "tie_embeddings": True,
                                 "rope_scaling": {"type": "yarn", "factor": 2.0,
                                                  "original_max_seq_len": 8}},
                                {"attention_impl": "pallas"}])
def test_token_by_token_decode_equals_full_forward(kw):
    cfg = cfg_(**kw)
    m = PolicyModel(cfg)
    p = random_params(m)
    b, t = 2, 7
    toks = tokens_(b, t)
    full = fwd(m)(p, toks)
    cache = models.init_cache(cfg, b, 10)
    outs = []
    for i in range(t):
        o, cache = _decode(m, p, toks[:, i], cache)
        outs.append(o)
    np.testing.assert_allclose(np.stack(outs, 1), full, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(cache.lengths, [t, t])
    # the cache holds the post-RoPE keys of exactly those tokens (first t slots), zeros after
    assert cache.k.shape == (cfg.n_layers, b, 10, cfg.n_kv_heads, cfg.head_dim)
    assert float(jnp.abs(cache.k[:, :, t:]).max()) == 0.0
    assert float(jnp.abs(cache.k[:, :, :t]).min()) >= 0 and float(jnp.abs(cache.k[:, :, :t]).max()) > 0


def _chunked_layout():
    """Row layouts of chunk sizes 5, 3, 4 with per-row valid prefixes (0 = pad)."""
    n_valid = np.array([[3, 3, 2],     # row 0
                        [5, 0, 4],     # row 1: an empty middle chunk
                        [1, 3, 1]])    # row 2
    sizes = [5, 3, 4]
    valid = np.concatenate([np.arange(c)[None, :] < n_valid[:, [j]] for j, c in enumerate(sizes)], 1)
    return sizes, valid


@pytest.mark.parametrize("kw", [{}, {"scan_layers": True, "remat": True},
                                {"attention_impl": "pallas"}])
def test_chunked_prefill_with_pads_equals_full_forward(kw):
    cfg = cfg_(**kw)
    m = PolicyModel(cfg)
    p = random_params(m, seed=1)
    sizes, valid = _chunked_layout()
    b, t = valid.shape
    toks = tokens_(b, t, seed=3)
    seg = valid.astype(np.int32)
    pos = np.cumsum(valid, 1) - 1
    full = np.asarray(fwd(m)(p, toks, positions=jnp.asarray(pos), segment_ids=jnp.asarray(seg)))
    cache = models.init_cache(cfg, b, 16)
    outs, start = [], 0
    # chunk 1 and 2 via prefill, chunk 3 token by token via decode_step(valid=...)
    for c in sizes[:2]:
        o, cache = _prefill(m, p, toks[:, start:start + c], cache, jnp.asarray(valid[:, start:start + c]))
        outs.append(np.asarray(o))
        start += c
    for i in range(start, t):
        o, cache = _decode(m, p, toks[:, i], cache, jnp.asarray(valid[:, i]))
        outs.append(np.asarray(o)[:, None])
    got = np.concatenate(outs, 1)
    np.testing.assert_allclose(got[valid], full[valid], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(cache.lengths, valid.sum(1))
    assert np.isfinite(got).all()


def test_scan_decode_under_jit_single_compile():
    cfg = cfg_()
    m = PolicyModel(cfg)
    p = random_params(m, seed=2)
    b, t, prompt = 3, 9, 4
    toks = tokens_(b, t, seed=5)
    full = fwd(m)(p, toks)

    @jax.jit
    def run(params, toks):
        cache = models.init_cache(cfg, b, 12)
        logits0, cache = models.prefill(m, params, toks[:, :prompt], cache)

        def step(cache, tok):
            out, cache = models.decode_step(m, params, tok, cache)
            return cache, out
        cache, outs = jax.lax.scan(step, cache, toks[:, prompt:].T)
        return logits0, jnp.swapaxes(outs, 0, 1), cache.lengths

    l0, rest, lengths = run(p, toks)
    np.testing.assert_allclose(jnp.concatenate([l0, rest], 1), full, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(lengths, [t] * b)
    # the jitted step is compiled once, whatever the lengths / valid pattern
    traces = []

    def counted(params, tok, cache, valid):
        traces.append(1)
        return models.decode_step(m, params, tok, cache, valid)
    step = jax.jit(counted)
    cache = models.init_cache(cfg, b, 12)
    for i in range(4):
        _, cache = step(p, toks[:, i], cache, jnp.array([True, i % 2 == 0, False]))
    assert len(traces) == 1
    np.testing.assert_array_equal(cache.lengths, [4, 2, 0])


def test_rows_with_valid_false_do_not_advance_or_leak():
    cfg = cfg_()
    m = PolicyModel(cfg)
    p = random_params(m, seed=4)
    toks = tokens_(2, 5, seed=6)
    cache = models.init_cache(cfg, 2, 8)
    _, cache = _prefill(m, p, toks[:, :3], cache)
    # row 1 feeds junk with valid False: its length stays and later logits are unaffected
    _, cache = _decode(m, p, jnp.array([toks[0, 3], 63]), cache, jnp.array([True, False]))
    np.testing.assert_array_equal(cache.lengths, [4, 3])
    o, cache = _decode(m, p, jnp.array([toks[0, 4], toks[1, 3]]), cache)
    full = fwd(m)(p, toks)
    np.testing.assert_allclose(o[0], full[0, 4], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(o[1], full[1, 3], atol=1e-5, rtol=1e-5)


def test_value_model_cache_path():
    cfg = cfg_()
    vm = ValueModel(cfg)
    p = random_params(vm, seed=7)
    toks = tokens_(2, 6, seed=8)
    full = fwd(vm)(p, toks)
    cache = models.init_cache(cfg, 2, 8)
    v0, cache = _prefill(vm, p, toks[:, :4], cache)
    v1, cache = _decode(vm, p, toks[:, 4], cache)
    v2, cache = _decode(vm, p, toks[:, 5], cache)
    assert v0.shape == (2, 4) and v1.shape == (2,)
    np.testing.assert_allclose(jnp.concatenate([v0, v1[:, None], v2[:, None]], 1), full,
                               atol=1e-5, rtol=1e-5)


def test_bf16_cache_dtype_and_closeness():
    cfg = cfg_(dtype="bfloat16")
    m = PolicyModel(cfg)
    p = random_params(m, seed=9)
    toks = tokens_(2, 5, seed=10)
    cache = models.init_cache(cfg, 2, 8)
    assert cache.k.dtype == jnp.bfloat16 and cache.lengths.dtype == jnp.int32
    o, cache = _prefill(m, p, toks, cache)
    assert o.dtype == jnp.float32 and cache.k.dtype == jnp.bfloat16
    full = fwd(m)(p, toks)
    assert float(jnp.abs(o - full).max()) < 0.1 * float(jnp.abs(full).max())


def test_cache_errors():
    cfg = cfg_()
    m = PolicyModel(cfg)
    p = random_params(m)
    with pytest.raises(ValueError, match="KVCache.k has shape"):
        models.prefill(m, p, tokens_(2, 3), models.init_cache(cfg_(n_layers=3), 2, 8))
    with pytest.raises(ValueError, match="expected"):
        models.prefill(m, p, tokens_(3, 3), models.init_cache(cfg, 2, 8))
    with pytest.raises(ValueError, match="valid shape"):
        models.prefill(m, p, tokens_(2, 3), models.init_cache(cfg, 2, 8), jnp.ones((2, 2), bool))
    with pytest.raises(ValueError, match=r"token must be \[B\]"):
        models.decode_step(m, p, tokens_(2, 3), models.init_cache(cfg, 2, 8))
    with pytest.raises(ValueError, match="max_len"):
        models.init_cache(cfg, 2, 0)
    with pytest.raises(ValueError, match="positions / segment_ids"):
        m.apply({"params": p}, tokens_(2, 3), positions=jnp.zeros((2, 3), jnp.int32),
                cache=models.init_cache(cfg, 2, 8))


@pytest.mark.parametrize("block", [0, 8])
@pytest.mark.parametrize("model_cls", [PolicyModel, ValueModel])
def test_prefill_last_only_is_the_last_valid_output(monkeypatch, block, model_cls):
    """``last_only``: each row's output at its last valid position (the full prefill's, picked),
    the same cache; with and without cache-length buckets; rows with pads and an empty row."""
    from models import kv_cache
    monkeypatch.setitem(kv_cache.KV_BLOCK, jax.default_backend(), block)
    cfg = cfg_()
    m = model_cls(cfg)
    p = random_params(m)
    toks = tokens_(4, 6, seed=3)
    valid = jnp.asarray(np.arange(6)[None, :] < np.array([6, 3, 1, 0])[:, None])
    cache = models.init_cache(cfg, 4, 32)
    cache = _prefill(m, p, tokens_(4, 5, seed=4), cache)[1]          # a history first
    full, c_full = _prefill(m, p, toks, cache, valid)
    last, c_last = jax.jit(models.prefill, static_argnums=(0, 5))(m, p, toks, cache, valid, True)
    n = np.asarray(valid).sum(-1)
    want = np.asarray(full)[np.arange(4), np.maximum(n - 1, 0)]
    np.testing.assert_allclose(np.asarray(last)[n > 0], want[n > 0], atol=1e-5, rtol=1e-5)
    assert last.shape == full.shape[:1] + full.shape[2:]
    for a, b in zip(jax.tree.leaves(c_full), jax.tree.leaves(c_last)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_prefill_last_only_builds_no_chunk_logits():
    """The compiled ``last_only`` prefill holds no f32[B, C, V] buffer; the full one does."""
    cfg = cfg_(vocab_size=997)
    m = PolicyModel(cfg)
    p = jax.eval_shape(lambda: random_params(m))
    toks = jax.ShapeDtypeStruct((4, 24), jnp.int32)
    cache = jax.eval_shape(lambda: models.init_cache(cfg, 4, 32))

    def hlo(last_only):
        fn = jax.jit(lambda p, t, c: models.prefill(m, p, t, c, last_only=last_only))
        return fn.lower(p, toks, cache).compile().as_text()

    assert "f32[4,24,997]" in hlo(False)
    assert "f32[4,24,997]" not in hlo(True) and "f32[4,997]" in hlo(True)


def test_pallas_models_decode_through_flash_decode(monkeypatch):
    """attention_impl="pallas" routes the cached path through the decode kernel, once per layer."""
    import pallas_kernels
    calls = []
    real = pallas_kernels.flash_decode
    monkeypatch.setattr(pallas_kernels, "flash_decode",
                        lambda *a, **kw: calls.append(a[0].shape) or real(*a, **kw))
    for impl in ("xla", "pallas"):
        cfg = cfg_(attention_impl=impl)
        m = PolicyModel(cfg)
        p = random_params(m)
        cache = models.init_cache(cfg, 2, 10)
        _, cache = models.prefill(m, p, tokens_(2, 3), cache)
        models.decode_step(m, p, tokens_(2, 1)[:, 0], cache)
    # prefill of 3 tokens (3 x 2 query heads per kv head) and one decode step, each layer
    assert calls == [(2, 12, 8)] * 2 + [(2, 4, 8)] * 2
