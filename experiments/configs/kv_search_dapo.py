"""DAPO on kv_search: clip-higher (ε_low 0.2, ε_high 0.28), token-mean loss, dynamic sampling
(2× oversampled groups; a group is kept iff 0 < #successes < G), soft overlong penalty over the last
quarter of the agent-token budget, no KL.

    python -m experiments.train --config experiments/configs/kv_search_dapo.py --workdir workdirs/kv_search_dapo
"""
from experiments.configs.recipes import config_arg, recipe


def get_config(arg=None):
    c = recipe("kv_search", config_arg(arg, algo="dapo")["algo"])
    c.total_updates = 60
    c.eval_every = 20
    c.checkpoint_every = 20
    return c
