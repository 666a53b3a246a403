"""gae / discounted_returns / masked_gae kernels (interpret mode) vs rlax golden values, rlax,
the lax.scan references and independent NumPy Python loops."""
import jax
import numpy as np
import pytest
import rlax

import pallas_kernels as pk


# ---- NumPy loop references -------------------------------------------------------------------
def np_gae(r, v, g, lam):
    r, v, g = (np.asarray(x, np.float64) for x in (r, v, g))
    lam = np.broadcast_to(np.asarray(lam, np.float64), r.shape)
    adv = np.zeros_like(r)
    for b in range(r.shape[0]):
        a = 0.0
        for t in reversed(range(r.shape[1])):
            a = r[b, t] + g[b, t] * v[b, t + 1] - v[b, t] + g[b, t] * lam[b, t] * a
            adv[b, t] = a
    return adv


def np_returns(r, g, boot):
    out = np.zeros(np.shape(r))
    for b in range(out.shape[0]):
        acc = float(boot[b])
        for t in reversed(range(out.shape[1])):
            acc = float(r[b, t]) + float(g[b, t]) * acc
            out[b, t] = acc
    return out


def np_masked_gae(r, v, m, gamma, lam):
    r, v, m = np.asarray(r, np.float64), np.asarray(v, np.float64), np.asarray(m, bool)
    adv = np.zeros_like(r)
    for b in range(r.shape[0]):
        idx = np.flatnonzero(m[b])
        a_next = v_next = 0.0
        for t in idx[::-1]:
            a_next = r[b, t] + gamma * v_next - v[b, t] + gamma * lam * a_next
            v_next = v[b, t]
            adv[b, t] = a_next
    return adv


def random_batch(seed, b, t):
    rng = np.random.default_rng(seed)
    r = rng.normal(size=(b, t)).astype(np.float32)
    v = rng.normal(size=(b, t + 1)).astype(np.float32)
    g = (0.97 * (rng.uniform(size=(b, t)) > 0.15)).astype(np.float32)  # terminations mid-row
    lam = rng.uniform(0.5, 1.0, size=(b, t)).astype(np.float32)
    return r, v, g, lam


# ---- rlax golden values (rlax/_src/multistep_test.py) ----------------------------------------
GAE_R = np.array([[0., 0., 1., 0., -0.5], [0., 0., 0., 0., 1.]], np.float32)
GAE_V = np.array([[1., 4., -3., -2., -1., -1.], [-3., -2., -1., 0.0, 5., -1.]], np.float32)
GAE_G = np.array([[0.99] * 5, [0.9, 0.9, 0.9, 0.0, 0.9]], np.float32)
GAE_EXPECTED = {
    1.0: [[-1.45118, -4.4557, 2.5396, 0.5249, -0.49], [3., 2., 1., 0., -4.9]],
    0.7: [[-0.676979, -5.248167, 2.4846, 0.6704, -0.49], [2.2899, 1.73, 1., 0., -4.9]],
    0.4: [[0.56731, -6.042, 2.3431, 0.815, -0.49], [1.725, 1.46, 1., 0., -4.9]],
}


@pytest.mark.parametrize("lam", [1.0, 0.7, 0.4])
def test_gae_rlax_golden_values(lam):
    got = pk.gae(GAE_R, GAE_V, GAE_G, lam)
    np.testing.assert_allclose(got, GAE_EXPECTED[lam], atol=1e-3)
    per_step = pk.gae(GAE_R, GAE_V, GAE_G, np.full(GAE_R.shape, lam, np.float32))
    np.testing.assert_allclose(per_step, got, atol=1e-6)


def test_discounted_returns_rlax_golden_values():
    r = np.array([[1.0, 0.0, -1.0, 0.0, 1.0], [0.5, 0.8, -0.7, 0.0, 2.1]], np.float32)
    g = np.array([[0.5, 0.9, 1.0, 0.5, 0.8], [0.9, 0.5, 0.3, 0.8, 0.7]], np.float32)
    v = np.array([[3.0, 1.0, 5.0, -5.0, 3.0], [-1.7, 1.2, 2.3, 2.2, 2.7]], np.float32)
    expected = [[1.315, 0.63000005, 0.70000005, 1.7, 3.4],
                [1.33592, 0.9288, 0.2576, 3.192, 3.9899998]]
    np.testing.assert_allclose(pk.discounted_returns(r, g, v[:, -1]), expected, rtol=1e-5)


@pytest.mark.parametrize("b,t,block_b", [(5, 23, 8), (19, 40, 8), (1, 1, 8)])
def test_gae_random_vs_rlax_numpy_and_reference(b, t, block_b):
    r, v, g, lam = random_batch(b * 100 + t, b, t)
    for lam_ in (0.9, lam):
        got = np.asarray(pk.gae(r, v, g, lam_, block_b=block_b))
        np.testing.assert_allclose(got, np_gae(r, v, g, lam_), atol=1e-4)
        np.testing.assert_allclose(got, pk.gae_reference(r, v, g, lam_), atol=1e-5)
        want = jax.vmap(rlax.truncated_generalized_advantage_estimation,
                        in_axes=(0, 0, 0 if np.ndim(lam_) else None, 0))(r, g, lam_, v)
        np.testing.assert_allclose(got, want, atol=1e-4)
    # termination mid-row: the step after a γ=0 step does not leak into it
    r2 = r.copy()
    r2[:, t // 2 + 1:] += 100.0
    if t > 1:
        g2 = g.copy()
        g2[:, t // 2] = 0.0
        a1 = np.asarray(pk.gae(r, v, g2, 0.9, block_b=block_b))
        a2 = np.asarray(pk.gae(r2, v, g2, 0.9, block_b=block_b))
        np.testing.assert_allclose(a1[:, : t // 2 + 1], a2[:, : t // 2 + 1], atol=1e-5)


@pytest.mark.parametrize("b,t", [(7, 31), (33, 9)])
def test_discounted_returns_random(b, t):
    r, v, g, _ = random_batch(b + t, b, t)
    boot = v[:, -1]
    got = np.asarray(pk.discounted_returns(r, g, boot, block_b=8))
    np.testing.assert_allclose(got, np_returns(r, g, boot), atol=1e-4)
    np.testing.assert_allclose(got, pk.discounted_returns_reference(r, g, boot), atol=1e-5)
    want = jax.vmap(rlax.discounted_returns)(r, g, boot)
    np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("b,t,p", [(6, 29, 0.6), (17, 12, 0.3), (3, 8, 1.0)])
def test_masked_gae_random(b, t, p):
    rng = np.random.default_rng(b * t)
    r = rng.normal(size=(b, t)).astype(np.float32)
    v = rng.normal(size=(b, t)).astype(np.float32)
    m = rng.uniform(size=(b, t)) < p
    m[0] = False                       # a row without agent tokens
    got = np.asarray(pk.masked_gae(r, v, m, 0.99, 0.9, block_b=8))
    want = np_masked_gae(r, v, m, 0.99, 0.9)
    np.testing.assert_allclose(got, want, atol=1e-4)
    np.testing.assert_allclose(got, pk.masked_gae_reference(r, v, m, 0.99, 0.9), atol=1e-5)
    assert np.all(got[~m] == 0)
    if p == 1.0:   # all agent tokens: ordinary GAE with a terminal zero bootstrap
        vv = np.concatenate([v, np.zeros((b, 1), np.float32)], 1)
        np.testing.assert_allclose(got[1:], np_gae(r, vv, np.full((b, t), 0.99), 0.9)[1:],
                                   atol=1e-4)


def test_scans_jit_grad_and_tpu_layout():
    r, v, g, lam = random_batch(3, 4, 10)
    f = jax.jit(lambda r, v, g: pk.gae(r, v, g, 0.95))
    np.testing.assert_allclose(f(r, v, g), np_gae(r, v, g, 0.95), atol=1e-4)
    got = pk.gae(r, v, g, lam, backend="tpu", interpret=True)
    np.testing.assert_allclose(got, np_gae(r, v, g, lam), atol=1e-4)


def test_scan_bad_inputs():
    r, v, g, lam = random_batch(0, 3, 5)
    with pytest.raises(ValueError, match="values"):
        pk.gae(r, v[:, :-1], g, 0.9)
    with pytest.raises(ValueError, match="lam"):
        pk.gae(r, v, g, lam[:, :2])
    with pytest.raises(ValueError, match="bootstrap"):
        pk.discounted_returns(r, g, v)
    with pytest.raises(ValueError, match="mask"):
        pk.masked_gae(r, v[:, :-1], np.ones((3, 4), bool), 0.9, 0.9)
    with pytest.raises(ValueError, match="gamma"):
        pk.masked_gae(r, v[:, :-1], np.ones((3, 5), bool), np.ones(3), 0.9)
    with pytest.raises(ValueError, match="block_b"):
        pk.gae(r, v, g, 0.9, block_b=6)
