"""Behaviour cloning / SFT warm start, filtered BC and RAFT (reward-ranked fine-tuning).

Demonstrations are oracle episodes (``Env.oracle_action``, optionally ε-noisy) rolled out with
the same jitted episode runner as the policy, stored as a Hugging Face ``datasets.Dataset``
(one row per episode: ``tokens``, ``loss_mask``, ``valid``, ``episode_return``, ``success``).

SFT loss (token mean over agent tokens):  L(θ) = − Σ_t m_t log π_θ(y_t | y_<t) / Σ_t m_t.
Filtered BC keeps the demos whose return passes a threshold (or the successful ones); RAFT
samples G rollouts per task from the current policy, keeps the best of each group (reward-
ranked) and runs SFT on them.

The warm start (``Trainer.init``) runs on the default device, outside the trainer's mesh: in one
process its result is bitwise the same whatever the mesh (docs/determinism.md).
"""
from __future__ import annotations

import math
import numbers
import sys
from typing import Any

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax

import models
from envs.base import Env
from rl_agents import losses
from rl_agents.rollout import Trajectory, oracle_policy, rollout, run_episodes
from rl_agents.sampling import SamplingConfig

DATASET_COLUMNS = ("tokens", "valid", "loss_mask", "episode_return", "success")


def _check_pos_int(name: str, value: Any) -> int:
    """``value`` as an int ≥ 1, else a ValueError naming ``name`` and the value."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, (bool, str, bytes)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None


def _check_epsilon(name: str, value: Any) -> float:
    v = _as_float(name, value)
    if not 0.0 <= v <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return v


def _check_lr(name: str, value: Any):
    """A learning rate: a finite number > 0 (or an optax schedule, passed through)."""
    if callable(value):
        return value
    v = _as_float(name, value)
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return v


def collect_demos(env: Env, key: jax.Array, num_episodes: int, epsilon: float = 0.0) -> Trajectory:
    """Oracle episodes; with probability ``epsilon`` per turn a random action instead."""
    num_episodes = _check_pos_int("num_episodes", num_episodes)
    epsilon = _check_epsilon("epsilon", epsilon)
    run = jax.jit(lambda k: run_episodes(env, oracle_policy(env, epsilon), k, num_episodes))
    return run(key)


def to_dataset(traj: Trajectory) -> datasets.Dataset:
    """A ``datasets.Dataset`` with one row per episode (columns ``DATASET_COLUMNS``): ``tokens``
    int64 [T], ``valid`` / ``loss_mask`` bool [T], ``episode_return`` float64 (the float32 value,
    exactly), ``success`` bool. ``dataset_arrays`` reads it back as ``[N, ...]`` NumPy arrays."""
    cols = {c: np.asarray(getattr(traj, c)) for c in DATASET_COLUMNS}
    return datasets.Dataset.from_dict({k: v.tolist() for k, v in cols.items()})


def dataset_arrays(ds: datasets.Dataset) -> dict[str, np.ndarray]:
    missing = [c for c in DATASET_COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(f"dataset lacks columns {missing}; expected {list(DATASET_COLUMNS)}")
    ds = ds.with_format("numpy")
    return {c: np.asarray(ds[c]) for c in DATASET_COLUMNS}


def filter_dataset(ds: datasets.Dataset, *, success_only: bool = False,
                   min_return: float | None = None) -> datasets.Dataset:
    """Filtered BC: keep successful episodes and / or those with return ≥ ``min_return``."""
    def keep(row):
        ok = bool(row["success"]) if success_only else True
        if min_return is not None:
            ok = ok and row["episode_return"] >= min_return
        return ok
    out = ds.filter(keep)
    if len(out) == 0:
        raise ValueError(f"filtering left no episodes (success_only={success_only}, "
                         f"min_return={min_return}) out of {len(ds)}")
    return out


def sft_loss(model, params, tokens, valid, loss_mask, logprob_chunk: int = 0):
    """Mean −log π(token) over the ``loss_mask`` tokens (teacher forcing). ``logprob_chunk``
    c > 0: T-chunked log-probs as in the RL loss (``losses.chunked_sequence_logprobs``: no
    [B,T,V] logits, for real vocabularies); 0: the full logits."""
    seg = valid.astype(jnp.int32)
    if logprob_chunk:
        hidden, unembed = models.policy_hidden(model, params, tokens, segment_ids=seg)
        logp = losses.chunked_sequence_logprobs(hidden, unembed, tokens, logprob_chunk)
    else:
        logp = losses.sequence_logprobs(model.apply({"params": params}, tokens, segment_ids=seg),
                                        tokens)
    m = loss_mask.astype(jnp.float32)
    return -(logp * m).sum() / jnp.maximum(m.sum(), 1.0)


BC_DECAYS = ("constant", "cosine")


def sft_train(model, params, arrays: dict, key: jax.Array, *, epochs: int, batch_size: int,
              lr: float, decay: str = "constant", verbose: bool = False,
              adapters_only: bool = False, logprob_chunk: int = 0) -> tuple[Any, dict]:
    """Minibatch SFT: ``epochs`` passes, each one jitted ``lax.scan`` over shuffled batches
    (``len // batch_size`` Adam steps on ``sft_loss``, global-norm clip 1; the remainder of each
    epoch's permutation is dropped). ``decay``: "constant" keeps ``lr``; "cosine" anneals it as
    ``lr_k = lr · ½(1 + cos(π k / K))`` over all K = epochs · steps Adam steps (to 0 at the end;
    ``lr`` must then be a number, not a schedule). Returns
    ``(params, {"bc/sft_loss": per-epoch mean loss})``. ``adapters_only``: train the LoRA
    adapters of ``params`` only (``models.lora``), the base weights frozen; ``logprob_chunk``:
    see ``sft_loss``."""
    epochs = _check_pos_int("epochs", epochs)
    batch_size = _check_pos_int("batch_size", batch_size)
    lr = _check_lr("lr", lr)
    if decay not in BC_DECAYS:
        raise ValueError(f"bc decay must be one of {list(BC_DECAYS)}, got {decay!r}")
    missing = [c for c in ("tokens", "valid", "loss_mask") if c not in arrays]
    if missing:
        raise ValueError(f"sft arrays lack {missing}; expected tokens, valid, loss_mask")
    n = len(arrays["tokens"])
    shapes = {c: np.shape(arrays[c]) for c in ("tokens", "valid", "loss_mask")}
    if len(set(shapes.values())) != 1 or len(shapes["tokens"]) != 2:
        raise ValueError(f"sft arrays must share one [N, T] shape, got {shapes}")
    if n < batch_size:
        raise ValueError(f"bc batch_size={batch_size} exceeds the {n} demonstration episodes")
    steps = n // batch_size
    if decay == "cosine":
        if callable(lr):
            raise ValueError("bc decay='cosine' needs a number lr, got a schedule")
        lr = optax.cosine_decay_schedule(lr, epochs * steps)
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(lr))
    freeze = lambda p: p                                           # noqa: E731
    if adapters_only:
        from models import lora
        opt = optax.multi_transform(
            {"train": opt, "frozen": optax.set_to_zero()},
            lambda p: jax.tree.map(lambda a: "train" if a else "frozen", lora.adapter_mask(p)))
        freeze = lora.freeze_base
    data = {k: jnp.asarray(arrays[k]) for k in ("tokens", "valid", "loss_mask")}

    @jax.jit
    def run_epoch(params, opt_state, ekey):
        perm = jax.random.permutation(ekey, n)[: steps * batch_size].reshape(steps, batch_size)

        def step(carry, idx):
            params, opt_state = carry
            mb = jax.tree.map(lambda x: x[idx], data)
            loss, grads = jax.value_and_grad(lambda p: sft_loss(
                model, freeze(p), mb["tokens"], mb["valid"], mb["loss_mask"],
                logprob_chunk))(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses_ = jax.lax.scan(step, (params, opt_state), perm)
        return params, opt_state, losses_.mean()

    opt_state = opt.init(params)
    history = []
    for e, ekey in enumerate(jax.random.split(key, epochs)):
        params, opt_state, loss = run_epoch(params, opt_state, ekey)
        history.append(float(loss))
        if verbose:
            print(f"[bc] epoch {e + 1}/{epochs} sft loss {history[-1]:.4f}", file=sys.stderr, flush=True)
    return params, {"bc/sft_loss": history}


def warm_start(env: Env, model, params, key: jax.Array, bc_cfg, verbose: bool = False,
               adapters_only: bool = False, logprob_chunk: int = 0):
    """Collect ε-noisy oracle demos (``bc_cfg.episodes``, ``bc_cfg.epsilon``), optionally keep only
    successful ones (``bc_cfg.success_only``), and run SFT on them. Bad ``bc_cfg`` values raise
    a ValueError naming the field before any demo is collected."""
    episodes = _check_pos_int("bc.episodes", bc_cfg.episodes)
    _check_epsilon("bc.epsilon", bc_cfg.epsilon)
    _check_pos_int("bc.epochs", bc_cfg.epochs)
    batch_size = _check_pos_int("bc.batch_size", bc_cfg.batch_size)
    _check_lr("bc.lr", bc_cfg.lr)
    decay = getattr(bc_cfg, "decay", "constant")
    if decay not in BC_DECAYS:
        raise ValueError(f"bc.decay must be one of {list(BC_DECAYS)}, got {decay!r}")
    if batch_size > episodes:
        raise ValueError(f"bc.batch_size={batch_size} exceeds bc.episodes={episodes} (no full SFT batch)")
    k_demo, k_sft = jax.random.split(key)
    demos = collect_demos(env, k_demo, bc_cfg.episodes, bc_cfg.epsilon)
    ds = to_dataset(demos)
    if bc_cfg.success_only:
        ds = filter_dataset(ds, success_only=True)
    if verbose:
        print(f"[bc] {len(ds)} demonstration episodes (ε={bc_cfg.epsilon}, demo success "
              f"{float(demos.success.mean()):.3f})", file=sys.stderr, flush=True)
    return sft_train(model, params, dataset_arrays(ds), k_sft, epochs=bc_cfg.epochs,
                     batch_size=bc_cfg.batch_size, lr=bc_cfg.lr, decay=decay, verbose=verbose,
                     adapters_only=adapters_only, logprob_chunk=logprob_chunk)


def raft_select(traj: Trajectory, group_size: int) -> jax.Array:
    """Row indices of the best-return episode of each group (ties: the first)."""
    group_size = _check_pos_int("group_size", group_size)
    if traj.episode_return.shape[0] % group_size:
        raise ValueError(f"group_size={group_size} does not divide the "
                         f"{traj.episode_return.shape[0]} episodes")
    r = traj.episode_return.reshape(-1, group_size)
    return jnp.arange(r.shape[0]) * group_size + jnp.argmax(r, axis=1)


def raft_round(env: Env, model, params, key: jax.Array, *, num_groups: int, group_size: int,
               sampling: SamplingConfig, epochs: int, batch_size: int, lr: float,
               success_only: bool = True):
    """One RAFT round: sample, keep each group's best (and only successes if asked), SFT."""
    num_groups = _check_pos_int("num_groups", num_groups)
    group_size = _check_pos_int("group_size", group_size)
    _check_pos_int("epochs", epochs)
    batch_size = _check_pos_int("batch_size", batch_size)
    _check_lr("lr", lr)
    k_roll, k_sft = jax.random.split(key)
    traj = jax.jit(lambda p, k: rollout(env, model, p, k, num_groups=num_groups,
                                        group_size=group_size, sampling=sampling))(params, k_roll)
    best = raft_select(traj, group_size)
    chosen = jax.tree.map(lambda x: x[best], traj)
    ds = to_dataset(chosen)
    if success_only:
        ds = filter_dataset(ds, success_only=True)
    new_params, metrics = sft_train(model, params, dataset_arrays(ds), k_sft, epochs=epochs,
                                    batch_size=min(batch_size, len(ds)), lr=lr)
    metrics["raft/kept"] = len(ds)
    metrics["raft/sample_success"] = float(traj.success.mean())
    return new_params, metrics
