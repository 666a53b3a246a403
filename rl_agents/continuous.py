"""Continuous rollouts (``config.rollout.mode = "continuous"``): episodes carried across updates.

A synchronous update samples B fresh episodes and waits for the longest one: ``max_turns``
turn steps however short the others are. In continuous mode the rollout itself lives in the
training state (``CarriedRollout``: env states, KV caches, next-token logits and the turn
records of S = ``slot_groups`` × G slots), and each update runs turn steps over all slots
until its buffer holds ``rollout.num_groups`` complete groups (``until_full``), at most
``turns_per_update`` of them (without ``until_full``: always that many):

* a turn step is the synchronous rollout's turn: every slot still in an episode samples its
  action (KV-cached, ``rollout.generate``), the envs step (``vmap``), the observation is
  prefilled. Each turn records its behaviour log-probs and the **policy version** (the update
  index) that sampled it; the trajectory carries it per token (``behaviour_version``);
* **groups.** The G slots of a group hold G episodes of one task instance (same reset key),
  started together. When all G have ended, the group is complete: it is written to this
  update's training buffer and its slots start a fresh task (env reset, prompt prefilled into
  a fresh cache of the starting rows, ``start_batch_groups`` groups per prefill, then written
  over the slots' carried cache rows). A group-relative estimator therefore always sees G
  whole episodes of one task; the cost is that a group's early finishers idle until its last
  member ends (as in synchronous mode), but no group waits for another;
* the buffer holds ``rollout.num_groups`` groups (the synchronous batch). Groups that complete
  when it is full wait, ended, and go into the next update's buffer. Buffer rows not filled
  (the step budget ran out first) get row weight 0;
* an episode not finished at the end of an update **continues in the next update** under the
  new parameters, its KV cache as it was (tokens attend to keys / values computed by older
  parameters). ``reprefill = True`` instead recomputes every slot's cache from its token
  history at the start of each update (one forward pass over the slots);
* **staleness.** An episode whose first turn was sampled more than ``max_staleness`` updates
  before the update that would train on it is dropped (its group restarts) and counted. The
  loss corrects for stale tokens through their recorded behaviour log-probs (the ratio
  π_θ/μ, or ``rl.correction`` = ``tis`` / ``mis`` against the trainer's π_old).

Everything is fixed-shape and jitted inside the update; the carried state is part of the
checkpoint, so a resumed run continues its in-flight episodes exactly.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

import models
from envs.wrappers import put_rows, tree_select
from rl_agents.hashing import hash_tokens
from rl_agents.rollout import _prefix_valid, assemble_trajectory, model_policy, play_turn

#: turn-record fields of ``rollout.run_episodes`` plus the sampling version
_NO_VERSION = jnp.iinfo(jnp.int32).max


class ContinuousSettings(NamedTuple):
    slot_groups: int         # groups of G slots carried (S = slot_groups · G rows)
    turns_per_update: int    # turn steps per update (the most, with ``until_full``)
    max_staleness: int       # drop episodes first sampled more than this many updates ago
    reprefill: bool          # rebuild the carried KV caches at each update's start
    until_full: bool         # stop an update's turn steps once its buffer is full


def settings_from_config(config) -> ContinuousSettings | None:
    """The continuous settings of ``config.rollout`` (None in ``"sync"`` mode)."""
    r = config.rollout
    mode = r.get("mode", "sync")
    if mode == "sync":
        return None
    if mode != "continuous":
        raise ValueError(f"config.rollout.mode={mode!r} is not one of ['sync', 'continuous']")
    c = r.continuous
    return ContinuousSettings(slot_groups=slot_groups(config),
                              turns_per_update=int(c.turns_per_update),
                              max_staleness=int(c.max_staleness), reprefill=bool(c.reprefill),
                              until_full=bool(c.until_full))


def slot_groups(config) -> int:
    """``rollout.continuous.slot_groups``, 0 meaning 2 × ``rollout.num_groups``."""
    return int(config.rollout.continuous.slot_groups) or 2 * int(config.rollout.num_groups)


def turn_budget(settings: ContinuousSettings, env) -> int:
    """Turn steps an update may run: ``turns_per_update``, 0 meaning ``env.max_turns``."""
    return settings.turns_per_update or env.max_turns


@struct.dataclass
class CarriedRollout:
    """The rollout in flight, S slots (``ContinuousSettings``), NG = S / G groups."""
    env_state: Any             # [S] env states
    cache: models.KVCache      # the sampler's KV cache, S rows
    logits: jax.Array          # f32 [S, V]: next-token logits of each slot
    prompt: jax.Array          # int32 [S, P]
    prompt_valid: jax.Array    # bool [S, P]
    rec: dict                  # turn records [S, K, ...] of the episode in flight (+ "version")
    turn: jax.Array            # int32 [S]: turns taken
    done: jax.Array            # bool [S]: the slot's episode has ended
    seen_hash: jax.Array       # uint32 [S]: hash of the observation the next turn acts on
    has_episode: jax.Array     # bool [NG]: the group holds episodes (False: start one)
    first_version: jax.Array   # int32 [NG]: version of the group's first turn (max int: none)


def _empty_records(env, s: int) -> dict:
    k, a, o = env.max_turns, env.action_len, env.obs_len
    z = lambda shape, dt: jnp.zeros(shape, dt)
    return dict(action=jnp.full((s, k, a), env.fill_id, jnp.int32), action_valid=z((s, k, a), bool),
                logp=z((s, k, a), jnp.float32), obs=jnp.full((s, k, o), env.fill_id, jnp.int32),
                obs_valid=z((s, k, o), bool), reward=z((s, k), jnp.float32),
                active=z((s, k), bool), obs_hash=z((s, k), jnp.uint32),
                format_error=z((s, k), bool), success=z((s, k), bool),
                terminated=z((s, k), bool), truncated=z((s, k), bool),
                version=jnp.full((s, k), -1, jnp.int32))


def init_carried(env, sampler: models.PolicyModel, settings: ContinuousSettings,
                 group_size: int) -> CarriedRollout:
    """No episode in flight: every group starts one in the first update (under its params)."""
    s = settings.slot_groups * group_size
    env_state, ts = jax.vmap(env.reset)(jax.random.split(jax.random.PRNGKey(0), s))
    prompt = jnp.full(ts.observation.shape, env.fill_id, jnp.int32)
    cache = models.init_cache(sampler.cfg, s, env.max_episode_tokens)
    v = sampler.cfg.vocab_limit or sampler.cfg.vocab_size
    return CarriedRollout(
        env_state=env_state, cache=cache, logits=jnp.zeros((s, v), jnp.float32), prompt=prompt,
        prompt_valid=jnp.zeros(prompt.shape, bool), rec=_empty_records(env, s),
        turn=jnp.zeros((s,), jnp.int32), done=jnp.ones((s,), bool),
        seen_hash=jnp.zeros((s,), jnp.uint32),
        has_episode=jnp.zeros((settings.slot_groups,), bool),
        first_version=jnp.full((settings.slot_groups,), _NO_VERSION, jnp.int32))


@struct.dataclass
class _Buffer:
    prompt: jax.Array
    prompt_valid: jax.Array
    rec: dict
    count: jax.Array           # int32 []: groups written


def start_batch_groups(num_slot_groups: int) -> int:
    """Groups one start prefill handles: ⌈NG / 4⌉ (more starting groups take more rounds)."""
    return max(1, -(-num_slot_groups // 4))


def _start_groups(env, sampler, params, c: CarriedRollout, start, key, group_size: int):
    """Slots of the groups in ``start`` [NG] begin a fresh task: G rows of one reset key (the
    group's own of ``split(key, NG)``), records cleared, cache rows replaced by the prompt's.

    The prompts are prefilled into a fresh cache of ``start_batch_groups(NG)`` groups at a time
    (gathered, then scattered into the carried rows), so a start costs a prefill of the starting
    rows alone, whose attention reads the prompt, not the carried slots' depth."""
    ng = start.shape[0]
    g = group_size
    n = start_batch_groups(ng)
    keys = jax.random.split(key, ng)
    offsets = jnp.arange(g)

    def start_some(state):
        c, todo = state
        idx = jnp.nonzero(todo, size=n, fill_value=ng)[0]         # [n] groups, ng = none
        ok = idx < ng
        rows = (idx[:, None] * g + offsets[None]).reshape(-1)      # [n·G], >= S: none
        env_state, ts = jax.vmap(env.reset)(jnp.repeat(keys[jnp.minimum(idx, ng - 1)], g,
                                                       axis=0))
        prompt = ts.observation.astype(jnp.int32)
        valid = _prefix_valid(prompt, env.fill_id) & jnp.repeat(ok, g)[:, None]
        # the barrier keeps XLA from constant-folding attention over the zero cache
        fresh = jax.lax.optimization_barrier(models.init_cache(sampler.cfg, n * g,
                                                                c.cache.max_len))
        logits, fresh = models.prefill(sampler, params, jnp.where(valid, prompt, 0), fresh,
                                       valid=valid, last_only=True)
        put = lambda dst, src, axis=0: put_rows(dst, rows, src, axis)
        cache = c.cache.replace(k=put(c.cache.k, fresh.k, 1), v=put(c.cache.v, fresh.v, 1),
                                lengths=put(c.cache.lengths, fresh.lengths))
        empty = _empty_records(env, n * g)
        c = c.replace(
            env_state=jax.tree.map(put, c.env_state, env_state), cache=cache,
            logits=put(c.logits, logits.astype(jnp.float32)), prompt=put(c.prompt, prompt),
            prompt_valid=put(c.prompt_valid, valid),
            rec=jax.tree.map(put, c.rec, empty), turn=put(c.turn, jnp.zeros((n * g,), jnp.int32)),
            done=put(c.done, jnp.zeros((n * g,), bool)),
            seen_hash=put(c.seen_hash, hash_tokens(prompt)))
        return c, todo.at[idx].set(False, mode="drop")

    c, _ = jax.lax.while_loop(lambda state: state[1].any(), start_some, (c, start))
    return c.replace(has_episode=c.has_episode | start,
                     first_version=jnp.where(start, _NO_VERSION, c.first_version))


def _emit_and_start(env, sampler, params, c: CarriedRollout, buf: _Buffer, key, version,
                    settings: ContinuousSettings, group_size: int, capacity: int):
    """Complete groups go into the buffer while it has room; groups too stale are dropped;
    emitted, dropped and empty groups start fresh tasks. → (carried, buffer, counts)."""
    g = group_size
    ng = c.has_episode.shape[0]
    ended = c.done.reshape(ng, g).all(-1)
    started = c.first_version != _NO_VERSION
    stale = c.has_episode & started & (version - c.first_version > settings.max_staleness)
    complete = c.has_episode & ended & ~stale
    pos = buf.count + jnp.cumsum(complete) - 1
    emit = complete & (pos < capacity)
    row_idx = (jnp.where(emit, pos, capacity)[:, None] * g + jnp.arange(g)[None]).reshape(-1)
    put = lambda dst, src: dst.at[row_idx].set(src, mode="drop")
    buf = _Buffer(prompt=put(buf.prompt, c.prompt), prompt_valid=put(buf.prompt_valid,
                                                                       c.prompt_valid),
                  rec=jax.tree.map(put, buf.rec, c.rec), count=buf.count + emit.sum())
    start = ~c.has_episode | emit | stale
    c = _start_groups(env, sampler, params, c, start, key, g)
    return c, buf, dict(dropped=stale.sum(), waiting=(complete & ~emit).sum())


def _turn_step(env, policy, c: CarriedRollout, key, version):
    """One turn of every slot still in an episode (``rollout.run_episodes``'s turn), the
    records written at each slot's own turn index."""
    active = ~c.done
    new_state, (cache, logits), ts, record = play_turn(env, policy, c.env_state,
                                                       (c.cache, c.logits), active,
                                                       c.seen_hash, key)
    record["version"] = jnp.full(active.shape, version, jnp.int32)
    obs = record["obs"]
    s = active.shape[0]
    idx = jnp.where(active, c.turn, env.max_turns)          # inactive rows: dropped writes
    rec = {k: v.at[jnp.arange(s), idx].set(record[k], mode="drop") for k, v in c.rec.items()}
    g = c.has_episode.shape[0]
    first = (active & (c.turn == 0)).reshape(g, -1).any(-1)
    return c.replace(
        env_state=tree_select(active, new_state, c.env_state), cache=cache,
        logits=logits.astype(jnp.float32), rec=rec, turn=c.turn + active,
        done=c.done | (active & (ts.done | (c.turn + 1 >= env.max_turns))),
        seen_hash=jnp.where(active, hash_tokens(obs), c.seen_hash),
        first_version=jnp.where(first, version, c.first_version))


def _reprefill(env, sampler, params, c: CarriedRollout, group_size: int) -> CarriedRollout:
    """Every slot's cache rebuilt from its token history under ``params``."""
    s = c.turn.shape[0]
    rec = {k: v for k, v in c.rec.items() if k != "version"}
    hist = assemble_trajectory(env, c.prompt, c.prompt_valid, rec,
                               jnp.arange(s, dtype=jnp.int32) // group_size)
    # the barrier keeps XLA from constant-folding attention over the all-zero cache at compile
    # time (as in ``rollout.model_policy``)
    cache = jax.lax.optimization_barrier(models.init_cache(sampler.cfg, s,
                                                           env.max_episode_tokens))
    logits, cache = models.prefill(sampler, params, jnp.where(hist.valid, hist.tokens, 0), cache,
                                   valid=hist.valid, last_only=True)
    return c.replace(cache=cache, logits=jnp.where(hist.valid.any(-1)[:, None],
                                                   logits.astype(jnp.float32), c.logits))


def continue_rollout(env, sampler, params, sampling, carried: CarriedRollout, key, version,
                     settings: ContinuousSettings, *, group_size: int, capacity: int):
    """One update's rollout: turn steps over the carried slots until the buffer is full
    (``until_full``) or ``turn_budget`` steps have run (module doc). ``params`` are the
    sampler's; ``version`` the update index. Returns ``(carried, trajectory [capacity·G rows],
    row_weight [capacity·G], metrics)``."""
    g = group_size
    b = capacity * g
    policy = model_policy(sampler, params, env, sampling)
    prompt_shape = carried.prompt.shape[1:]
    buf = _Buffer(prompt=jnp.full((b,) + prompt_shape, env.fill_id, jnp.int32),
                  prompt_valid=jnp.zeros((b,) + prompt_shape, bool),
                  rec=_empty_records(env, b), count=jnp.zeros((), jnp.int32))
    emit = lambda c, buf, k: _emit_and_start(env, sampler, params, c, buf, k, version, settings,
                                             g, capacity)
    k_first, k_steps = jax.random.split(key)
    carried, buf, first_counts = emit(carried, buf, k_first)
    if settings.reprefill:
        carried = _reprefill(env, sampler, params, carried, g)

    budget = turn_budget(settings, env)
    step_keys = jax.random.split(k_steps, budget)
    zero = jnp.zeros((), jnp.int32)

    def more(state):
        step, _, buf, _ = state
        going = step < budget
        return going & (buf.count < capacity) if settings.until_full else going

    def body(state):
        step, c, buf, acc = state
        k_turn, k_start = jax.random.split(step_keys[step])
        generated_before = c.rec["action_valid"].sum()
        c = _turn_step(env, policy, c, k_turn, version)
        generated = c.rec["action_valid"].sum() - generated_before
        c, buf, counts = emit(c, buf, k_start)
        acc = dict(dropped=acc["dropped"] + counts["dropped"], waiting=counts["waiting"],
                   generated=acc["generated"] + generated)
        return step + 1, c, buf, acc

    steps, carried, buf, acc = jax.lax.while_loop(
        more, body, (zero, carried, buf, dict(dropped=zero, waiting=first_counts["waiting"],
                                              generated=zero)))
    rec = {k: v for k, v in buf.rec.items() if k != "version"}
    traj = assemble_trajectory(env, buf.prompt, buf.prompt_valid, rec,
                               jnp.arange(b, dtype=jnp.int32) // g)
    row_weight = (jnp.arange(b) < buf.count * g).astype(jnp.float32)
    # staleness of the trained tokens: this update's index minus the version that sampled them
    turn_version = buf.rec["version"]
    tok_version = jnp.take_along_axis(turn_version, jnp.maximum(traj.turn_ids, 0), axis=1)
    traj = traj.replace(behaviour_version=jnp.where(traj.loss_mask, tok_version, -1))
    trained = traj.loss_mask & (row_weight[:, None] > 0)
    staleness = jnp.where(trained, version - tok_version, 0)
    n_trained = jnp.maximum(trained.sum(), 1)
    metrics = {
        "continuous/groups_completed": buf.count,
        "continuous/groups_dropped_stale": first_counts["dropped"] + acc["dropped"],
        "continuous/groups_waiting": acc["waiting"],
        "continuous/turn_steps": steps,
        "continuous/staleness_mean": staleness.sum() / n_trained,
        "continuous/staleness_max": staleness.max(),
        "continuous/generated_tokens": acc["generated"],
        "continuous/trained_tokens": trained.sum(),
        "continuous/slots_in_episode": (~carried.done).sum(),
    }
    return carried, traj, row_weight, metrics
