"""PPO (token GAE, critic, KL-in-reward 0.01) on kv_search.

    python -m experiments.train --config experiments/configs/kv_search_ppo.py --workdir workdirs/kv_search_ppo
"""
from experiments.configs.recipes import config_arg, recipe


def get_config(arg=None):
    c = recipe("kv_search", config_arg(arg, algo="ppo")["algo"])
    c.total_updates = 60
    c.eval_every = 20
    c.checkpoint_every = 20
    return c
