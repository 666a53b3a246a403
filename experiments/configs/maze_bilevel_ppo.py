"""RAGEN's bi-level GAE PPO on maze: turn-level GAE (γ=0.95) across turns, token-level GAE
(γ=λ=1) inside each turn, whitened advantages.

    python -m experiments.train --config experiments/configs/maze_bilevel_ppo.py --workdir workdirs/maze_bilevel_ppo
"""
from experiments.configs.recipes import config_arg, recipe


def get_config(arg=None):
    c = recipe("maze", config_arg(arg, algo="bilevel_ppo")["algo"])
    c.total_updates = 80
    c.eval_every = 20
    c.checkpoint_every = 20
    return c
