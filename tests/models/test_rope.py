"""RoPE: frequencies vs independent NumPy formulas and transformers' ROPE_INIT_FUNCTIONS;
rotation vs a per-pair NumPy rotation; YaRN attention temperature."""
import math

import jax.numpy as jnp
import numpy as np
import pytest

from models import ModelConfig
from models.rope import apply_rope, config_rope, rope_frequencies

D, BASE = 32, 10000.0


def np_theta(d, base):
    return np.array([base ** (-2.0 * i / d) for i in range(d // 2)])


def np_yarn(d, base, s, l0, beta_fast=32.0, beta_slow=1.0):
    """YaRN written from the paper: r_i = L0 / λ_i rotations per original context, λ_i = 2π/θ_i;
    γ_i = 1 (extrapolate) when r_i > β_fast, 0 (interpolate θ/s) when r_i < β_slow, linear in
    the dimension index between the (floored / ceiled) boundary dims."""
    theta = np_theta(d, base)
    dim = lambda r: d * math.log(l0 / (r * 2 * math.pi)) / (2 * math.log(base))  # noqa: E731
    lo, hi = max(math.floor(dim(beta_fast)), 0), min(math.ceil(dim(beta_slow)), d - 1)
    out = []
    for i in range(d // 2):
        ramp = min(max((i - lo) / (hi - lo), 0.0), 1.0)
        gamma = 1.0 - ramp
        out.append(theta[i] / s * (1 - gamma) + theta[i] * gamma)
    return np.array(out), 0.1 * math.log(s) + 1.0


def test_plain_linear_ntk_against_formulas():
    inv, m = rope_frequencies(D, BASE, None)
    np.testing.assert_allclose(inv, np_theta(D, BASE), rtol=1e-12)
    assert m == 1.0
    inv, _ = rope_frequencies(D, BASE, {"type": "linear", "factor": 4.0})
    # linear PI: angle(m) = (m / s) θ_i
    np.testing.assert_allclose(7.0 * inv, (7.0 / 4.0) * np_theta(D, BASE), rtol=1e-12)
    inv, _ = rope_frequencies(D, BASE, {"type": "ntk", "factor": 4.0})
    np.testing.assert_allclose(inv, np_theta(D, BASE * 4.0 ** (D / (D - 2))), rtol=1e-12)
    # NTK keeps the highest frequency and scales the lowest by exactly 1/s
    assert inv[0] == 1.0
    np.testing.assert_allclose(inv[-1], np_theta(D, BASE)[-1] / 4.0, rtol=1e-9)


@pytest.mark.parametrize("s, l0", [(4.0, 64), (2.0, 512), (8.0, 2048)])
def test_yarn_against_formula(s, l0):
    inv, m = rope_frequencies(D, BASE, {"type": "yarn", "factor": s, "original_max_seq_len": l0})
    ref, mref = np_yarn(D, BASE, s, l0)
    np.testing.assert_allclose(inv, ref, rtol=1e-12)
    assert math.isclose(m, mref)
    # high frequencies extrapolate (unchanged), low ones interpolate (θ/s)
    assert inv[0] == np_theta(D, BASE)[0]
    if l0 >= 512:
        np.testing.assert_allclose(inv[-1], np_theta(D, BASE)[-1] / s)


def test_llama3_against_formula():
    s, l0, lo, hi = 8.0, 64, 1.0, 4.0
    inv, m = rope_frequencies(D, BASE, {"type": "llama3", "factor": s, "original_max_seq_len": l0,
                                        "low_freq_factor": lo, "high_freq_factor": hi})
    ref = []
    for th in np_theta(D, BASE):
        wl = 2 * math.pi / th
        if wl < l0 / hi:
            ref.append(th)
        elif wl > l0 / lo:
            ref.append(th / s)
        else:
            a = (l0 / wl - lo) / (hi - lo)
            ref.append((1 - a) * th / s + a * th)
    np.testing.assert_allclose(inv, ref, rtol=1e-12)
    assert m == 1.0


def _hf(rope_parameters, max_pos=128, d_model=128, heads=4):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.LlamaConfig(hidden_size=d_model, num_attention_heads=heads,
                                    max_position_embeddings=max_pos,
                                    rope_parameters=dict(rope_parameters))


@pytest.mark.parametrize("ours, hf", [
    ({"type": "linear", "factor": 4.0}, {"rope_type": "linear", "factor": 4.0}),
    ({"type": "yarn", "factor": 4.0, "original_max_seq_len": 32},
     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    ({"type": "yarn", "factor": 8.0, "original_max_seq_len": 1024, "beta_fast": 16, "beta_slow": 2},
     {"rope_type": "yarn", "factor": 8.0, "original_max_position_embeddings": 1024,
      "beta_fast": 16, "beta_slow": 2}),
    ({"type": "llama3", "factor": 8.0, "original_max_seq_len": 64, "low_freq_factor": 1.0,
      "high_freq_factor": 4.0},
     {"rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 64,
      "low_freq_factor": 1.0, "high_freq_factor": 4.0}),
])
def test_against_transformers(ours, hf):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    theta = 50000.0
    hf_cfg = _hf({**hf, "rope_theta": theta})
    ref, attn = ROPE_INIT_FUNCTIONS[hf["rope_type"]](hf_cfg, "cpu")
    inv, m = rope_frequencies(32, theta, ours, max_seq_len=128)
    np.testing.assert_allclose(inv, ref.numpy(), rtol=1e-6)
    assert math.isclose(m, attn, rel_tol=1e-6)


def test_ntk_against_transformers_dynamic():
    """HF "dynamic" NTK at running length L uses b·(f·L/L_max − (f−1))^(d/(d−2)); with f = s and
    L = L_max·(2s−1)/s that base equals static NTK-aware b·s^(d/(d−2))."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    s, lmax = 4.0, 64
    hf_cfg = _hf({"rope_type": "dynamic", "factor": s, "rope_theta": BASE}, max_pos=lmax)
    ref, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf_cfg, "cpu", seq_len=int(lmax * (2 * s - 1) / s))
    inv, _ = rope_frequencies(32, BASE, {"type": "ntk", "factor": s})
    np.testing.assert_allclose(inv, ref.numpy(), rtol=1e-5)


def test_apply_rope_against_pairwise_rotation():
    rng = np.random.default_rng(0)
    b, t, h, d = 2, 5, 3, 8
    x = rng.standard_normal((b, t, h, d)).astype(np.float32)
    pos = rng.integers(0, 1000, (b, t))
    inv = np_theta(d, BASE)
    out = np.asarray(apply_rope(jnp.asarray(x), jnp.asarray(pos), inv, 1.5))
    ref = np.empty_like(x)
    for bi in range(b):
        for ti in range(t):
            for i in range(d // 2):
                a = pos[bi, ti] * inv[i]
                x1, x2 = x[bi, ti, :, i], x[bi, ti, :, i + d // 2]
                ref[bi, ti, :, i] = 1.5 * (x1 * math.cos(a) - x2 * math.sin(a))
                ref[bi, ti, :, i + d // 2] = 1.5 * (x2 * math.cos(a) + x1 * math.sin(a))
    np.testing.assert_allclose(out, ref, atol=2e-4, rtol=1e-4)
    # relative-position property: <R(m)q, R(n)k> depends only on m - n
    q, k = x[0, 0, :1], x[0, 1, :1]

    def dot(m, n):
        rq = np.asarray(apply_rope(jnp.asarray(q[None, None]), jnp.array([[m]]), inv))
        rk = np.asarray(apply_rope(jnp.asarray(k[None, None]), jnp.array([[n]]), inv))
        return float((rq * rk).sum())
    assert math.isclose(dot(10, 3), dot(107, 100), rel_tol=1e-3)
    assert not math.isclose(dot(10, 3), dot(10, 4), rel_tol=1e-3)


def test_config_rope_uses_config():
    cfg = ModelConfig(d_model=64, n_heads=2, rope_theta=500000.0,
                      rope_scaling={"type": "yarn", "factor": 4.0, "original_max_seq_len": 64})
    inv, m = config_rope(cfg)
    ref, mref = np_yarn(32, 500000.0, 4.0, 64)
    np.testing.assert_allclose(inv, ref, rtol=1e-12)
    assert math.isclose(m, mref)
