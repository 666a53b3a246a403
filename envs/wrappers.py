"""Env wrappers (auto reset, episode statistics) and jit(vmap) batching helpers.

    env = EpisodeStatsWrapper(AutoResetWrapper(envs.make("calculator")))
    states, ts = batch_reset(env, key, 1024)              # jit(vmap(env.reset))
    states, ts = batch_step(env, states, actions)         # jit(vmap(env.step))

Wrappers are themselves ``Env``s: they forward ``obs_len``, ``action_len``, ``max_turns``,
``format_penalty``, ``name``, ``render`` and ``oracle_action`` to the wrapped env.

AutoResetWrapper and batching. ``step`` decides between "keep the stepped state" and "reset"
with ``jax.lax.cond`` on the episode's done flag. Unbatched (a single env under ``jit``) XLA
executes only the taken branch, so the reset is computed only on done steps. Under ``vmap``
the predicate is batched and JAX lowers the ``cond`` to a ``select``: the reset state and
observation are then computed ONCE per step for every env (one ``reset`` call per env, not
one per leaf) and chosen leaf by leaf with ``where``, the standard gymnax approach. Its cost
is one extra ``reset`` per step, which for these tasks is of the order of one ``step``. The
``mode="select"`` option forces that select form also when unbatched (useful to compare).
"""
from __future__ import annotations

import weakref
from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from envs import vocab
from envs.base import Env

__all__ = ["Wrapper", "AutoResetWrapper", "EpisodeStatsWrapper", "EpisodeStatsState",
           "batch_reset", "batch_step", "batch_oracle", "state_done", "tree_select",
           "put_rows"]


def _is_key(x) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _through_key_data(fn, a, b):
    """``fn(a, b)`` on the arrays themselves, or on the raw data of typed PRNG keys."""
    if _is_key(a):
        data = fn(jax.random.key_data(a), jax.random.key_data(b))
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
    return fn(a, b)


def tree_select(pred, on_true, on_false):
    """Leafwise ``where(pred, on_true, on_false)``: a scalar ``pred``, or a per-row one whose
    shape leads every leaf's (broadcast over the trailing axes); typed PRNG keys supported."""
    pred = jnp.asarray(pred)
    where = lambda a, b: jnp.where(pred.reshape(pred.shape + (1,) * (jnp.ndim(a) - pred.ndim)),
                                   a, b)
    return jax.tree_util.tree_map(lambda a, b: _through_key_data(where, a, b), on_true, on_false)


def put_rows(dst, rows, src, axis: int = 0):
    """``dst`` with its entries ``rows`` along ``axis`` set to ``src``'s (``dst.at[rows].set``);
    out-of-range rows are dropped. Typed PRNG keys supported."""
    index = (slice(None),) * axis + (rows,)
    return _through_key_data(lambda d, s: d.at[index].set(s, mode="drop"), dst, src)


def state_done(state) -> jax.Array:
    """The ``done`` flag of a task state, looking through wrapper states (``.env_state``)."""
    while not hasattr(state, "done") and hasattr(state, "env_state"):
        state = state.env_state
    if not hasattr(state, "done"):
        raise ValueError(f"state of type {type(state).__name__} has no 'done' field")
    return jnp.asarray(state.done, bool)


class Wrapper(Env):
    """Base wrapper: forwards the Env interface and attributes to ``self.env``."""

    def __init__(self, env: Env):
        if not isinstance(env, Env):
            raise ValueError(f"env must be an envs.base.Env, got {type(env).__name__}")
        self.env = env

    # Env declares these as class attributes; properties make the wrapper follow the inner env.
    name = property(lambda self: self.env.name)
    obs_len = property(lambda self: self.env.obs_len)
    action_len = property(lambda self: self.env.action_len)
    max_turns = property(lambda self: self.env.max_turns)
    format_penalty = property(lambda self: self.env.format_penalty)
    fill_id = property(lambda self: self.env.fill_id)
    stop_ids = property(lambda self: self.env.stop_ids)
    fill_ends_action = property(lambda self: self.env.fill_ends_action)

    @property
    def unwrapped(self) -> Env:
        env = self.env
        while isinstance(env, Wrapper):
            env = env.env
        return env

    def reset(self, key):
        return self.env.reset(key)

    def step(self, state, action):
        return self.env.step(state, action)

    def oracle_action(self, state, key):
        return self.env.oracle_action(state, key)

    def render(self, state) -> str:
        return self.env.render(state)

    def __getattr__(self, item):
        # Only called when normal lookup fails: task-specific attributes / knobs.
        if item == "env":
            raise AttributeError(item)
        return getattr(self.env, item)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.env!r})"


class AutoResetWrapper(Wrapper):
    """On a done step, replace the state by a fresh episode's reset state.

    The returned TimeStep keeps the stepped reward / terminated / truncated / info, but its
    ``observation`` is the new episode's prompt; the true last observation of the finished
    episode is in ``info["final_observation"]`` (on reset: a ``<pad>`` row). The reset key is
    ``split(stepped_state.key)[1]``, so the episode sequence is a deterministic function of the
    first reset key. The state type is the inner env's state (no extra fields).

    ``mode``: ``"cond"`` (default; ``lax.cond``, see the module docstring for how it behaves
    under ``vmap``) or ``"select"`` (always compute the reset and select leafwise).
    """

    def __init__(self, env: Env, mode: str = "cond"):
        super().__init__(env)
        if mode not in ("cond", "select"):
            raise ValueError(f"mode must be 'cond' or 'select', got {mode!r}")
        self.mode = mode

    def _final_obs_info(self, info, obs):
        info = dict(info)
        info["final_observation"] = obs
        return info

    def reset(self, key):
        state, ts = self.env.reset(key)
        pad = jnp.full((self.obs_len,), vocab.PAD, jnp.int32)
        return state, ts.replace(info=self._final_obs_info(ts.info, pad))

    def _reset_key(self, state):
        key = state.key
        return jax.random.split(key)[1]

    def step(self, state, action):
        st, ts = self.env.step(state, action)
        done = ts.done
        info = self._final_obs_info(ts.info, ts.observation)

        def do_reset(_):
            rs, rts = self.env.reset(self._reset_key(st))
            return rs, rts.observation

        def keep(_):
            return st, ts.observation

        if self.mode == "cond":
            new_state, obs = jax.lax.cond(done, do_reset, keep, None)
        else:
            rs, robs = do_reset(None)
            new_state = tree_select(done, rs, st)
            obs = jnp.where(done, robs, ts.observation)
        return new_state, ts.replace(observation=obs, info=info)


@struct.dataclass
class EpisodeStatsState:
    env_state: Any
    episode_return: jax.Array   # float32 [], running return of the current episode
    episode_length: jax.Array   # int32 [], steps taken in the current episode
    episode_success: jax.Array  # bool [], any step of the current episode succeeded

    @property
    def done(self):
        return state_done(self.env_state)

    @property
    def key(self):
        return self.env_state.key

    @property
    def turn(self):
        return self.env_state.turn


class EpisodeStatsWrapper(Wrapper):
    """Running episode statistics in ``info``.

    ``info["episode_return"]`` (Σ rewards), ``info["episode_length"]`` (number of steps) and
    ``info["episode_success"]`` (any step had ``info["success"]``) of the current episode,
    including this step. They are the finished episode's totals on done steps (the place to
    read them). A step taken on an already-done inner state (a no-op of a non-auto-reset env)
    adds nothing, so the totals stay frozen there. The accumulators restart at zero after a
    done step whose new inner state is not done (i.e. the inner env auto-reset).
    Put it OUTSIDE ``AutoResetWrapper``: ``EpisodeStatsWrapper(AutoResetWrapper(env))``.
    """

    def _info(self, info, ret, length, succ):
        info = dict(info)
        info["episode_return"] = jnp.asarray(ret, jnp.float32)
        info["episode_length"] = jnp.asarray(length, jnp.int32)
        info["episode_success"] = jnp.asarray(succ, bool)
        return info

    def reset(self, key):
        s, ts = self.env.reset(key)
        state = EpisodeStatsState(s, jnp.float32(0.0), jnp.int32(0), jnp.bool_(False))
        return state, ts.replace(info=self._info(ts.info, 0.0, 0, False))

    def step(self, state: EpisodeStatsState, action):
        active = ~state_done(state.env_state)
        s, ts = self.env.step(state.env_state, action)
        ret = state.episode_return + jnp.where(active, ts.reward, 0.0).astype(jnp.float32)
        length = state.episode_length + active.astype(jnp.int32)
        succ = state.episode_success | (active & jnp.asarray(ts.info["success"], bool))
        restart = ts.done & ~state_done(s)
        new = EpisodeStatsState(
            s,
            jnp.where(restart, 0.0, ret).astype(jnp.float32),
            jnp.where(restart, 0, length).astype(jnp.int32),
            jnp.where(restart, False, succ),
        )
        return new, ts.replace(info=self._info(ts.info, ret, length, succ))

    def oracle_action(self, state: EpisodeStatsState, key):
        return self.env.oracle_action(state.env_state, key)

    def render(self, state: EpisodeStatsState) -> str:
        return self.env.render(state.env_state)


# --------------------------------------------------------------------------- batching

_CACHE: "weakref.WeakKeyDictionary[Env, dict[str, Any]]" = weakref.WeakKeyDictionary()


def _fns(env: Env) -> dict[str, Any]:
    if not isinstance(env, Env):
        raise ValueError(f"env must be an envs.base.Env, got {type(env).__name__}")
    fns = _CACHE.get(env)
    if fns is None:
        fns = {
            "reset": jax.jit(jax.vmap(env.reset)),
            "step": jax.jit(jax.vmap(env.step)),
            "oracle": jax.jit(jax.vmap(env.oracle_action)),
        }
        _CACHE[env] = fns
    return fns


def batch_reset(env: Env, key: jax.Array, n: int):
    """``n`` independent episodes: ``jit(vmap(env.reset))(split(key, n))``."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    return _fns(env)["reset"](jax.random.split(key, n))


def batch_step(env: Env, states, actions):
    """``jit(vmap(env.step))(states, actions)``; ``actions`` int32 ``[n, action_len]``."""
    actions = jnp.asarray(actions)
    if actions.ndim != 2 or actions.shape[1] != env.action_len:
        raise ValueError(f"actions must have shape [n, {env.action_len}], got {actions.shape}")
    return _fns(env)["step"](states, actions)


def batch_oracle(env: Env, states, key: jax.Array):
    """``jit(vmap(env.oracle_action))`` with one key per env split from ``key``."""
    n = jax.tree_util.tree_leaves(states)[0].shape[0]
    return _fns(env)["oracle"](states, jax.random.split(key, n))


def oracle_rollout(env: Env, key: jax.Array, n: int, num_steps: int | None = None):
    """Play ``n`` episodes with ``env.oracle_action`` (jit(vmap) over envs, ``lax.scan`` over turns).

    Returns a dict of arrays ``[n]``: ``return`` (Σ rewards), ``success`` (any step succeeded),
    ``length`` (steps until done), ``format_errors`` (count), and ``done`` (finished within
    ``num_steps``, default ``env.max_turns``). Steps after done are no-ops of the env.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    steps = env.max_turns if num_steps is None else int(num_steps)
    k_reset, k_act = jax.random.split(key)
    fns = _fns(env)
    if ("oracle_rollout", steps) in fns:
        return fns[("oracle_rollout", steps)](jax.random.split(k_reset, n), jax.random.split(k_act, n))

    def one(k_reset, k_act):
        state, _ = env.reset(k_reset)

        def body(carry, k):
            st, ret, succ, length, ferr = carry
            active = ~state_done(st)
            st2, ts = env.step(st, env.oracle_action(st, k))
            ret = ret + jnp.where(active, ts.reward, 0.0)
            succ = succ | (active & ts.info["success"])
            length = length + active.astype(jnp.int32)
            ferr = ferr + (active & ts.info["format_error"]).astype(jnp.int32)
            return (st2, ret, succ, length, ferr), None

        init = (state, jnp.float32(0.0), jnp.bool_(False), jnp.int32(0), jnp.int32(0))
        (st, ret, succ, length, ferr), _ = jax.lax.scan(body, init, jax.random.split(k_act, steps))
        return {"return": ret, "success": succ, "length": length, "format_errors": ferr,
                "done": state_done(st)}

    fns[("oracle_rollout", steps)] = jax.jit(jax.vmap(one))      # compiled once per env / steps
    return fns[("oracle_rollout", steps)](jax.random.split(k_reset, n), jax.random.split(k_act, n))
