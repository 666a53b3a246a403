"""RL for language-model agents: rollout, advantages, losses, algorithms, the trainer.

    from rl_agents import make_train
    train = make_train(config)          # any registered algorithm, any context mode
    state, metrics = train(jax.random.PRNGKey(0))

``make_train(config) -> train(key)`` runs a whole training run (warm start, then a
``lax.scan`` over the updates); ``make_update(config, mesh) -> (init, update)`` gives the pure
per-update functions; ``make_trainer(config, mesh)`` the ``Trainer`` holding them.
Submodules are imported on first use.
"""
from __future__ import annotations

__all__ = ["make_train", "make_update", "make_trainer"]


def __getattr__(name):
    if name in __all__:
        from rl_agents import trainer
        return getattr(trainer, name)
    raise AttributeError(f"module 'rl_agents' has no attribute {name!r}")
