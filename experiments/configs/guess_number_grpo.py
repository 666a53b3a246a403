"""GRPO (DeepSeekMath recipe: group-normalised outcome, seq-mean-token-mean loss, k3 KL
loss β=0.04 to the BC policy) on guess_number (n=32, binary search in ≤ 8 turns).

    python -m experiments.train --config experiments/configs/guess_number_grpo.py --workdir workdirs/guess_number_grpo
"""
from experiments.configs.recipes import config_arg, recipe


def get_config(arg=None):
    c = recipe("guess_number", config_arg(arg, algo="grpo")["algo"])
    c.total_updates = 40
    return c
