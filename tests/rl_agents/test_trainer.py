"""The trainer's composition: ``rl.policy_loss`` picks the loss it optimises, the update is
``step``'s stages, and the library does not import ``experiments``."""
from __future__ import annotations

import ast
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_agents import make_train, make_trainer, make_update
from rl_agents.validation import ConfigError, check_config
from tests.rl_agents import probes

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LIBRARY = ("rl_agents", "models", "envs", "pallas_kernels")


def _numpy_pg_and_ppo(logp, old, adv, mask, eps_low, eps_high):
    """seq-mean-token-mean of −ρA (pg) and of −min(ρA, clip(ρ)A) (ppo), in NumPy."""
    ratio = np.exp(logp - old)
    pg_tok = -adv * ratio
    ppo_tok = np.maximum(pg_tok, -adv * np.clip(ratio, 1 - eps_low, 1 + eps_high))

    def seq_mean(x):
        n = mask.sum(-1)
        per = np.where(mask, x, 0.0).sum(-1) / np.maximum(n, 1)
        return per[n > 0].mean()

    return seq_mean(pg_tok), seq_mean(ppo_tok)


@pytest.fixture(scope="module")
def batch_and_params():
    c = probes.tiny("kv_search", "grpo")
    c.rl.kl_coef = 0.0
    tr = make_trainer(c)
    state = tr.fresh_state(jax.random.PRNGKey(0))
    traj = tr.sample_groups(state.params["policy"], jax.random.PRNGKey(1), num_groups=4,
                            group_size=2)
    batch = jax.jit(tr.advantages)(state, traj, jnp.ones((8,), jnp.float32))
    # a random policy fails every group (GRPO advantages 0): give the tokens advantages of both
    # signs, so that the loss's value depends on which objective is applied
    adv = jax.random.normal(jax.random.PRNGKey(2), batch["advantages"].shape)
    batch["advantages"] = jnp.where(batch["loss_mask"], adv, 0.0)
    # parameters far from the sampler's: importance ratios leave the clip range
    moved = jax.tree.map(lambda x: x * 1.5, state.params["policy"])
    return c, batch, moved


def test_policy_loss_is_the_configured_one(batch_and_params):
    c, batch, moved = batch_and_params
    values = {}
    for name in ("ppo", "pg"):
        cfg = c.copy_and_resolve_references()
        cfg.rl.policy_loss = name
        tr = make_trainer(cfg)
        _, metrics = jax.jit(tr.policy_loss)(moved, batch)
        values[name] = float(metrics["loss/policy"])
        logp = np.asarray(jax.jit(tr.logprobs)(moved, batch["tokens"], batch["valid"])[0],
                          np.float64)
    ref_pg, ref_ppo = _numpy_pg_and_ppo(
        logp, np.asarray(batch["old_logp"], np.float64), np.asarray(batch["advantages"],
                                                                    np.float64),
        np.asarray(batch["loss_mask"]), c.rl.eps_low, c.rl.eps_high)
    assert abs(ref_pg - ref_ppo) > 1e-3            # the clip is active: the test can fail
    np.testing.assert_allclose(values["pg"], ref_pg, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(values["ppo"], ref_ppo, rtol=1e-4, atol=1e-6)


def test_unknown_policy_loss_is_one_line():
    c = probes.tiny("kv_search", "grpo")
    c.rl.policy_loss = "clipz"
    with pytest.raises(ConfigError, match=r"config\.rl\.policy_loss = 'clipz' is not one of "
                                          r"\['cispo', 'gspo', 'pg', 'ppo'\]"):
        check_config(c, num_devices=1)
    with pytest.raises(ValueError, match="policy_loss='clipz'"):
        make_trainer(c)


def test_public_entry_points_share_the_update():
    """``make_update``'s functions are one trainer's ``init`` and jitted pure ``step``;
    ``make_train`` scans the same ``step``."""
    c = probes.tiny("guess_number", "grpo")
    init, update = make_update(c)
    trainer = init.__self__
    assert update is trainer.update and init == trainer.init
    assert type(make_train(c).trainer).step is type(trainer).step


def _imports(path):
    tree = ast.parse(open(path).read())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module


def test_library_does_not_import_experiments():
    bad = []
    for pkg in LIBRARY:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    bad += [f"{os.path.relpath(path, ROOT)}: {m}" for m in _imports(path)
                            if m == "experiments" or m.startswith(("experiments.", "benchmarks"))]
    assert not bad, bad


def test_no_reference_copy_without_kl_or_prime():
    """The state keeps a frozen reference policy only when a KL term or PRIME reads it."""
    def state_of(**rl):
        c = probes.tiny("guess_number", "grpo")
        c.rl.update(rl)
        tr = make_trainer(c)
        return tr, jax.eval_shape(tr.fresh_state, jax.random.PRNGKey(0))

    tr, st = state_of(kl_coef=0.0)
    assert not tr.keeps_reference and st.ref_params is None
    assert tr.abstract_state().ref_params is None
    tr, st = state_of(kl_coef=0.04)
    assert tr.keeps_reference
    assert jax.tree.structure(st.ref_params) == jax.tree.structure(st.params["policy"])


@pytest.mark.parametrize("shift", [0.0, 0.3])
def test_mismatch_kl_is_the_sampler_trainer_kl(monkeypatch, shift):
    """``mismatch/kl`` is the k3 KL between the recorded behaviour log-probs and the trainer's
    on the sampled tokens: ≈ 0 when they come from the same parameters, e^s − 1 − s when the
    recorded ones are lowered by s on every agent token."""
    from rl_agents import trainer as trainer_lib

    sample = trainer_lib.FullContext.sample

    def shifted(self, tr, params, key, **kw):
        traj = sample(self, tr, params, key, **kw)
        return traj.replace(behaviour_logp=jnp.where(traj.loss_mask,
                                                     traj.behaviour_logp - shift, 0.0))

    monkeypatch.setattr(trainer_lib.FullContext, "sample", shifted)
    c = probes.tiny("kv_search", "grpo")
    c.rl.update(minibatches=1, kl_coef=0.0)
    _, metrics = make_train(c)(jax.random.PRNGKey(0))
    want = np.exp(shift) - 1.0 - shift
    np.testing.assert_allclose(float(metrics["mismatch/kl"][0]), want, atol=2e-5, rtol=1e-3)


def test_minibatch_epochs_skips_minibatches_without_loss_tokens():
    """A minibatch whose loss_mask is all False leaves params and AdamW state (its count too) as
    they were; the result equals running the other minibatches alone — and differs from taking
    the zero-gradient steps, which move the parameters along the moments and decay them."""
    import optax
    from rl_agents.trainer import minibatch_epochs
    x = jnp.arange(1.0, 9.0)
    batch = {"x": x, "loss_mask": jnp.asarray([1, 1, 0, 0, 1, 1, 0, 0], bool)}

    def loss_fn(p, mb):
        m = mb["loss_mask"]
        per = (mb["x"] * p["w"] - 1.0) ** 2
        return jnp.where(m, per, 0.0).sum() / jnp.maximum(m.sum(), 1), {}

    opt = optax.adamw(0.1, weight_decay=0.1)
    w0 = {"w": jnp.full((), 2.0)}
    key = jax.random.PRNGKey(9)
    p, s, m = minibatch_epochs(loss_fn, opt, w0, opt.init(w0), batch, key, epochs=1,
                               minibatches=4, batch_size=8)
    perm = np.asarray(jax.random.permutation(jax.random.split(key, 1)[0], 8)).reshape(4, 2)
    empty = ~np.asarray(batch["loss_mask"])[perm].any(1)
    assert 0 < empty.sum() < 4 and not empty[0], "the key must give an empty later minibatch"
    np.testing.assert_array_equal(np.asarray(m["update/empty_step_frac"])[0], empty)
    assert int(s[0].count) == 4 - empty.sum()

    def reference(rows):
        ref, ref_s = w0, opt.init(w0)
        for idx in rows:
            g = jax.grad(lambda q: loss_fn(q, {"x": x[idx], "loss_mask": batch["loss_mask"][idx]})[0])(ref)
            u, ref_s = opt.update(g, ref_s, ref)
            ref = optax.apply_updates(ref, u)
        return ref["w"]
    np.testing.assert_allclose(p["w"], reference(perm[~empty]), rtol=1e-6)
    assert abs(float(reference(perm)) - float(p["w"])) > 1e-3
