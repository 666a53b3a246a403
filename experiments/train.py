"""Train an agent: ``python -m experiments.train --config experiments/configs/NAME.py --workdir DIR``.

Overrides: ``--config.rl.algorithm=ppo --config.env.name=kv_search --config.total_updates=20``.
Writes ``DIR/metrics.jsonl`` (+ TensorBoard events under ``DIR/tensorboard``) and orbax
checkpoints under ``DIR/checkpoints``; rerunning the same command resumes from the latest
checkpoint and produces the same metrics as an uninterrupted run. SIGTERM (TPU preemption)
saves a checkpoint and exits with status 0.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

from experiments import distributed

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and episodes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    distributed.initialize_from_env()
    from experiments.run import run_training  # imports jax-heavy modules after distributed init

    try:
        result = run_training(FLAGS.config, FLAGS.workdir)
    except (ValueError, FileNotFoundError) as e:   # config / checkpoint errors: one clear line
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    if result.get("final_success_rate") is not None and distributed.is_main_process():
        print(f"final greedy success rate: {result['final_success_rate']:.3f} "
              f"({result['updates']} updates, {result['wall_s']:.0f} s, workdir {os.path.abspath(FLAGS.workdir)})")


if __name__ == "__main__":
    app.run(main)
