"""RL for language-model agents: rollout, advantages, losses, algorithms, trainers.

``rl_agents.make_train(config) -> train(key)`` runs a whole training run (warm start, then a
``lax.scan`` over the updates) for every registered algorithm (``rl_agents.algorithms``).
Submodules are imported on first use.
"""
from __future__ import annotations

__all__ = ["make_train"]


def __getattr__(name):
    if name == "make_train":
        from rl_agents.trainer import make_train
        return make_train
    raise AttributeError(f"module 'rl_agents' has no attribute {name!r}")
