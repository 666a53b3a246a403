"""``models.policy_hidden``: hidden states and unembedding reproduce the PolicyModel's logits."""
import jax.numpy as jnp
import numpy as np
import pytest

import models
from tests.models.helpers import fwd, random_params


@pytest.mark.parametrize("kw", [dict(), dict(tie_embeddings=True), dict(scan_layers=True),
                                dict(dtype="bfloat16", tie_embeddings=True)])
def test_hidden_times_unembed_is_the_logits(kw):
    cfg = models.ModelConfig(vocab_size=37, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                             d_ff=32, max_seq_len=32, attention_impl="xla", **kw)
    model = models.PolicyModel(cfg)
    params = random_params(model, seed=3)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 37, size=(3, 11)), jnp.int32)
    seg = jnp.asarray(np.array([[1] * 11, [1] * 7 + [0] * 4, [1] * 5 + [2] * 4 + [0] * 2]), jnp.int32)
    pos = jnp.asarray(np.tile(np.arange(11), (3, 1)) + np.array([[0], [2], [5]]), jnp.int32)
    hidden, unembed = models.policy_hidden(model, params, tokens, positions=pos, segment_ids=seg)
    assert hidden.shape == (3, 11, 16) and unembed.shape == (16, 37)
    assert hidden.dtype == unembed.dtype == cfg.compute_dtype
    logits = np.asarray(jnp.einsum("btd,dv->btv", hidden, unembed,
                                   preferred_element_type=jnp.float32))
    want = np.asarray(fwd(model)(params, tokens, pos, seg))
    assert np.abs(want).max() > 0.1
    tol = 1e-5 if cfg.dtype == "float32" else 2e-2
    np.testing.assert_allclose(logits, want, rtol=tol, atol=tol)
    if cfg.tie_embeddings:
        np.testing.assert_array_equal(np.asarray(unembed),
                                      np.asarray(params["model"]["embed_tokens"]["embedding"].T
                                                 .astype(cfg.compute_dtype)))
    else:
        np.testing.assert_array_equal(np.asarray(unembed), np.asarray(params["lm_head"]["kernel"]))


def test_policy_hidden_rejects_bad_input():
    cfg = models.ModelConfig(vocab_size=11, d_model=8, n_layers=1, n_heads=2, n_kv_heads=1,
                             d_ff=16, max_seq_len=16, attention_impl="xla")
    model = models.PolicyModel(cfg)
    params = random_params(model)
    tok = jnp.zeros((2, 4), jnp.int32)
    with pytest.raises(ValueError, match="PolicyModel"):
        models.policy_hidden(models.ValueModel(cfg), params, tok)
    with pytest.raises(ValueError, match="'model'"):
        models.policy_hidden(model, {"lm_head": params["lm_head"]}, tok)
    with pytest.raises(ValueError, match="lm_head"):
        models.policy_hidden(model, {"model": params["model"]}, tok)
    with pytest.raises(ValueError, match="tokens must be int"):
        models.policy_hidden(model, params, jnp.zeros((4,), jnp.int32))
    with pytest.raises(ValueError, match="segment_ids has shape"):
        models.policy_hidden(model, params, tok, segment_ids=jnp.ones((2, 3), jnp.int32))
