"""Advantage estimators for multi-turn token sequences (pure, jittable, fixed shapes).

Data layout: a batch of B episodes, each a row of T tokens: prompt, then per turn an agent action
chunk and an observation chunk (padding may sit inside chunks). Agent tokens are those with
``loss_mask``; a turn's reward sits on its last agent token (``turn_end``). Every estimator reads
only agent-token entries of ``rewards`` / ``values`` (other entries are ignored) and returns
``(advantages, returns)``, both float32 ``[B, T]`` and 0 outside ``loss_mask``.

Estimators are registered in ``ADVANTAGE_ESTIMATORS`` and called through
``compute_advantages(name, inputs, **hparams)``; ``needs_critic(name)`` says whether the
estimator reads ``values``.

Conventions shared by all estimators (chosen here, tested in tests/rl_agents/test_advantages.py):

* Termination: the value after a row's last agent token (or last turn) is 0. Truncated episodes
  are bootstrapped with 0 as well (the rollout does not provide a bootstrap value).
* Group statistics (GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline, GiGPO) use an all-pairs
  equality matrix of the group ids, so ids may be arbitrary int32 values in any order; the cost
  is O(B^2) (O((BK)^2) for GiGPO's step groups), small for our batch sizes. Centred values are
  computed from exact pairwise differences, so a group whose rewards are all equal gets
  advantage exactly 0 (never NaN, never a rounding residue divided by eps).
* ``std`` is the *unbiased* (n−1) sample standard deviation by default, as in the published
  GRPO code (TRL / verl use ``torch.std``); ``unbiased=False`` gives the population std. A
  group of size 1 has no relative signal: its advantage is 0.
* Critic-free estimators return ``returns = advantages`` (verl's convention; they train no
  value head) except REINFORCE++, whose returns are the un-normalised rewards-to-go.
"""
from __future__ import annotations

import inspect
import numbers
from typing import Callable

import jax
import jax.numpy as jnp
from flax import struct


@struct.dataclass
class AdvantageInputs:
    rewards: jax.Array         # f32 [B,T]: each turn's reward on that turn's last agent token, 0 elsewhere
    values: jax.Array          # f32 [B,T]: critic values per token (zeros for critic-free methods)
    loss_mask: jax.Array       # bool [B,T]: agent (generated) tokens
    turn_ids: jax.Array        # int32 [B,T]: turn index k of each agent token (and its observation); -1 on prompt
    turn_end: jax.Array        # bool [B,T]: the last agent token of each turn
    group_ids: jax.Array       # int32 [B]: rollouts of the same task instance share an id
    turn_rewards: jax.Array    # f32 [B,K]: reward of turn k (K = max turns)
    turn_valid: jax.Array      # bool [B,K]: turn k happened (episode not yet done)
    turn_obs_hash: jax.Array   # uint32 [B,K]: hash of the observation seen when acting at turn k
    episode_return: jax.Array  # f32 [B]: sum of turn rewards


# ============================================================================================
# Building blocks
# ============================================================================================
def masked_gae(rewards: jax.Array, values: jax.Array, mask: jax.Array, gamma, lam,
               cut: jax.Array | None = None) -> jax.Array:
    """GAE along the last axis that skips unmasked positions; ``[B,T]`` → advantages ``[B,T]``.

    For masked positions t with next masked position t' (none → terminal):
        δ_t = r_t + γ·V_{t'} − V_t,   A_t = δ_t + γλ·A_{t'},
    with V_{t'} = A_{t'} = 0 when t is the row's last masked position or ``cut[t]`` is True
    (``cut`` ends a segment at t: nothing after t is bootstrapped into it). Unmasked positions
    get 0 and do not interrupt the recursion. A reverse ``lax.scan`` over time carries the next
    masked position's value and advantage across unmasked positions.
    With ``values = 0`` and ``lam = 1`` this is the discounted reward-to-go.
    """
    rewards = jnp.asarray(rewards, jnp.float32)
    values = jnp.asarray(values, jnp.float32)
    mask = jnp.asarray(mask, bool)
    cut = jnp.zeros_like(mask) if cut is None else jnp.asarray(cut, bool)
    gamma = jnp.asarray(gamma, jnp.float32)
    lam = jnp.asarray(lam, jnp.float32)
    b = rewards.shape[0]

    def step(carry, x):
        next_v, next_a = carry
        r, v, m, c = x
        nv = jnp.where(c, 0.0, next_v)
        na = jnp.where(c, 0.0, next_a)
        a = r + gamma * nv - v + gamma * lam * na
        a = jnp.where(m, a, 0.0)
        return (jnp.where(m, v, next_v), jnp.where(m, a, next_a)), a

    zeros = jnp.zeros((b,), jnp.float32)
    xs = (rewards.T, values.T, mask.T, cut.T)
    _, adv = jax.lax.scan(step, (zeros, zeros), xs, reverse=True)
    return adv.T


def masked_whiten(x: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """(x − mean) / sqrt(var + eps) over the masked entries of the whole array; 0 elsewhere.

    Mean and variance are taken over all masked entries; var is the unbiased (n−1) estimate
    (verl's ``masked_whiten``); with n ≤ 1 the variance is 0.
    """
    x = jnp.asarray(x, jnp.float32)
    m = jnp.asarray(mask, bool)
    n = m.sum().astype(jnp.float32)
    mean = jnp.where(m, x, 0.0).sum() / jnp.maximum(n, 1.0)
    centred = jnp.where(m, x - mean, 0.0)
    var = (centred ** 2).sum() / jnp.maximum(n - 1.0, 1.0)
    return jnp.where(m, centred * jax.lax.rsqrt(var + eps), 0.0)


def group_normalize(x: jax.Array, same: jax.Array, *, norm: str = "std", eps: float = 1e-6,
                    unbiased: bool = True) -> jax.Array:
    """Group-relative score of each entry of ``x`` ``[N]``; ``same`` ``[N,N]`` bool says which
    entries share a group (reflexive for members; an all-False row marks a non-member → 0).

    norm="mean": x_i − mean_{g(i)} x;  norm="std": (x_i − mean) / (std + eps).
    Built from exact pairwise differences d_ij = x_j − x_i, so all-equal groups give exactly 0;
    groups of size 1 give 0.
    """
    x = jnp.asarray(x, jnp.float32)
    s = jnp.asarray(same, bool)
    n = s.sum(-1).astype(jnp.float32)
    d = jnp.where(s, x[None, :] - x[:, None], 0.0)            # x_j − x_i over members j
    c = d.sum(-1) / jnp.maximum(n, 1.0)                        # mean_g − x_i
    adv = -c
    if norm == "std":
        dev = jnp.where(s, d - c[:, None], 0.0)                # x_j − mean_g
        denom = jnp.maximum(n - 1.0, 1.0) if unbiased else jnp.maximum(n, 1.0)
        std = jnp.sqrt((dev ** 2).sum(-1) / denom)
        adv = adv / (std + eps)
    elif norm != "mean":
        raise ValueError(f"norm={norm!r} is not one of ['mean', 'std']")
    return jnp.where(n > 1, adv, 0.0)


def rloo_baseline_advantage(x: jax.Array, same: jax.Array) -> jax.Array:
    """A_i = x_i − mean_{j≠i, j∈g(i)} x_j (0 for groups of size 1), from exact differences."""
    x = jnp.asarray(x, jnp.float32)
    s = jnp.asarray(same, bool)
    n = s.sum(-1).astype(jnp.float32)
    d = jnp.where(s, x[:, None] - x[None, :], 0.0)             # x_i − x_j (0 for j = i)
    return jnp.where(n > 1, d.sum(-1) / jnp.maximum(n - 1.0, 1.0), 0.0)


def per_turn_sum(x: jax.Array, select: jax.Array, turn_ids: jax.Array, num_turns: int) -> jax.Array:
    """``[B,T]`` → ``[B,K]``: sum of x over the selected tokens of each turn (by ``turn_ids``);
    selected tokens whose turn id is outside [0, K) are dropped."""
    b = x.shape[0]
    ok = select & (turn_ids >= 0) & (turn_ids < num_turns)
    idx = jnp.where(ok, turn_ids, num_turns)
    out = jnp.zeros((b, num_turns + 1), jnp.float32)
    out = out.at[jnp.arange(b)[:, None], idx].add(jnp.where(ok, x, 0.0).astype(jnp.float32))
    return out[:, :num_turns]


def broadcast_turns(x_turn: jax.Array, turn_ids: jax.Array, mask: jax.Array) -> jax.Array:
    """``[B,K]`` → ``[B,T]``: token t gets x_turn[b, turn_ids[b,t]] where ``mask``, else 0."""
    k = x_turn.shape[1]
    ok = mask & (turn_ids >= 0) & (turn_ids < k)
    g = jnp.take_along_axis(x_turn, jnp.clip(turn_ids, 0, k - 1), axis=1)
    return jnp.where(ok, g, 0.0).astype(jnp.float32)


def _same_group(group_ids: jax.Array) -> jax.Array:
    g = jnp.asarray(group_ids)
    return g[:, None] == g[None, :]


# ============================================================================================
# Hyper-parameter checks (Python values only; traced values pass through)
# ============================================================================================
def _is_concrete_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, jax.Array))


def _check_unit(name: str, v) -> None:
    if isinstance(v, bool) or not (_is_concrete_number(v) or isinstance(v, jax.Array)):
        raise ValueError(f"{name}={v!r} must be a number in [0, 1]")
    if _is_concrete_number(v) and not 0.0 <= v <= 1.0:
        raise ValueError(f"{name}={v!r} must be in [0, 1]")


def _check_positive(name: str, v) -> None:
    if _is_concrete_number(v) and not v > 0:
        raise ValueError(f"{name}={v!r} must be > 0")


def _check_bool(name: str, v) -> None:
    if not isinstance(v, bool):
        raise ValueError(f"{name}={v!r} must be a bool")


def _check_norm(norm) -> None:
    if norm not in ("mean", "std"):
        raise ValueError(f"norm={norm!r} is not one of ['mean', 'std']")


def _check_inputs(x: AdvantageInputs) -> None:
    """Static shape checks, each error naming the offending field and its shape."""
    if jnp.ndim(x.rewards) != 2:
        raise ValueError(f"AdvantageInputs.rewards must be [B,T]; got shape {jnp.shape(x.rewards)}")
    b, t = jnp.shape(x.rewards)
    for name in ("values", "loss_mask", "turn_ids", "turn_end"):
        if jnp.shape(getattr(x, name)) != (b, t):
            raise ValueError(f"AdvantageInputs.{name} must have shape {(b, t)} like rewards; "
                             f"got {jnp.shape(getattr(x, name))}")
    for name in ("group_ids", "episode_return"):
        if jnp.shape(getattr(x, name)) != (b,):
            raise ValueError(f"AdvantageInputs.{name} must have shape {(b,)}; "
                             f"got {jnp.shape(getattr(x, name))}")
    if jnp.ndim(x.turn_rewards) != 2 or jnp.shape(x.turn_rewards)[0] != b:
        raise ValueError(f"AdvantageInputs.turn_rewards must be [B={b},K]; "
                         f"got {jnp.shape(x.turn_rewards)}")
    k = jnp.shape(x.turn_rewards)[1]
    for name in ("turn_valid", "turn_obs_hash"):
        if jnp.shape(getattr(x, name)) != (b, k):
            raise ValueError(f"AdvantageInputs.{name} must have shape {(b, k)} like turn_rewards; "
                             f"got {jnp.shape(getattr(x, name))}")


def _finish(adv, returns, mask):
    adv = jnp.where(mask, adv, 0.0).astype(jnp.float32)
    returns = jnp.where(mask, returns, 0.0).astype(jnp.float32)
    return adv, returns


# ============================================================================================
# Critic-based estimators
# ============================================================================================
def gae(x: AdvantageInputs, *, gamma: float = 1.0, lam: float = 0.95,
        use_pallas: bool = False):
    """Token-level GAE over agent tokens, skipping observation / padding tokens.

    δ_t = r_t + γ V_{t'} − V_t, A_t = δ_t + γλ A_{t'} where t' is the row's next agent token
    (terminal after the last one: V = A = 0). returns = A + V. Rewards and values off the mask
    are ignored. ``use_pallas=True`` runs ``pallas_kernels.masked_gae`` (same semantics).
    """
    _check_unit("gamma", gamma)
    _check_unit("lam", lam)
    _check_bool("use_pallas", use_pallas)
    m = jnp.asarray(x.loss_mask, bool)
    r = jnp.where(m, x.rewards, 0.0).astype(jnp.float32)
    v = jnp.where(m, x.values, 0.0).astype(jnp.float32)
    if use_pallas:
        import pallas_kernels
        kernel = getattr(pallas_kernels, "masked_gae", None)
        if kernel is None:
            raise ValueError("use_pallas=True but pallas_kernels.masked_gae is not available")
        adv = kernel(r, v, m, gamma, lam)
    else:
        adv = masked_gae(r, v, m, gamma, lam)
    return _finish(adv, adv + v, m)


def per_turn_first(x: jax.Array, select: jax.Array, turn_ids: jax.Array,
                   num_turns: int) -> jax.Array:
    """``[B,T]`` → ``[B,K]``: x at the first (lowest-position) selected token of each turn (by
    ``turn_ids``), 0 for a turn with no selected token; selected tokens whose turn id is outside
    [0, K) are dropped. Tokens of a turn need not be contiguous (padding may sit between them)."""
    b, t = x.shape
    ok = select & (turn_ids >= 0) & (turn_ids < num_turns)
    idx = jnp.where(ok, turn_ids, num_turns)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    first = jnp.full((b, num_turns + 1), t, jnp.int32)
    first = first.at[jnp.arange(b)[:, None], idx].min(jnp.where(ok, pos, t))[:, :num_turns]
    got = jnp.take_along_axis(jnp.asarray(x, jnp.float32), jnp.minimum(first, t - 1), axis=1)
    return jnp.where(first < t, got, 0.0)


def turn_gae(x: AdvantageInputs, *, gamma: float = 0.99, lam: float = 0.9):
    """Turn-level GAE: one step per turn, broadcast to the turn's agent tokens.

    Turns are the ``turn_end`` tokens. Turn k's reward R_k is the sum of the token rewards over
    its agent tokens (= turn_rewards[k] plus whatever was folded into ``rewards``, e.g. a
    KL-in-reward term). Its value is the value of the state the turn acts from,

        V(s_k) = values[f_k],   f_k = turn k's first agent token (lowest position with
                                      ``loss_mask`` and turn_ids = k),

    since ``values[t]`` is V of the state *before* token t (``trainer.sequence_values``: the
    value head at position t−1, i.e. the last prompt / observation token before the turn in
    the compact layout). Reading a later agent token of the turn would give a baseline that
    has seen part of the action. Then GAE over the turns:

        δ_k = R_k + γ V(s_{k+1}) − V(s_k),   A_k = δ_k + γλ A_{k+1},

    terminal after the last turn (V = A = 0). Every agent token of turn k gets A_k;
    returns = A_k + V(s_k) likewise (the critic's target for V(s_k)).
    """
    _check_unit("gamma", gamma)
    _check_unit("lam", lam)
    m = jnp.asarray(x.loss_mask, bool)
    ends = m & jnp.asarray(x.turn_end, bool)
    tid = jnp.asarray(x.turn_ids, jnp.int32)
    k = x.turn_rewards.shape[1]
    r_turn = per_turn_sum(x.rewards, m, tid, k)
    v_turn = per_turn_first(x.values, m, tid, k)
    has_turn = per_turn_sum(jnp.ones_like(x.rewards), ends, tid, k) > 0
    a_turn = masked_gae(r_turn, v_turn, has_turn, gamma, lam)
    adv = broadcast_turns(a_turn, tid, m)
    ret = broadcast_turns(a_turn + v_turn, tid, m)
    return _finish(adv, ret, m)


def bilevel_gae(x: AdvantageInputs, *, gamma_turn: float = 0.95, lam_turn: float = 1.0,
                gamma_token: float = 1.0, lam_token: float = 1.0, whiten: bool = True,
                eps: float = 1e-8):
    """RAGEN's bi-level GAE (``compute_bi_level_gae_advantage_return``), on ``turn_end`` tokens.

    1. Turn level, across the turn-end tokens e_1 < e_2 < ... of a row:
       δ_i = r_{e_i} + γ_turn V_{e_{i+1}} − V_{e_i},  A_i = δ_i + γ_turn λ_turn A_{i+1}
       (terminal after the last turn), with r_{e_i} the token reward on the turn-end token.
       RAGEN uses one λ for both levels (λ = 1 in its recipe), hence ``lam_turn = 1.0``.
    2. Token level inside each turn (γ_token = λ_token = 1 by default): the turn-end token's
       reward is replaced by the turn's return target A_i + V_{e_i} and it bootstraps 0; the
       other agent tokens keep their own token rewards (e.g. a folded-in KL term); the
       recursion runs backwards over the turn's agent tokens. So the turn-end token's
       advantage equals the turn advantage A_i. The recursion runs down to the turn's first
       agent token f_i, whose ``values`` entry is V(s_i), the value of the state before the
       turn (``trainer.sequence_values``); with γ_token = λ_token = 1 it telescopes to
       A_{f_i} = Σ_{f_i ≤ t < e_i} r_t + (A_i + V_{e_i}) − V(s_i): the turn's return target
       against the baseline of the state the turn acts from (the turn level itself reads V at
       the turn ends, as RAGEN does).
    returns = token-level A + V (before whitening); advantages are whitened under the mask
    (``masked_whiten``, unbiased variance, as RAGEN) when ``whiten``.
    """
    for n, v in (("gamma_turn", gamma_turn), ("lam_turn", lam_turn),
                 ("gamma_token", gamma_token), ("lam_token", lam_token)):
        _check_unit(n, v)
    _check_bool("whiten", whiten)
    _check_positive("eps", eps)
    m = jnp.asarray(x.loss_mask, bool)
    ends = m & jnp.asarray(x.turn_end, bool)
    r = jnp.where(m, x.rewards, 0.0).astype(jnp.float32)
    v = jnp.where(m, x.values, 0.0).astype(jnp.float32)
    a_turn = masked_gae(r, v, ends, gamma_turn, lam_turn)      # nonzero on turn ends only
    r_tok = jnp.where(ends, a_turn + v, r)
    adv = masked_gae(r_tok, v, m, gamma_token, lam_token, cut=ends)
    ret = adv + v
    if whiten:
        adv = masked_whiten(adv, m, eps)
    return _finish(adv, ret, m)


# ============================================================================================
# Critic-free estimators
# ============================================================================================
def outcome_advantages(x: AdvantageInputs, a_seq):
    """An episode-level advantage ``a_seq`` [B] on every agent token of its row:
    ``(advantages [B,T], returns [B,T])`` (returns = advantages), 0 off the agent tokens."""
    m = jnp.asarray(x.loss_mask, bool)
    adv = jnp.where(m, a_seq[:, None], 0.0)
    return _finish(adv, adv, m)


def grpo(x: AdvantageInputs, *, eps: float = 1e-6, unbiased: bool = True):
    """GRPO: A_i = (r_i − mean_G r) / (std_G r + eps), r_i = episode_return, on agent tokens.

    std is the unbiased sample std (``torch.std`` as in TRL / verl) unless ``unbiased=False``
    (population std). Groups of size 1 and all-equal groups get 0.
    """
    _check_positive("eps", eps)
    _check_bool("unbiased", unbiased)
    a = group_normalize(x.episode_return, _same_group(x.group_ids), norm="std", eps=eps,
                        unbiased=unbiased)
    return outcome_advantages(x, a)


def dr_grpo(x: AdvantageInputs):
    """Dr. GRPO: A_i = r_i − mean_G r (no std), on agent tokens. Pair it with the
    ``seq-mean-token-sum-norm`` loss aggregation."""
    a = group_normalize(x.episode_return, _same_group(x.group_ids), norm="mean")
    return outcome_advantages(x, a)


def rloo(x: AdvantageInputs):
    """RLOO: A_i = r_i − mean_{j≠i in G} r_j, on agent tokens; groups of size 1 get 0."""
    a = rloo_baseline_advantage(x.episode_return, _same_group(x.group_ids))
    return outcome_advantages(x, a)


def reinforce_pp(x: AdvantageInputs, *, gamma: float = 1.0, eps: float = 1e-8):
    """REINFORCE++: per-token reward-to-go G_t = Σ_{t'≥t, agent} γ^{#agent steps} r_{t'} of the
    token-level rewards (incl. any KL-in-reward folded into ``rewards``), whitened over the whole
    batch under the mask (``masked_whiten``). returns = G (un-normalised)."""
    _check_unit("gamma", gamma)
    _check_positive("eps", eps)
    m = jnp.asarray(x.loss_mask, bool)
    r = jnp.where(m, x.rewards, 0.0)
    g = masked_gae(r, jnp.zeros_like(r), m, gamma, 1.0)
    return _finish(masked_whiten(g, m, eps), g, m)


def reinforce_pp_baseline(x: AdvantageInputs, *, gamma: float = 1.0, eps: float = 1e-8):
    """REINFORCE++-baseline: G_t − mean_G(episode_return) (the group mean of the episode
    returns of the row's group, incl. the row itself), then whitened over the batch under the
    mask. returns = G (un-normalised reward-to-go)."""
    _check_unit("gamma", gamma)
    _check_positive("eps", eps)
    m = jnp.asarray(x.loss_mask, bool)
    r = jnp.where(m, x.rewards, 0.0)
    g = masked_gae(r, jnp.zeros_like(r), m, gamma, 1.0)
    ret = jnp.asarray(x.episode_return, jnp.float32)
    same = _same_group(x.group_ids)
    mean = ret - group_normalize(ret, same, norm="mean")   # group mean (singletons: r_i)
    return _finish(masked_whiten(g - mean[:, None], m, eps), g, m)


def gigpo(x: AdvantageInputs, *, gamma: float = 0.95, omega: float = 1.0, norm: str = "mean",
          eps: float = 1e-6, unbiased: bool = True):
    """GiGPO (verl-agent): A = A_episode + ω·A_step on agent tokens.

    A_episode: group-relative episode return (``norm="mean"``: r − mean_G; ``"std"``: divided by
    std_G + eps, unbiased std unless ``unbiased=False``). A_step: the steps (b, k) with
    ``turn_valid`` form step groups of equal ``group_ids`` and equal ``turn_obs_hash`` (the
    anchor state); each step's discounted return R_{b,k} = Σ_{j≥k} γ^{j−k} turn_rewards[b,j]
    (valid turns) minus its step-group mean (same ``norm``); a step alone in its step group gets
    0. A_step of turn k is broadcast to turn k's agent tokens via ``turn_ids``.
    Cost: a [BK, BK] equality matrix, O((BK)^2) memory and time — fine for B·K up to a few
    thousand. Invalid-action penalties are applied by the env / rollout, not here.
    """
    _check_unit("gamma", gamma)
    _check_norm(norm)
    _check_positive("eps", eps)
    _check_bool("unbiased", unbiased)
    if not (_is_concrete_number(omega) or isinstance(omega, jax.Array)):
        raise ValueError(f"omega={omega!r} must be a number")
    m = jnp.asarray(x.loss_mask, bool)
    b, k = x.turn_rewards.shape
    a_ep = group_normalize(x.episode_return, _same_group(x.group_ids), norm=norm, eps=eps,
                           unbiased=unbiased)
    tv = jnp.asarray(x.turn_valid, bool)
    tr = jnp.where(tv, x.turn_rewards, 0.0).astype(jnp.float32)
    step_ret = masked_gae(tr, jnp.zeros_like(tr), tv, gamma, 1.0)          # [B,K]
    gid = jnp.repeat(jnp.asarray(x.group_ids), k)
    h = jnp.asarray(x.turn_obs_hash).reshape(-1)
    valid = tv.reshape(-1)
    same = ((gid[:, None] == gid[None, :]) & (h[:, None] == h[None, :])
            & valid[:, None] & valid[None, :])
    a_step = group_normalize(step_ret.reshape(-1), same, norm=norm, eps=eps,
                             unbiased=unbiased).reshape(b, k)
    adv = jnp.where(m, a_ep[:, None], 0.0) + omega * broadcast_turns(a_step, x.turn_ids, m)
    return _finish(adv, adv, m)


# ============================================================================================
# Registry
# ============================================================================================
ADVANTAGE_ESTIMATORS: dict[str, Callable] = {
    "gae": gae,
    "turn_gae": turn_gae,
    "bilevel_gae": bilevel_gae,
    "grpo": grpo,
    "dr_grpo": dr_grpo,
    "rloo": rloo,
    "reinforce_pp": reinforce_pp,
    "reinforce_pp_baseline": reinforce_pp_baseline,
    "gigpo": gigpo,
}

_CRITIC = {"gae", "turn_gae", "bilevel_gae"}


def register_estimator(name: str, fn: Callable, *, critic: bool = False) -> None:
    """Add estimator ``fn(inputs: AdvantageInputs, **hparams) -> (advantages, returns)`` under
    ``name`` (its keyword-only parameters are its hyper-parameters, ``rl.advantage_kwargs``);
    ``critic``: it reads ``inputs.values``. A name already registered raises ValueError."""
    if name in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage estimator {name!r} is already registered")
    if not callable(fn):
        raise ValueError(f"estimator {name!r} must be callable, got {fn!r}")
    ADVANTAGE_ESTIMATORS[name] = fn
    if critic:
        _CRITIC.add(name)


def _check_name(name: str) -> Callable:
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"advantage estimator {name!r} is not registered; choose one of "
                         f"{sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name]


def estimator_hparams(name: str) -> dict:
    """The hyper-parameters estimator ``name`` accepts, with their defaults."""
    fn = _check_name(name)
    return {p.name: p.default for p in inspect.signature(fn).parameters.values()
            if p.kind == inspect.Parameter.KEYWORD_ONLY}


def needs_critic(name: str) -> bool:
    """Whether estimator ``name`` reads critic ``values`` (GAE family)."""
    _check_name(name)
    return name in _CRITIC


def compute_advantages(name: str, inputs: AdvantageInputs, **hparams):
    """Run the registered estimator ``name`` → ``(advantages [B,T] f32, returns [B,T] f32)``.

    Raises ValueError for an unknown name (listing the registered ones), unknown hparam names
    (naming them and the accepted ones), bad hparam values, or inconsistent input shapes.
    """
    fn = _check_name(name)
    allowed = estimator_hparams(name)
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise ValueError(f"unknown hparams {unknown} for advantage estimator {name!r}; it "
                         f"accepts {sorted(allowed)}")
    _check_inputs(inputs)
    return fn(inputs, **hparams)
