"""SUPO on KeyChain: GRPO with summarization-based context management.

The working context holds ``context.working_len`` = 64 tokens, about half of an oracle
episode (``episode_tokens_needed`` = 121 at chain_len 4, 4 distractors): without summaries the
context fills up after two lookups. When the next turn would not fit, the rollout appends
``<summarize>``, the policy writes a summary (≤ ``summary_len`` tokens), and the context is
reset to [task prompt, ``<summary>``, summary]. The BC warm start clones oracle episodes with
oracle summaries (``<summary> last-key <eos>``); RL then trains every segment with its
episode's group-relative outcome advantage, episodes hitting the summary / turn cap masked out.
Eval may allow more summary rounds (``max_summaries_eval``).

    python -m experiments.train --config experiments/configs/keychain_supo.py --workdir /tmp/supo
"""
import ml_collections

from experiments.configs.common import make_config
from experiments.configs.recipes import config_arg


def get_config(arg=None):
    c = make_config("keychain", config_arg(arg, algo="grpo")["algo"])   # a critic-free estimator
    c.env.kwargs = ml_collections.ConfigDict(dict(chain_len=4, n_distractors=4))
    c.context = ml_collections.ConfigDict(dict(
        mode="supo",             # "full": plain rollout over the whole episode
        working_len=64,          # L: tokens in the working context
        summary_len=4,           # summary body budget (KEY <eos> needs 3, a value 4)
        max_summaries=4,         # cap per training episode (an oracle episode needs 2 at L=64)
        max_summaries_eval=8,    # test time may summarise more often
        overlong_mask=True,      # drop episodes that hit the summary / turn cap from the loss
    ))
    c.model.d_model = 64
    c.model.d_ff = 192
    c.rollout.num_groups = 8
    c.rollout.group_size = 4
    c.rollout.eval_episodes = 128
    c.bc.episodes = 512
    c.bc.epsilon = 0.0
    c.bc.epochs = 6
    c.bc.batch_size = 64
    c.total_updates = 20
    c.eval_every = 10
    c.checkpoint_every = 10
    return c
