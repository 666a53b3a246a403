"""GiGPO (verl-agent) on maze: episode-group advantage (mean only) + step-group advantage over
identical observations (γ=0.95, ω=1), k3 KL loss 0.01. 5×5 random mazes, positions only.

    python -m experiments.train --config experiments/configs/maze_gigpo.py --workdir workdirs/maze_gigpo
"""
from experiments.configs.recipes import config_arg, recipe


def get_config(arg=None):
    c = recipe("maze", config_arg(arg, algo="gigpo")["algo"])
    c.total_updates = 80
    c.eval_every = 20
    c.checkpoint_every = 20
    return c
