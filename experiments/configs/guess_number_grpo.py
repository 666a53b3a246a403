"""GRPO (DeepSeekMath recipe: group-normalised outcome, seq-mean-token-mean loss, k3 KL
loss β=0.04 to the BC policy) on guess_number (n=32, binary search in ≤ 8 turns).

    python -m experiments.train --config experiments/configs/guess_number_grpo.py --workdir workdirs/guess_number_grpo
"""
from experiments.configs.recipes import recipe


def get_config():
    c = recipe("guess_number", "grpo")
    c.total_updates = 40
    return c
