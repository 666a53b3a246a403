"""PPO with token-level GAE (γ=1, λ=0.95) and a critic initialised from the BC policy, KL-in-reward
0.01 (Practitioner's Guide recipe), on guess_number.

    python -m experiments.train --config experiments/configs/guess_number_ppo.py --workdir workdirs/guess_number_ppo
"""
from experiments.configs.recipes import config_arg, recipe


def get_config(arg=None):
    c = recipe("guess_number", config_arg(arg, algo="ppo")["algo"])
    c.total_updates = 40
    return c
