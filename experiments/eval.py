"""Evaluate a trained agent: ``python -m experiments.eval --config CFG --workdir DIR``.

Restores the latest checkpoint of DIR (the same config and overrides as training), then reports
greedy success, sampled success and pass@k (k = ``--pass_k`` samples per task instance, a task
counts as passed if any sample succeeds), appends them as one line to ``DIR/metrics.jsonl``
(``"mode": "eval"``) and writes rendered example episodes to ``DIR/episodes.txt``.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
flags.DEFINE_integer("pass_k", 4, "Samples per task instance for pass@k.")
flags.DEFINE_integer("num_render", 5, "Episodes written to episodes.txt (greedy, then sampled).")
flags.mark_flags_as_required(["config", "workdir"])


def evaluate_workdir(config, workdir: str, pass_k: int = 4, num_render: int = 5) -> dict:
    import jax
    import numpy as np

    import envs
    from experiments.checkpointing import Checkpointer
    from experiments.run import config_fingerprint
    from experiments.validation import validate_config
    from rl_agents.rollout import render_trajectory
    from rl_agents.trainer import Trainer

    validate_config(config, jax.device_count(), registered_envs=envs.registered())
    ckpt_dir = os.path.join(workdir, "checkpoints")
    ckpt = Checkpointer(ckpt_dir, keep=config.keep_checkpoints, save_every=config.checkpoint_every)
    step = ckpt.latest_step()
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {ckpt_dir}; train first with experiments.train")
    trainer = Trainer(config)
    state, _ = ckpt.restore(step, trainer.abstract_state(), expected_fingerprint=config_fingerprint(config))
    params = state.params["policy"]
    n = config.rollout.eval_episodes
    key = jax.random.PRNGKey(config.seed + 2)
    k_greedy, k_sample, k_pass = jax.random.split(key, 3)
    greedy_m, greedy_traj = trainer.evaluate(params, k_greedy, episodes=n, greedy=True)
    sample_m, sample_traj = trainer.evaluate(params, k_sample, episodes=n, greedy=False)
    groups = max(1, n // pass_k)
    pass_traj = trainer.sample_groups(params, k_pass, num_groups=groups, group_size=pass_k)
    passed = np.asarray(pass_traj.success).reshape(groups, pass_k).any(axis=1)
    result = {"step": step, "mode": "eval",
              "eval/success_rate": float(greedy_m["eval/success_rate"]),
              "eval/greedy_return": float(greedy_m["eval/return"]),
              "eval/sampled_success_rate": float(sample_m["eval/success_rate"]),
              "eval/sampled_return": float(sample_m["eval/return"]),
              f"eval/pass@{pass_k}": float(passed.mean())}
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write(json.dumps(result) + "\n")
    with open(os.path.join(workdir, "episodes.txt"), "w") as f:
        for title, traj in (("greedy", greedy_traj), ("sampled", sample_traj)):
            for b in range(min(num_render, n)):
                f.write(f"# {title} episode {b} (success={bool(traj.success[b])})\n")
                f.write(render_trajectory(trainer.env, traj, b) + "\n\n")
    return result


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        result = evaluate_workdir(FLAGS.config, FLAGS.workdir, FLAGS.pass_k, FLAGS.num_render)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    for k, v in result.items():
        print(f"{k}: {v}")
    print(f"episodes written to {os.path.join(FLAGS.workdir, 'episodes.txt')}")


if __name__ == "__main__":
    app.run(main)
