"""Off-policy correction (``rl.correction``) against NumPy, its wiring in the update, and
bfloat16 sampling (``rollout.dtype``)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rl_agents import make_trainer
from rl_agents import off_policy
from rl_agents import trainer as trainer_lib
from rl_agents.validation import ConfigError, check_config
from tests.rl_agents import probes


def _numpy_correct(trainer, behaviour, adv, mask, kind, cap):
    """The METHODS formulas, written out: TIS w = min(π_old/μ, C); MIS drops rows whose
    exp(mean_t log(π_old/μ)) is outside [1/C, C]; token MIS drops such tokens."""
    r = np.exp(trainer - behaviour)
    kl = np.where(mask, r - 1 - np.log(r), 0).sum() / max(mask.sum(), 1)
    if kind == "none":
        return adv, mask, kl
    if kind == "tis":
        return np.where(mask, adv * np.minimum(r, cap), 0), mask, kl
    if kind == "mis":
        keep = np.zeros_like(mask)
        for i in range(mask.shape[0]):
            if mask[i].any():
                g = np.exp(np.mean(np.log(r[i][mask[i]])))
                keep[i] = mask[i] & (1 / cap <= g <= cap)
    else:
        keep = mask & (r >= 1 / cap) & (r <= cap)
    return np.where(keep, adv, 0), keep, kl


@pytest.mark.parametrize("kind", ["none", "tis", "mis", "token_mis"])
def test_correct_matches_numpy(kind):
    rng = np.random.default_rng(0)
    b, t, cap = 6, 9, 2.0
    behaviour = rng.normal(-1.5, 0.5, (b, t)).astype(np.float32)
    trainer = behaviour + rng.normal(0, 0.6, (b, t)).astype(np.float32)
    trainer[0] = behaviour[0] + np.log(3.0)        # every ratio above the cap
    trainer[1] = behaviour[1] - np.log(3.0)        # every ratio below 1 / cap
    adv = rng.normal(size=(b, t)).astype(np.float32)
    mask = rng.random((b, t)) < 0.7
    mask[2] = False                                # a row without agent tokens
    got_adv, got_mask, metrics = off_policy.correct(
        jnp.asarray(trainer), jnp.asarray(behaviour), jnp.asarray(adv), jnp.asarray(mask),
        kind=kind, cap=cap)
    want_adv, want_mask, want_kl = _numpy_correct(trainer, behaviour, adv, mask, kind, cap)
    np.testing.assert_array_equal(np.asarray(got_mask), want_mask)
    np.testing.assert_allclose(np.where(want_mask, np.asarray(got_adv), 0),
                               np.where(want_mask, want_adv, 0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(float(metrics["mismatch/kl"]), want_kl, rtol=1e-5)
    if kind == "mis":      # rows 0 and 1 are out of [1/C, C]; the rest are decided by their mean
        assert not np.asarray(got_mask)[:2].any()
    if kind == "tis":
        np.testing.assert_allclose(np.asarray(got_adv)[0][mask[0]], 2.0 * adv[0][mask[0]],
                                   rtol=1e-6)


def test_bad_correction_settings_give_one_line():
    c = probes.tiny("kv_search", "grpo")
    c.rl.correction = "is"
    with pytest.raises(ConfigError, match=r"config.rl.correction = 'is' is not one of"):
        check_config(c, num_devices=1)
    c.rl.correction, c.rl.correction_cap = "tis", 1.0
    with pytest.raises(ConfigError, match=r"config.rl.correction_cap = 1.0 must be"):
        check_config(c, num_devices=1)
    c.rl.correction_cap, c.rollout.dtype = 2.0, "bf16"
    with pytest.raises(ConfigError, match=r"config.rollout.dtype = 'bf16' is not a known dtype"):
        check_config(c, num_devices=1)


@pytest.mark.parametrize("kind", ["tis"])
def test_correction_reads_the_trainers_logprobs_and_feeds_the_optimizer(monkeypatch, kind):
    """The recorded behaviour log-probs of even rows are lowered by 1 (π_old/μ = e > C = 2).
    The batch the optimizer trains on must hold the trainer's log-probs at the update's
    starting parameters as π_old, and advantages × min(π_old/μ, 2) (TIS: 2× on even rows,
    ≈ 1× on odd rows) or the even rows masked out (MIS: same wiring, the masks are checked
    against NumPy above)."""
    sample = trainer_lib.FullContext.sample
    advantages = trainer_lib.Trainer.advantages

    def shifted(self, tr, params, key, **kw):
        traj = sample(self, tr, params, key, **kw)
        even = (jnp.arange(traj.tokens.shape[0]) % 2 == 0)[:, None]
        return traj.replace(behaviour_logp=jnp.where(traj.loss_mask & even,
                                                     traj.behaviour_logp - 1.0,
                                                     traj.behaviour_logp))

    def random_advantages(self, state, traj, row_weight):
        batch = advantages(self, state, traj, row_weight)
        adv = jax.random.normal(jax.random.PRNGKey(5), batch["advantages"].shape)
        return {**batch, "advantages": jnp.where(batch["loss_mask"], adv, 0.0)}

    monkeypatch.setattr(trainer_lib.FullContext, "sample", shifted)
    monkeypatch.setattr(trainer_lib.Trainer, "advantages", random_advantages)
    rec = probes.Recorder()
    rec.wrap(monkeypatch, trainer_lib.Trainer, "correct", lambda a, k, out: a[2])
    rec.wrap(monkeypatch, trainer_lib.Trainer, "optimize", probes.batch_pick)
    c = probes.tiny("kv_search", "grpo")
    c.rl.update(minibatches=1, kl_coef=0.0, correction=kind, correction_cap=2.0)
    tr = make_trainer(c)
    state = tr.fresh_state(jax.random.PRNGKey(0))
    start = jax.tree.map(jnp.copy, state.params["policy"])
    _, metrics = tr.update(state)
    before, after = rec.last("correct"), rec.last("optimize")
    mask = before["loss_mask"]
    assert mask[::2].any() and mask[1::2].any()
    want_old = np.asarray(tr.logprobs(start, jnp.asarray(before["tokens"]),
                                      jnp.asarray(before["valid"]))[0])
    np.testing.assert_allclose(after["old_logp"][mask], want_old[mask], atol=2e-5)
    # the rows not shifted have π_old ≈ μ: the recomputation is the trainer's own forward pass
    np.testing.assert_allclose(after["old_logp"][1::2][mask[1::2]],
                               before["old_logp"][1::2][mask[1::2]], atol=2e-5)
    even = np.zeros(mask.shape, bool)
    even[::2] = True
    if kind == "tis":
        np.testing.assert_allclose(after["advantages"][mask & even],
                                   2.0 * before["advantages"][mask & even], rtol=1e-6)
        np.testing.assert_allclose(after["advantages"][mask & ~even],
                                   before["advantages"][mask & ~even], rtol=1e-3, atol=1e-5)
        assert float(metrics["mismatch/clipped_frac"]) == pytest.approx(
            (mask & even).sum() / mask.sum())
    else:
        np.testing.assert_array_equal(after["loss_mask"], mask & ~even)
        assert float(metrics["mismatch/masked_frac"]) == pytest.approx(
            (mask & even).sum() / mask.sum())
    k = np.e - 1 - 1                                  # k3 of a log-ratio of 1 on even rows
    np.testing.assert_allclose(float(metrics["mismatch/kl"]), k * (mask & even).sum() / mask.sum(),
                               rtol=1e-3, atol=1e-5)


def test_bfloat16_sampling_is_measured_and_corrected():
    """``rollout.dtype = "bfloat16"``: the sampler runs the policy in bf16 (its params cast),
    the trainer in float32; ``mismatch/kl`` sees the difference (float32 sampling: ≈ 0), and
    TIS / MIS train on it."""
    def run(dtype, correction):
        c = probes.tiny("kv_search", "grpo")
        c.rl.update(minibatches=1, kl_coef=0.0, correction=correction)
        c.rollout.dtype = dtype
        tr = make_trainer(c)
        state = tr.fresh_state(jax.random.PRNGKey(0))
        # larger weights: peaked next-token distributions, as in a trained policy
        state = state.replace(params={"policy": jax.tree.map(lambda x: 4.0 * x,
                                                             state.params["policy"])})
        _, metrics = tr.update(state)
        return tr, {k: float(v) for k, v in metrics.items()}

    tr, m32 = run("float32", "none")
    assert tr.sampler is tr.policy
    tr, m16 = run("bfloat16", "tis")
    assert tr.sampler.cfg.dtype == "bfloat16" and tr.policy.cfg.dtype == "float32"
    leaves = jax.tree.leaves(tr.sampler_params(tr.fresh_state(jax.random.PRNGKey(0))
                                               .params["policy"]))
    assert all(x.dtype == jnp.bfloat16 for x in leaves)
    assert m32["mismatch/kl"] < 1e-6
    # the exact batch-wide KL(μ ‖ π_old) of bf16 sampling vs the float32 trainer
    assert m16["mismatch/kl"] > 1e-5 and m16["mismatch/kl"] > 100 * m32["mismatch/kl"]
    assert 0.9 < m16["mismatch/weight_mean"] < 1.1 and np.isfinite(m16["loss"])
