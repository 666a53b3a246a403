"""PPO (token GAE γ=1, λ=0.95, KL-in-reward 0.01) on calculator.

    python -m experiments.train --config experiments/configs/calculator_ppo.py --workdir workdirs/calculator_ppo
"""
from experiments.configs.recipes import config_arg, recipe


def get_config(arg=None):
    c = recipe("calculator", config_arg(arg, algo="ppo")["algo"])
    c.total_updates = 60
    c.eval_every = 20
    c.checkpoint_every = 20
    return c
