"""Bradley–Terry reward models learned from preference pairs of env trajectories.

Preference data (``make_preference_pairs``). For each task instance (one env reset key) two
episodes are rolled out with the jitted episode runner:

* chosen   = the env's oracle, ``oracle_policy(env, 0.0)``;
* rejected = a perturbed oracle on the *same* reset key, ``oracle_policy(env, epsilon)``: each
  turn is, with probability ``epsilon`` (≥ 0.5 recommended), a random token string instead of
  the expert's turn (usually a format error, or a wrong move / answer).

Only pairs whose rejected return is strictly below the chosen return (by more than ``margin``)
are kept, so the label "chosen ≻ rejected" is always backed by the env's own reward; instances
where the perturbation happened not to hurt are dropped and more instances are drawn (fresh
keys) until ``n_pairs`` pairs are collected.

Model and loss. ``models.RewardModel`` scores a whole token row, reading its scalar head at the
row's last non-padding token (``segment_ids = valid``). Bradley–Terry:

    P(chosen ≻ rejected) = σ(r(chosen) − r(rejected)),
    L = −mean_pairs log σ(r(chosen) − r(rejected)).

Training (``train_reward_model``): Adam (global-norm clipped), ``epochs`` passes, each one jitted
``lax.scan`` over shuffled minibatches.

Learned reward for RL (``learned_reward_fn`` / ``relabel_with_learned_reward``): the RM scores
each full episode row (prompt, actions, observations — including the final observation) and its
score becomes the episode's only reward, placed on the last agent token of the episode's last
turn (``turn_end`` of turn ``episode_length − 1``), 0 elsewhere; ``turn_rewards`` holds it at
turn ``episode_length − 1`` and ``episode_return`` equals it. Episodes with no turn get 0.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from typing import Any, Callable

import datasets
import jax
import jax.numpy as jnp
import numpy as np
import optax

import models
from envs.base import Env
from rl_agents.rollout import Trajectory, oracle_policy, run_episodes

PAIR_COLUMNS = ("chosen_tokens", "chosen_valid", "rejected_tokens", "rejected_valid",
                "chosen_return", "rejected_return")


# ============================================================================================
# Preference data
# ============================================================================================
def _pair_rollouts(env: Env, key: jax.Array, epsilon: jax.Array, n: int):
    """Oracle and ε-perturbed episodes of the same ``n`` task instances (same reset keys)."""
    k_reset, k_chosen, k_rejected = jax.random.split(key, 3)
    reset_keys = jax.random.split(k_reset, n)
    chosen = run_episodes(env, oracle_policy(env, 0.0), k_chosen, n, reset_keys=reset_keys)
    rejected = run_episodes(env, oracle_policy(env, epsilon), k_rejected, n, reset_keys=reset_keys)
    return chosen, rejected


_pair_rollouts_jit = jax.jit(_pair_rollouts, static_argnames=("env", "n"))


def make_preference_pairs(env: Env, key: jax.Array, n_pairs: int, epsilon: float = 0.7, *,
                          margin: float = 0.0, oversample: float = 1.5, max_rounds: int = 20,
                          as_dataset: bool = False) -> dict[str, np.ndarray] | datasets.Dataset:
    """``n_pairs`` (chosen = oracle, rejected = ε-perturbed oracle) pairs on shared task instances.

    Returns a dict of NumPy arrays (or a ``datasets.Dataset`` with ``as_dataset=True``):
    ``chosen_tokens`` / ``rejected_tokens`` int32 ``[N, T]``, ``chosen_valid`` /
    ``rejected_valid`` bool ``[N, T]`` (T = ``env.max_episode_tokens``), ``chosen_return`` /
    ``rejected_return`` float32 ``[N]``, with ``rejected_return < chosen_return − margin`` for
    every row. Each round rolls out ``ceil(n_pairs · oversample)`` fresh instances (one compiled
    program reused across rounds); raises ValueError if ``max_rounds`` rounds do not yield
    ``n_pairs`` kept pairs (e.g. ``epsilon`` too small to make the perturbation hurt).
    """
    if isinstance(n_pairs, bool) or not isinstance(n_pairs, (int, np.integer)) or n_pairs < 1:
        raise ValueError(f"n_pairs must be a positive int, got {n_pairs!r}")
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0.0 < epsilon <= 1.0:
        raise ValueError(f"epsilon must be a number in (0, 1] (0 would make rejected == chosen), "
                         f"got {epsilon!r}")
    if not oversample >= 1.0:
        raise ValueError(f"oversample must be >= 1, got {oversample!r}")
    if not margin >= 0.0:
        raise ValueError(f"margin must be >= 0, got {margin!r}")
    n_cand = int(math.ceil(n_pairs * oversample))
    kept: dict[str, list[np.ndarray]] = {c: [] for c in PAIR_COLUMNS}
    have, tried = 0, 0
    for rnd in range(max_rounds):
        chosen, rejected = _pair_rollouts_jit(env, jax.random.fold_in(key, rnd),
                                              jnp.float32(epsilon), n_cand)
        c_ret, r_ret = np.asarray(chosen.episode_return), np.asarray(rejected.episode_return)
        keep = r_ret < c_ret - margin
        tried += n_cand
        cols = dict(chosen_tokens=chosen.tokens, chosen_valid=chosen.valid,
                    rejected_tokens=rejected.tokens, rejected_valid=rejected.valid,
                    chosen_return=c_ret, rejected_return=r_ret)
        for c, v in cols.items():
            kept[c].append(np.asarray(v)[keep])
        have += int(keep.sum())
        if have >= n_pairs:
            break
    if have < n_pairs:
        raise ValueError(f"only {have} of {tried} instances gave rejected_return < chosen_return "
                         f"- margin (epsilon={epsilon}, margin={margin}); need n_pairs={n_pairs}: "
                         f"raise epsilon or max_rounds")
    out = {c: np.concatenate(v)[:n_pairs] for c, v in kept.items()}
    out["chosen_tokens"] = out["chosen_tokens"].astype(np.int32)
    out["rejected_tokens"] = out["rejected_tokens"].astype(np.int32)
    out["chosen_return"] = out["chosen_return"].astype(np.float32)
    out["rejected_return"] = out["rejected_return"].astype(np.float32)
    return pairs_to_dataset(out) if as_dataset else out


def pairs_to_dataset(pairs: dict[str, np.ndarray]) -> datasets.Dataset:
    """A ``datasets.Dataset`` with one row per pair (columns ``PAIR_COLUMNS``)."""
    pairs = _check_pairs(pairs)
    return datasets.Dataset.from_dict({c: np.asarray(pairs[c]).tolist() for c in PAIR_COLUMNS})


def pairs_from_dataset(ds: datasets.Dataset) -> dict[str, np.ndarray]:
    missing = [c for c in PAIR_COLUMNS[:4] if c not in ds.column_names]
    if missing:
        raise ValueError(f"dataset lacks columns {missing}; expected {list(PAIR_COLUMNS)}")
    ds = ds.with_format("numpy")
    cols = [c for c in PAIR_COLUMNS if c in ds.column_names]
    return _check_pairs({c: np.asarray(ds[c]) for c in cols})


def _as_pairs(pairs) -> dict[str, np.ndarray]:
    if isinstance(pairs, datasets.Dataset):
        return pairs_from_dataset(pairs)
    return _check_pairs(pairs)


def _check_pairs(pairs: dict) -> dict[str, np.ndarray]:
    missing = [c for c in PAIR_COLUMNS[:4] if c not in pairs]
    if missing:
        raise ValueError(f"preference pairs lack {missing}; expected keys {list(PAIR_COLUMNS[:4])}")
    out = dict(pairs)
    out["chosen_tokens"] = np.asarray(pairs["chosen_tokens"], np.int32)
    out["rejected_tokens"] = np.asarray(pairs["rejected_tokens"], np.int32)
    out["chosen_valid"] = np.asarray(pairs["chosen_valid"], bool)
    out["rejected_valid"] = np.asarray(pairs["rejected_valid"], bool)
    shapes = {c: out[c].shape for c in PAIR_COLUMNS[:4]}
    if len(set(shapes.values())) != 1 or len(out["chosen_tokens"].shape) != 2:
        raise ValueError(f"chosen/rejected tokens and valid must share one [N, T] shape, got {shapes}")
    for side in ("chosen", "rejected"):
        if not out[f"{side}_valid"].any(-1).all():
            bad = int(np.argmin(out[f"{side}_valid"].any(-1)))
            raise ValueError(f"{side}_valid row {bad} has no valid token")
    return out


def _trim(pairs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Drop the all-padding tail columns (the RM reads the last valid token; RoPE positions are
    arange(T), so trimming trailing pads changes no score)."""
    t = int(max(pairs["chosen_valid"].sum(-1).max(), pairs["rejected_valid"].sum(-1).max()))
    return {c: pairs[c][:, :t] for c in PAIR_COLUMNS[:4]}


# ============================================================================================
# Scores and the Bradley–Terry loss
# ============================================================================================
def sequence_scores(rm: models.RewardModel, params: Any, tokens: jax.Array,
                    valid: jax.Array) -> jax.Array:
    """RM score of each row ``[B]``, read at its last valid token (``segment_ids = valid``)."""
    return rm.apply({"params": params}, tokens, segment_ids=valid.astype(jnp.int32))


def bt_loss_from_scores(chosen_scores: jax.Array, rejected_scores: jax.Array) -> jax.Array:
    """−mean log σ(r_c − r_r), computed as mean softplus(r_r − r_c) (stable for large gaps)."""
    return jnp.mean(jax.nn.softplus(rejected_scores - chosen_scores))


def _pair_scores(rm, params, batch) -> tuple[jax.Array, jax.Array]:
    n = batch["chosen_tokens"].shape[0]
    tokens = jnp.concatenate([batch["chosen_tokens"], batch["rejected_tokens"]], axis=0)
    valid = jnp.concatenate([batch["chosen_valid"], batch["rejected_valid"]], axis=0)
    s = sequence_scores(rm, params, tokens, valid)
    return s[:n], s[n:]


def bt_loss(rm: models.RewardModel, params: Any, batch: dict) -> jax.Array:
    """Bradley–Terry loss −mean log σ(r(chosen) − r(rejected)) of a batch of pairs (dict with
    ``chosen_tokens``, ``chosen_valid``, ``rejected_tokens``, ``rejected_valid``); one forward
    pass over the concatenated rows."""
    rc, rr = _pair_scores(rm, params, batch)
    return bt_loss_from_scores(rc, rr)


def _bt_loss_metrics(rm, params, batch):
    rc, rr = _pair_scores(rm, params, batch)
    loss = bt_loss_from_scores(rc, rr)
    return loss, {"loss": loss, "accuracy": jnp.mean((rc > rr).astype(jnp.float32)),
                  "margin": jnp.mean(rc - rr)}


def _as_model(model_or_cfg) -> models.RewardModel:
    if isinstance(model_or_cfg, models.ModelConfig):
        return models.RewardModel(model_or_cfg)
    if isinstance(model_or_cfg, models.RewardModel):
        return model_or_cfg
    raise ValueError(f"expected a models.RewardModel or models.ModelConfig, got {type(model_or_cfg).__name__}")


def train_reward_model(model_or_cfg, params: Any, pairs, key: jax.Array, epochs: int = 4,
                       batch_size: int = 32, lr: float = 1e-3, grad_clip: float = 1.0,
                       weight_decay: float = 0.0, verbose: bool = False) -> tuple[Any, dict]:
    """Minibatch Bradley–Terry training; returns ``(params, metrics)``.

    ``params=None`` initialises the RM from ``key``. Each epoch is one jitted ``lax.scan`` over
    ``N // batch_size`` shuffled minibatches (the remainder of a permutation is dropped, a
    different one each epoch). ``metrics``: per-epoch lists ``rm/loss``, ``rm/train_accuracy``
    (fraction of pairs with r_c > r_r, measured on each minibatch before its step),
    ``rm/margin``.
    """
    rm = _as_model(model_or_cfg)
    for name, v in (("epochs", epochs), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr!r}")
    pairs = _trim(_as_pairs(pairs))
    n = pairs["chosen_tokens"].shape[0]
    if n < batch_size:
        raise ValueError(f"batch_size={batch_size} exceeds the {n} preference pairs")
    k_init, k_epochs = jax.random.split(key)
    if params is None:
        params = init_reward_params(rm, k_init)
    steps = n // batch_size
    opt = optax.chain(optax.clip_by_global_norm(grad_clip), optax.adamw(lr, weight_decay=weight_decay))
    data = {c: jnp.asarray(v) for c, v in pairs.items()}

    @jax.jit
    def run_epoch(params, opt_state, ekey):
        perm = jax.random.permutation(ekey, n)[: steps * batch_size].reshape(steps, batch_size)

        def step(carry, idx):
            params, opt_state = carry
            mb = jax.tree.map(lambda x: x[idx], data)
            grads, m = jax.grad(lambda p: _bt_loss_metrics(rm, p, mb), has_aux=True)(params)
            updates, opt_state = opt.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), m

        (params, opt_state), m = jax.lax.scan(step, (params, opt_state), perm)
        return params, opt_state, jax.tree.map(jnp.mean, m)

    opt_state = opt.init(params)
    history: dict[str, list[float]] = {"rm/loss": [], "rm/train_accuracy": [], "rm/margin": []}
    for e, ekey in enumerate(jax.random.split(k_epochs, epochs)):
        params, opt_state, m = run_epoch(params, opt_state, ekey)
        history["rm/loss"].append(float(m["loss"]))
        history["rm/train_accuracy"].append(float(m["accuracy"]))
        history["rm/margin"].append(float(m["margin"]))
        if verbose:
            print(f"[rm] epoch {e + 1}/{epochs} bt loss {history['rm/loss'][-1]:.4f} "
                  f"acc {history['rm/train_accuracy'][-1]:.3f}", file=sys.stderr, flush=True)
    return params, history


_scores_jit = jax.jit(sequence_scores, static_argnums=0)
_init_params_jit = jax.jit(models.init_params, static_argnums=0)   # one compile, not op-by-op


def init_reward_params(rm: models.RewardModel, key: jax.Array) -> Any:
    """Fresh RM params (jitted ``models.init_params``)."""
    return _init_params_jit(rm, key)


def preference_accuracy(rm: models.RewardModel, params: Any, pairs, batch_size: int = 256) -> float:
    """Fraction of pairs with r(chosen) > r(rejected) (ties count as errors), scored in chunks."""
    pairs = _trim(_as_pairs(pairs))
    n = pairs["chosen_tokens"].shape[0]
    correct = 0
    for i in range(0, n, batch_size):
        rc = _scores_jit(rm, params, pairs["chosen_tokens"][i:i + batch_size],
                         pairs["chosen_valid"][i:i + batch_size])
        rr = _scores_jit(rm, params, pairs["rejected_tokens"][i:i + batch_size],
                         pairs["rejected_valid"][i:i + batch_size])
        correct += int(np.sum(np.asarray(rc) > np.asarray(rr)))
    return correct / n


# ============================================================================================
# The learned reward as the RL reward
# ============================================================================================
def place_episode_scores(scores: jax.Array, traj: Trajectory
                         ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Episode scores ``[B]`` → ``(rewards [B,T], turn_rewards [B,K], episode_return [B])``.

    The score sits on the last agent token of turn ``episode_length − 1`` (0 elsewhere), at
    turn ``episode_length − 1`` of ``turn_rewards``, and is the episode return; rows with
    ``episode_length == 0`` get zeros everywhere.
    """
    scores = jnp.asarray(scores, jnp.float32)
    last_turn = traj.episode_length.astype(jnp.int32) - 1                         # [B]
    has_turn = traj.episode_length > 0
    at_token = traj.turn_end & (traj.turn_ids == last_turn[:, None]) & has_turn[:, None]
    rewards = jnp.where(at_token, scores[:, None], 0.0)
    k = traj.turn_rewards.shape[1]
    at_turn = (jnp.arange(k)[None] == last_turn[:, None]) & has_turn[:, None]
    turn_rewards = jnp.where(at_turn, scores[:, None], 0.0)
    episode_return = jnp.where(has_turn, scores, 0.0)
    return rewards, turn_rewards, episode_return


def learned_reward_fn(rm_model: models.RewardModel, rm_params: Any
                      ) -> Callable[[Trajectory], jax.Array]:
    """``traj -> rewards [B,T]``: the RM's score of each episode row on its last agent token
    (``place_episode_scores``), zeros elsewhere. Pure and jittable."""
    def fn(traj: Trajectory) -> jax.Array:
        scores = sequence_scores(rm_model, rm_params, traj.tokens, traj.valid)
        return place_episode_scores(scores, traj)[0]
    return fn


def relabel_with_learned_reward(rm_model: models.RewardModel, rm_params: Any, traj: Trajectory
                                ) -> Trajectory:
    """``traj`` with ``rewards``, ``turn_rewards`` and ``episode_return`` replaced by the RM's
    episode score (see ``place_episode_scores``); ``success`` etc. stay the env's."""
    scores = sequence_scores(rm_model, rm_params, traj.tokens, traj.valid)
    rewards, turn_rewards, episode_return = place_episode_scores(scores, traj)
    return traj.replace(rewards=rewards, turn_rewards=turn_rewards, episode_return=episode_return)


# ============================================================================================
# Checkpoints and the config-driven flow
# ============================================================================================
def save_reward_model(path: str, cfg: models.ModelConfig, params: Any) -> None:
    """Write ``path/config.json`` (the ModelConfig) and ``path/params`` (orbax)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    if hasattr(cfg, "to_dict"):
        d = cfg.to_dict()
    else:
        d = dataclasses.asdict(cfg)
        d["rope_scaling"] = cfg.rope_scaling_dict
    for f in ("dtype", "param_dtype"):
        d[f] = d[f] if isinstance(d[f], str) else jnp.dtype(d[f]).name
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(d, f, indent=1, sort_keys=True)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(os.path.join(path, "params"), params, force=True)
    ckpt.wait_until_finished()


def load_reward_model_config(path: str) -> models.ModelConfig:
    """The ModelConfig stored by ``save_reward_model`` (cheap: no params read)."""
    cfg_file = os.path.join(os.path.abspath(path), "config.json")
    if not os.path.isfile(cfg_file):
        raise ValueError(f"rm_checkpoint={path!r} has no config.json (not written by save_reward_model)")
    with open(cfg_file) as f:
        return models.ModelConfig(**json.load(f))


def load_reward_model(path: str) -> tuple[models.ModelConfig, Any]:
    """Inverse of ``save_reward_model``: ``(ModelConfig, params)``."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    cfg = load_reward_model_config(path)
    abstract = jax.eval_shape(lambda k: models.init_params(models.RewardModel(cfg), k),
                              jax.random.PRNGKey(0))
    params = ocp.StandardCheckpointer().restore(os.path.join(path, "params"), abstract)
    return cfg, params


def reward_model_from_config(reward_cfg, env: Env, rm_cfg: models.ModelConfig, key: jax.Array, *,
                             init_trunk: Any = None, verbose: bool = False
                             ) -> tuple[models.RewardModel, Any, dict]:
    """The learned-reward RM of a run: ``(rm_model, rm_params, metrics)``.

    ``reward_cfg.rm_checkpoint`` non-empty → load it (``load_reward_model``; its own config).
    Otherwise train one first: ``reward_cfg.rm_pairs`` preference pairs with
    ``reward_cfg.rm_epsilon``, ``rm_epochs`` / ``rm_batch_size`` / ``rm_lr``, from a fresh RM of
    ``rm_cfg`` whose trunk is copied from ``init_trunk`` (policy params) when given; metrics
    include the held-out preference accuracy on ``rm_eval_pairs`` fresh pairs (0 → skipped).
    """
    path = str(getattr(reward_cfg, "rm_checkpoint", "") or "")
    if path:
        cfg, params = load_reward_model(path)
        return models.RewardModel(cfg), params, {}
    k_pairs, k_eval, k_init, k_train = jax.random.split(key, 4)
    rm = models.RewardModel(rm_cfg)
    params = init_reward_params(rm, k_init)
    if init_trunk is not None:
        params = models.init_reward_from_policy(init_trunk, params)
    eps = float(reward_cfg.rm_epsilon)
    pairs = make_preference_pairs(env, k_pairs, int(reward_cfg.rm_pairs), eps)
    params, metrics = train_reward_model(rm, params, pairs, k_train, epochs=int(reward_cfg.rm_epochs),
                                         batch_size=int(reward_cfg.rm_batch_size),
                                         lr=float(reward_cfg.rm_lr), verbose=verbose)
    n_eval = int(getattr(reward_cfg, "rm_eval_pairs", 0) or 0)
    if n_eval > 0:
        held_out = make_preference_pairs(env, k_eval, n_eval, eps)
        metrics["rm/heldout_accuracy"] = preference_accuracy(rm, params, held_out)
    return rm, params, metrics
