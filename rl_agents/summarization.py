"""SUPO: summarization-based context management for long-horizon multi-turn agents.

Rollout (one jitted ``lax.scan`` over turns, fixed shapes). Every row keeps a *working
context* of at most ``L = working_len`` tokens (its KV cache holds exactly the context's valid
tokens). Before each turn, with ``ctx`` the row's context length, ``A`` / ``O`` the env's
action / observation budgets and ``R = 1 + summary_len`` the room a summary needs:

* ``ctx + A + O + R > L`` and the row has summaries left (``n_sum < max_summaries``): the row
  summarises. The rollout appends the instruction ``<summarize>``, the policy samples up to
  ``summary_len`` tokens (the summary body, ending at its first ``<eos>``; agent tokens with
  loss), then the row's context is reset to ``[task prompt, <summary>, body]``: the cache length
  is set to 0 (``jnp.where``) and that chunk is prefilled. Rows that do not summarise get an
  all-invalid chunk (nothing written) — rows summarise at different turns.
* no summaries left and ``ctx + A + O > L``: the context is full; the episode ends here
  (``hit_summary_cap``, counted as truncated). With ``max_summaries = 0`` this is the plain
  "context too short" baseline: the trajectory is truncated at ``L``.
* otherwise the turn fits: act, step the env, prefill the observation, as in
  ``rl_agents.rollout.run_episodes``.

So a segment never exceeds ``L`` tokens (the check uses the padded budgets ``A``, ``O``: it is
conservative), and ``L >= 2·O + A + 2·R`` is required when ``max_summaries > 0`` (after a reset a
turn plus the next summary must fit). The KV cache has ``L + O + R`` slots, room for a chunk
written (invalid) after a full context.

Segments. Segment ``s`` of an episode is exactly the context the sampler saw: segment 0 is
``[prompt, turns...]``, segment ``s > 0`` is ``[prompt, <summary>, body_{s-1}, turns...]``, and
every segment that ended in a summary ends with ``[<summarize>, body_s]``. A ``SupoTrajectory``
stores each episode as ``S = max_summaries + 1`` segment slots of ``L`` tokens laid end to end
(``[B, S·L]``, each slot compact: real tokens first); ``segment_rows`` reshapes them into
``[B·S, L]`` training rows on which a causal forward pass with positions ``arange(L)``
recomputes the sampler's log-probs (``segment_valid`` marks the used slots).

Training (``SupoContext``, the trainer's context mode for ``config.context.mode = "supo"``). Each segment is one PPO row; all segments of an episode share the
episode's outcome advantage: the config's critic-free estimator (GRPO by default) is run on the
episode view ``[B, S·L]`` (its agent tokens = all segments' actions and summaries) and reshaped
into rows. Overlong masking: episodes that hit the summary cap or the turn cap (``truncated``)
are removed from the loss (their rows keep weight 0); they still count in their group's
baseline (their return is what the policy earned). Summary tokens and the copied reset chunk
carry ``turn_ids = -1`` (they belong to no env turn).

Evaluation may allow more summaries than training (``max_summaries_eval``); the shapes follow.

Oracle summaries (for BC demos): ``oracle_summary(env, state, summary_len)``. KeyChain's is
``<summary> KEY <eos>`` where KEY is the last key read (``chain[progress]``), or the goal value
once the goal record has been read — the only thing the agent needs to continue.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

import models
from envs import vocab
from envs.base import Env
from envs.wrappers import tree_select
from rl_agents import bc as bc_lib
from rl_agents.advantages import AdvantageInputs, compute_advantages
from rl_agents.hashing import hash_tokens
from rl_agents.rollout import (TurnOutput, action_valid_mask, generate, model_policy,
                               oracle_policy)
from rl_agents.sampling import SamplingConfig


# ============================================================================================
# Configuration
# ============================================================================================
def _int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")
    return int(v)


@dataclasses.dataclass(frozen=True)
class SupoConfig:
    """Working-context limit ``working_len`` (L), summary budget and summary cap."""
    working_len: int
    summary_len: int = 4
    max_summaries: int = 4

    def __post_init__(self):
        _int("working_len", self.working_len, 1)
        _int("summary_len", self.summary_len, 1)
        _int("max_summaries", self.max_summaries, 0)

    @property
    def reserve(self) -> int:
        """R = 1 + summary_len: the ``<summarize>`` instruction plus the summary body."""
        return 1 + self.summary_len

    @property
    def num_segments(self) -> int:
        return self.max_summaries + 1

    def min_working_len(self, env: Env) -> int:
        """Smallest valid L: the prompt fits; with summaries, a reset context + a turn + a summary."""
        if self.max_summaries == 0:
            return env.obs_len
        return 2 * env.obs_len + env.action_len + 2 * self.reserve

    def cache_len(self, env: Env) -> int:
        return self.working_len + env.obs_len + self.reserve

    def validate(self, env: Env) -> "SupoConfig":
        lo = self.min_working_len(env)
        if self.working_len < lo:
            raise ValueError(
                f"working_len={self.working_len} is too small for {env!r} with summary_len="
                f"{self.summary_len}, max_summaries={self.max_summaries}: need >= {lo} "
                f"(2*obs_len + action_len + 2*(1 + summary_len) when summarising, obs_len otherwise)")
        return self


# ============================================================================================
# Trajectory
# ============================================================================================
@struct.dataclass
class SupoTrajectory:
    """B episodes; per-token leaves are the episode view ``[B, S·L]`` (S segment slots of L)."""
    tokens: jax.Array          # int32 [B,S·L]
    valid: jax.Array           # bool  [B,S·L]
    loss_mask: jax.Array       # bool  [B,S·L]: actions and summary bodies (agent-generated)
    behaviour_logp: jax.Array  # f32   [B,S·L]
    rewards: jax.Array         # f32   [B,S·L]: turn reward on the turn's last action token
    turn_ids: jax.Array        # int32 [B,S·L]: env turn of action / obs tokens; -1 otherwise
    turn_end: jax.Array        # bool  [B,S·L]
    summary_mask: jax.Array    # bool  [B,S·L]: summary-body tokens written by the agent
    segment_valid: jax.Array   # bool  [B,S]: the slot holds a segment
    turn_segment: jax.Array    # int32 [B,K]: segment of turn k's action
    summarized: jax.Array      # bool  [B,K]: the row summarised right before turn k
    turn_rewards: jax.Array    # f32   [B,K]
    turn_valid: jax.Array      # bool  [B,K]: the agent acted at turn k
    turn_obs_hash: jax.Array   # uint32 [B,K]
    turn_format_error: jax.Array  # bool [B,K]
    num_summaries: jax.Array   # int32 [B]
    hit_summary_cap: jax.Array  # bool [B]: the context was full with no summary left (cut)
    episode_return: jax.Array  # f32   [B]
    episode_length: jax.Array  # int32 [B]: turns taken
    success: jax.Array         # bool  [B]
    terminated: jax.Array      # bool  [B]
    truncated: jax.Array       # bool  [B]: turn cap or summary cap
    group_ids: jax.Array       # int32 [B]
    working_len: int = struct.field(pytree_node=False, default=0)

    @property
    def num_segments(self) -> int:
        return self.segment_valid.shape[1]


PER_TOKEN = ("tokens", "valid", "loss_mask", "behaviour_logp", "rewards", "turn_ids", "turn_end",
             "summary_mask")


def segment_rows(traj: SupoTrajectory) -> dict[str, jax.Array]:
    """Per-token leaves as training rows ``[B·S, L]`` plus ``segment_valid`` ``[B·S]`` and
    ``episode`` ``[B·S]`` (row → episode index)."""
    b, s, length = traj.tokens.shape[0], traj.num_segments, traj.working_len
    out = {k: getattr(traj, k).reshape(b * s, length) for k in PER_TOKEN}
    out["segment_valid"] = traj.segment_valid.reshape(b * s)
    out["episode"] = jnp.repeat(jnp.arange(b, dtype=jnp.int32), s)
    return out


# ============================================================================================
# Policies: TurnPolicy plus summarize / reset
# ============================================================================================
class SupoPolicy(NamedTuple):
    init: Callable       # (prompt, valid) -> pstate
    act: Callable        # (pstate, env_states, active, key) -> (TurnOutput [B,A], pstate)
    observe: Callable    # (pstate, obs, valid) -> pstate
    summarize: Callable  # (pstate, env_states, rows, key) -> (TurnOutput [B,summary_len], pstate)
    reset: Callable      # (pstate, rows, chunk [B,C], chunk_valid [B,C]) -> pstate


def _with_lengths(cache, lengths):
    if hasattr(cache, "replace"):
        return cache.replace(lengths=lengths)
    if hasattr(cache, "_replace"):
        return cache._replace(lengths=lengths)
    return dataclasses.replace(cache, lengths=lengths)


def supo_model_policy(model, params, env: Env, sampling: SamplingConfig, cfg: SupoConfig) -> SupoPolicy:
    """The LM policy: ``model_policy``'s KV-cached turns, plus ``<summarize>`` → sampled summary
    and the cache reset (lengths → 0 for the summarising rows, then one prefill of the chunk)."""
    base = model_policy(model, params, env, sampling, max_len=cfg.cache_len(env))

    def summarize(pstate, env_states, rows, key):
        del env_states
        cache, logits = pstate
        instr = jnp.full((rows.shape[0], 1), vocab.SUMMARIZE, jnp.int32)
        new_logits, cache = models.prefill(model, params, instr, cache, valid=rows[:, None])
        logits = jnp.where(rows[:, None], new_logits[:, 0], logits)
        out, cache, logits = generate(model, params, sampling, cache, logits, rows, key,
                                      cfg.summary_len)
        return out, (cache, logits)

    def reset(pstate, rows, chunk, chunk_valid):
        cache, logits = pstate
        cache = _with_lengths(cache, jnp.where(rows, 0, cache.lengths).astype(cache.lengths.dtype))
        new_logits, cache = models.prefill(model, params, chunk, cache, valid=chunk_valid,
                                           last_only=True)
        return cache, jnp.where(chunk_valid.any(-1)[:, None], new_logits, logits)

    return SupoPolicy(base.init, base.act, base.observe, summarize, reset)


# ----------------------------------------------------------------------------- oracle summaries
def keychain_last_key(env, state) -> tuple[jax.Array, jax.Array]:
    """KeyChain (one unbatched state): the last thing read — ``(tokens [max(key_len,
    value_len)], n)``: the letters of ``chain[progress]`` (the next key to search, read from the
    last record or the prompt) or, once the goal record was read, the value's digits."""
    width = max(env.key_len, env.value_len)
    key_tok = state.chain[jnp.clip(state.progress, 0, env.chain_len - 1)] + vocab.LETTER_A
    val_tok = state.value + vocab.DIGIT_0
    pad = lambda x: jnp.concatenate([x, jnp.full((width - x.shape[0],), vocab.PAD, jnp.int32)])
    done = state.progress >= env.chain_len
    toks = jnp.where(done, pad(val_tok.astype(jnp.int32)), pad(key_tok.astype(jnp.int32)))
    return toks, jnp.where(done, env.value_len, env.key_len)


ORACLE_SUMMARIES: dict[str, Callable] = {"keychain": keychain_last_key}


def oracle_summary(env: Env, state, summary_len: int) -> jax.Array:
    """The oracle summary body of one env state: ``ITEM <eos>`` padded to ``summary_len`` (the
    rollout puts ``<summary>`` before it in the new context). Raises ValueError for an env with
    no oracle summary or a ``summary_len`` too short for it."""
    if env.name not in ORACLE_SUMMARIES:
        raise ValueError(f"env {env.name!r} has no oracle summary; registered: {sorted(ORACLE_SUMMARIES)}")
    item, n = ORACLE_SUMMARIES[env.name](env, state)
    if item.shape[0] + 1 > summary_len:
        raise ValueError(f"summary_len={summary_len} is too short for {env.name}'s oracle summary "
                         f"({item.shape[0]} tokens + <eos>)")
    pos = jnp.arange(summary_len)
    body = jnp.where(pos < n, jnp.pad(item, (0, summary_len - item.shape[0])),
                     jnp.where(pos == n, vocab.EOS, vocab.PAD))
    return body.astype(jnp.int32)


def supo_oracle_policy(env: Env, cfg: SupoConfig, epsilon: float = 0.0) -> SupoPolicy:
    """The env's expert (ε-noisy actions as ``oracle_policy``) writing oracle summaries."""
    base = oracle_policy(env, epsilon)

    def summarize(pstate, env_states, rows, key):
        del key
        body = jax.vmap(lambda s: oracle_summary(env, s, cfg.summary_len))(env_states)
        body = jnp.where(rows[:, None], body, vocab.PAD)
        return TurnOutput(body, action_valid_mask(body), jnp.zeros(body.shape, jnp.float32)), pstate

    def reset(pstate, rows, chunk, chunk_valid):
        return pstate

    return SupoPolicy(base.init, base.act, base.observe, summarize, reset)


# ============================================================================================
# The episode runner
# ============================================================================================
def _prefix_valid(row):
    return jnp.cumprod(row != vocab.PAD, axis=-1).astype(bool)


def reset_chunk(prompt, prompt_valid, body, body_valid, rows):
    """``[prompt, <summary>, body]`` compacted (valid tokens first), all-invalid where not ``rows``."""
    b = prompt.shape[0]
    toks = jnp.concatenate([prompt, jnp.full((b, 1), vocab.SUMMARY, jnp.int32), body], axis=1)
    valid = jnp.concatenate([prompt_valid, jnp.ones((b, 1), bool), body_valid], axis=1) & rows[:, None]
    order = jnp.argsort(~valid, axis=-1, stable=True)
    toks = jnp.take_along_axis(toks, order, axis=1)
    valid = jnp.take_along_axis(valid, order, axis=1)
    return jnp.where(valid, toks, vocab.PAD), valid


def supo_run_episodes(env: Env, policy: SupoPolicy, key: jax.Array, num_groups: int,
                      group_size: int = 1, *, cfg: SupoConfig, reset_keys: jax.Array | None = None,
                      shard_rows: Callable[[Any], Any] = lambda tree: tree,
                      limits: tuple[Any, Any] | None = None) -> SupoTrajectory:
    """Roll out ``num_groups × group_size`` episodes with summarization; see the module doc.

    ``limits = (working_len, max_summaries)``, possibly traced, replaces ``cfg``'s thresholds
    (clipped to ``cfg``'s, which fix the shapes), so that one compiled rollout evaluates several
    working lengths / summary caps. The caller keeps them valid (``SupoConfig.min_working_len``).
    """
    cfg.validate(env)
    a_len, o_len, s_len, r_len = env.action_len, env.obs_len, cfg.summary_len, cfg.reserve
    big_l, cap = cfg.working_len, cfg.max_summaries
    if limits is not None:
        big_l = jnp.minimum(jnp.asarray(limits[0], jnp.int32), cfg.working_len)
        cap = jnp.minimum(jnp.asarray(limits[1], jnp.int32), cfg.max_summaries)
    b = num_groups * group_size
    k_reset, k_act = jax.random.split(key)
    if reset_keys is None:
        reset_keys = jax.random.split(k_reset, num_groups)
    reset_keys = shard_rows(jnp.repeat(reset_keys, group_size, axis=0))
    group_ids = jnp.repeat(jnp.arange(num_groups, dtype=jnp.int32), group_size)
    env_state, ts = shard_rows(jax.vmap(env.reset)(reset_keys))
    prompt = ts.observation.astype(jnp.int32)
    prompt_valid = _prefix_valid(prompt)
    prompt_n = prompt_valid.sum(-1).astype(jnp.int32)
    pstate = policy.init(prompt, prompt_valid)

    def summary_phase(pstate, env_state, rows, key):
        out, pstate = policy.summarize(pstate, env_state, rows, key)
        body_valid = out.action_valid & rows[:, None]
        body = jnp.where(body_valid, out.action, vocab.PAD).astype(jnp.int32)
        chunk, chunk_valid = reset_chunk(prompt, prompt_valid, body, body_valid, rows)
        pstate = policy.reset(pstate, rows, chunk, chunk_valid)
        return pstate, body, body_valid, jnp.where(body_valid, out.logp, 0.0).astype(jnp.float32)

    def no_summary(pstate, env_state, rows, key):
        return (pstate, jnp.full((b, s_len), vocab.PAD, jnp.int32), jnp.zeros((b, s_len), bool),
                jnp.zeros((b, s_len), jnp.float32))

    def turn(carry, turn_key):
        env_state, pstate, done, seen_obs, ctx, n_sum = carry
        k_sum, k_turn = jax.random.split(turn_key)
        active = ~done
        summarise = active & (ctx + a_len + o_len + r_len > big_l) & (n_sum < cap)
        cut = active & ~summarise & (ctx + a_len + o_len > big_l)
        pstate, body, body_valid, body_logp = jax.lax.cond(
            summarise.any(), summary_phase, no_summary, pstate, env_state, summarise, k_sum)
        ctx = jnp.where(summarise, prompt_n + 1 + body_valid.sum(-1), ctx).astype(jnp.int32)
        seg = n_sum + summarise.astype(jnp.int32)
        acting = active & ~cut
        out, pstate = policy.act(pstate, env_state, acting, k_turn)
        action_valid = out.action_valid & acting[:, None]
        action = jnp.where(action_valid, out.action, vocab.PAD).astype(jnp.int32)
        stepped, ts = jax.vmap(env.step)(env_state, action)
        new_state = jax.vmap(tree_select)(acting, stepped, env_state)
        obs = jnp.where(acting[:, None], ts.observation.astype(jnp.int32), vocab.PAD)
        obs_valid = _prefix_valid(obs) & acting[:, None]
        pstate = policy.observe(pstate, obs, obs_valid)
        ctx = ctx + action_valid.sum(-1) + obs_valid.sum(-1)
        record = dict(
            action=action, action_valid=action_valid,
            logp=jnp.where(action_valid, out.logp, 0.0), obs=obs, obs_valid=obs_valid,
            reward=jnp.where(acting, ts.reward, 0.0).astype(jnp.float32), active=acting,
            obs_hash=hash_tokens(seen_obs),
            format_error=ts.info["format_error"] & acting, success=ts.info["success"] & acting,
            terminated=ts.terminated & acting, truncated=ts.truncated & acting,
            summarized=summarise, body=body, body_valid=body_valid, body_logp=body_logp,
            cut=cut, seg=seg, ctx=ctx)
        new_done = done | cut | (acting & ts.done)
        seen_obs = jnp.where(acting[:, None], obs, seen_obs)
        return (new_state, pstate, new_done, seen_obs, ctx, seg), record

    carry0 = (env_state, pstate, jnp.zeros((b,), bool), prompt, prompt_n,
              jnp.zeros((b,), jnp.int32))
    _, rec = jax.lax.scan(turn, carry0, jax.random.split(k_act, env.max_turns))
    rec = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), rec)   # [B, K, ...]
    return assemble_supo_trajectory(env, cfg, prompt, prompt_valid, rec, group_ids)


def assemble_supo_trajectory(env: Env, cfg: SupoConfig, prompt, prompt_valid, rec: dict,
                             group_ids) -> SupoTrajectory:
    """Route every token of the per-turn records ([B,K,...]) to its segment slot.

    The token stream is: prompt (segment 0), then per turn k: ``[<summarize>, body]`` (the
    segment it closes, seg_k − 1), ``[prompt, <summary>, body]`` (the segment it opens, seg_k),
    action and observation (seg_k). Within a segment the stream order is kept; each valid token
    goes to slot ``seg·L + (its rank among its segment's valid tokens)`` by one scatter.
    """
    b, k, a = rec["action"].shape
    o, s_len, big_l, n_seg = env.obs_len, cfg.summary_len, cfg.working_len, cfg.num_segments
    summ = rec["summarized"]                                     # [B,K]
    seg = rec["seg"]                                             # [B,K]
    n_act = rec["action_valid"].sum(-1)
    last = (jnp.arange(a)[None, None] == (n_act - 1)[..., None]) & rec["action_valid"]

    def full(width, value, dtype):
        return jnp.full((b, k, width), value, dtype)

    def bk(x, width):                                            # [B,K] -> [B,K,width]
        return jnp.broadcast_to(x[..., None], (b, k, width))

    prompt_k = jnp.broadcast_to(prompt[:, None], (b, k, o))
    pv_k = jnp.broadcast_to(prompt_valid[:, None], (b, k, o))
    f = lambda w: full(w, False, bool)
    z = lambda w: full(w, 0.0, jnp.float32)
    parts = [  # (tokens, valid, loss, logp, reward, turn_id, turn_end, summary, segment)
        (full(1, vocab.SUMMARIZE, jnp.int32), summ[..., None], f(1), z(1), z(1), full(1, -1, jnp.int32),
         f(1), f(1), bk(seg - 1, 1)),
        (rec["body"], rec["body_valid"], rec["body_valid"], rec["body_logp"], z(s_len),
         full(s_len, -1, jnp.int32), f(s_len), rec["body_valid"], bk(seg - 1, s_len)),
        (prompt_k, pv_k & summ[..., None], f(o), z(o), z(o), full(o, -1, jnp.int32), f(o), f(o), bk(seg, o)),
        (full(1, vocab.SUMMARY, jnp.int32), summ[..., None], f(1), z(1), z(1), full(1, -1, jnp.int32),
         f(1), f(1), bk(seg, 1)),
        (rec["body"], rec["body_valid"], f(s_len), z(s_len), z(s_len), full(s_len, -1, jnp.int32),
         f(s_len), f(s_len), bk(seg, s_len)),
        (rec["action"], rec["action_valid"], rec["action_valid"], rec["logp"],
         jnp.where(last, rec["reward"][..., None], 0.0), bk(jnp.arange(k, dtype=jnp.int32)[None], a),
         last, f(a), bk(seg, a)),
        (rec["obs"], rec["obs_valid"], f(o), z(o), z(o), bk(jnp.arange(k, dtype=jnp.int32)[None], o),
         f(o), f(o), bk(seg, o)),
    ]
    fields = [jnp.concatenate([p[i] for p in parts], axis=2).reshape(b, -1) for i in range(9)]
    zero_row = lambda dt, v=0: jnp.full(prompt.shape, v, dt)
    head = [prompt, prompt_valid, zero_row(bool), zero_row(jnp.float32), zero_row(jnp.float32),
            zero_row(jnp.int32, -1), zero_row(bool), zero_row(bool), zero_row(jnp.int32)]
    stream = [jnp.concatenate([h, x], axis=1) for h, x in zip(head, fields)]
    toks, valid, loss, logp, rew, tids, tend, summary, segs = stream

    onehot = valid[..., None] & (segs[..., None] == jnp.arange(n_seg)[None, None])   # [B,Ts,S]
    rank = jnp.cumsum(onehot, axis=1) - 1
    pos = jnp.take_along_axis(rank, jnp.clip(segs, 0, n_seg - 1)[..., None], axis=2)[..., 0]
    ok = valid & (segs >= 0) & (segs < n_seg) & (pos < big_l)
    dest = jnp.where(ok, segs * big_l + pos, n_seg * big_l)    # out of range → dropped
    rows = jnp.arange(b)[:, None]

    def scatter(x, fill):
        out = jnp.full((b, n_seg * big_l), fill, x.dtype)
        return out.at[rows, dest].set(x, mode="drop")

    valid_out = scatter(ok, False)
    seg_counts = onehot.sum(1)                                   # [B,S]
    return SupoTrajectory(
        tokens=jnp.where(valid_out, scatter(toks, vocab.PAD), vocab.PAD),
        valid=valid_out, loss_mask=scatter(loss & ok, False),
        behaviour_logp=scatter(jnp.where(ok, logp, 0.0), 0.0),
        rewards=scatter(jnp.where(ok, rew, 0.0), 0.0),
        turn_ids=scatter(jnp.where(ok, tids, -1), -1),
        turn_end=scatter(tend & ok, False), summary_mask=scatter(summary & ok, False),
        segment_valid=seg_counts > 0, turn_segment=seg, summarized=summ,
        turn_rewards=rec["reward"], turn_valid=rec["active"], turn_obs_hash=rec["obs_hash"],
        turn_format_error=rec["format_error"],
        num_summaries=summ.sum(-1).astype(jnp.int32), hit_summary_cap=rec["cut"].any(-1),
        episode_return=rec["reward"].sum(-1),
        episode_length=rec["active"].sum(-1).astype(jnp.int32),
        success=rec["success"].any(-1), terminated=rec["terminated"].any(-1),
        truncated=(rec["truncated"].any(-1) | rec["cut"].any(-1)) & ~rec["terminated"].any(-1),
        group_ids=group_ids, working_len=big_l)


def supo_rollout(env: Env, model, params, key: jax.Array, *, cfg: SupoConfig, num_groups: int,
                 group_size: int = 1, sampling: SamplingConfig = SamplingConfig(),
                 shard_rows: Callable[[Any], Any] = lambda tree: tree,
                 limits: tuple[Any, Any] | None = None) -> SupoTrajectory:
    """Sample episodes from the LM policy with summarization (jit this, or call inside jit)."""
    policy = supo_model_policy(model, params, env, sampling, cfg)
    return supo_run_episodes(env, policy, key, num_groups, group_size, cfg=cfg, shard_rows=shard_rows,
                             limits=limits)


def supo_metrics(traj: SupoTrajectory, prefix: str) -> dict:
    return {
        f"{prefix}/summaries": traj.num_summaries.mean(),
        f"{prefix}/hit_summary_cap": traj.hit_summary_cap.mean(),
        f"{prefix}/segments": traj.segment_valid.sum(-1).mean(),
        f"{prefix}/summary_tokens": traj.summary_mask.sum(-1).mean(),
    }


def render_supo_trajectory(traj: SupoTrajectory, row: int) -> str:
    """Readable text of episode ``row``: one line per used segment."""
    lines = []
    s_count, big_l = traj.num_segments, traj.working_len
    toks = np.asarray(traj.tokens[row]).reshape(s_count, big_l)
    valid = np.asarray(traj.valid[row]).reshape(s_count, big_l)
    for s in range(s_count):
        if valid[s].any():
            lines.append(f"[segment {s}, {int(valid[s].sum())} tokens] {vocab.decode(toks[s][valid[s]])}")
    lines.append(f"success={bool(traj.success[row])} return={float(traj.episode_return[row]):.3f} "
                 f"turns={int(traj.episode_length[row])} summaries={int(traj.num_summaries[row])} "
                 f"hit_summary_cap={bool(traj.hit_summary_cap[row])}")
    return "\n".join(lines)


# ============================================================================================
# BC warm start on oracle demos with oracle summaries
# ============================================================================================
def collect_supo_demos(env: Env, cfg: SupoConfig, key: jax.Array, num_episodes: int,
                       epsilon: float = 0.0) -> SupoTrajectory:
    if not 0.0 <= epsilon <= 1.0:
        raise ValueError(f"epsilon must be in [0, 1] (got {epsilon})")
    run = jax.jit(lambda k: supo_run_episodes(env, supo_oracle_policy(env, cfg, epsilon), k,
                                              num_episodes, cfg=cfg))
    return run(key)


def demo_rows(traj: SupoTrajectory, success_only: bool = False, pad_to: int | None = None) -> dict:
    """NumPy SFT rows (tokens, valid, loss_mask) of the used segments, optionally only those of
    successful episodes, right-padded to ``pad_to`` tokens (to mix demos of several L)."""
    r = segment_rows(traj)
    keep = np.asarray(r["segment_valid"])
    if success_only:
        keep &= np.asarray(traj.success)[np.asarray(r["episode"])]
    out = {k: np.asarray(r[k])[keep] for k in ("tokens", "valid", "loss_mask")}
    if pad_to is not None:
        if pad_to < traj.working_len:
            raise ValueError(f"pad_to={pad_to} is shorter than working_len={traj.working_len}")
        extra = pad_to - traj.working_len
        out = {k: np.pad(v, ((0, 0), (0, extra))) for k, v in out.items()}
    return out


def supo_warm_start(env: Env, model, params, key: jax.Array, bc_cfg, cfg: SupoConfig,
                    verbose: bool = False):
    """SFT on the segments of ε-noisy oracle episodes that include oracle summaries."""
    k_demo, k_sft = jax.random.split(key)
    demos = collect_supo_demos(env, cfg, k_demo, bc_cfg.episodes, bc_cfg.epsilon)
    arrays = demo_rows(demos, success_only=bc_cfg.success_only)
    if verbose:
        print(f"[bc/supo] {len(arrays['tokens'])} segments from {bc_cfg.episodes} demo episodes "
              f"(ε={bc_cfg.epsilon}, success {float(demos.success.mean()):.3f}, summaries "
              f"{float(demos.num_summaries.mean()):.2f})", file=sys.stderr, flush=True)
    if len(arrays["tokens"]) == 0:
        raise ValueError("the SUPO demos have no segment to train on (success_only=True and no "
                         "demo succeeded?)")
    return bc_lib.sft_train(model, params, arrays, k_sft, epochs=bc_cfg.epochs,
                            batch_size=min(bc_cfg.batch_size, len(arrays["tokens"])), lr=bc_cfg.lr,
                            decay=getattr(bc_cfg, "decay", "constant"), verbose=verbose)


# ============================================================================================
# Training rows (the "supo" context mode)
# ============================================================================================
def supo_config_from(context) -> tuple[SupoConfig, SupoConfig, bool]:
    """(training SupoConfig, eval SupoConfig, overlong_mask) from ``config.context``."""
    get = (lambda k, d: context.get(k, d)) if hasattr(context, "get") else (
        lambda k, d: getattr(context, k, d))
    if get("working_len", None) is None:
        raise ValueError("config.context.working_len is missing (SUPO needs the working-context length L)")
    train = SupoConfig(working_len=get("working_len", None), summary_len=get("summary_len", 4),
                       max_summaries=get("max_summaries", 4))
    m_eval = get("max_summaries_eval", None)
    m_eval = train.max_summaries if m_eval is None else m_eval
    ev = dataclasses.replace(train, max_summaries=_int("context.max_summaries_eval", m_eval, 0))
    mask = get("overlong_mask", True)
    if not isinstance(mask, bool):
        raise ValueError(f"config.context.overlong_mask must be a bool, got {mask!r}")
    return train, ev, mask


class SupoContext:
    """``config.context.mode = "supo"`` in the trainer (``rl_agents.trainer``): rows are
    episode segments ``[B·S, L]``, outcome advantages shared by all segments of an episode,
    overlong (summary / turn cap) episodes masked out. A critic, KL-in-reward, the overlong
    penalty and learned / process rewards are refused at start-up
    (``rl_agents.algorithms.unsupported_option``)."""

    name = "supo"

    def __init__(self, tr):
        self.supo, self.supo_eval, self.overlong_mask = supo_config_from(tr.config.context)
        self.supo.validate(tr.env)
        self.supo_eval.validate(tr.env)
        self.rows_per_episode = self.supo.num_segments

    def sample(self, tr, params, key, *, num_groups: int, group_size: int,
               eval_mode: bool = False, sampling: SamplingConfig | None = None) -> SupoTrajectory:
        return supo_rollout(tr.env, tr.sampler, tr.sampler_params(params), key,
                            cfg=self.supo_eval if eval_mode else self.supo,
                            num_groups=num_groups, group_size=group_size,
                            sampling=sampling or tr.sampling,
                            shard_rows=(lambda tree: tree) if eval_mode else tr.shard_rows)

    def warm_start(self, tr, policy_params, key, *, verbose: bool = False):
        params, _ = supo_warm_start(tr.env, tr.policy, policy_params, key, tr.config.bc,
                                    self.supo, verbose=verbose)
        return params

    def batch(self, tr, state, traj: SupoTrajectory, row_weight) -> dict:
        ref_logp_fn = None
        if tr.config.rl.kl_coef > 0:
            ref_logp_fn = lambda t, v: tr.logprobs(tr.reference_policy(state), t, v)[0]   # noqa: E731
        return prepare_supo_batch(traj, row_weight, tr.algorithm.estimator,
                                  dict(tr.config.rl.advantage_kwargs), self.overlong_mask,
                                  ref_logp_fn=ref_logp_fn)

    def metrics(self, traj: SupoTrajectory, prefix: str) -> dict:
        out = supo_metrics(traj, prefix)
        if prefix == "rollout":
            out[f"{prefix}/overlong_masked"] = traj.truncated.mean()
        return out


def prepare_supo_batch(traj: SupoTrajectory, episode_weight, estimator: str = "grpo",
                       advantage_kwargs: dict | None = None, overlong_mask: bool = True,
                       ref_logp_fn: Callable | None = None) -> dict:
    """The PPO batch over segment rows ``[B·S, L]``.

    Advantages: ``estimator`` on the episode view (so all segments of an episode share the
    group-relative outcome advantage on their agent tokens). Loss mask: agent tokens of used
    segments of episodes with weight > 0 and, with ``overlong_mask``, not truncated (turn or
    summary cap).
    """
    b, s, length = traj.tokens.shape[0], traj.num_segments, traj.working_len
    inputs = AdvantageInputs(
        rewards=traj.rewards, values=jnp.zeros(traj.rewards.shape, jnp.float32),
        loss_mask=traj.loss_mask, turn_ids=traj.turn_ids, turn_end=traj.turn_end,
        group_ids=traj.group_ids, turn_rewards=traj.turn_rewards, turn_valid=traj.turn_valid,
        turn_obs_hash=traj.turn_obs_hash, episode_return=traj.episode_return)
    adv, returns = compute_advantages(estimator, inputs, **(advantage_kwargs or {}))
    keep = jnp.asarray(episode_weight) > 0
    if overlong_mask:
        keep = keep & ~traj.truncated
    rows = lambda x: x.reshape(b * s, length)
    batch = dict(tokens=rows(traj.tokens), valid=rows(traj.valid),
                 loss_mask=rows(traj.loss_mask & keep[:, None]), old_logp=rows(traj.behaviour_logp),
                 advantages=rows(adv), returns=rows(returns),
                 old_values=jnp.zeros((b * s, length), jnp.float32))
    if ref_logp_fn is not None:
        batch["ref_logp"] = ref_logp_fn(batch["tokens"], batch["valid"])
    return batch
