"""The README's main job: GRPO on ``guess_number`` from a noisy-BC warm start, on CPU.

The ``guess_number_grpo`` recipe (group mean/std advantages, seq-mean-token-mean loss, k3 KL
β=0.04 to the BC policy) after BC on ε = 0.4 noisy oracle demos, whose greedy success
(≈0.6–0.75) leaves room for RL to show: 100 updates (a few minutes on a 2-core CPU) raise it
by 15–25 points (see the learning table in README). Every task knob is under ``env.kwargs``,
e.g. ``--config.env.kwargs.n=64``.
"""
import ml_collections

from experiments.configs.recipes import recipe


def get_config():
    c = recipe("guess_number", "grpo")
    # The recipe's GRPO hyper-parameters (eps=1e-6, unbiased std) are grpo()'s defaults; leaving
    # advantage_kwargs empty lets `--config.rl.algorithm=ppo` etc. use their own defaults.
    c.rl.advantage_kwargs = ml_collections.ConfigDict()
    c.bc.epsilon = 0.4
    c.total_updates = 100
    c.eval_every = 20
    c.checkpoint_every = 20
    return c
