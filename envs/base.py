"""The environment contract: pure, jittable, vmappable, token in / token out.

    state, ts = env.reset(key)             # ts.observation is the task prompt
    state, ts = env.step(state, action)    # action: int32 [env.action_len]

Conventions (gymnax / jumanji):
- ``state`` is a ``flax.struct.dataclass`` that carries its own PRNG key, the turn counter
  and a ``done`` flag; ``step`` on a done state is a no-op (reward 0, state unchanged, done
  flags kept) so that a batch with finished episodes can keep stepping under ``vmap``.
- ``terminated``: the task ended (solved, failed, answered); ``truncated``: the turn budget
  ``max_turns`` ran out first. ``info["success"]`` is true on the step that solves the task.
- Observations are int32 ``[obs_len]`` rows, left-aligned, ``<pad>`` after; actions are int32
  ``[action_len]``; an action ends at its first ``<eos>`` / ``<pad>``.
- Any action is legal input: a malformed one gives the observation ``<obs> <err>`` and
  reward ``-format_penalty``, never an exception or NaN.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from envs import vocab


@struct.dataclass
class TimeStep:
    observation: jax.Array  # int32 [obs_len]
    reward: jax.Array       # float32 []
    terminated: jax.Array   # bool []
    truncated: jax.Array    # bool []
    info: dict[str, Any]    # always holds "success" (bool []) and "format_error" (bool [])

    @property
    def done(self) -> jax.Array:
        return jnp.logical_or(self.terminated, self.truncated)


class Env:
    """Base class. Subclasses set the class attributes below and implement the methods."""

    name: str = "env"
    obs_len: int = 16        # tokens in the prompt and in every observation
    action_len: int = 8      # tokens in one agent turn (including its <eos>)
    max_turns: int = 8       # turn budget; truncation after this many steps
    format_penalty: float = 0.1
    # the ids of a row's framing, read by the rollout: rows are real tokens then ``fill_id``;
    # an action ends after its first id in ``stop_ids`` (kept) or at a sampled ``fill_id``
    # (not kept) when ``fill_ends_action``. The symbol vocabulary: <pad>, (<eos>,), True.
    # A tokenizer-bridged env (``envs.tokenizer_bridge.BridgedEnv``): -1, the model's stop
    # ids, False (every id of a real vocabulary is a real token).
    fill_id: int = vocab.PAD
    stop_ids: tuple = (vocab.EOS,)
    fill_ends_action: bool = True
    # a task in words: symbol ``vocab.size + i`` of a prompt / observation is the text
    # ``phrases[i]`` (``vocab.decode(row, phrases=env.phrases)``); only a tokenizer renders it
    # (``envs.tokenizer_bridge``, ``config.model.hf_checkpoint``), the 64-symbol models cannot
    phrases: tuple = ()
    # the longest observation after the prompt, in symbols, when shorter than ``obs_len``
    # (None: ``obs_len``); a tokenizer-bridged env sizes its observation rows by it
    step_obs_len: int | None = None

    def reset(self, key: jax.Array) -> tuple[Any, TimeStep]:
        raise NotImplementedError

    def step(self, state: Any, action: jax.Array) -> tuple[Any, TimeStep]:
        raise NotImplementedError

    def oracle_action(self, state: Any, key: jax.Array) -> jax.Array:
        raise NotImplementedError

    def render(self, state: Any) -> str:
        """One line of text describing the hidden state (the answer, the KB, the maze...)."""
        raise NotImplementedError

    @property
    def max_episode_tokens(self) -> int:
        """Prompt plus ``max_turns`` (action + observation) rows."""
        return self.obs_len + self.max_turns * (self.action_len + self.obs_len)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(obs_len={self.obs_len}, action_len={self.action_len}, "
                f"max_turns={self.max_turns})")


def finish_step(env: Env, state: Any, *, terminated, observation, reward, info: dict[str, Any],
                idle_info: dict[str, Any], **updates) -> tuple[Any, TimeStep]:
    """The shared end of a task's ``step``: turn counter, end flags and the done no-op.

    ``turn' = turn + 1``; ``truncated = ~terminated & (turn' >= env.max_turns)``;
    ``done' = terminated | truncated``; the new state is ``state.replace(turn', done',
    terminated, truncated, **updates)`` and the time step ``TimeStep(observation, reward
    (float32), terminated, truncated, info)``. A state that is already done is a no-op: it is
    returned unchanged with the observation ``<obs>``, reward 0, its own end flags and
    ``idle_info``. (Every leaf is chosen with ``where``, so the function is vmap-safe.)
    """
    from envs.wrappers import tree_select      # here: envs.wrappers imports this module

    turn = state.turn + 1
    terminated = jnp.asarray(terminated, bool)
    truncated = ~terminated & (turn >= env.max_turns)
    new = state.replace(turn=turn, done=terminated | truncated, terminated=terminated,
                        truncated=truncated, **updates)
    ts = TimeStep(observation, jnp.asarray(reward).astype(jnp.float32), terminated, truncated, info)
    idle_obs = jnp.full((env.obs_len,), vocab.PAD, jnp.int32).at[0].set(vocab.OBS)
    idle = TimeStep(idle_obs, jnp.float32(0.0), state.terminated, state.truncated, idle_info)
    return tree_select(state.done, (state, idle), (new, ts))
