"""RLOO (leave-one-out baseline within a group of 4, KL-in-reward 0.01) on calculator.

    python -m experiments.train --config experiments/configs/calculator_rloo.py --workdir workdirs/calculator_rloo
"""
from experiments.configs.recipes import recipe


def get_config():
    c = recipe("calculator", "rloo")
    c.total_updates = 60
    c.eval_every = 20
    c.checkpoint_every = 20
    return c
