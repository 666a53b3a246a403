"""Trunk + heads: NumPy reference forward, packing / padding, scan vs unrolled, remat, bf16,
heads and trunk copying, attention implementations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import ModelConfig, PolicyModel, RewardModel, ValueModel
from models.attention import segment_causal_mask, xla_attention
from tests.models import numpy_ref
from tests.models.helpers import fwd, random_params

BASE = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
            max_seq_len=64, attention_impl="xla")


def cfg_(**kw):
    return ModelConfig(**{**BASE, **kw})


def make(cfg, cls=PolicyModel, seed=0):
    m = cls(cfg)
    return m, random_params(m, seed)


def tokens_(b, t, seed=0, vocab=64):
    return jnp.asarray(np.random.default_rng(seed).integers(2, vocab, (b, t)), jnp.int32)


@pytest.mark.parametrize("kw", [{}, {"qkv_bias": True}, {"tie_embeddings": True},
                                {"n_kv_heads": 1, "head_dim": 6}, {"n_kv_heads": 4},
                                {"rope_scaling": {"type": "yarn", "factor": 4.0,
                                                  "original_max_seq_len": 8}}])
def test_forward_matches_numpy_reference(kw):
    cfg = cfg_(**kw)
    m, p = make(cfg)
    toks = tokens_(2, 7)
    out = fwd(m)(p, toks)
    assert out.dtype == jnp.float32 and out.shape == (2, 7, 64)
    inv, ms = models.rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_dict,
                                      cfg.max_seq_len)
    ref = numpy_ref.forward(cfg, p, toks, inv_freq=inv if kw.get("rope_scaling") else None,
                            mscale=ms)
    np.testing.assert_allclose(np.asarray(out), ref, atol=1e-4, rtol=1e-4)


def test_positions_and_segments_match_numpy_reference():
    cfg = cfg_()
    m, p = make(cfg)
    toks = tokens_(2, 9, seed=1)
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0, 0], [3, 3, 3, 3, 3, 3, 3, 3, 3]], jnp.int32)
    pos = jnp.array([[0, 1, 2, 0, 1, 2, 3, 0, 0], [5, 6, 7, 8, 9, 10, 11, 12, 13]], jnp.int32)
    out = fwd(m)(p, toks, positions=pos, segment_ids=seg)
    ref = numpy_ref.forward(cfg, p, toks, positions=pos, segment_ids=seg)
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(out)[real], ref[real], atol=1e-4, rtol=1e-4)
    assert np.isfinite(np.asarray(out)).all()


def test_packed_rows_equal_separate_runs():
    cfg = cfg_()
    m, p = make(cfg)
    a, b = tokens_(1, 5, seed=2), tokens_(1, 4, seed=3)
    packed = jnp.concatenate([a, b], axis=1)
    seg = jnp.array([[1] * 5 + [2] * 4], jnp.int32)
    pos = jnp.array([list(range(5)) + list(range(4))], jnp.int32)
    out = fwd(m)(p, packed, positions=pos, segment_ids=seg)
    np.testing.assert_allclose(out[0, :5], fwd(m)(p, a)[0], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(out[0, 5:], fwd(m)(p, b)[0], atol=1e-5, rtol=1e-5)
    # without segment ids the second sequence would see the first: outputs differ
    mixed = fwd(m)(p, packed, positions=pos)
    assert np.abs(np.asarray(mixed[0, 5:] - out[0, 5:])).max() > 1e-3


def test_padding_never_changes_real_tokens():
    cfg = cfg_()
    m, p = make(cfg)
    toks = tokens_(1, 6, seed=4)
    base = fwd(m)(p, toks)
    for pads in (jnp.zeros((1, 3), jnp.int32), tokens_(1, 3, seed=9)):   # any pad content
        for left in (False, True):
            row = jnp.concatenate([pads, toks] if left else [toks, pads], axis=1)
            seg = jnp.array([[0] * 3 + [1] * 6] if left else [[1] * 6 + [0] * 3], jnp.int32)
            pos = jnp.array([[0] * 3 + list(range(6))] if left else [list(range(6)) + [0] * 3])
            out = fwd(m)(p, row, positions=pos, segment_ids=seg)
            real = out[0, 3:] if left else out[0, :6]
            np.testing.assert_allclose(real, base[0], atol=1e-5, rtol=1e-5)
            assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("remat", [False, True])
def test_scan_layers_identical_to_unrolled(remat):
    cfg = cfg_(n_layers=2, d_ff=32)
    m, p = make(cfg)
    ms = PolicyModel(cfg_(n_layers=2, d_ff=32, scan_layers=True, remat=remat))
    ps = models.stack_layer_params(p, 2)
    assert jax.tree.structure(ps) == jax.tree.structure(random_params(ms))
    toks = tokens_(2, 6)
    seg = jnp.array([[1, 1, 1, 2, 2, 0], [1, 1, 1, 1, 1, 1]], jnp.int32)
    a = fwd(m)(p, toks, segment_ids=seg)
    b = fwd(ms)(ps, toks, segment_ids=seg)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    un = models.unstack_layer_params(ps)
    assert jax.tree.all(jax.tree.map(lambda x, y: bool((x == y).all()), un, p))
    if not remat:
        return
    # gradients agree too (remat / scan only change scheduling)
    loss = lambda mod, q: mod.apply({"params": q}, toks, segment_ids=seg).sum()  # noqa: E731
    g1 = models.stack_layer_params(jax.jit(jax.grad(lambda q: loss(m, q)))(p), 2)
    g2 = jax.jit(jax.grad(lambda q: loss(ms, q)))(ps)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4), g1, g2)


def test_remat_unrolled_same_output():
    cfg = cfg_()
    m, p = make(cfg)
    toks = tokens_(2, 5)
    np.testing.assert_allclose(fwd(PolicyModel(cfg_(remat=True)))(p, toks),
                               fwd(m)(p, toks), atol=1e-6)


def test_bfloat16():
    cfg = cfg_(dtype="bfloat16", param_dtype="bfloat16")
    m = PolicyModel(cfg)
    p = random_params(m)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(p))
    toks = tokens_(2, 6)
    out = fwd(m)(p, toks)
    assert out.dtype == jnp.float32
    p32 = jax.tree.map(lambda x: x.astype(jnp.float32), p)
    ref = fwd(PolicyModel(cfg_()))(p32, toks)
    err = float(jnp.abs(out - ref).max())
    assert err < 0.05 * float(jnp.abs(ref).max()) + 1e-2
    # mixed: bf16 compute, f32 params
    out2 = fwd(PolicyModel(cfg_(dtype="bfloat16")))(p32, toks)
    assert out2.dtype == jnp.float32 and float(jnp.abs(out2 - ref).max()) < 0.05 + 1e-2
    v = ValueModel(cfg)
    assert fwd(v)(random_params(v), toks).dtype == jnp.float32


def test_value_and_reward_heads():
    cfg = cfg_()
    vm, vp = make(cfg, ValueModel, seed=3)
    toks = tokens_(2, 6)
    vals = fwd(vm)(vp, toks)
    assert vals.shape == (2, 6) and vals.dtype == jnp.float32
    np.testing.assert_allclose(vals, numpy_ref.forward(cfg, vp, toks, head="value"), atol=1e-4)

    rm, rp = make(cfg, RewardModel, seed=5)
    toks = jnp.array([[5, 6, 7, 0, 0, 0], [5, 6, 7, 8, 9, 10], [9, 0, 0, 0, 0, 0]], jnp.int32)
    r = fwd(rm)(rp, toks)
    assert r.shape == (3,) and r.dtype == jnp.float32
    hidden = numpy_ref.forward(cfg, rp, toks, head="hidden")
    per_tok = hidden @ np.asarray(rp["reward_head"]["kernel"])[:, 0] + float(rp["reward_head"]["bias"][0])
    np.testing.assert_allclose(r, [per_tok[0, 2], per_tok[1, 5], per_tok[2, 0]], atol=1e-4)
    # with segment_ids: read at the last non-zero id (here a pad token 0 inside the sequence)
    seg = jnp.array([[1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 0, 0, 0, 0]], jnp.int32)
    r2 = fwd(rm)(rp, toks, segment_ids=seg)
    h2 = numpy_ref.forward(cfg, rp, toks, segment_ids=seg, head="hidden")
    pt2 = h2 @ np.asarray(rp["reward_head"]["kernel"])[:, 0] + float(rp["reward_head"]["bias"][0])
    np.testing.assert_allclose(r2, [pt2[0, 3], pt2[1, 5], pt2[2, 1]], atol=1e-4)
    # custom pad id
    rm7 = RewardModel(cfg_(pad_id=7))
    np.testing.assert_allclose(fwd(rm7)(rp, jnp.array([[5, 6, 7, 7, 7, 7]])),
                               [per_tok[0, 1]], atol=1e-4)


def test_init_params_plain_arrays_and_zero_value_head():
    cfg = cfg_(n_layers=1, d_model=16, d_ff=16, vocab_size=32)
    vm = ValueModel(cfg)
    fresh = models.init_params(vm, jax.random.PRNGKey(0), batch=2, seq=4)
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(fresh))
    assert jax.tree.structure(fresh) == jax.tree.structure(random_params(vm))
    k = fresh["model"]["layers_0"]["self_attn"]["q_proj"]["kernel"]
    assert 0.01 < float(jnp.std(k)) < 0.03                       # normal(0.02) init
    np.testing.assert_array_equal(fresh["model"]["norm"]["scale"], 1.0)
    toks = tokens_(2, 5, vocab=32)
    assert float(jnp.abs(fwd(vm)(fresh, toks)).max()) == 0.0      # zero-init value head


def test_trunk_copy_between_heads():
    cfg = cfg_()
    pm, pp = make(cfg, PolicyModel, seed=0)
    vm = ValueModel(cfg)
    vp0 = random_params(vm, seed=7)
    vp = models.init_value_from_policy(pp, vp0)
    assert set(vp) == {"model", "value_head"}
    jax.tree.map(np.testing.assert_array_equal, vp["model"], pp["model"])
    jax.tree.map(np.testing.assert_array_equal, vp["value_head"], vp0["value_head"])
    # value == head applied to the policy trunk's hidden state
    toks = tokens_(1, 5)
    hidden = numpy_ref.forward(cfg, pp, toks, head="hidden")
    ref = hidden @ np.asarray(vp0["value_head"]["kernel"])[:, 0] + float(vp0["value_head"]["bias"][0])
    np.testing.assert_allclose(fwd(vm)(vp, toks), ref, atol=1e-4)
    rm = RewardModel(cfg)
    rp = models.init_reward_from_policy(pp, random_params(rm, seed=3))
    jax.tree.map(np.testing.assert_array_equal, rp["model"], pp["model"])
    assert "reward_head" in rp and "lm_head" not in rp
    # buffers are copies (safe to donate both trees)
    assert vp["model"]["norm"]["scale"] is not pp["model"]["norm"]["scale"]
    with pytest.raises(ValueError, match="trunk structures differ"):
        models.init_value_from_policy(pp, random_params(ValueModel(cfg_(n_layers=3))))
    with pytest.raises(ValueError, match="shape"):
        models.init_value_from_policy(pp, random_params(ValueModel(cfg_(d_ff=32))))
    with pytest.raises(ValueError, match="'model'"):
        models.init_value_from_policy({"lm_head": {}}, vp)


def test_count_params():
    cfg = cfg_()
    p = random_params(PolicyModel(cfg))
    d, f, v, h, kv, dh = 32, 64, 64, 4, 2, 8
    layer = 2 * d + d * h * dh * 2 + 2 * d * kv * dh + 3 * d * f
    assert models.count_params(p) == v * d + 2 * layer + d + d * v


def test_bad_inputs():
    m, p = make(cfg_())
    with pytest.raises(ValueError, match="tokens"):
        fwd(m)(p, jnp.ones((5,), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids"):
        fwd(m)(p, jnp.ones((2, 5), jnp.int32), segment_ids=jnp.ones((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        fwd(m)(p, jnp.ones((2, 5), jnp.float32))


def test_xla_attention_against_numpy():
    rng = np.random.default_rng(0)
    b, t, h, hkv, d = 2, 6, 4, 2, 8
    q = rng.standard_normal((b, t, h, d)).astype(np.float32)
    k = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    v = rng.standard_normal((b, t, hkv, d)).astype(np.float32)
    seg = np.array([[1, 1, 2, 2, 2, 0], [1, 1, 1, 1, 1, 1]])
    mask = np.asarray(segment_causal_mask(jnp.asarray(seg)))
    out = np.asarray(xla_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), 0.3))
    for bi in range(b):
        for i in range(t):
            vis = [j for j in range(i + 1) if seg[bi, j] == seg[bi, i] != 0]
            assert mask[bi, i].tolist() == [j in vis for j in range(t)]
            for hi in range(h):
                if not vis:
                    np.testing.assert_array_equal(out[bi, i, hi], 0)
                    continue
                s = np.array([q[bi, i, hi] @ k[bi, j, hi // 2] * 0.3 for j in vis])
                p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
                np.testing.assert_allclose(out[bi, i, hi], p @ v[bi, vis, hi // 2], atol=1e-5)


def test_auto_impl_is_xla_on_cpu():
    from models.attention import resolve_attention_impl
    assert jax.default_backend() == "cpu" and resolve_attention_impl("auto") == "xla"
    with pytest.raises(ValueError, match="attention_impl"):
        resolve_attention_impl("cuda")


@pytest.mark.parametrize("backend,devices,want", [("gpu", 1, "pallas"), ("tpu", 1, "pallas"),
                                                  ("gpu", 8, "xla"), ("cpu", 1, "xla")])
def test_auto_impl_is_pallas_on_one_accelerator_only(monkeypatch, backend, devices, want):
    """Under a mesh XLA does not partition a Pallas call (its inputs would be gathered to every
    device), so "auto" picks the kernel on a single GPU / TPU device only."""
    from models.attention import resolve_attention_impl
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    monkeypatch.setattr(jax, "device_count", lambda: devices)
    assert resolve_attention_impl("auto") == want
    assert resolve_attention_impl("pallas") == "pallas"


def test_pallas_path_matches_xla():
    pk = pytest.importorskip("pallas_kernels")
    if not hasattr(pk, "flash_attention"):
        pytest.skip("pallas_kernels.flash_attention not available yet")
    cfg = cfg_(n_layers=1)
    m, p = make(cfg)
    toks = tokens_(2, 8)
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 0, 0], [1] * 8], jnp.int32)
    a = fwd(m)(p, toks, segment_ids=seg)
    b = fwd(PolicyModel(cfg_(n_layers=1, attention_impl="pallas")))(p, toks, segment_ids=seg)
    real = np.asarray(seg) != 0
    np.testing.assert_allclose(np.asarray(b)[real], np.asarray(a)[real], atol=1e-4, rtol=1e-4)
