"""Train an agent: ``python -m experiments.train --config experiments/configs/NAME.py --workdir DIR``.

Overrides: ``--config.rl.algorithm=ppo --config.env.name=kv_search --config.total_updates=20``.
Writes ``DIR/metrics.jsonl`` (+ TensorBoard events under ``DIR/tensorboard``), ``DIR/config.json``
and orbax checkpoints under ``DIR/checkpoints``; rerunning the same command resumes from the
latest checkpoint and produces the same metrics as an uninterrupted run. SIGTERM (TPU
preemption) saves a checkpoint and exits with status 0.

A bad command line or config (unknown / ill-typed override, mesh product != device count, batch
not divisible by the data axes, a workdir holding a different config, a checkpoint that does not
fit) exits with status 2 and one ``error: ...`` line on stderr naming the problem. Training that
stops on non-finite updates (``config.rl.max_nonfinite_updates`` skipped updates in a row, see
``experiments.run``) exits with status 1 and one ``error: ...`` line; its latest checkpoint
holds the last finite parameters.
"""
from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from experiments import distributed
from experiments.configs import parse_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Path to an experiment config file.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for metrics, checkpoints and episodes.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        print(f"error: unexpected arguments {argv[1:]} (overrides are --config.KEY=VALUE)",
              file=sys.stderr)
        sys.exit(2)
    if not FLAGS["verbosity"].present:   # orbax / absl INFO lines would bury the output
        logging.set_verbosity(logging.WARNING)
    distributed.initialize_from_env()
    # jax-heavy modules after the distributed init
    from experiments.checkpointing import CheckpointError
    from experiments.run import ConfigError, NonFiniteError, run_training

    try:
        result = run_training(FLAGS.config, FLAGS.workdir)
    except (ConfigError, CheckpointError, NonFiniteError) as e:   # one clear line
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(1 if isinstance(e, NonFiniteError) else 2)
    if not distributed.is_main_process():
        return
    wd = os.path.abspath(FLAGS.workdir)
    if result["start_step"] >= FLAGS.config.total_updates:
        print(f"nothing to do: {wd} is already at step {result['updates']} "
              f"(total_updates={FLAGS.config.total_updates})")
    elif result["final_success_rate"] is not None:
        print(f"final greedy success rate: {result['final_success_rate']:.3f} "
              f"({result['updates']} updates, {result['wall_s']:.0f} s, workdir {wd})")
    else:
        print(f"stopped at step {result['updates']} (preempted); rerun the same command to resume")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
