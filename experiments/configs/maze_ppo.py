"""PPO with token-level GAE on maze (LMRL-Gym's PPO baseline; KL-in-reward 0.01).

    python -m experiments.train --config experiments/configs/maze_ppo.py --workdir workdirs/maze_ppo
"""
from experiments.configs.recipes import config_arg, recipe


def get_config(arg=None):
    c = recipe("maze", config_arg(arg, algo="ppo")["algo"])
    c.total_updates = 80
    c.eval_every = 20
    c.checkpoint_every = 20
    return c
