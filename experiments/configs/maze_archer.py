"""ArCHer on maze: off-policy turn-level TD critic (replay buffer, Polyak target) whose turn
advantage r + γV(s') − V(s) drives the PPO-clip token policy (compare with maze_ppo).

    python -m experiments.train --config experiments/configs/maze_archer.py --workdir workdirs/maze_archer
"""
from experiments.configs.recipes import config_arg, recipe


def get_config(arg=None):
    c = recipe("maze", config_arg(arg, algo="archer")["algo"])
    c.total_updates = 80
    c.eval_every = 20
    c.checkpoint_every = 20
    return c
