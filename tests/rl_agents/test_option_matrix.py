"""The estimator × option matrix of docs/algorithms.md ("What each option changes").

For every allowed combination the option changes the advantages the estimator produces through
the trainer's own ``score`` and ``advantages`` stages (one sampled rollout, every registered
estimator, one jit per option); ArCHer's turn rewards R_k likewise. Every refused combination
is refused by ``check_config`` with one line naming the field, and by the trainer constructor.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from experiments.run import ConfigError, check_config
from rl_agents.advantages import ADVANTAGE_ESTIMATORS
from rl_agents.archer import turn_rewards
from rl_agents.trainer import make_trainer
from tests.rl_agents import probes

ESTIMATORS = sorted(ADVANTAGE_ESTIMATORS)
BUDGET = 6 * 5                     # kv_search: max_turns · action_len agent tokens

OPTIONS = {
    "base": lambda c: None,
    "kl_in_reward": lambda c: c.rl.update(kl_coef=0.1, kl_kind="k1", kl_in_reward=True),
    "kl_loss": lambda c: c.rl.update(kl_coef=0.1, kl_kind="k1", kl_in_reward=False),
    "overlong": lambda c: c.rl.update(overlong_cache_len=BUDGET),
    "learned": lambda c: c.reward.update(source="learned"),
    "learned_constant": lambda c: c.reward.update(source="learned"),
    "process": lambda c: c.reward.process.update(enabled=True, beta=0.5),
    "process_beta0": lambda c: c.reward.process.update(enabled=True, beta=1e-9),
}


def base_config():
    c = probes.tiny("kv_search", "ppo", groups=4, group_size=2)
    c.rl.update(kl_coef=0.0, kl_in_reward=False)
    c.rl.advantage_kwargs = ml_collections.ConfigDict()        # each estimator's defaults
    return c


@pytest.fixture(scope="module")
def rollout():
    tr = make_trainer(base_config())
    state = tr.fresh_state(jax.random.PRNGKey(0))
    traj = tr.sample_groups(state.params["policy"], jax.random.PRNGKey(1), num_groups=4,
                            group_size=2)
    return jax.block_until_ready(traj)


def runner(option):
    """(jitted run(state, traj), state) for the config of ``option``: run gives
    {estimator: advantages [B,T], "archer": R_k [B,K]} through the trainer's own
    ``score`` and ``advantages`` stages with each registered estimator in turn."""
    c = base_config()
    OPTIONS[option](c)
    tr = make_trainer(c)
    state = tr.fresh_state(jax.random.PRNGKey(0))      # same policy / critic for every option
    leaves, tree = jax.tree.flatten(state.ref_params)
    state = state.replace(ref_params=jax.tree.unflatten(tree, [x * 1.2 for x in leaves]))
    base_algorithm = tr.algorithm

    def run(state, traj):
        weight = jnp.ones(traj.success.shape, jnp.float32)
        t2, _, _ = tr.score(state, traj, weight)
        out = {}
        for name in ESTIMATORS:
            tr.algorithm = dataclasses.replace(base_algorithm, estimator=name)
            out[name] = tr.advantages(state, t2, weight)["advantages"]
        tr.algorithm = base_algorithm
        ref_logp = (tr.logprobs(state.ref_params, t2.tokens, t2.valid)[0]
                    if c.rl.kl_coef > 0 else None)
        out["archer"] = turn_rewards(tr, t2, ref_logp)
        return out

    return jax.jit(run), state


class Matrix(dict):
    """option → {target: advantages}, computed on first use (one compile per config)."""

    def __init__(self, traj):
        super().__init__()
        self.traj, self.runners = traj, {}

    def __missing__(self, option):
        key = "learned" if option == "learned_constant" else option
        if key not in self.runners:
            self.runners[key] = runner(key)
        run, state = self.runners[key]
        if option == "learned_constant":                # an RM that scores everything 0
            state = state.replace(reward_params=jax.tree.map(jnp.zeros_like,
                                                             state.reward_params))
        self[option] = jax.tree.map(np.asarray, run(state, self.traj))
        return self[option]


@pytest.fixture(scope="module")
def matrix(rollout):
    return Matrix(rollout)


ALLOWED = ("kl_in_reward", "overlong", "learned", "process")
TARGETS = ESTIMATORS + ["archer"]


@pytest.mark.parametrize("option", ALLOWED)
def test_each_allowed_option_changes_what_every_estimator_reads(matrix, option):
    unchanged = [name for name in TARGETS
                 if np.allclose(matrix[option][name], matrix["base"][name], atol=1e-4)]
    assert not unchanged, f"{option} leaves {unchanged} unchanged"


def test_kl_as_a_loss_term_leaves_the_advantages_alone(matrix):
    for name in TARGETS:
        np.testing.assert_allclose(matrix["kl_loss"][name], matrix["base"][name], atol=1e-6)


def test_prime_with_vanishing_beta_gives_the_outcome_only_advantages(matrix):
    """β → 0: the process rewards vanish, the advantages are the outcome-only ones (GRPO's
    std normalisation would amplify the residue inside an all-equal group: left out; β = 0.5
    differs for all, test above)."""
    for name in TARGETS:
        if name == "grpo":
            continue
        np.testing.assert_allclose(matrix["process_beta0"][name], matrix["base"][name],
                                   atol=1e-4)


def test_a_learned_reward_that_scores_everything_equal_gives_zero_group_advantages(matrix,
                                                                                   rollout):
    for name in ("grpo", "dr_grpo", "rloo", "gigpo", "reinforce_pp_baseline"):
        np.testing.assert_allclose(matrix["learned_constant"][name], 0.0, atol=1e-6)
    assert np.abs(matrix["base"]["gigpo"]).max() > 0          # the env reward does differ
    np.testing.assert_allclose(matrix["learned_constant"]["archer"], 0.0, atol=1e-6)


def test_entropy_bonus_changes_the_loss_by_its_coefficient(rollout):
    """entropy_coef is a loss term (all estimators alike): total(c) = total(0) − c·entropy."""
    c = base_config()
    tr = make_trainer(c)
    params = tr.fresh_state(jax.random.PRNGKey(0)).params["policy"]
    batch = dict(tokens=rollout.tokens, valid=rollout.valid, loss_mask=rollout.loss_mask,
                 old_logp=rollout.behaviour_logp,
                 advantages=jnp.where(rollout.loss_mask, 0.5, 0.0))
    total0, m0 = jax.jit(tr.policy_loss)(params, batch)
    c.rl.entropy_coef = 0.05                          # read when policy_loss is traced
    total1, _ = jax.jit(tr.policy_loss)(params, batch)
    assert float(m0["policy/entropy"]) > 0
    np.testing.assert_allclose(float(total1), float(total0) - 0.05 * float(m0["policy/entropy"]),
                               rtol=1e-5)


# ----------------------------------------------------------------------------- refused
def supo_config(**rl):
    from experiments.configs import keychain_supo
    c = keychain_supo.get_config()
    c.rl.update(rl)
    return c


REFUSED = {
    "dapo+learned": (lambda: _with(probes.tiny("kv_search", "dapo", groups=2, group_size=2),
                                   reward_source="learned"), "config.reward.source"),
    "supo+ppo": (lambda: _algorithm(supo_config(), "ppo"), "config.rl.algorithm"),
    "supo+kl_in_reward": (lambda: supo_config(kl_coef=0.01, kl_in_reward=True),
                          "config.rl.kl_in_reward"),
    "supo+overlong": (lambda: supo_config(overlong_cache_len=8), "config.rl.overlong_cache_len"),
    "supo+learned": (lambda: _with(supo_config(), reward_source="learned"),
                     "config.reward.source"),
    "supo+process": (lambda: _with(supo_config(), process=True), "config.reward.process"),
}


def _with(c, reward_source=None, process=False):
    if reward_source:
        c.reward.source = reward_source
    if process:
        c.reward.process.enabled = True
    return c


def _algorithm(c, name):
    c.rl.algorithm = name
    c.rollout.group_size = 1
    return c


@pytest.mark.parametrize("combo", sorted(REFUSED))
def test_refused_combinations_fail_at_start_up_naming_the_field(combo):
    build, field = REFUSED[combo]
    with pytest.raises(ConfigError) as e:
        check_config(build(), num_devices=1)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(field), msg
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make_trainer(build())
