"""Every registered algorithm through ``rl_agents.make_train`` (one jitted ``lax.scan`` update):
the advantages the loss trains on are checked against NumPy references computed from the
rollout the update sampled (recorded inside jit, ``tests/rl_agents/probes.py``).

The reference policy is perturbed away from the initial policy, so KL terms are non-zero
(recipes that fold the KL into the reward must show it in the advantages of every estimator),
and so is the critic, so the positions its values are read at matter.
"""
from __future__ import annotations

import jax
import numpy as np
import pytest

import rl_agents
from rl_agents import archer as archer_lib
from rl_agents.algorithms import ALGORITHMS
from tests.rl_agents import probes
from tests.rl_agents.test_advantages import (ref_bilevel, ref_gae, ref_gigpo, ref_grpo_seq,
                                             ref_rloo_seq, ref_rtg, ref_turn_gae, np_masked_whiten)

SUPO = "supo"      # context.mode = "supo" (rl_agents.summarization), GRPO advantages


# ----------------------------------------------------------------------------- configs
def config_for(name):
    if name == SUPO:
        from experiments.configs import keychain_supo
        c = keychain_supo.get_config()
        c.model.update(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64,
                       attention_impl="xla")
        c.env.kwargs.update(chain_len=2, n_distractors=1)
        c.context.update(working_len=64, max_summaries=1, max_summaries_eval=1)
        c.rollout.update(num_groups=2, group_size=2)
        c.rl.update(epochs=1, minibatches=2, logprob_chunk=0)
        c.bc.episodes = 0
        c.total_updates = 1
        return c
    c = probes.tiny("kv_search", name, groups=2 if name == "dapo" else 4, group_size=2)
    if name in ("grpo", "dr_grpo", "gigpo"):
        # group-relative estimators on a random policy: the KL folded into the return is what
        # makes the returns of a group differ
        c.rl.update(kl_coef=0.1, kl_kind="k1", kl_in_reward=True)
    if name == "dapo":
        # a little noisy BC so that rollouts differ (format errors, searches); oversample 3×
        c.rollout.group_size = 4
        c.rl.oversample = 3.0
        c.bc.update(episodes=128, epochs=10, batch_size=32, epsilon=0.2, lr=5e-3)
    return c


def _noisy(tree, seed):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    return jax.tree.unflatten(treedef, [x + 0.2 * jax.random.normal(k, x.shape, x.dtype)
                                        for x, k in zip(leaves, keys)])


def perturbed_start(state):
    """A reference policy away from the initial one (as after some training), and a critic
    whose value head is not the initial zero head (so the value positions matter)."""
    state = state.replace(ref_params=_noisy(state.ref_params, 123))
    if "value" in state.params:
        state = state.replace(params={**state.params, "value": _noisy(state.params["value"], 7)})
    return state


# ----------------------------------------------------------------------------- references
def np_rewards(traj, batch, config):
    """(rewards, turn_rewards, episode_return) with the recipe's KL-in-reward (k1) and DAPO
    overlong penalty folded in, computed with NumPy from the recorded rollout and batch."""
    rl = config.rl
    m, tid = traj["loss_mask"], traj["turn_ids"]
    r = traj["rewards"].astype(np.float64).copy()
    tr = traj["turn_rewards"].astype(np.float64).copy()
    ret = traj["episode_return"].astype(np.float64).copy()
    b, k = tr.shape
    if rl.overlong_cache_len > 0:
        budget, cache = 6 * 5, rl.overlong_cache_len          # kv_search: max_turns · action_len
        for i in range(b):
            n = m[i].sum()
            pen = 0.0 if n <= budget - cache else max((budget - cache - n) / cache, -1.0)
            last = traj["episode_length"][i] - 1
            r[i, traj["turn_end"][i] & (tid[i] == last)] += pen
            tr[i, last] += pen
            ret[i] += pen
    if rl.kl_coef > 0 and rl.kl_in_reward:
        assert rl.kl_kind == "k1"
        kl = np.where(m, batch["old_logp"] - batch["ref_logp"], 0.0) * rl.kl_coef
        r -= kl
        for j in range(k):
            tr[:, j] -= np.where(tid == j, kl, 0.0).sum(1)
        ret -= kl.sum(1)
    return r, tr, ret


def observation_keys(traj):
    """[B,K] ids of the observation each row saw when acting at turn k, from the tokens: the
    prompt at k = 0, turn k−1's observation tokens after (independent of the rollout's hash)."""
    tok, valid, m, tid = (traj[n] for n in ("tokens", "valid", "loss_mask", "turn_ids"))
    b, k = traj["turn_valid"].shape
    table, out = {}, np.zeros((b, k), np.uint32)
    for i in range(b):
        for j in range(k):
            sel = valid[i] & ~m[i] & (tid[i] == j - 1)
            out[i, j] = table.setdefault(tuple(tok[i][sel]), len(table))
    return out


def expected_advantages(name, traj, batch, config):
    kw = dict(config.rl.advantage_kwargs)
    r, tr, ret = np_rewards(traj, batch, config)
    m = traj["loss_mask"]
    d = dict(rewards=r, values=batch["old_values"], loss_mask=m, turn_ids=traj["turn_ids"],
             turn_end=traj["turn_end"], group_ids=traj["group_ids"], turn_rewards=tr,
             turn_valid=traj["turn_valid"], turn_obs_hash=observation_keys(traj),
             episode_return=ret)
    bcast = lambda a: np.where(m, np.asarray(a)[:, None], 0.0)
    adv = ALGORITHMS[name].estimator
    if adv == "gae":
        return ref_gae(d, kw["gamma"], kw["lam"])[0]
    if adv == "turn_gae":
        return ref_turn_gae(d, kw["gamma"], kw["lam"])[0]
    if adv == "bilevel_gae":
        return ref_bilevel(d, kw["gamma_turn"], kw["lam_turn"], kw["gamma_token"],
                           kw["lam_token"], kw["whiten"])[0]
    if adv == "grpo":
        return bcast(ref_grpo_seq(ret, d["group_ids"]))
    if adv == "dr_grpo":
        return bcast(ref_grpo_seq(ret, d["group_ids"], use_std=False))
    if adv == "rloo":
        return bcast(ref_rloo_seq(ret, d["group_ids"]))
    if adv == "reinforce_pp":
        return np_masked_whiten(ref_rtg(d, kw["gamma"]), m)
    if adv == "reinforce_pp_baseline":
        mean = ret - ref_grpo_seq(ret, d["group_ids"], use_std=False)
        return np_masked_whiten(ref_rtg(d, kw["gamma"]) - mean[:, None], m)
    if adv == "gigpo":
        return ref_gigpo(d, kw["gamma"], kw["omega"], kw["norm"])
    raise AssertionError(adv)


# ----------------------------------------------------------------------------- the test
#: Estimators also checked against the same references in test_advantages.py and through the
#: trainer's _prepare in test_option_matrix.py: marked slow (a few seconds each of compile).
COVERED = ("bilevel_ppo", "dr_grpo", "grpo", "reinforce_pp", "reinforce_pp_baseline")
NAMES = [pytest.param(n, marks=pytest.mark.slow) if n in COVERED else n
         for n in sorted(ALGORITHMS) + [SUPO]]


@pytest.mark.parametrize("name", NAMES)
def test_make_train_runs_every_algorithm_and_trains_on_the_reference_advantages(name,
                                                                                 monkeypatch):
    config = config_for(name)
    train = rl_agents.make_train(config)
    trainer = train.trainer
    rec = probes.Recorder()
    cls = type(trainer)
    rec.wrap(monkeypatch, cls, "_sample_groups", probes.traj_pick)
    rec.wrap(monkeypatch, cls, "optimize", probes.batch_pick)
    if name == "archer":
        rec.wrap(monkeypatch, archer_lib, "turn_advantages",
                 lambda args, kwargs, out: dict(r=args[0], v=args[1], tv=args[2], a=out))
    init = trainer.init
    monkeypatch.setattr(trainer, "init", lambda key, **kw: perturbed_start(init(key, **kw)))

    state, metrics = jax.block_until_ready(train(jax.random.PRNGKey(0)))
    assert int(state.step) == 1 and metrics["loss"].shape == (1,)
    traj = rec.last("_sample_groups")
    batch = rec.last("optimize")
    adv, mask = batch["advantages"], batch["loss_mask"]

    if name == SUPO:
        # every segment of an episode carries the episode's GRPO advantage; episodes cut by
        # the turn / summary cap are masked out
        b = traj["tokens"].shape[0]
        want = np.where(traj["loss_mask"],
                        ref_grpo_seq(traj["episode_return"], traj["group_ids"])[:, None], 0.0)
        np.testing.assert_allclose(adv.reshape(b, -1), want, atol=1e-4)
        np.testing.assert_array_equal(mask.reshape(b, -1),
                                      traj["loss_mask"] & ~traj["truncated"][:, None])
        return

    if name == "dapo":
        # the update trains on the groups with 0 < #successes < G of the oversampled rollout
        g = config.rollout.group_size
        succ = traj["success"].reshape(-1, g).sum(1)
        informative = (succ > 0) & (succ < g)
        assert float(metrics["dapo/kept_fraction"][0]) == pytest.approx(informative.mean())
        order = list(np.nonzero(informative)[0]) + list(np.nonzero(~informative)[0])
        kept = order[:config.rollout.num_groups]
        rows = np.concatenate([np.arange(i * g, (i + 1) * g) for i in kept])
        np.testing.assert_array_equal(batch["tokens"], traj["tokens"][rows])
        weight = np.repeat(informative[kept], g)
        np.testing.assert_array_equal(mask, traj["loss_mask"][rows] & weight[:, None])
        assert float(metrics["rollout/kept_fraction"][0]) == pytest.approx(weight.mean())
        # the old filter (returns not all equal) would keep groups that all fail here
        returns = traj["episode_return"].reshape(-1, g)
        assert np.any((np.ptp(returns, axis=1) > 0) & ~informative)
        traj = {k: v[rows] if v.shape[:1] == traj["success"].shape else v
                for k, v in traj.items()}
        traj["group_ids"] = np.repeat(np.arange(len(kept)), g)

    if name == "archer":
        t = rec.last("turn_advantages")
        np.testing.assert_allclose(t["r"], np.where(traj["turn_valid"], traj["turn_rewards"], 0))
        from tests.rl_agents.test_archer import np_turn_advantages
        a_turn = np_turn_advantages(t["r"], t["v"], t["tv"], 0.95, 0.0)
        tid = traj["turn_ids"]
        want = np.where(mask, np.take_along_axis(a_turn, np.clip(tid, 0, None), 1), 0.0)
        np.testing.assert_allclose(adv, want, atol=1e-5)
        return

    want = expected_advantages(name, traj, batch, config)
    np.testing.assert_allclose(np.where(mask, adv, 0.0), np.where(mask, want, 0.0),
                               atol=2e-4, rtol=1e-4)
    if config.rl.kl_coef > 0 and config.rl.kl_in_reward:
        # the folded-in KL matters: without it the advantages differ
        no_kl = expected_advantages(name, traj, batch, _without_kl(config))
        assert not np.allclose(np.where(mask, no_kl, 0.0), np.where(mask, adv, 0.0), atol=1e-3)


def _without_kl(config):
    c = config.copy_and_resolve_references()
    c.rl.kl_in_reward = False
    return c
