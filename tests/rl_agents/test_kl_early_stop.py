"""minibatch_epochs: the shared epochs × minibatches update loop and PPO's KL early stopping
(``config.rl.target_kl``), against a plain Python loop over the same minibatches."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiments.configs.common import make_config
from experiments.run import ConfigError, check_config
from rl_agents.trainer import minibatch_epochs

B, D = 8, 3


def _problem():
    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    batch = {"x": jax.random.normal(k1, (B, D)), "y": jax.random.normal(k2, (B,))}
    w0 = {"w": jnp.zeros((D,))}

    def loss_fn(params, mb):
        err = mb["x"] @ params["w"] - mb["y"]
        # a stand-in for KL(π_old‖π): grows as the parameters leave their start
        kl = jnp.sum((params["w"] - w0["w"]) ** 2)
        return jnp.mean(err ** 2), {"policy/approx_kl": kl}

    return batch, w0, loss_fn


def _reference(loss_fn, opt, params, batch, key, epochs, n_mb, target_kl):
    """Python loop: same permutations, same steps; skip the step (and all later ones) once the
    KL measured before a step exceeds 1.5·target_kl."""
    opt_state = opt.init(params)
    stopped, flags = False, []
    for ekey in jax.random.split(key, epochs):
        perm = np.asarray(jax.random.permutation(ekey, B))
        for i in range(n_mb):
            idx = perm.reshape(n_mb, -1)[i]
            mb = {k: v[idx] for k, v in batch.items()}
            grads, m = jax.grad(loss_fn, has_aux=True)(params, mb)
            if target_kl > 0 and float(m["policy/approx_kl"]) > 1.5 * target_kl:
                stopped = True
            flags.append(stopped)
            if not stopped:
                updates, opt_state = opt.update(grads, opt_state, params)
                params = optax.apply_updates(params, updates)
    return params, flags


@pytest.mark.parametrize("target_kl", [0.0, 0.02, 0.1, 100.0])
def test_matches_python_loop(target_kl):
    batch, w0, loss_fn = _problem()
    opt = optax.adam(0.1)
    key = jax.random.PRNGKey(5)
    params, _, metrics = jax.jit(lambda p, s: minibatch_epochs(
        loss_fn, opt, p, s, batch, key, epochs=3, minibatches=4, batch_size=B,
        target_kl=target_kl))(w0, opt.init(w0))
    ref, flags = _reference(loss_fn, opt, w0, batch, key, 3, 4, target_kl)
    np.testing.assert_allclose(params["w"], ref["w"], rtol=1e-5, atol=1e-6)
    assert metrics["grad_norm"].shape == (3, 4)
    if target_kl > 0:
        np.testing.assert_array_equal(np.asarray(metrics["policy/kl_stopped"]).ravel(), flags)
    else:
        assert "policy/kl_stopped" not in metrics
    if target_kl in (0.02, 0.1):      # the cases stop part-way: some steps taken, some skipped
        assert 0 < sum(flags) < len(flags)
    if target_kl == 100.0:            # never reached: identical to no early stopping
        free, _ = _reference(loss_fn, opt, w0, batch, key, 3, 4, 0.0)
        np.testing.assert_allclose(params["w"], free["w"], rtol=1e-5, atol=1e-6)


def test_stopping_keeps_optimizer_state():
    batch, w0, loss_fn = _problem()
    opt = optax.adam(0.1)
    s0 = opt.init(w0)
    # a threshold below the KL after the first step: exactly one step is taken
    p, s, m = minibatch_epochs(loss_fn, opt, w0, s0, batch, jax.random.PRNGKey(1), epochs=2,
                               minibatches=2, batch_size=B, target_kl=1e-9)
    assert np.asarray(m["policy/kl_stopped"]).ravel().tolist() == [False, True, True, True]
    assert int(s[0].count) == 1


def test_negative_target_kl_rejected():
    batch, w0, loss_fn = _problem()
    with pytest.raises(ValueError, match="target_kl must be >= 0"):
        minibatch_epochs(loss_fn, optax.sgd(0.1), w0, optax.sgd(0.1).init(w0), batch,
                         jax.random.PRNGKey(0), epochs=1, minibatches=2, batch_size=B,
                         target_kl=-0.1)
    c = make_config("guess_number", "ppo")
    c.rl.target_kl = -0.5
    with pytest.raises(ConfigError, match=r"config.rl.target_kl must be >= 0, got -0.5"):
        check_config(c, num_devices=1)
