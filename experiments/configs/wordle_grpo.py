"""GRPO on wordle (4-letter words over a 6-letter alphabet, 6 guesses, per-letter feedback).

    python -m experiments.train --config experiments/configs/wordle_grpo.py --workdir workdirs/wordle_grpo
"""
from experiments.configs.recipes import config_arg, recipe


def get_config(arg=None):
    c = recipe("wordle", config_arg(arg, algo="grpo")["algo"])
    c.total_updates = 80
    c.eval_every = 20
    c.checkpoint_every = 20
    return c
