"""The README's main job: GRPO on ``guess_number`` from a noisy-BC warm start, on CPU."""
from experiments.configs.common import make_config


def get_config():
    c = make_config("guess_number", "grpo")
    c.total_updates = 40
    return c
