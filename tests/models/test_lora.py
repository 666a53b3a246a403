"""LoRA with qwix: fresh adapters change nothing, merged weights reproduce the adapted model,
gradients reach the adapters only."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
from models import lora


def _setup(scan_layers, rank=4, alpha=8.0, targets=lora.TARGETS):
    cfg = models.ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                             d_ff=64, scan_layers=scan_layers)
    base_model = models.PolicyModel(cfg)
    base = models.init_params(base_model, jax.random.PRNGKey(0))
    model = lora.apply_lora(base_model, rank, alpha, targets)
    params = lora.add_adapters(model, base, jax.random.PRNGKey(1))
    return cfg, base_model, base, model, params


def _randomize_b(params, key):
    ad = lora.adapters(params)
    keys = jax.random.split(key, len(ad))
    new = {k: (0.1 * jax.random.normal(kk, v.shape) if k.endswith("lora_b']") else v)
           for (k, v), kk in zip(ad.items(), keys)}
    return lora.with_adapters(params, new)


TOKENS = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 12)))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_fresh_adapters_leave_the_model_unchanged(scan_layers):
    cfg, base_model, base, model, params = _setup(scan_layers)
    n_adapted = 7 * (1 if scan_layers else cfg.n_layers)
    assert len(lora.adapters(params)) == 2 * n_adapted
    np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, TOKENS)),
                                  np.asarray(base_model.apply({"params": base}, TOKENS)))


@pytest.mark.parametrize("scan_layers", [False, True])
def test_merged_weights_reproduce_the_adapted_model(scan_layers):
    """The adapted forward pass (qwix's intercepted dot_generals) equals a plain model whose
    kernels are W + (α/r)·A·B; the KV-cached prefill of the adapted model agrees too."""
    cfg, base_model, base, model, params = _setup(scan_layers)
    params = _randomize_b(params, jax.random.PRNGKey(2))
    adapted = np.asarray(model.apply({"params": params}, TOKENS))
    merged = lora.merge(params, 4, 8.0)
    plain = np.asarray(base_model.apply({"params": merged}, TOKENS))
    assert np.abs(adapted - np.asarray(base_model.apply({"params": base}, TOKENS))).max() > 1e-3
    np.testing.assert_allclose(adapted, plain, atol=2e-5)
    cache = models.init_cache(cfg, 2, 16)
    logits, _ = models.prefill(model, params, TOKENS, cache, valid=jnp.ones(TOKENS.shape, bool))
    np.testing.assert_allclose(np.asarray(logits), adapted, atol=2e-5)
    hidden, unembed = models.policy_hidden(model, params, TOKENS)
    np.testing.assert_allclose(np.einsum("btd,dv->btv", hidden, unembed), adapted, atol=2e-5)


def test_gradients_reach_the_adapters_only():
    _, _, _, model, params = _setup(False, targets=("q_proj", "down_proj"))
    params = _randomize_b(params, jax.random.PRNGKey(3))

    def loss(p):
        return model.apply({"params": lora.freeze_base(p)}, TOKENS).mean()

    g = jax.grad(loss)(params)
    mask = lora.adapter_mask(g)
    for m, leaf in zip(jax.tree.leaves(mask), jax.tree.leaves(g)):
        assert bool(np.any(np.asarray(leaf) != 0)) == m
    assert sum(jax.tree.leaves(mask)) == 2 * 2 * 2      # 2 targets x 2 layers x (A, B)


def test_bad_settings():
    with pytest.raises(ValueError, match="rank"):
        lora.check_lora(0, 1.0)
    with pytest.raises(ValueError, match="alpha"):
        lora.check_lora(4, 0.0)
    with pytest.raises(ValueError, match="targets"):
        lora.check_lora(4, 8.0, ("lm_head",))
