"""GRPO on kv_search: 2-hop question answering over a hidden knowledge base with a search tool
(Search-R1 style).

    python -m experiments.train --config experiments/configs/kv_search_grpo.py --workdir workdirs/kv_search_grpo
"""
from experiments.configs.recipes import recipe


def get_config():
    c = recipe("kv_search", "grpo")
    c.total_updates = 60
    c.eval_every = 20
    c.checkpoint_every = 20
    return c
