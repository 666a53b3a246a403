"""The README's main job: GRPO on ``guess_number`` from a noisy-BC warm start, on CPU.

(``make_config`` defaults: token-mean loss, no KL; every task knob is under ``env.kwargs``, e.g.
``--config.env.kwargs.n=64``.)
"""
from experiments.configs.common import make_config
from experiments.configs.recipes import env_kwargs


def get_config():
    c = make_config("guess_number", "grpo")
    c.env.kwargs = env_kwargs("guess_number")
    c.total_updates = 40
    return c
