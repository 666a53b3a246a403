"""Evaluate a trained agent: ``python -m experiments.eval --config CFG --workdir DIR``.

Restores the latest checkpoint of DIR (the same config and overrides as training), then reports

* ``eval/success_rate``: greedy decoding, ``rollout.eval_episodes`` task instances;
* ``eval/sampled_success_rate``: one sample per instance at the training temperature / top-k / top-p;
* ``eval/pass@k``: ``eval_episodes // k`` instances, ``k = --pass_k`` samples each; an instance
  passes if any of its samples succeeds (the unbiased estimator with n = k samples);

appends them as one line to ``DIR/metrics.jsonl`` (``"mode": "eval"``, ``step`` = the
checkpoint's step) and writes rendered example episodes to ``DIR/episodes.txt``. Errors
(no checkpoint, a config that does not match the workdir) exit with status 2 and one line.
"""
from __future__ import annotations

import json
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments.configs import parse_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
flags.DEFINE_integer("pass_k", 4, "Samples per task instance for pass@k.", lower_bound=1)
flags.DEFINE_integer("num_render", 5, "Episodes written to episodes.txt (greedy, then sampled).",
                     lower_bound=0)
flags.DEFINE_integer("seed", None, "Eval seed (default: config.seed + 2).")
flags.mark_flags_as_required(["config", "workdir"])


def evaluate_workdir(config, workdir: str, pass_k: int = 4, num_render: int = 5,
                     seed: int | None = None) -> dict:
    """Greedy / sampled success and pass@k of the latest checkpoint in ``workdir`` (see module
    docstring); appends the result to ``metrics.jsonl`` and writes ``episodes.txt``."""
    import jax
    import numpy as np

    from experiments.run import ConfigError, check_config, config_for_restore, restore_latest
    from rl_agents.rollout import render_trajectory
    from rl_agents.summarization import SupoTrajectory, render_supo_trajectory

    if pass_k < 1:
        raise ConfigError(f"--pass_k must be >= 1, got {pass_k}")
    check_config(config_for_restore(config, workdir))
    trainer, state, step = restore_latest(config, workdir)
    params = state.params["policy"]
    n = config.rollout.eval_episodes
    if n < pass_k:
        raise ConfigError(f"config.rollout.eval_episodes = {n} < --pass_k = {pass_k}: no task "
                          f"instance for pass@{pass_k}")
    key = jax.random.PRNGKey(config.seed + 2 if seed is None else seed)
    k_greedy, k_sample, k_pass = jax.random.split(key, 3)
    greedy_m, greedy_traj = trainer.evaluate(params, k_greedy, episodes=n, greedy=True)
    sample_m, sample_traj = trainer.evaluate(params, k_sample, episodes=n, greedy=False)
    groups = n // pass_k
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
                f.write(f"# {title} episode {b} (success={bool(traj.success[b])}, "
                        f"return={float(traj.episode_return[b]):.3f})\n")
                text = (render_supo_trajectory(traj, b) if isinstance(traj, SupoTrajectory)
                        else render_trajectory(trainer.env, traj, b))
                f.write(text + "\n\n")
    return result


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]} (overrides are --config.KEY=VALUE)",
              file=sys.stderr)
        sys.exit(2)
    if not FLAGS["verbosity"].present:   # orbax / absl INFO lines would bury the output
        logging.set_verbosity(logging.WARNING)
    from experiments.checkpointing import CheckpointError
    from experiments.run import ConfigError

    try:
        result = evaluate_workdir(FLAGS.config, FLAGS.workdir, FLAGS.pass_k, FLAGS.num_render,
                                  FLAGS.seed)
    except (ConfigError, CheckpointError, FileNotFoundError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    for k, v in result.items():
        print(f"{k}: {v}")
    print(f"episodes written to {os.path.join(FLAGS.workdir, 'episodes.txt')}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
