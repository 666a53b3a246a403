"""Process rewards: PRIME's implicit PRM, its online update, and the Clip / Delta transforms.

PRIME implicit process reward model. The PRM π_φ is a language model (``models.PolicyModel``
params) initialised from the reference policy π_ref. Its per-token process reward on agent
tokens (``loss_mask``) is

    r_t = β · (log π_φ(y_t | y_<t) − log π_ref(y_t | y_<t)),      0 on other tokens,

so at initialisation every r_t is exactly 0. It is trained online on the policy's own rollouts
from outcome labels y ∈ {0, 1} (episode success) with the cross-entropy on the summed implicit
reward (PRIME eq. 4):

    L(φ) = −mean_episodes [ y · log σ(Σ_t r_t) + (1 − y) · log σ(−Σ_t r_t) ].

Log-probs follow ``losses.sequence_logprobs`` (entry t = log p(tokens[t] | <t)); ``temperature``
divides the PRM's logits and must match the temperature of ``ref_logp`` (the trainer computes
its reference log-probs at the sampling temperature).

Using process rewards with any advantage estimator: ``combine_rewards`` adds them (× coef) to
token-level outcome rewards (for "gae" / "reinforce_pp", which read every agent token);
``process_rewards_to_turns`` sums them per turn (``advantages.per_turn_sum``) for the turn-level
and group estimators, and ``add_process_rewards`` updates ``rewards``, ``turn_rewards`` and
``episode_return`` together.

Clip and Delta ("On Designing Effective RL Reward at Training Time for LLM Reasoning", Gao et
al. 2024) keep a trajectory's accumulated process reward bounded, so that adding correct-looking
but useless steps cannot earn reward:

    Clip:   r_t ← min(r_t − η, 0)                 (no step adds positive reward)
    Delta:  r_t ← r_t − r_{t'} (t' the next valid step), the last valid step unchanged,
            so Σ_{s ≥ t} r_s telescopes to r_t and the total to the first step's reward.

Both act on any ``[B, N]`` array with a validity mask: per turn (``turn_rewards`` with
``turn_valid``) or per token (``[B, T]`` with ``loss_mask`` — the "steps" are then the agent
tokens, skipping observation / padding positions).
"""
from __future__ import annotations

import functools
import numbers

import jax
import jax.numpy as jnp

from rl_agents import losses
from rl_agents.advantages import per_turn_sum
from rl_agents.nonfinite import PRM_NONFINITE_STEP, guarded_step

TRANSFORMS = ("none", "clip", "delta")


def _check_pos(name: str, v) -> None:
    if isinstance(v, numbers.Real) and not isinstance(v, bool) and not v > 0:
        raise ValueError(f"{name} must be > 0, got {v!r}")


def _check_same_shape(**arrays) -> None:
    shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"shapes must match: {shapes}")
    (s,) = set(shapes.values())
    if len(s) != 2:
        raise ValueError(f"expected [B, N] arrays, got shapes {shapes}")


# ============================================================================================
# PRIME implicit PRM
# ============================================================================================
def prm_logprobs(prm_model, prm_params, tokens, valid, temperature: float = 1.0) -> jax.Array:
    """log π_φ(tokens[t] | <t) ``[B,T]`` (entry 0 = 0), padding isolated by ``segment_ids``."""
    logits = prm_model.apply({"params": prm_params}, tokens, segment_ids=valid.astype(jnp.int32))
    return losses.sequence_logprobs(logits / temperature, tokens)


def implicit_process_rewards(prm_model, prm_params, ref_logp, tokens, valid, loss_mask, beta,
                             temperature: float = 1.0) -> jax.Array:
    """r_t = β · (log π_φ(y_t) − log π_ref(y_t)) on ``loss_mask`` tokens, 0 elsewhere: ``[B,T]``."""
    _check_pos("beta", beta)
    _check_pos("temperature", temperature)
    _check_same_shape(ref_logp=ref_logp, tokens=tokens, valid=valid, loss_mask=loss_mask)
    logp = prm_logprobs(prm_model, prm_params, tokens, valid, temperature)
    return jnp.where(loss_mask, beta * (logp - ref_logp), 0.0).astype(jnp.float32)


def prm_loss_from_rewards(process_rewards, mask, labels, row_weight=None
                          ) -> tuple[jax.Array, dict]:
    """PRIME's CE on s = Σ_t r_t: −wmean[y log σ(s) + (1 − y) log σ(−s)], with σ via
    softplus (log σ(x) = −softplus(−x)); rows weighted by ``row_weight`` (default 1)."""
    s = jnp.where(mask, process_rewards, 0.0).sum(-1)
    y = jnp.asarray(labels, jnp.float32)
    w = jnp.ones_like(s) if row_weight is None else jnp.asarray(row_weight, jnp.float32)
    per_row = y * jax.nn.softplus(-s) + (1.0 - y) * jax.nn.softplus(s)
    denom = jnp.maximum(w.sum(), 1e-8)
    loss = (w * per_row).sum() / denom
    acc = (w * ((s > 0) == (y > 0.5)).astype(jnp.float32)).sum() / denom
    return loss, {"prm/loss": loss, "prm/accuracy": acc, "prm/summed_reward": (w * s).sum() / denom}


def prm_loss(prm_model, prm_params, batch: dict, *, beta, temperature: float = 1.0
             ) -> tuple[jax.Array, dict]:
    """PRIME's outcome cross-entropy on the summed implicit reward of each episode.

    ``batch``: ``tokens``, ``valid``, ``loss_mask`` ``[B,T]``, ``ref_logp`` ``[B,T]``,
    ``labels`` ``[B]`` (success as 0/1), optional ``row_weight`` ``[B]``. Returns
    ``(loss, metrics)``.
    """
    for k in ("tokens", "valid", "loss_mask", "ref_logp", "labels"):
        if k not in batch:
            raise ValueError(f"prm batch lacks {k!r}; has {sorted(batch)}")
    r = implicit_process_rewards(prm_model, prm_params, batch["ref_logp"], batch["tokens"],
                                 batch["valid"], batch["loss_mask"], beta, temperature)
    return prm_loss_from_rewards(r, batch["loss_mask"], batch["labels"], batch.get("row_weight"))


@functools.partial(jax.jit, static_argnames=("prm_model", "optimizer", "temperature"))
def prm_update(prm_params, opt_state, batch: dict, *, prm_model, optimizer, beta,
               temperature: float = 1.0):
    """One optax step on ``prm_loss``: ``(prm_params, opt_state, metrics)`` (jitted; also
    traceable inside a larger jit). ``optimizer`` is an ``optax.GradientTransformation``. A
    non-finite loss or gradient skips the step (``nonfinite.guarded_step``: params and state
    unchanged, ``prm/nonfinite_step`` = 1), and so does a batch with no row to learn from (no
    loss token, or ``row_weight`` 0: an update that completed no continuous group)."""
    (loss, metrics), grads = jax.value_and_grad(
        lambda p: prm_loss(prm_model, p, batch, beta=beta, temperature=temperature),
        has_aux=True)(prm_params)
    rows = batch["loss_mask"].any(-1)
    if batch.get("row_weight") is not None:
        rows = rows & (jnp.asarray(batch["row_weight"]) > 0)
    prm_params, opt_state, grad_norm, bad = guarded_step(optimizer, prm_params, opt_state, loss,
                                                         grads, empty=~rows.any())
    metrics = dict(metrics, **{"prm/grad_norm": grad_norm,
                               PRM_NONFINITE_STEP: bad.astype(jnp.float32)})
    return prm_params, opt_state, metrics


def prime_process_rewards(prm_model, prm_params, opt_state, batch: dict, *, optimizer, beta,
                          temperature: float = 1.0, update: str = "before"):
    """One PRIME iteration on a rollout batch: ``(process_rewards [B,T], prm_params, opt_state,
    metrics)``.

    ``update="before"`` (verl's default, a double forward): take one PRM step on the batch's
    outcome labels, then compute the rewards with the updated PRM. ``"after"``: rewards from the
    current PRM, then the step. ``"none"``: rewards only (frozen PRM).
    """
    if update not in ("before", "after", "none"):
        raise ValueError(f"update={update!r} is not one of ['before', 'after', 'none']")

    def rewards(p):
        return implicit_process_rewards(prm_model, p, batch["ref_logp"], batch["tokens"],
                                        batch["valid"], batch["loss_mask"], beta, temperature)

    metrics = {}
    if update == "before":
        prm_params, opt_state, metrics = prm_update(prm_params, opt_state, batch, prm_model=prm_model,
                                                    optimizer=optimizer, beta=beta,
                                                    temperature=temperature)
    r = rewards(prm_params)
    if update == "after":
        prm_params, opt_state, metrics = prm_update(prm_params, opt_state, batch, prm_model=prm_model,
                                                    optimizer=optimizer, beta=beta,
                                                    temperature=temperature)
    return r, prm_params, opt_state, metrics


PROCESS_KEYS = ("beta", "coef", "transform", "clip_eta", "granularity", "update")


def process_kwargs(process_cfg) -> dict:
    """The ``apply_process_rewards`` keywords from a config block (``reward.process``) holding
    ``beta, coef, transform, clip_eta, granularity, update`` (extra keys are ignored)."""
    missing = [k for k in PROCESS_KEYS if k not in process_cfg]
    if missing:
        raise ValueError(f"config.reward.process lacks {missing}; needs {list(PROCESS_KEYS)}")
    return {k: process_cfg[k] for k in PROCESS_KEYS}


def apply_process_rewards(traj, prm_model, prm_state: dict, ref_logp, row_weight=None, *,
                          optimizer, beta, coef=1.0, transform: str = "none", clip_eta=0.0,
                          granularity: str = "token", update: str = "before",
                          temperature: float = 1.0):
    """PRIME on a rollout batch, folded into its rewards: ``(traj, prm_state, metrics)``.

    ``traj``: a ``Trajectory`` (tokens, valid, loss_mask, turn_ids, turn_end, turn_valid,
    rewards, turn_rewards, episode_return, success). ``prm_state``: ``{"params", "opt_state"}``.
    The PRM takes its online step on the labels ``success`` (rows weighted by ``row_weight``),
    the implicit process rewards are shaped (``shape_process_rewards``: Clip / Delta per token
    or per turn) and added × ``coef`` to ``rewards``, ``turn_rewards`` and ``episode_return``
    (``add_process_rewards``), so every advantage estimator sees them.
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"reward.process.transform={transform!r} is not one of {list(TRANSFORMS)}")
    batch = dict(tokens=traj.tokens, valid=traj.valid, loss_mask=traj.loss_mask, ref_logp=ref_logp,
                 labels=traj.success.astype(jnp.float32))
    if row_weight is not None:
        batch["row_weight"] = row_weight
    proc, params, opt_state, metrics = prime_process_rewards(
        prm_model, prm_state["params"], prm_state["opt_state"], batch, optimizer=optimizer,
        beta=beta, temperature=temperature, update=update)
    shaped = shape_process_rewards(proc, traj.loss_mask, traj.turn_ids, traj.turn_end,
                                   traj.turn_valid, kind=transform, eta=clip_eta,
                                   granularity=granularity)
    mask = traj.loss_mask
    rewards, turn_rewards, episode_return = add_process_rewards(
        traj.rewards, traj.turn_rewards, traj.episode_return, shaped, mask, traj.turn_ids, coef)
    metrics = dict(metrics)
    metrics["rollout/process_return"] = (coef * shaped.sum(-1)).mean()
    metrics["rollout/raw_process_return"] = proc.sum(-1).mean()
    traj = traj.replace(rewards=rewards, turn_rewards=turn_rewards, episode_return=episode_return)
    return traj, {"params": params, "opt_state": opt_state}, metrics


# ============================================================================================
# Combining with outcome rewards
# ============================================================================================
def combine_rewards(outcome_rewards, process_rewards, mask, coef=1.0) -> jax.Array:
    """Token-level rewards: outcome + coef · process on ``mask`` (outcome kept elsewhere)."""
    _check_same_shape(outcome_rewards=outcome_rewards, process_rewards=process_rewards, mask=mask)
    return (jnp.asarray(outcome_rewards, jnp.float32)
            + coef * jnp.where(mask, jnp.asarray(process_rewards, jnp.float32), 0.0))


def process_rewards_to_turns(process_rewards, mask, turn_ids, num_turns: int) -> jax.Array:
    """``[B,T]`` → ``[B,K]``: Σ of the process rewards of each turn's ``mask`` tokens."""
    _check_same_shape(process_rewards=process_rewards, mask=mask, turn_ids=turn_ids)
    if isinstance(num_turns, bool) or not isinstance(num_turns, int) or num_turns < 1:
        raise ValueError(f"num_turns must be a positive int, got {num_turns!r}")
    return per_turn_sum(jnp.asarray(process_rewards, jnp.float32), jnp.asarray(mask, bool),
                        turn_ids, num_turns)


def add_process_rewards(rewards, turn_rewards, episode_return, process_rewards, mask, turn_ids,
                        coef=1.0):
    """``(rewards, turn_rewards, episode_return)`` each + coef × the process rewards at its
    granularity (token, Σ per turn, Σ per episode), consistent with one another."""
    k = turn_rewards.shape[1]
    p = jnp.where(mask, jnp.asarray(process_rewards, jnp.float32), 0.0)
    return (combine_rewards(rewards, p, mask, coef),
            turn_rewards + coef * process_rewards_to_turns(p, mask, turn_ids, k),
            episode_return + coef * p.sum(-1))


# ============================================================================================
# Clip and Delta
# ============================================================================================
def mean_step_reward(r, mask) -> jax.Array:
    """Mean of ``r`` over the ``mask`` entries of the whole batch (0 if none): a default η."""
    m = jnp.asarray(mask, bool)
    return jnp.where(m, r, 0.0).sum() / jnp.maximum(m.sum(), 1).astype(jnp.float32)


def clip_process_rewards(r, mask, eta=0.0) -> jax.Array:
    """Clip: r_t ← min(r_t − η, 0) on ``mask``, 0 elsewhere. ``eta``: a number, an array
    broadcastable to ``r`` (e.g. ``[B,1]``), or ``"mean"`` (``mean_step_reward``)."""
    _check_same_shape(r=r, mask=mask)
    r = jnp.asarray(r, jnp.float32)
    m = jnp.asarray(mask, bool)
    if isinstance(eta, str):
        if eta != "mean":
            raise ValueError(f"eta={eta!r}: use a number, an array or 'mean'")
        eta = mean_step_reward(r, m)
    return jnp.where(m, jnp.minimum(r - eta, 0.0), 0.0)


def delta_process_rewards(r, mask) -> jax.Array:
    """Delta: r_t ← r_t − r_{t'} with t' the next ``mask`` position of the row; the row's last
    valid step keeps r_t; 0 off ``mask``. A reverse ``lax.scan`` over the step axis carries the
    next valid reward, so masked-out positions neither contribute nor break the chain."""
    _check_same_shape(r=r, mask=mask)
    r = jnp.asarray(r, jnp.float32)
    m = jnp.asarray(mask, bool)

    def step(carry, x):
        nxt, has_nxt = carry
        rt, mt = x
        out = jnp.where(mt, rt - jnp.where(has_nxt, nxt, 0.0), 0.0)
        return (jnp.where(mt, rt, nxt), has_nxt | mt), out

    b = r.shape[0]
    init = (jnp.zeros((b,), jnp.float32), jnp.zeros((b,), bool))
    _, out = jax.lax.scan(step, init, (r.T, m.T), reverse=True)
    return out.T


def turn_values_at_turn_ends(turn_values, turn_end, turn_ids) -> jax.Array:
    """``[B,K]`` → ``[B,T]``: turn k's value on its ``turn_end`` token, 0 elsewhere."""
    k = turn_values.shape[1]
    ok = turn_end & (turn_ids >= 0) & (turn_ids < k)
    picked = jnp.take_along_axis(jnp.asarray(turn_values, jnp.float32),
                                 jnp.clip(turn_ids, 0, k - 1), axis=1)
    return jnp.where(ok, picked, 0.0)


def shape_process_rewards(process_rewards, loss_mask, turn_ids, turn_end, turn_valid, *,
                          kind: str = "none", eta=0.0, granularity: str = "token") -> jax.Array:
    """Token-level process rewards ``[B,T]`` after the Clip / Delta transform ``kind``.

    ``granularity="token"``: the steps are the agent tokens (``loss_mask``).
    ``granularity="turn"``: the steps are the turns: each turn's process rewards are summed
    (``process_rewards_to_turns``), transformed over ``turn_valid``, and the turn's value is put
    on its ``turn_end`` token. The result feeds ``add_process_rewards`` either way.
    """
    if granularity == "token":
        return transform_process_rewards(process_rewards, loss_mask, kind, eta)
    if granularity != "turn":
        raise ValueError(f"granularity={granularity!r} is not one of ['token', 'turn']")
    k = turn_valid.shape[1]
    per_turn = process_rewards_to_turns(process_rewards, loss_mask, turn_ids, k)
    per_turn = transform_process_rewards(per_turn, turn_valid, kind, eta)
    return turn_values_at_turn_ends(per_turn, turn_end, turn_ids)


def transform_process_rewards(r, mask, kind: str = "none", eta=0.0) -> jax.Array:
    """Dispatch on ``kind`` in ``TRANSFORMS``: "none" (masked copy), "clip", "delta"."""
    if kind == "none":
        _check_same_shape(r=r, mask=mask)
        return jnp.where(mask, jnp.asarray(r, jnp.float32), 0.0)
    if kind == "clip":
        return clip_process_rewards(r, mask, eta)
    if kind == "delta":
        return delta_process_rewards(r, mask)
    raise ValueError(f"transform kind={kind!r} is not one of {list(TRANSFORMS)}")
