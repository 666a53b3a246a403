"""Dr. GRPO on guess_number: group-mean advantages (no std), loss summed over tokens and divided
by the maximum length (seq-mean-token-sum-norm), no KL.

    python -m experiments.train --config experiments/configs/guess_number_dr_grpo.py --workdir workdirs/guess_number_dr_grpo
"""
from experiments.configs.recipes import config_arg, recipe


def get_config(arg=None):
    c = recipe("guess_number", config_arg(arg, algo="dr_grpo")["algo"])
    c.total_updates = 40
    return c
