"""Dr. GRPO on guess_number: group-mean advantages (no std), loss summed over tokens and divided
by the maximum length (seq-mean-token-sum-norm), no KL.

    python -m experiments.train --config experiments/configs/guess_number_dr_grpo.py --workdir workdirs/guess_number_dr_grpo
"""
from experiments.configs.recipes import recipe


def get_config():
    c = recipe("guess_number", "dr_grpo")
    c.total_updates = 40
    return c
