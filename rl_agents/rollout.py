"""On-device multi-turn rollout: KV-cached generation interleaved with jitted env steps.

One ``lax.scan`` over turns. Inside a turn the policy samples its action token by token
(``lax.scan`` over the turn's token budget, one ``decode_step`` of the whole batch per token,
stopping each row at ``<eos>``), the batch of environments steps once (``vmap``), and the
observation is appended to the KV cache with one ``prefill`` of the chunk: the history is never
re-encoded. Shapes are fixed: every row has the same token budget, and finished rows keep
stepping as no-ops (nothing is written to their cache, nothing enters their loss).

The result is a ``Trajectory`` in *compact layout*: each row holds its episode's real tokens
left-aligned (prompt, action, observation, action, ...) and ``<pad>`` after, so a plain causal
forward pass with ``positions = arange(T)`` recomputes exactly the sampler's log-probs.

Group sampling: ``num_groups`` task instances, each rolled out ``group_size`` times from the
same environment key (same hidden task), with independent sampling keys; ``group_ids`` names
the instance of each row.

Random numbers do not depend on the device mesh: each token step draws the whole batch with one
key, and under ``jit`` an element's random bits are a function of the key and its global index,
never of how the rows are sharded. Given the same logits, a row samples the same tokens on
every mesh (docs/determinism.md).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

import models
from envs import vocab
from envs.base import Env
from rl_agents.hashing import hash_tokens
from rl_agents.sampling import SamplingConfig, sample_tokens


@struct.dataclass
class Trajectory:
    """A batch of B episodes, compact layout, T = Env.max_episode_tokens, K = Env.max_turns."""
    tokens: jax.Array          # int32 [B,T]: real tokens left-aligned, <pad> after
    valid: jax.Array           # bool  [B,T]: real tokens (a prefix of each row)
    loss_mask: jax.Array       # bool  [B,T]: tokens the agent generated (incl. its <eos>)
    behaviour_logp: jax.Array  # f32   [B,T]: log π_old(token) under the tempered sampler; 0 elsewhere
    rewards: jax.Array         # f32   [B,T]: turn k's reward on turn k's last agent token
    turn_ids: jax.Array        # int32 [B,T]: turn of each action / observation token; -1 prompt / pad
    turn_end: jax.Array        # bool  [B,T]: last agent token of each turn
    turn_rewards: jax.Array    # f32   [B,K]
    turn_valid: jax.Array      # bool  [B,K]: the agent acted at turn k
    turn_obs_hash: jax.Array   # uint32 [B,K]: hash of the observation seen when acting at turn k
    turn_format_error: jax.Array  # bool [B,K]
    episode_return: jax.Array  # f32   [B]
    episode_length: jax.Array  # int32 [B]: turns taken
    success: jax.Array         # bool  [B]
    terminated: jax.Array      # bool  [B]
    truncated: jax.Array       # bool  [B]
    group_ids: jax.Array       # int32 [B]
    behaviour_version: Any = None  # int32 [B,T]: the update that sampled each agent token, −1
    #                                elsewhere (continuous rollouts; None: all sampled by this update)

    @property
    def num_tokens(self) -> jax.Array:
        return self.valid.sum(-1)


class TurnOutput(NamedTuple):
    action: jax.Array        # int32 [B,A]
    action_valid: jax.Array  # bool [B,A]
    logp: jax.Array          # f32 [B,A]


# --------------------------------------------------------------------------------------------
# Policies: how a turn's action is produced. A policy is three pure functions over a carried
# policy state (the model's KV cache and next-token logits; nothing for the oracle).
# --------------------------------------------------------------------------------------------
class TurnPolicy(NamedTuple):
    init: Callable[[jax.Array, jax.Array], Any]                       # (prompt, valid) -> pstate
    act: Callable[[Any, Any, jax.Array, jax.Array], tuple[TurnOutput, Any]]  # (pstate, env_states, active, key)
    observe: Callable[[Any, jax.Array, jax.Array], Any]               # (pstate, obs, valid) -> pstate


def generate(model, params, sampling: SamplingConfig, cache, logits, rows, key, n: int,
             stop_ids=(vocab.EOS,), fill_id: int = vocab.PAD, fill_ends_action: bool = True):
    """Sample up to ``n`` tokens per row of ``rows`` from ``logits`` onward, one ``decode_step``
    of the whole batch per token, each row stopping after its first id in ``stop_ids`` (or a
    sampled ``fill_id`` when ``fill_ends_action``: the symbol vocabulary's ``<pad>``, where the
    env stops reading); returns ``(TurnOutput [B,n], cache, logits)``, ``fill_id`` where a row
    emitted nothing. Rows not in ``rows`` write nothing to the cache."""
    stops = jnp.asarray(stop_ids, jnp.int32)

    def token_step(carry, step_key):
        cache, logits, finished = carry
        tok, lp = sample_tokens(logits, step_key, sampling)
        emit = rows & ~finished
        lp = jnp.where(emit, lp, 0.0)
        new_logits, cache = models.decode_step(model, params, jnp.where(emit, tok, 0), cache,
                                               valid=emit)
        logits = jnp.where(emit[:, None], new_logits, logits)
        ends = (tok[:, None] == stops[None]).any(-1)
        if fill_ends_action:
            ends = ends | (tok == fill_id)
        finished = finished | (emit & ends)
        tok = jnp.where(emit, tok, fill_id)
        return (cache, logits, finished), (tok, emit, lp)

    finished = jnp.zeros(rows.shape, bool)
    (cache, logits, _), (toks, emits, lps) = jax.lax.scan(
        token_step, (cache, logits, finished), jax.random.split(key, n))
    return TurnOutput(toks.T, emits.T, lps.T), cache, logits


def model_policy(model: models.PolicyModel, params: Any, env: Env, sampling: SamplingConfig,
                 max_len: int | None = None) -> TurnPolicy:
    """The language-model policy: KV-cached sampling of each turn, observations prefilled."""
    max_len = max_len or env.max_episode_tokens

    def init(prompt, valid):
        # the barrier stops XLA from constant-folding attention over the all-zero cache at
        # compile time (seconds per layer on CPU)
        cache = jax.lax.optimization_barrier(models.init_cache(model.cfg, prompt.shape[0], max_len))
        prompt = jnp.where(valid, prompt, 0)          # the fill is not a token id (bridged envs)
        logits, cache = models.prefill(model, params, prompt, cache, valid=valid, last_only=True)
        return cache, jnp.where(valid.any(-1)[:, None], logits, 0.0)

    def act(pstate, env_states, active, key):
        del env_states
        cache, logits = pstate
        out, cache, logits = generate(model, params, sampling, cache, logits, active, key,
                                      env.action_len, env.stop_ids, env.fill_id,
                                      env.fill_ends_action)
        return out, (cache, logits)

    def observe(pstate, obs, valid):
        cache, logits = pstate
        obs = jnp.where(valid, obs, 0)
        new_logits, cache = models.prefill(model, params, obs, cache, valid=valid, last_only=True)
        return cache, jnp.where(valid.any(-1)[:, None], new_logits, logits)

    return TurnPolicy(init, act, observe)


def action_valid_mask(action: jax.Array, stop_ids=(vocab.EOS,), fill_id: int = vocab.PAD) -> jax.Array:
    """Ids up to and including the first stop id, ending at the first ``fill_id``: [.., A] bool."""
    not_fill = jnp.cumprod(action != fill_id, axis=-1).astype(bool)
    is_stop = (action[..., None] == jnp.asarray(stop_ids, action.dtype)).any(-1)
    stop_before = jnp.cumsum(is_stop, axis=-1) - is_stop
    return not_fill & (stop_before == 0)


def oracle_policy(env: Env, epsilon: float = 0.0) -> TurnPolicy:
    """The env's expert; with probability ``epsilon`` per turn a uniformly random action instead
    (random tokens then ``<eos>``: usually a format error), for noisy demonstrations."""
    def init(prompt, valid):
        return ()

    # a tokenizer-bridged env draws its random actions as env symbols and renders them
    render = getattr(env, "render_action", None)
    sym_len = env.env.action_len if render is not None else env.action_len

    def act(pstate, env_states, active, key):
        b = active.shape[0]
        k_oracle, k_coin, k_rand = jax.random.split(key, 3)
        oracle = jax.vmap(env.oracle_action)(env_states, jax.random.split(k_oracle, b))
        rand_len = jax.random.randint(k_rand, (b, 1), 1, sym_len)
        rand_tok = jax.random.randint(jax.random.fold_in(k_rand, 1), (b, sym_len), 2, vocab.size)
        pos = jnp.arange(sym_len)[None]
        random_action = jnp.where(pos < rand_len, rand_tok, jnp.where(pos == rand_len, vocab.EOS, vocab.PAD))
        if render is not None:
            random_action = jax.vmap(render)(random_action)
        use_random = jax.random.uniform(k_coin, (b,)) < epsilon
        action = jnp.where(use_random[:, None], random_action, oracle).astype(jnp.int32)
        action = jnp.where(active[:, None], action, env.fill_id)
        valid = action_valid_mask(action, env.stop_ids, env.fill_id)
        return TurnOutput(action, valid, jnp.zeros(action.shape, jnp.float32)), pstate

    def observe(pstate, obs, valid):
        return pstate

    return TurnPolicy(init, act, observe)


# --------------------------------------------------------------------------------------------
# The episode runner.
# --------------------------------------------------------------------------------------------
def _prefix_valid(row: jax.Array, fill_id: int = vocab.PAD) -> jax.Array:
    return jnp.cumprod(row != fill_id, axis=-1).astype(bool)


def compact(tree_tokens_first: dict[str, jax.Array], valid: jax.Array) -> tuple[dict, jax.Array]:
    """Move each row's valid entries to the front (stable order); others after. Per-token leaves."""
    order = jnp.argsort(~valid, axis=-1, stable=True)
    out = {k: jnp.take_along_axis(v, order, axis=1) for k, v in tree_tokens_first.items()}
    return out, jnp.take_along_axis(valid, order, axis=1)


def play_turn(env: Env, policy: TurnPolicy, env_state, pstate, active, seen_hash, key):
    """One turn of the rows in ``active``: the policy acts, the envs step (``vmap``), the
    observation is fed back. Returns ``(new env states, pstate, timestep, record)``, the record
    holding the turn's per-row fields (action, masks, behaviour log-probs, observation, reward,
    flags; ``obs_hash`` = ``seen_hash``, the observation acted on)."""
    out, pstate = policy.act(pstate, env_state, active, key)
    action = jnp.where(out.action_valid, out.action, env.fill_id)
    new_state, ts = jax.vmap(env.step)(env_state, action)
    obs = jnp.where(active[:, None], ts.observation.astype(jnp.int32), env.fill_id)
    obs_valid = _prefix_valid(obs, env.fill_id) & active[:, None]
    pstate = policy.observe(pstate, obs, obs_valid)
    reward = jnp.where(active, ts.reward, 0.0).astype(jnp.float32)
    record = dict(
        action=action, action_valid=out.action_valid & active[:, None],
        logp=jnp.where(out.action_valid, out.logp, 0.0), obs=obs, obs_valid=obs_valid,
        reward=reward, active=active, obs_hash=seen_hash,
        format_error=ts.info["format_error"] & active, success=ts.info["success"] & active,
        terminated=ts.terminated & active, truncated=ts.truncated & active)
    return new_state, pstate, ts, record


def run_episodes(env: Env, policy: TurnPolicy, key: jax.Array, num_groups: int,
                 group_size: int = 1, reset_keys: jax.Array | None = None,
                 shard_rows: Callable[[Any], Any] = lambda tree: tree) -> Trajectory:
    """Roll out ``num_groups * group_size`` episodes of ``env`` with ``policy``; see module doc.

    ``shard_rows`` constrains batch-leading arrays (e.g. to the mesh's data axes) so that each
    device steps its own slice of the episodes.
    """
    b = num_groups * group_size
    k_reset, k_act = jax.random.split(key)
    if reset_keys is None:
        reset_keys = jax.random.split(k_reset, num_groups)
    reset_keys = jnp.repeat(reset_keys, group_size, axis=0)
    group_ids = jnp.repeat(jnp.arange(num_groups, dtype=jnp.int32), group_size)

    reset_keys = shard_rows(reset_keys)
    env_state, ts = shard_rows(jax.vmap(env.reset)(reset_keys))
    prompt = ts.observation.astype(jnp.int32)
    prompt_valid = _prefix_valid(prompt, env.fill_id)
    pstate = policy.init(prompt, prompt_valid)

    def turn(carry, turn_key):
        env_state, pstate, done, seen_hash = carry
        active = ~done
        new_state, pstate, ts, record = play_turn(env, policy, env_state, pstate, active,
                                                  seen_hash, turn_key)
        new_done = done | (active & ts.done)
        # the observation the next turn acts on (the prompt before the first turn)
        seen_hash = jnp.where(active, hash_tokens(record["obs"]), seen_hash)
        return (new_state, pstate, new_done, seen_hash), record

    done0 = jnp.zeros((b,), bool)
    _, rec = jax.lax.scan(turn, (env_state, pstate, done0, hash_tokens(prompt)),
                          jax.random.split(k_act, env.max_turns))
    rec = jax.tree.map(lambda x: jnp.swapaxes(x, 0, 1), rec)   # [B, K, ...]
    return assemble_trajectory(env, prompt, prompt_valid, rec, group_ids)


def assemble_trajectory(env: Env, prompt, prompt_valid, rec: dict, group_ids) -> Trajectory:
    """Interleave per-turn records ([B,K,...]) into token rows and compact them."""
    b, k, a = rec["action"].shape
    o = env.obs_len
    n_act = rec["action_valid"].sum(-1)                                        # [B,K]
    last = (jnp.arange(a)[None, None] == (n_act - 1)[..., None]) & rec["action_valid"]
    turn_idx = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32)[None, :, None], (b, k, a + o))

    def rows(action_part, obs_part, prompt_part):
        chunk = jnp.concatenate([action_part, obs_part], axis=2).reshape(b, k * (a + o))
        return jnp.concatenate([prompt_part, chunk], axis=1)

    zeros_o = lambda dt: jnp.zeros((b, k, o), dt)
    per_token = dict(
        tokens=rows(rec["action"], rec["obs"], prompt),
        loss_mask=rows(rec["action_valid"], zeros_o(bool), jnp.zeros_like(prompt_valid)),
        behaviour_logp=rows(rec["logp"], zeros_o(jnp.float32), jnp.zeros(prompt.shape, jnp.float32)),
        rewards=rows(jnp.where(last, rec["reward"][..., None], 0.0), zeros_o(jnp.float32),
                     jnp.zeros(prompt.shape, jnp.float32)),
        turn_ids=rows(turn_idx[..., :a], turn_idx[..., a:], jnp.full(prompt.shape, -1, jnp.int32)),
        turn_end=rows(last, zeros_o(bool), jnp.zeros_like(prompt_valid)),
    )
    valid = rows(rec["action_valid"], rec["obs_valid"], prompt_valid)
    per_token, valid = compact(per_token, valid)
    tokens = jnp.where(valid, per_token["tokens"], vocab.PAD)
    return Trajectory(
        tokens=tokens, valid=valid,
        loss_mask=per_token["loss_mask"] & valid,
        behaviour_logp=jnp.where(valid, per_token["behaviour_logp"], 0.0),
        rewards=jnp.where(valid, per_token["rewards"], 0.0),
        turn_ids=jnp.where(valid, per_token["turn_ids"], -1),
        turn_end=per_token["turn_end"] & valid,
        turn_rewards=rec["reward"], turn_valid=rec["active"],
        turn_obs_hash=rec["obs_hash"], turn_format_error=rec["format_error"],
        episode_return=rec["reward"].sum(-1), episode_length=rec["active"].sum(-1).astype(jnp.int32),
        success=rec["success"].any(-1), terminated=rec["terminated"].any(-1),
        truncated=rec["truncated"].any(-1) & ~rec["terminated"].any(-1),
        group_ids=group_ids)


def rollout(env: Env, model: models.PolicyModel, params: Any, key: jax.Array, *, num_groups: int,
            group_size: int = 1, sampling: SamplingConfig = SamplingConfig(),
            shard_rows: Callable[[Any], Any] = lambda tree: tree) -> Trajectory:
    """Sample ``num_groups × group_size`` episodes from the policy (jit this, or call inside jit)."""
    policy = model_policy(model, params, env, sampling)
    return run_episodes(env, policy, key, num_groups, group_size, shard_rows=shard_rows)


def render_trajectory(env: Env, traj: Trajectory, row: int) -> str:
    """Readable text of episode ``row`` of a trajectory (via ``envs.render.render_episode``)."""
    import numpy as np

    from envs.render import render_episode

    valid = np.asarray(traj.valid[row])
    toks = np.asarray(traj.tokens[row])[valid]
    mask = np.asarray(traj.loss_mask[row])[valid]
    tokenizer = getattr(env, "tokenizer", None)
    if tokenizer is not None:      # a tokenizer-bridged env: the episode as the model saw it
        return (f"{env.name} episode ({len(toks)} tokens, {int(traj.episode_length[row])} turns, "
                f"return {float(traj.episode_return[row]):+.2f})\n"
                + tokenizer.decode([int(t) for t in toks]))
    turn_ids = np.asarray(traj.turn_ids[row])[valid]
    n = int(traj.episode_length[row])
    acts = np.full((n, env.action_len), vocab.PAD, np.int32)
    obs = np.full((n, env.obs_len), vocab.PAD, np.int32)
    for k in range(n):
        a = toks[(turn_ids == k) & mask][: env.action_len]
        o = toks[(turn_ids == k) & ~mask][: env.obs_len]
        acts[k, : len(a)] = a
        obs[k, : len(o)] = o
    prompt = toks[turn_ids == -1]
    dones = np.zeros(n, bool)
    if n:
        dones[-1] = True
    return render_episode(env, prompt, acts, obs, np.asarray(traj.turn_rewards[row])[:n], dones=dones)
