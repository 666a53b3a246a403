"""GRPO on KeyChain (chain of 4 keys among 4 decoys per record, full context: no summaries; see
keychain_supo.py for the summarizing variant).

    python -m experiments.train --config experiments/configs/keychain_grpo.py --workdir workdirs/keychain_grpo
"""
from experiments.configs.recipes import config_arg, recipe


def get_config(arg=None):
    c = recipe("keychain", config_arg(arg, algo="grpo")["algo"], chain_len=4, n_distractors=4)
    c.model.d_model = 64
    c.model.d_ff = 192
    c.rollout.num_groups = 8
    c.rollout.group_size = 4
    c.total_updates = 40
    c.eval_every = 20
    c.checkpoint_every = 20
    return c
