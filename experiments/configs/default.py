"""The README's main job: GRPO on ``guess_number`` from a noisy-BC warm start, on CPU.

The ``guess_number_grpo`` recipe (group mean/std advantages, seq-mean-token-mean loss, k3 KL
β=0.04 to the BC policy) after BC on ε = 0.4 noisy oracle demos, whose greedy success leaves
room for RL to show. Two settings on top of the recipe:

* rollouts are sampled at temperature 0.5 (the loss's log-probs use the same temperature;
  evaluation is greedy): the BC policy imitates the demos' ε-random turns, so at temperature 1
  most groups fail for noise and GRPO first unlearns the BC policy's good answers;
* the learning rate decays (cosine) to a tenth over the run, so the final policy is a settled
  one, not a snapshot of a fluctuating one.

200 updates take a few minutes on a 2-core CPU, BC included; the final greedy success on 1,024
evaluation episodes is in docs/results.md. Every task knob is under ``env.kwargs``, e.g.
``--config.env.kwargs.n=64``. Another algorithm or task gets its own recipe, with this file's
edits on top: ``--config experiments/configs/default.py:algo=ppo,env=kv_search``, or the
same through ``--config.rl.algorithm=ppo --config.env.name=kv_search``.
"""
from experiments.configs.recipes import config_arg, recipe


def get_config(arg=None):
    a = config_arg(arg, env="guess_number", algo="grpo")
    c = recipe(a["env"], a["algo"])
    c.bc.epsilon = 0.4
    c.rollout.temperature = 0.5
    c.rollout.eval_episodes = 1024
    c.optim.decay = "cosine"
    c.optim.final_lr_fraction = 0.1
    c.total_updates = 200
    c.eval_every = 50
    c.checkpoint_every = 50
    return c
