"""GRPO on calculator (2 operations over operands < 20, a calculator tool per operation).

    python -m experiments.train --config experiments/configs/calculator_grpo.py --workdir workdirs/calculator_grpo
"""
from experiments.configs.recipes import config_arg, recipe


def get_config(arg=None):
    c = recipe("calculator", config_arg(arg, algo="grpo")["algo"])
    c.total_updates = 60
    c.eval_every = 20
    c.checkpoint_every = 20
    return c
