"""ArCHer (Zhou et al., 2024): a hierarchical actor-critic for multi-turn LLM agents.

High level — an *off-policy turn-level critic*. A ``ValueModel`` (own params, trunk initialised
from the (BC) policy, zero head) is read at turn boundaries: V(s_k) is the value head at the
last token of the history before turn k's first agent token (the prompt's last token for
k = 0, turn k−1's last observation token after). It is trained by TD(0) over turns from a
replay buffer of past episodes (the fresh rollout is inserted every update, the oldest episodes
are overwritten):

    y_k = R_k + γ · 1[turn k+1 happened] · V̄(s_{k+1}),      L = mean_{valid k} (V(s_k) − y_k)²

with V̄ a Polyak-averaged target network (V̄ ← (1−τ)·V̄ + τ·V after every critic step) and
``critic_updates`` minibatch steps of ``critic_batch`` episodes sampled uniformly from the
filled replay slots, all inside the one jitted update (``lax.scan``). R_k is turn k's reward
(plus any KL-in-reward / overlong penalty folded into that turn, as the PPO trainer does). The
last turn of an episode — terminated or truncated alike — bootstraps 0 (the repo's convention:
the rollout gives no bootstrap state after the turn cap).

Low level — the *token policy*. After the critic steps, the online critic scores the fresh
on-policy batch, the turn advantage is turn-level GAE over those values (``masked_gae`` on
[B, K]): δ_k = R_k + γ V(s_{k+1}) − V(s_k), A_k = δ_k + γλ A_{k+1}; λ = 0 (the recipe) is
ArCHer's one-step advantage r + γV(s') − V(s), the sampled estimate of Q(s_k, a_k) − V(s_k).
A_k is broadcast to every agent token of turn k (optionally whitened) and trained with the
shared PPO-clip token loss (``losses.ppo_policy_loss``; aggregation, clip range, entropy and KL
settings from ``config.rl``) for ``epochs × minibatches`` steps.

Q and V. ArCHer learns both Q(s, a) (target r + γV̄(s')) and V(s) (target Q̄(s, a') with
a' ~ π freshly sampled at the replayed state). Sampling π's action at every replayed turn would
need a generation pass per turn of every replayed episode; without it the V target can only be
Q̄ at the replayed action, which makes Q redundant (Q̄(s, a) ≈ r + γV̄(s')). So this is the
V-only form: Q(s_k, a_k) is represented by its one-sample TD estimate R_k + γV(s_{k+1}). Like
ArCHer without the fresh-action V target, the critic then estimates the value of the replay's
mixture of recent policies (no importance correction).

Config (``config.rl``): ``algorithm = "archer"``, ``advantage_kwargs = {gamma, lam}`` (γ is the
critic's discount too), and ``archer.{tau, replay_episodes, critic_updates, critic_batch,
critic_lr, whiten}`` (missing keys take ``ArcherConfig``'s defaults). ``ArcherStage`` is the
algorithm's extra stage in the trainer's update (``rl_agents.trainer``): it replaces the
advantages stage and keeps ``ArcherExtra`` (the critic's optimizer state, its Polyak target and
the replay buffer) in ``TrainState.extra``; ``opt_state`` is the policy optimizer's state and
``params = {"policy", "value"}`` as for the other critics.

Non-finite guard (``rl_agents.nonfinite``): critic and actor steps with a NaN / inf loss or
gradient are skipped, and such a step, non-finite new parameters or non-finite fresh turn
rewards skip the whole update: params, both optimizer states, the target critic, the replay
buffer (the fresh episodes are not inserted) and the PRM stay as before it.
"""
from __future__ import annotations

import dataclasses
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import models
from models.sharding import param_shardings_from_logical
from rl_agents.advantages import broadcast_turns, masked_gae, masked_whiten, per_turn_sum
from rl_agents.nonfinite import guarded_step


# ============================================================================================
# Configuration
# ============================================================================================
@dataclasses.dataclass(frozen=True)
class ArcherConfig:
    """ArCHer's critic settings (``config.rl.archer``) and turn discount / GAE λ
    (``config.rl.advantage_kwargs``)."""
    tau: float = 0.1              # Polyak rate of the target critic, in (0, 1] (1: hard copy)
    replay_episodes: int = 512    # ring-buffer capacity in episodes (>= the rollout batch)
    critic_updates: int = 8       # critic minibatch steps per update
    critic_batch: int = 32        # episodes per critic minibatch (sampled from the replay)
    critic_lr: float = 5e-4       # Adam learning rate of the critic
    whiten: bool = False          # whiten the token advantages over the batch
    gamma: float = 0.95           # turn discount (critic TD target and actor advantage)
    lam: float = 0.0              # turn GAE λ of the actor advantage (0: one-step TD, ArCHer)


_ARCHER_KEYS = ("tau", "replay_episodes", "critic_updates", "critic_batch", "critic_lr", "whiten")
_ADV_KEYS = ("gamma", "lam")


def _int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
        raise ValueError(f"{name}={v!r} must be an int >= {lo}")
    return int(v)


def _real(name, v):
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise ValueError(f"{name}={v!r} must be a number")
    return float(v)


def archer_config(rl, batch_size: int) -> ArcherConfig:
    """``ArcherConfig`` from ``config.rl`` (its ``archer`` block and ``advantage_kwargs``),
    validated: a bad value raises ValueError naming the field and the value."""
    block = rl.get("archer", None) if hasattr(rl, "get") else None
    block = {} if block is None else dict(block)
    adv = dict(rl.get("advantage_kwargs", None) or {}) if hasattr(rl, "get") else {}
    for where, given, known in (("config.rl.archer", block, _ARCHER_KEYS),
                                ("config.rl.advantage_kwargs", adv, _ADV_KEYS)):
        unknown = sorted(set(given) - set(known))
        if unknown:
            raise ValueError(f"{where}.{unknown[0]} is not an ArCHer setting; {where} takes "
                             f"{list(known)}")
    cfg = ArcherConfig(**block, **adv)
    tau = _real("config.rl.archer.tau", cfg.tau)
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"config.rl.archer.tau={cfg.tau!r} must be in (0, 1]")
    cap = _int("config.rl.archer.replay_episodes", cfg.replay_episodes, 1)
    if cap < batch_size:
        raise ValueError(f"config.rl.archer.replay_episodes={cap} is smaller than the rollout "
                         f"batch {batch_size} (num_groups*group_size): one update must fit")
    _int("config.rl.archer.critic_updates", cfg.critic_updates, 1)
    nb = _int("config.rl.archer.critic_batch", cfg.critic_batch, 1)
    if nb > cap:
        raise ValueError(f"config.rl.archer.critic_batch={nb} exceeds "
                         f"config.rl.archer.replay_episodes={cap}")
    if not _real("config.rl.archer.critic_lr", cfg.critic_lr) > 0:
        raise ValueError(f"config.rl.archer.critic_lr={cfg.critic_lr!r} must be > 0")
    if not isinstance(cfg.whiten, bool):
        raise ValueError(f"config.rl.archer.whiten={cfg.whiten!r} must be a bool")
    for name in _ADV_KEYS:
        v = _real(f"config.rl.advantage_kwargs.{name}", getattr(cfg, name))
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"config.rl.advantage_kwargs.{name}={v!r} must be in [0, 1]")
    return cfg


# ============================================================================================
# Turn-level TD: boundaries, targets, advantages (pure, [B, K])
# ============================================================================================
def turn_state_positions(valid: jax.Array, turn_ids: jax.Array, num_turns: int) -> jax.Array:
    """int32 ``[B, K]``: the position whose value-head output is V(s_k) — the last token before
    turn k's tokens in the compact layout (prompt, turn 0's action + observation, turn 1's ...):
    pos_k = (#valid tokens with turn id < k, the prompt's −1 included) − 1, floored at 0.
    Turns that did not happen get the row's last valid position (masked by the callers)."""
    valid = jnp.asarray(valid, bool)
    tid = jnp.asarray(turn_ids, jnp.int32)
    prompt = (valid & (tid < 0)).sum(-1).astype(jnp.int32)                       # [B]
    per_turn = per_turn_sum(jnp.ones(valid.shape, jnp.float32), valid, tid, num_turns)
    before = jnp.cumsum(per_turn, axis=1) - per_turn                              # exclusive
    return jnp.maximum(prompt[:, None] + before.astype(jnp.int32) - 1, 0)


def read_turn_values(head: jax.Array, positions: jax.Array) -> jax.Array:
    """``head`` [B, T] (value head per position) at ``positions`` [B, K] → [B, K] float32."""
    return jnp.take_along_axis(jnp.asarray(head, jnp.float32), positions, axis=1)


def turn_td_targets(rewards: jax.Array, next_values: jax.Array, turn_valid: jax.Array,
                    gamma) -> jax.Array:
    """y_k = R_k + γ · 1[turn k+1 valid] · V̄_{k+1} on valid turns, 0 on the others
    (``next_values`` [B, K] are the target critic's V̄(s_k); turn K−1 never bootstraps).
    ``turn_valid`` is a prefix of each row (the rollout's ``turn_valid``)."""
    tv = jnp.asarray(turn_valid, bool)
    v = jnp.where(tv, jnp.asarray(next_values, jnp.float32), 0.0)
    v_next = jnp.concatenate([v[:, 1:], jnp.zeros_like(v[:, :1])], axis=1)
    y = jnp.asarray(rewards, jnp.float32) + gamma * v_next
    return jnp.where(tv, y, 0.0)


def turn_advantages(rewards: jax.Array, values: jax.Array, turn_valid: jax.Array, gamma,
                    lam) -> jax.Array:
    """Turn GAE ``[B, K]``: δ_k = R_k + γ V_{k+1} − V_k (V = 0 after the last valid turn),
    A_k = δ_k + γλ A_{k+1}; 0 on turns that did not happen. λ = 0: A_k = δ_k."""
    tv = jnp.asarray(turn_valid, bool)
    r = jnp.where(tv, jnp.asarray(rewards, jnp.float32), 0.0)
    v = jnp.where(tv, jnp.asarray(values, jnp.float32), 0.0)
    return masked_gae(r, v, tv, gamma, lam)


def critic_td_loss(values: jax.Array, targets: jax.Array, turn_valid: jax.Array) -> jax.Array:
    """mean over valid turns of (V(s_k) − stop_grad(y_k))² (0 when no turn is valid)."""
    tv = jnp.asarray(turn_valid, bool)
    err = jnp.asarray(values, jnp.float32) - jax.lax.stop_gradient(targets)
    return jnp.where(tv, err ** 2, 0.0).sum() / jnp.maximum(tv.sum(), 1)


def polyak(target, online, tau):
    """V̄ ← (1 − τ)·V̄ + τ·V, leaf by leaf."""
    return jax.tree.map(lambda t, o: (1.0 - tau) * t + tau * o, target, online)


# ============================================================================================
# Replay buffer: a fixed-capacity ring of episodes on device
# ============================================================================================
@struct.dataclass
class ReplayBuffer:
    """``data``: a dict of ``[C, ...]`` arrays (C = capacity, one slot per episode). ``ptr``: the
    next slot written; ``size``: filled slots (slots [0, size) are filled: the ring is written
    from slot 0 and only wraps once full)."""
    data: dict
    ptr: jax.Array    # int32 []
    size: jax.Array   # int32 []

    @property
    def capacity(self) -> int:
        return jax.tree.leaves(self.data)[0].shape[0]


def replay_init(example: dict, capacity: int) -> ReplayBuffer:
    """An empty buffer of ``capacity`` slots shaped like one row of each leaf of ``example``
    (arrays ``[N, ...]`` or ShapeDtypeStructs; the leading axis is replaced by the capacity)."""
    _int("capacity", capacity, 1)
    data = jax.tree.map(lambda x: jnp.zeros((capacity,) + tuple(x.shape[1:]), x.dtype), example)
    return ReplayBuffer(data=data, ptr=jnp.zeros((), jnp.int32), size=jnp.zeros((), jnp.int32))


def replay_insert(buf: ReplayBuffer, rows: dict) -> ReplayBuffer:
    """Write the N rows of ``rows`` at slots ptr, ptr+1, ... (mod C), overwriting the oldest;
    ptr ← (ptr + N) mod C, size ← min(size + N, C). N must be ≤ C."""
    cap = buf.capacity
    n = jax.tree.leaves(rows)[0].shape[0]
    if n > cap:
        raise ValueError(f"replay_insert: {n} rows exceed the buffer capacity {cap}")
    idx = (buf.ptr + jnp.arange(n, dtype=jnp.int32)) % cap
    data = jax.tree.map(lambda d, r: d.at[idx].set(r.astype(d.dtype)), buf.data, rows)
    return ReplayBuffer(data=data, ptr=(buf.ptr + n) % cap,
                        size=jnp.minimum(buf.size + n, cap).astype(jnp.int32))


def replay_sample(buf: ReplayBuffer, key: jax.Array, n: int) -> tuple[dict, jax.Array]:
    """``n`` rows drawn uniformly with replacement from the filled slots ``[0, size)``;
    returns ``(rows, slot indices [n])``. An empty buffer yields slot 0 (zeros)."""
    idx = jax.random.randint(key, (n,), 0, jnp.maximum(buf.size, 1), dtype=jnp.int32)
    return jax.tree.map(lambda d: d[idx], buf.data), idx


# ============================================================================================
# The stage in the trainer's update
# ============================================================================================
#: Per-step flag in the critic steps' stacked metrics: the step was not finite.
CRITIC_NONFINITE_STEP = "critic/nonfinite_step"


@struct.dataclass
class ArcherExtra:
    """ArCHer's state in ``TrainState.extra``: the critic's optimizer state, its Polyak target
    and the replay buffer."""
    critic_opt_state: Any
    target_value: Any
    replay: ReplayBuffer


class StageOutput(NamedTuple):
    """What a stage hands back to the update: the policy's training batch, the parameters it
    trained (``{"value": ...}``), its new state, metrics, its non-finite step count and arrays
    that must be finite for the update to be kept."""
    batch: dict
    params: dict
    extra: Any
    metrics: dict
    bad_steps: jax.Array
    check_finite: Any


class ArcherStage:
    """ArCHer's stage: replay insert → ``critic_updates`` TD steps on replay minibatches (target
    network, Polyak) → turn advantages from the updated critic on the fresh batch; the trainer
    then runs the PPO-clip token-policy epochs on ``loss_fn`` (the policy loss, no value term).
    See the module docstring."""

    def __init__(self, tr):
        config = tr.config
        self.archer = archer_config(config.rl, tr.num_episodes)
        self.critic_optimizer = optax.chain(optax.clip_by_global_norm(config.optim.grad_clip),
                                            optax.adam(self.archer.critic_lr))
        if tr.algorithm.dynamic_sampling:
            raise ValueError(f"config.rl.algorithm={config.rl.algorithm!r}: dynamic sampling is "
                             f"not supported with ArCHer")
        if tr.context.name != "full":
            raise ValueError(f"config.rl.algorithm={config.rl.algorithm!r} needs "
                             f"config.context.mode='full'")
        if tr.mesh is not None:
            shards = tr.mesh.shape["data"] * tr.mesh.shape["fsdp"]
            if self.archer.critic_batch % shards:
                raise ValueError(f"config.rl.archer.critic_batch={self.archer.critic_batch} is "
                                 f"not divisible by mesh.data*mesh.fsdp = {shards}")
        self.env, self.value_model, self.shard_rows = tr.env, tr.value_model, tr.shard_rows
        self.loss_fn = lambda policy_params, mb: _actor_loss(tr, policy_params, mb)

    # ---------------------------------------------------------------- state
    def _replay_example(self) -> dict:
        b, t, k = 1, self.env.max_episode_tokens, self.env.max_turns
        return dict(tokens=jax.ShapeDtypeStruct((b, t), jnp.int32),
                    valid=jax.ShapeDtypeStruct((b, t), bool),
                    state_pos=jax.ShapeDtypeStruct((b, k), jnp.int32),
                    turn_rewards=jax.ShapeDtypeStruct((b, k), jnp.float32),
                    turn_valid=jax.ShapeDtypeStruct((b, k), bool))

    def init(self, tr, params) -> tuple[Any, ArcherExtra]:
        """(policy optimizer state, ``ArcherExtra``): the critic's optimizer state, its target
        (a copy of the critic, whose trunk starts from the (BC) policy) and an empty replay."""
        value = params["value"]
        return tr.optimizer.init(params["policy"]), ArcherExtra(
            critic_opt_state=self.critic_optimizer.init(value),
            target_value=jax.tree.map(jnp.copy, value),
            replay=replay_init(self._replay_example(), self.archer.replay_episodes))

    def shardings(self, tr, boxed) -> tuple[Any, ArcherExtra]:
        """The policy-only optimizer state, the critic's optimizer state and target sharded like
        the critic, the replay buffer replicated."""
        rules = models.LOGICAL_AXIS_RULES

        def opt_shardings(optimizer, boxed_params):
            b = jax.eval_shape(optimizer.init, boxed_params)
            return param_shardings_from_logical(nn.get_partition_spec(b), tr.mesh, rules,
                                                shapes=nn.meta.unbox(b))

        value_sh = param_shardings_from_logical(nn.get_partition_spec(boxed["value"]), tr.mesh,
                                                rules, shapes=nn.meta.unbox(boxed["value"]))
        rep = NamedSharding(tr.mesh, P())
        abstract_replay = jax.eval_shape(
            lambda: replay_init(self._replay_example(), self.archer.replay_episodes))
        return opt_shardings(tr.optimizer, boxed["policy"]), ArcherExtra(
            critic_opt_state=opt_shardings(self.critic_optimizer, boxed["value"]),
            target_value=value_sh, replay=jax.tree.map(lambda _: rep, abstract_replay))

    # ---------------------------------------------------------------- rewards, critic
    def critic_turn_values(self, value_params, tokens, valid, state_pos) -> jax.Array:
        """V(s_k) ``[B, K]``: the critic's value head read at the turn-boundary positions."""
        head = self.value_model.apply({"params": value_params}, tokens,
                                      segment_ids=valid.astype(jnp.int32))
        return read_turn_values(head, state_pos)

    def critic_loss(self, value_params, target_params, rows):
        """TD(0) loss on replay ``rows``: V(s_k) vs R_k + γ·V̄(s_{k+1}) (V̄ = target net)."""
        v_bar = self.critic_turn_values(target_params, rows["tokens"], rows["valid"],
                                        rows["state_pos"])
        y = turn_td_targets(rows["turn_rewards"], jax.lax.stop_gradient(v_bar),
                            rows["turn_valid"], self.archer.gamma)
        v = self.critic_turn_values(value_params, rows["tokens"], rows["valid"], rows["state_pos"])
        loss = critic_td_loss(v, y, rows["turn_valid"])
        tv = rows["turn_valid"]
        n = jnp.maximum(tv.sum(), 1)
        return loss, {"critic/td_loss": loss, "critic/value_mean": jnp.where(tv, v, 0.0).sum() / n,
                      "critic/target_mean": jnp.where(tv, y, 0.0).sum() / n}

    def critic_step(self, carry, key):
        """One critic minibatch step on a replay sample + the Polyak target update."""
        value, opt_state, target, replay = carry
        rows, _ = replay_sample(replay, key, self.archer.critic_batch)
        rows = self.shard_rows(rows)
        (loss, metrics), grads = jax.value_and_grad(self.critic_loss, has_aux=True)(
            value, target, rows)
        value, opt_state, grad_norm, bad = guarded_step(self.critic_optimizer, value, opt_state,
                                                        loss, grads)
        target = polyak(target, value, self.archer.tau)
        metrics["critic/grad_norm"] = grad_norm
        metrics[CRITIC_NONFINITE_STEP] = bad.astype(jnp.float32)
        return (value, opt_state, target, replay), metrics

    # ---------------------------------------------------------------- the stage
    def advantages(self, tr, state, traj, row_weight, key) -> StageOutput:
        """Replay insert, critic TD steps, then the token batch with the turn advantages of the
        updated critic on the fresh episodes."""
        a, extra = self.archer, state.extra
        ref_logp = tr.reference_logprobs(state, traj)
        k_turns = traj.turn_rewards.shape[1]
        turn_r = turn_rewards(tr, traj, ref_logp)
        state_pos = turn_state_positions(traj.valid, traj.turn_ids, k_turns)

        # high level: insert the fresh episodes, then TD steps on replay minibatches
        replay = replay_insert(extra.replay, dict(
            tokens=traj.tokens, valid=traj.valid, state_pos=state_pos, turn_rewards=turn_r,
            turn_valid=traj.turn_valid))
        (value, critic_opt, target, replay), critic_metrics = jax.lax.scan(
            self.critic_step, (state.params["value"], extra.critic_opt_state,
                               extra.target_value, replay),
            jax.random.split(key, a.critic_updates))

        # low level: turn advantages from the updated critic on the fresh batch
        v_turn = self.critic_turn_values(value, traj.tokens, traj.valid, state_pos)
        a_turn = turn_advantages(turn_r, v_turn, traj.turn_valid, a.gamma, a.lam)
        mask = traj.loss_mask & (row_weight[:, None] > 0)
        adv = broadcast_turns(a_turn, traj.turn_ids, mask)
        if a.whiten:
            adv = masked_whiten(adv, mask)
        batch = dict(tokens=traj.tokens, valid=traj.valid, loss_mask=mask,
                     old_logp=traj.behaviour_logp, advantages=adv)
        if ref_logp is not None:
            batch["ref_logp"] = ref_logp
        bad = critic_metrics.pop(CRITIC_NONFINITE_STEP).sum()
        metrics = jax.tree.map(jnp.mean, critic_metrics)
        tv = traj.turn_valid
        n_turns = jnp.maximum(tv.sum(), 1)
        metrics["critic/fresh_value_mean"] = jnp.where(tv, v_turn, 0.0).sum() / n_turns
        metrics["actor/turn_advantage_mean"] = jnp.where(tv, a_turn, 0.0).sum() / n_turns
        metrics["actor/turn_advantage_abs"] = jnp.where(tv, jnp.abs(a_turn), 0.0).sum() / n_turns
        metrics["replay/size"] = replay.size.astype(jnp.float32)
        # non-finite fresh turn rewards are kept out of the replay: the update is skipped
        return StageOutput(batch=batch, params={"value": value},
                           extra=ArcherExtra(critic_opt_state=critic_opt, target_value=target,
                                             replay=replay),
                           metrics=metrics, bad_steps=bad, check_finite=turn_r)


def turn_rewards(tr, traj, ref_logp) -> jax.Array:
    """R_k ``[B, K]``: turn rewards + DAPO overlong penalty on the last turn + the turn's sum of
    the KL-in-reward penalty −β·kl_t over its agent tokens (when enabled), as
    ``Trainer.shaped_rewards`` folds them."""
    _, r, _ = tr.shaped_rewards(traj, ref_logp)
    return jnp.where(traj.turn_valid, r.astype(jnp.float32), 0.0)


def _actor_loss(tr, policy_params, mb):
    """PPO-clip on the turn advantages − entropy bonus (+ KL loss), as ``Trainer.loss_fn``
    without the value term (the critic is trained by the stage)."""
    total, metrics = tr.policy_loss(policy_params, mb)
    metrics["loss"] = total
    return total, metrics
