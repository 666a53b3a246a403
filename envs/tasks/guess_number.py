"""Guess number: twenty questions over a hidden integer, answered by binary search.

Task. A hidden integer ``x`` is drawn uniformly from ``[0, n)`` (knob ``n``, default 32). The
agent asks comparison questions "is x < k ?" and receives yes / no, then commits to one
answer. With ``max_turns`` (default ``ceil(log2 n) + 3`` = 8 at n = 32) a binary search
(``ceil(log2 n)`` questions + 1 answer) always fits with two turns to spare.

Commands (one per turn, then ``<eos>``; ``k`` is a decimal number of at most
``len(str(n))`` digits, leading zeros allowed):
    ``< k ?``       ask whether x < k       -> ``<obs> <yes>`` if x < k else ``<obs> <no>``
    ``<answer> k``  answer k                -> ``<obs> <yes>`` if k == x else ``<obs> <no>``
Anything else -> ``<obs> <err>``.

Rewards. ``-question_cost`` (default 0.01) per question; a correct answer gives 1.0 and ends
the episode (terminated, success); a wrong answer gives 0.0 and ends it (terminated); a
malformed action gives ``-format_penalty`` (0.1) and uses up the turn. Running out of turns
truncates the episode. ``info``: ``success``, ``format_error``, ``n_questions`` (questions asked
so far).

Oracle. The state keeps the interval ``[lo, hi)`` that the answers so far leave possible
(legitimate bookkeeping, every answer is in the agent's context too); the oracle asks
``< (lo+hi)//2 ?`` until ``hi - lo == 1`` and then answers ``lo``: success 100%.

Example episode (n = 32, x = 21)::

    <task> guess 32 <sep> 8
    < 16 ? <eos>      <obs> <no>        reward -0.01
    < 24 ? <eos>      <obs> <yes>       reward -0.01
    < 20 ? <eos>      <obs> <no>        reward -0.01
    < 22 ? <eos>      <obs> <yes>       reward -0.01
    < 21 ? <eos>      <obs> <no>        reward -0.01
    <answer> 21 <eos> <obs> <yes>       reward 1.0, terminated, success
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from envs import token_ops as T
from envs import vocab
from envs.base import Env, TimeStep, finish_step

_WORD = [vocab.TOKEN_TO_ID[c] for c in "guess"]


@struct.dataclass
class GuessNumberState:
    key: jax.Array
    turn: jax.Array         # int32 []
    done: jax.Array         # bool []
    terminated: jax.Array   # bool []
    truncated: jax.Array    # bool []
    target: jax.Array       # int32 [], the hidden number
    lo: jax.Array           # int32 [], answers so far imply lo <= target < hi
    hi: jax.Array           # int32 []
    n_questions: jax.Array  # int32 []


def _check_int(name, v, lo, hi):
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v!r}")
    return v


def _check_float(name, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= float(v) <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


class GuessNumberEnv(Env):
    """Binary-search question game; see the module docstring."""

    name = "guess_number"

    def __init__(self, n: int = 32, max_turns: int | None = None, question_cost: float = 0.01,
                 format_penalty: float = 0.1):
        self.n = _check_int("n", n, 2, 9999)
        need = math.ceil(math.log2(self.n)) + 1
        if max_turns is None:
            max_turns = need + 2
        self.max_turns = _check_int("max_turns", max_turns, 1, 99)
        self.question_cost = _check_float("question_cost", question_cost, 0.0, 1.0)
        self.format_penalty = _check_float("format_penalty", format_penalty, 0.0, 10.0)
        self.n_digits = len(str(self.n))
        self.action_len = self.n_digits + 3           # < k ? <eos>
        digits = [vocab.DIGIT_0 + int(c) for c in str(self.n)]
        turns = [vocab.DIGIT_0 + int(c) for c in str(self.max_turns)]
        self._prompt = [vocab.TASK] + _WORD + digits + [vocab.SEP] + turns
        self.obs_len = len(self._prompt)

    # ------------------------------------------------------------------ helpers
    def _info(self, success, format_error, n_questions):
        return {"success": jnp.asarray(success, bool),
                "format_error": jnp.asarray(format_error, bool),
                "n_questions": jnp.asarray(n_questions, jnp.int32)}

    def _obs(self, tok):
        return T.make_row([vocab.OBS, jnp.asarray(tok, jnp.int32)], self.obs_len)

    # ------------------------------------------------------------------ API
    def reset(self, key):
        key, sub = jax.random.split(key)
        u = jax.random.uniform(sub, ())     # one draw (each random call site costs compile time)
        target = jnp.clip(jnp.floor(u * self.n), 0, self.n - 1).astype(jnp.int32)
        state = GuessNumberState(key=key, turn=jnp.int32(0), done=jnp.bool_(False),
                                 terminated=jnp.bool_(False), truncated=jnp.bool_(False),
                                 target=target, lo=jnp.int32(0), hi=jnp.int32(self.n),
                                 n_questions=jnp.int32(0))
        prompt = T.make_row([jnp.asarray(self._prompt, jnp.int32)], self.obs_len)
        return state, TimeStep(prompt, jnp.float32(0.0), jnp.bool_(False), jnp.bool_(False),
                               self._info(False, False, 0))

    def parse(self, action):
        """-> (kind, k): kind 0 = malformed, 1 = question ``< k ?``, 2 = answer ``<answer> k``."""
        a = T.action_row(action, self.action_len)
        length = T.action_length(a)
        k, nd, ok = T.parse_uint(a, 1, self.n_digits)
        after = T.take(a, 1 + nd)
        question = (a[0] == vocab.LESS) & ok & (after == vocab.QUESTION) & (length == nd + 2)
        answer = (a[0] == vocab.ANSWER) & ok & (length == nd + 1)
        kind = jnp.where(question, 1, jnp.where(answer, 2, 0)).astype(jnp.int32)
        return kind, k

    def step(self, state: GuessNumberState, action):
        kind, k = self.parse(action)
        question, answer = kind == 1, kind == 2
        fmt_err = kind == 0
        less = state.target < k
        correct = answer & (k == state.target)
        tok = jnp.where(fmt_err, vocab.ERR,
                        jnp.where(question, jnp.where(less, vocab.YES, vocab.NO),
                                  jnp.where(correct, vocab.YES, vocab.NO)))
        reward = jnp.where(fmt_err, -self.format_penalty,
                           jnp.where(question, -self.question_cost,
                                     jnp.where(correct, 1.0, 0.0))).astype(jnp.float32)
        hi = jnp.where(question & less, jnp.minimum(state.hi, k), state.hi)
        lo = jnp.where(question & ~less, jnp.maximum(state.lo, k), state.lo)
        nq = state.n_questions + question.astype(jnp.int32)
        return finish_step(self, state, terminated=answer, observation=self._obs(tok), reward=reward,
                           info=self._info(correct, fmt_err, nq),
                           idle_info=self._info(False, False, state.n_questions),
                           lo=lo.astype(jnp.int32), hi=hi.astype(jnp.int32), n_questions=nq)

    def oracle_action(self, state: GuessNumberState, key=None):
        mid = (state.lo + state.hi) // 2
        digits, n = T.uint_to_tokens_var(mid, self.n_digits)
        ask = T.make_row([vocab.LESS, (digits, n), vocab.QUESTION, vocab.EOS], self.action_len)
        d2, n2 = T.uint_to_tokens_var(state.lo, self.n_digits)
        ans = T.make_row([vocab.ANSWER, (d2, n2), vocab.EOS], self.action_len)
        return jnp.where(state.hi - state.lo <= 1, ans, ask)

    def render(self, state: GuessNumberState) -> str:
        return (f"guess_number: target={int(state.target)} interval=[{int(state.lo)}, "
                f"{int(state.hi)}) turn={int(state.turn)}/{self.max_turns} done={bool(state.done)}")
