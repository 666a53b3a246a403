"""ArCHer on kv_search: off-policy turn-level TD critic (replay buffer, Polyak target) whose turn
advantage r + γV(s') − V(s) drives the PPO-clip token policy (compare with kv_search_ppo).

    python -m experiments.train --config experiments/configs/kv_search_archer.py --workdir workdirs/kv_search_archer
"""
from experiments.configs.recipes import config_arg, recipe


def get_config(arg=None):
    c = recipe("kv_search", config_arg(arg, algo="archer")["algo"])
    c.total_updates = 60
    c.eval_every = 20
    c.checkpoint_every = 20
    return c
