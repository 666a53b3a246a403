"""The thin host loop around the jitted update: logging, eval, checkpoints, resume, preemption.

``run_training(config, workdir)`` is what ``python -m experiments.train`` runs:

1. ``check_config``: :func:`rl_agents.validation.validate_config` (mesh = device count, batch
   divisible by the data axes, ...) plus the registries (algorithm, loss aggregation, KL
   estimator, advantage hyper-parameters, env knobs): a bad config fails here, before anything
   is compiled, with one :class:`ConfigError` line naming the field.
2. ``WORKDIR/config.json`` records the run's config. Rerunning in a workdir whose config differs
   (outside the run-length keys ``RUN_LENGTH_KEYS``) is a :class:`ConfigError` listing the
   differing fields; a checkpoint that does not fit the state is a ``CheckpointError``. A
   workdir is never silently re-initialised.
3. Resume from the latest checkpoint or initialise (BC warm start), then ``Trainer.update`` per
   step, metrics every ``log_every``, greedy eval every ``eval_every``, a checkpoint every
   ``checkpoint_every`` and at the end. SIGTERM saves and stops. Same seed, config and device
   count give the same ``metrics.jsonl`` lines and parameters, resumed or not.
4. Non-finite updates: the jitted update skips an update whose loss or gradient is NaN / inf
   (``rl_agents.nonfinite``: parameters and optimizer state stay as before it, the metric
   ``update/skipped_nonfinite`` is 1). After ``config.rl.max_nonfinite_updates`` skipped updates
   in a row the loop stops with a :class:`NonFiniteError`, without saving that last step; every
   checkpoint holds finite parameters (initial parameters that are not finite are refused
   before the first save).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from typing import Any

import jax

from experiments import distributed
from experiments.checkpointing import Checkpointer, PreemptionGuard
from models.sharding import make_mesh
from experiments.metrics import MetricsWriter
from rl_agents.nonfinite import all_finite
from rl_agents.trainer import make_trainer
from rl_agents.trainer import Trainer
from rl_agents.validation import ConfigError, check_config

__all__ = ["ConfigError", "NonFiniteError", "RUN_LENGTH_KEYS", "CONFIG_FILE", "config_fingerprint",
           "flat_config", "config_diff", "config_from_workdir", "check_config", "build_trainer", "check_workdir_config",
           "restore_latest", "run_training", "eval_key"]

#: Keys that may change between a run and its resumption (they do not shape the training).
RUN_LENGTH_KEYS = ("total_updates", "eval_every", "checkpoint_every", "keep_checkpoints", "log_every",
                   "rl.max_nonfinite_updates")
CONFIG_FILE = "config.json"


# ----------------------------------------------------------------------------- config identity
def flat_config(config) -> dict[str, Any]:
    """``{"model.d_model": 128, ...}`` (JSON values) of a ConfigDict."""
    out: dict[str, Any] = {}

    def walk(prefix, node):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}{k}.", v)
            if not node and prefix:
                out[prefix[:-1]] = {}
        else:
            out[prefix[:-1]] = node

    walk("", json.loads(config.to_json_best_effort(sort_keys=True)))
    return out


def config_from_workdir(workdir: str):
    """The run's ConfigDict rebuilt from ``WORKDIR/config.json`` (what ``flat_config`` wrote)."""
    import ml_collections

    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        raise ConfigError(f"--workdir {workdir} has no {CONFIG_FILE} (not a training workdir)")
    with open(path) as f:
        try:
            flat = json.load(f)
        except json.JSONDecodeError:
            raise ConfigError(f"{path} is not valid JSON (damaged workdir?)") from None
    nested: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return ml_collections.ConfigDict(nested)


def _shaping(flat: dict) -> dict:
    return {k: v for k, v in flat.items() if k not in RUN_LENGTH_KEYS}


def config_fingerprint(config) -> str:
    """Hash of everything that shapes the run except its length and logging cadence (the
    ``RUN_LENGTH_KEYS``, dotted for nested ones)."""
    d = json.loads(config.to_json_best_effort(sort_keys=True))
    for k in RUN_LENGTH_KEYS:
        *parents, leaf = k.split(".")
        node = d
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(leaf, None)
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def config_diff(old: dict, new: dict) -> list[str]:
    """``["model.d_model: 32 -> 48", ...]`` over the run-shaping keys of two flat configs."""
    old, new = _shaping(old), _shaping(new)
    missing = object()
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k, missing), new.get(k, missing)
        if a != b:
            fa = "(absent)" if a is missing else json.dumps(a)
            fb = "(absent)" if b is missing else json.dumps(b)
            out.append(f"{k}: {fa} -> {fb}")
    return out


# ----------------------------------------------------------------------------- start-up checks
def build_trainer(config, mesh=None, checkpoint_weights: bool = True) -> Trainer:
    """``Trainer(config, mesh)``; a setting it rejects becomes a one-line ConfigError."""
    try:
        return make_trainer(config, mesh=mesh, checkpoint_weights=checkpoint_weights)
    except (ValueError, TypeError) as e:
        msg = " ".join(str(e).split())
        raise ConfigError(msg if msg.startswith("config") else f"config: {msg}") from None


def check_workdir_config(config, workdir: str) -> None:
    """Raise :class:`ConfigError` if ``workdir`` holds a run with a different config."""
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.exists(path):
        return
    with open(path) as f:
        try:
            stored = json.load(f)
        except json.JSONDecodeError:
            raise ConfigError(f"{path} is not valid JSON (damaged workdir?)") from None
    diff = config_diff(stored, flat_config(config))
    if diff:
        more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
        raise ConfigError(f"--workdir {workdir} holds a run with a different config: "
                          f"{'; '.join(diff[:3])}{more} (stored -> now); rerun with the stored "
                          f"settings or use a new --workdir")


def _write_workdir_config(config, workdir: str) -> None:
    path = os.path.join(workdir, CONFIG_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(flat_config(config), f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def config_for_restore(config, workdir: str):
    """``config``, or, when its ``model.hf_checkpoint`` directory is gone, a copy that reads the
    run's weightless copy of it (``WORKDIR/hf_base``: config, tokenizer with the run's tags,
    stop ids), enough to restore and export the run's checkpoints."""
    from rl_agents.pretrained import BASE_DIR

    path = config.model.get("hf_checkpoint", "")
    base = os.path.join(workdir, BASE_DIR)
    if not path or os.path.isdir(path) or not os.path.isdir(base):
        return config
    config = config.copy_and_resolve_references()
    with config.unlocked():
        config.model.hf_checkpoint = base
    return config


def restore_latest(config, workdir: str, trainer: Trainer | None = None, step: int | None = None):
    """``(trainer, state, step)`` of the latest checkpoint in ``workdir`` (or of ``step``; no mesh
    unless ``trainer`` has one). Raises FileNotFoundError without a (that) checkpoint,
    ConfigError / CheckpointError when it does not fit ``config``."""
    check_workdir_config(config, workdir)
    # the checkpoint's weights are not read: the restored state holds the trained ones
    trainer = trainer or build_trainer(config_for_restore(config, workdir),
                                       checkpoint_weights=False)
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise FileNotFoundError(f"no checkpoint under {ckpt_dir}; train first with experiments.train")
    ckpt = Checkpointer(ckpt_dir, keep=config.keep_checkpoints, save_every=config.checkpoint_every)
    if step is None:
        step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {ckpt_dir}; train first with experiments.train")
    elif step not in ckpt.all_steps():
        raise FileNotFoundError(f"no checkpoint at step {step} under {ckpt_dir} "
                                f"(steps: {ckpt.all_steps()})")
    state, _ = ckpt.restore(step, trainer.abstract_state(),
                            expected_fingerprint=config_fingerprint(config))
    return trainer, state, step


# ----------------------------------------------------------------------------- the loop
class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss / gradient too many updates in a row (or non-finite
    initial parameters); the message is one line."""


def eval_key(config, step: int) -> jax.Array:
    return jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), step)


def _scalars(metrics) -> dict:
    """Host floats of a metrics dict, on every process (arrays may span several processes)."""
    return {k: float(distributed.host_value(v)) for k, v in metrics.items()}


def run_training(config, workdir: str, *, progress: bool = True) -> dict:
    """Train (or resume) in ``workdir``. Returns ``final_success_rate`` (last greedy eval, None
    if no eval ran), ``start_step`` (the step it resumed from), ``updates`` (final step),
    ``wall_s``, and the final ``state`` and its ``trainer``."""
    check_config(config)
    main = distributed.is_main_process()
    os.makedirs(workdir, exist_ok=True)
    check_workdir_config(config, workdir)
    mesh = make_mesh(config.mesh)
    trainer = build_trainer(config, mesh)
    if main and trainer.pretrained is not None:
        from rl_agents.pretrained import BASE_DIR, save_base
        if not os.path.isdir(os.path.join(workdir, BASE_DIR)):
            save_base(trainer.pretrained, trainer.model_cfg, os.path.join(workdir, BASE_DIR))
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints,
                        save_every=config.checkpoint_every)
    fingerprint = config_fingerprint(config)
    latest = ckpt.latest_step()
    if latest is not None:
        state, _ = ckpt.restore(latest, trainer.abstract_state(), expected_fingerprint=fingerprint)
        if main:
            print(f"resumed from {ckpt.directory} step {latest}", file=sys.stderr, flush=True)
    if main:
        _write_workdir_config(config, workdir)
    if latest is None:
        state = trainer.init(jax.random.PRNGKey(config.seed), verbose=main and progress)
        if not bool(jax.jit(all_finite)(state.params)):
            ckpt.close()
            raise NonFiniteError("the initial parameters (after the BC warm start) are not "
                                 "finite; nothing was saved (lower config.bc.lr?)")
        ckpt.save(0, state, {"config_fingerprint": fingerprint}, force=True)
    start = int(state.step)
    max_skipped = int(config.rl.max_nonfinite_updates)
    skipped, failure = 0, None
    writer = MetricsWriter(workdir, enabled=main, resume_step=start)
    t0 = time.time()
    final_success = None
    bar = writer.progress(total=config.total_updates, initial=start) if main and progress else None
    with PreemptionGuard() as guard:
        for step in range(start + 1, config.total_updates + 1):
            state, metrics = trainer.update(state)
            bad = float(distributed.host_value(metrics["update/skipped_nonfinite"])) > 0
            skipped = skipped + 1 if bad else 0
            out = {}
            if (step % config.log_every == 0 or step == config.total_updates
                    or skipped >= max_skipped):
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
                if "loss" in out:
                    bar.set_postfix(loss=f"{out['loss']:.3f}",
                                    success=f"{out.get('rollout/success_rate', float('nan')):.2f}")
            if skipped >= max_skipped:   # no save: the latest checkpoint keeps the last good params
                failure = NonFiniteError(
                    f"{skipped} updates in a row (steps {step - skipped + 1}-{step}) had a "
                    f"non-finite loss or gradient and were skipped "
                    f"(config.rl.max_nonfinite_updates={max_skipped}); stopped at step {step}, "
                    f"latest checkpoint: step {ckpt.latest_step()} (finite parameters)")
                break
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
    ckpt.close()
    if failure is not None:
        raise failure
    return {"final_success_rate": final_success, "start_step": start, "updates": int(state.step),
            "wall_s": time.time() - t0, "state": state, "trainer": trainer}
