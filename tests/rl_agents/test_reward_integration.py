"""Trainer integration of learned rewards and PRIME process rewards (config.reward.*)."""
import jax
import numpy as np

from experiments.configs.common import make_config
from rl_agents.trainer import Trainer


def tiny(algorithm="grpo"):
    c = make_config("guess_number", algorithm)
    c.model.update(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, attention_impl="xla")
    c.rollout.update(num_groups=4, group_size=2)
    c.rl.update(epochs=1, minibatches=2)
    c.bc.episodes = 0
    c.reward.update(rm_pairs=64, rm_epochs=2, rm_eval_pairs=64)
    return c


def test_learned_reward_replaces_env_reward():
    c = tiny()
    c.reward.source = "learned"
    tr = Trainer(c)
    st = tr.init(jax.random.PRNGKey(0))
    st, m = tr.update(st)
    assert "rollout/learned_return" in m
    assert np.isfinite(float(m["loss"]))
    assert jax.tree.structure(tr.abstract_state()) == jax.tree.structure(st)


def test_prime_process_rewards_update_prm():
    c = tiny()
    c.reward.process.update(enabled=True, transform="delta", lr=1e-3)
    tr = Trainer(c)
    st = tr.init(jax.random.PRNGKey(0))
    before = jax.tree.map(np.asarray, st.prm["params"])
    st, m = tr.update(st)
    after = jax.tree.map(np.asarray, st.prm["params"])
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(after)))
    assert moved > 0
    assert any(k.startswith("prm/") for k in m)
    assert np.isfinite(float(m["loss"]))
