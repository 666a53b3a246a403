"""RLOO (leave-one-out baseline within a group of 4, KL-in-reward 0.01) on calculator.

    python -m experiments.train --config experiments/configs/calculator_rloo.py --workdir workdirs/calculator_rloo
"""
from experiments.configs.recipes import config_arg, recipe


def get_config(arg=None):
    c = recipe("calculator", config_arg(arg, algo="rloo")["algo"])
    c.total_updates = 60
    c.eval_every = 20
    c.checkpoint_every = 20
    return c
