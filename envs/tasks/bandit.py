"""Bandit: a Bernoulli multi-armed bandit played over turns (EVOLvE style).

Task. ``n_arms`` arms (default 4, labelled by the digits ``0`` .. ``n_arms - 1``) pay 1 with
probability ``p_k`` and 0 otherwise. Each episode picks one best arm uniformly at random with
``p_best = 0.5 + gap / 2`` and gives every other arm ``0.5 - gap / 2`` (``gap`` = Δ, default
0.5, so 0.75 vs 0.25). The agent does not see the probabilities: the prompt gives the number of
arms and turns, and each observation the arm it pulled and the payoff. The payoff of arm ``k``
on turn ``t`` is ``u_t[k] < p_k`` with ``u_t`` uniform on [0, 1) drawn from
``fold_in(state.key, t)``, so it
is deterministic given the state's key and turn (all arms share the same draw of a turn).

Commands. One arm digit, then ``<eos>`` (e.g. ``2 <eos>``). Anything else (a digit
``>= n_arms``, several tokens, other tokens) is a format error: ``<obs> <err>``, reward
``-format_penalty``, no arm is pulled, and the wasted turn counts as regret ``p_best``.

Observations. ``<obs> ARM = PAYOFF``, e.g. ``<obs> 2 = 1``.

Rewards. The pulled arm's sampled payoff (0 or 1), so returns lie in [0, max_turns]. The
episode always runs ``max_turns`` turns (default 16) and ends by truncation (terminated is
never set). ``info["success"]`` is true on the final step iff the best arm was pulled
strictly more often than every other arm over the episode (the agent identified and
exploited it). ``info["regret"]`` is the cumulative expected regret Σ_t (p_best − p_pulled_t),
``info["step_regret"]`` that turn's term.

Oracle. Knows the probabilities and always pulls the best arm: regret 0, success 100%.

Example episode (4 arms, 4 turns, best arm 2)::

    <task> bandit 4 <sep> 4
    0 <eos>      <obs> 0 = 0         (reward 0, step regret 0.5)
    2 <eos>      <obs> 2 = 1         (reward 1, step regret 0)
    2 <eos>      <obs> 2 = 1
    2 <eos>      <obs> 2 = 0         (truncated; success: arm 2 was pulled most)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from envs import token_ops, vocab
from envs.base import Env, TimeStep, finish_step

_BANDIT_WORD = [vocab.TOKEN_TO_ID[c] for c in "bandit"]


@struct.dataclass
class BanditState:
    key: jax.Array          # PRNG key of the episode (payoff draws are fold_in(key, turn))
    turn: jax.Array         # int32 []
    done: jax.Array         # bool []
    terminated: jax.Array   # bool [] (always False: the episode ends by truncation)
    truncated: jax.Array    # bool []
    probs: jax.Array        # float32 [n_arms], payoff probabilities
    best: jax.Array         # int32 [], index of the best arm
    counts: jax.Array       # int32 [n_arms], pulls per arm
    regret: jax.Array       # float32 [], cumulative expected regret


class BanditEnv(Env):
    """Bernoulli bandit over turns; see the module docstring."""

    name = "bandit"

    def __init__(self, n_arms: int = 4, gap: float = 0.5, max_turns: int = 16, format_penalty: float = 0.1):
        if not isinstance(n_arms, (int, np.integer)) or not 2 <= n_arms <= 10:
            raise ValueError(f"n_arms must be an int in [2, 10] (one digit per arm), got {n_arms!r}")
        if not 0.0 < float(gap) <= 1.0:
            raise ValueError(f"gap must be in (0, 1], got {gap!r}")
        if not isinstance(max_turns, (int, np.integer)) or not 1 <= max_turns <= 99:
            raise ValueError(f"max_turns must be an int in [1, 99], got {max_turns!r}")
        if not 0.0 <= float(format_penalty) <= 10.0:
            raise ValueError(f"format_penalty must be in [0, 10], got {format_penalty!r}")
        self.n_arms = int(n_arms)
        self.gap = float(gap)
        self.max_turns = int(max_turns)
        self.format_penalty = float(format_penalty)
        self.p_best = 0.5 + self.gap / 2
        self.p_other = 0.5 - self.gap / 2
        turns = [vocab.DIGIT_0 + int(c) for c in str(self.max_turns)]
        arms = [vocab.DIGIT_0 + int(c) for c in str(self.n_arms)]
        self._prompt_tokens = [vocab.TASK] + _BANDIT_WORD + arms + [vocab.SEP] + turns
        self.obs_len = max(len(self._prompt_tokens), 4)
        self.action_len = 3

    def reset(self, key: jax.Array) -> tuple[BanditState, TimeStep]:
        key, k_best = jax.random.split(key)
        best = (jax.random.bits(k_best, (), jnp.uint32) % jnp.uint32(self.n_arms)).astype(jnp.int32)
        probs = jnp.where(jnp.arange(self.n_arms) == best, self.p_best, self.p_other).astype(jnp.float32)
        state = BanditState(key=key, turn=jnp.int32(0), done=jnp.bool_(False), terminated=jnp.bool_(False),
                            truncated=jnp.bool_(False), probs=probs, best=best,
                            counts=jnp.zeros((self.n_arms,), jnp.int32), regret=jnp.float32(0.0))
        ts = TimeStep(observation=token_ops.make_row(self._prompt_tokens, self.obs_len), reward=jnp.float32(0.0),
                      terminated=jnp.bool_(False), truncated=jnp.bool_(False),
                      info=self._info(False, False, 0.0, 0.0))
        return state, ts

    def _info(self, success, format_error, regret, step_regret):
        return {"success": jnp.asarray(success, bool), "format_error": jnp.asarray(format_error, bool),
                "regret": jnp.asarray(regret, jnp.float32), "step_regret": jnp.asarray(step_regret, jnp.float32)}

    def payoffs(self, state: BanditState) -> jax.Array:
        """int32 [n_arms]: what each arm would pay on the current turn (u_t[k] < p_k)."""
        bits = jax.random.bits(jax.random.fold_in(state.key, state.turn), (self.n_arms,), jnp.uint32)
        u = (bits >> 8).astype(jnp.float32) * (1.0 / (1 << 24))              # uniform on [0, 1)
        return (u < state.probs).astype(jnp.int32)

    def step(self, state: BanditState, action: jax.Array) -> tuple[BanditState, TimeStep]:
        action = token_ops.action_row(action, self.action_len)
        arm = token_ops.digit_value(action[0])                            # -1 if not a digit
        fmt_ok = (token_ops.action_length(action) == 1) & (arm >= 0) & (arm < self.n_arms)
        arm = jnp.clip(arm, 0, self.n_arms - 1)
        payoff = jnp.where(fmt_ok, self.payoffs(state)[arm], 0)
        step_regret = jnp.where(fmt_ok, self.p_best - state.probs[arm], self.p_best)
        counts = state.counts + (fmt_ok & (jnp.arange(self.n_arms) == arm)).astype(jnp.int32)
        regret = state.regret + step_regret
        last_turn = state.turn + 1 >= self.max_turns        # the episode ends by truncation
        others = jnp.where(jnp.arange(self.n_arms) == state.best, -1, counts)
        success = last_turn & (counts[state.best] > others.max())
        reward = jnp.where(fmt_ok, payoff.astype(jnp.float32), -self.format_penalty)
        obs = jnp.where(fmt_ok, token_ops.make_row([vocab.OBS, token_ops.digit_token(arm), vocab.EQUALS,
                                                    token_ops.digit_token(payoff)], self.obs_len),
                        token_ops.make_row([vocab.OBS, vocab.ERR], self.obs_len))
        return finish_step(self, state, terminated=False, observation=obs, reward=reward,
                           info=self._info(success, ~fmt_ok, regret, step_regret),
                           idle_info=self._info(False, False, state.regret, 0.0),
                           counts=counts, regret=regret.astype(jnp.float32))

    def oracle_action(self, state: BanditState, key: jax.Array) -> jax.Array:
        """Pull the best arm (the oracle knows the probabilities)."""
        del key
        return token_ops.make_row([token_ops.digit_token(state.best), vocab.EOS], self.action_len)

    def render(self, state: BanditState) -> str:
        probs = " ".join(f"{float(p):.2f}" for p in np.asarray(state.probs))
        return (f"bandit probs=[{probs}] best={int(state.best)} pulls={np.asarray(state.counts).tolist()} "
                f"regret={float(state.regret):.2f} turn={int(state.turn)}/{self.max_turns}")

    def __repr__(self) -> str:
        return f"BanditEnv(n_arms={self.n_arms}, gap={self.gap}, max_turns={self.max_turns})"
