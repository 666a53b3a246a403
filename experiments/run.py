"""The thin host loop around the jitted update: logging, eval, checkpoints, resume, preemption."""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import envs
from experiments import distributed
from experiments.checkpointing import Checkpointer, PreemptionGuard
from experiments.mesh import make_mesh
from experiments.metrics import MetricsWriter
from experiments.validation import validate_config
from rl_agents.trainer import Trainer


def config_fingerprint(config) -> str:
    """Hash of everything that shapes the run except its length and logging cadence."""
    d = json.loads(config.to_json_best_effort(sort_keys=True))
    for k in ("total_updates", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every"):
        d.pop(k, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def eval_key(config, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), step)


def _scalars(metrics) -> dict:
    return {k: float(np.asarray(v)) for k, v in metrics.items()}


def run_training(config, workdir: str) -> dict:
    validate_config(config, jax.device_count(), registered_envs=envs.registered())
    main = distributed.is_main_process()
    os.makedirs(workdir, exist_ok=True)
    mesh = make_mesh(config.mesh)
    trainer = Trainer(config, mesh=mesh)
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                        save_every=config.checkpoint_every)
    fingerprint = config_fingerprint(config)
    latest = ckpt.latest_step()
    if latest is not None:
        state, meta = ckpt.restore(latest, trainer.abstract_state(),
                                   expected_fingerprint=fingerprint)
        if main:
            print(f"resumed from {ckpt.directory} step {latest}", file=sys.stderr, flush=True)
    else:
        state = trainer.init(jax.random.PRNGKey(config.seed), verbose=main)
        ckpt.save(0, state, {"config_fingerprint": fingerprint}, force=True)
    start = int(state.step)
    writer = MetricsWriter(workdir, enabled=main, resume_step=start)
    t0 = time.time()
    final_success = None
    bar = writer.progress(total=config.total_updates, initial=start) if main else None
    with PreemptionGuard() as guard:
        for step in range(start + 1, config.total_updates + 1):
            state, metrics = trainer.update(state)
            out = {}
            if step % config.log_every == 0 or step == config.total_updates:
                out.update(_scalars(metrics))
            if step % config.eval_every == 0 or step == config.total_updates:
                ev, _ = trainer.evaluate(state.params["policy"], eval_key(config, step),
                                         episodes=config.rollout.eval_episodes, greedy=True)
                ev = _scalars(ev)
                out.update(ev)
                final_success = ev["eval/success_rate"]
            if out:
                writer.write(step, out)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{out.get('loss', float('nan')):.3f}",
                                success=f"{out.get('rollout/success_rate', float('nan')):.2f}")
            preempted = guard.should_stop
            ckpt.save(step, state, {"config_fingerprint": fingerprint},
                      force=preempted or step == config.total_updates)
            if preempted:
                if main:
                    print(f"preempted: saved step {step}, exiting", file=sys.stderr, flush=True)
                break
    if bar is not None:
        bar.close()
    writer.close()
    return {"final_success_rate": final_success, "updates": int(state.step),
            "wall_s": time.time() - t0}
