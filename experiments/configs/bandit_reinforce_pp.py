"""REINFORCE++ on a 4-armed Bernoulli bandit (16 pulls): batch-normalised returns, token-level
KL-in-reward 0.01; no critic, no groups (64 independent episodes per update).

    python -m experiments.train --config experiments/configs/bandit_reinforce_pp.py --workdir workdirs/bandit_reinforce_pp
"""
from experiments.configs.recipes import config_arg, recipe


def get_config(arg=None):
    c = recipe("bandit", config_arg(arg, algo="reinforce_pp")["algo"])
    c.total_updates = 60
    c.eval_every = 20
    c.checkpoint_every = 20
    return c
