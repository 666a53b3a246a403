"""Fixed shapes: after the first call, ``Trainer.update`` and a jitted rollout compile nothing.

Compilations are counted with JAX's monitoring events (every XLA backend compile records
``/jax/core/compile/backend_compile_duration``, every trace ``.../jaxpr_trace_duration``) and
cross-checked with the jitted function's own cache size and ``jax.log_compiles`` output.
"""
import contextlib
import logging

import jax
import jax.numpy as jnp
import models
from experiments.configs.common import make_config
from rl_agents.rollout import rollout
from rl_agents.trainer import Trainer

BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"
TRACE = "/jax/core/compile/jaxpr_trace_duration"


@contextlib.contextmanager
def count_compilations():
    """Yields a dict {"compile": n, "trace": n} filled while the block runs."""
    counts = {"compile": 0, "trace": 0}

    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE:
            counts["compile"] += 1
        elif event == TRACE:
            counts["trace"] += 1

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield counts
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def test_counter_sees_a_compilation():
    """The counter itself works: a fresh jitted function with a new shape is counted, its
    second call is not."""
    f = jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.0)
    with count_compilations() as first:
        jax.block_until_ready(f(jnp.ones((7, 3))))
    with count_compilations() as second:
        jax.block_until_ready(f(jnp.zeros((7, 3))))
    with count_compilations() as third:
        jax.block_until_ready(f(jnp.zeros((8, 3))))       # new shape: compiles again
    assert first["compile"] >= 1 and first["trace"] >= 1
    assert second == {"compile": 0, "trace": 0}
    assert third["compile"] >= 1


def tiny_config(algorithm):
    c = make_config("guess_number", algorithm)
    c.model.update(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, d_ff=64, attention_impl="xla")
    c.rollout.update(num_groups=2, group_size=2)
    c.rl.update(epochs=1, minibatches=2)
    c.bc.episodes = 0
    return c


def test_second_update_compiles_nothing(caplog):
    """PPO (policy + critic, GAE, two minibatches): the donated state returned by the first
    update has the same avals / shardings as the input, so the second call is a cache hit."""
    trainer = Trainer(tiny_config("ppo"))
    state = trainer.init(jax.random.PRNGKey(0))
    state, metrics = trainer.update(state)
    jax.block_until_ready(metrics)
    size = trainer.update._cache_size()
    caplog.set_level(logging.WARNING)
    with jax.log_compiles(True), count_compilations() as counts:
        state, metrics = trainer.update(state)
        jax.block_until_ready((state, metrics))
    assert counts == {"compile": 0, "trace": 0}, counts
    assert trainer.update._cache_size() == size == 1
    assert not [r for r in caplog.records if "Compiling" in r.getMessage()]
    assert int(state.step) == 2


def test_second_rollout_compiles_nothing():
    """A jitted rollout called again with new params (same shapes, e.g. after an update) and a
    new key reuses its executable."""
    trainer = Trainer(tiny_config("grpo"))
    env = trainer.env
    fn = jax.jit(lambda p, k: rollout(env, trainer.policy, p, k, num_groups=3, group_size=2))
    p1 = models.init_params(trainer.policy, jax.random.PRNGKey(1))
    p2 = jax.tree.map(lambda x: x * 1.5, p1)
    jax.block_until_ready(fn(p1, jax.random.PRNGKey(0)))
    with count_compilations() as counts:
        traj = jax.block_until_ready(fn(p2, jax.random.PRNGKey(5)))
    assert counts == {"compile": 0, "trace": 0}, counts
    assert fn._cache_size() == 1
    assert traj.tokens.shape == (6, env.max_episode_tokens)
    assert int(traj.loss_mask.sum()) > 0
    assert not bool((traj.loss_mask & ~traj.valid).any())
