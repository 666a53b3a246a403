"""Calculator: multi-step integer arithmetic with a calculator tool.

Task. The prompt is an arithmetic expression of ``n_ops`` (default 2) binary operations over
non-negative integer operands drawn uniformly from ``[0, operand_max)`` (default 20), operators
from ``ops`` (default ``"+-*"``) with at most ``max_mul`` (default 1) multiplications. It is
built inside out: ``a0 op1 a1``, then each further operation puts the expression so far in
parentheses on a random side, e.g. ``( 12 + 7 ) * 3`` or ``3 - ( 12 + 7 )``. The agent must
give its exact integer value; it may use a calculator tool for any single operation.

Commands (one per turn, then ``<eos>``; numbers are decimal, optionally with a leading ``-``):
    ``<calc> A op B``   op in ``+ - *``       -> ``<obs> <result> V`` with V = A op B exactly
    ``<answer> V``      final answer           -> ``<obs> <yes>`` if V is the value else ``<obs> <no>``
``A``, ``B`` have at most ``operand_digits`` digits (enough for every intermediate value of the
problem, 3 at the defaults) and ``V`` at most ``answer_digits``. Anything else -> ``<obs> <err>``.

Rewards. ``-call_cost`` (0.01) per calculator call (a tie-breaker: fewer calls score higher);
correct answer 1.0 (terminated, success); wrong answer ``wrong_answer_reward`` (0.0,
terminated); malformed action ``-format_penalty`` (0.1). ``max_turns`` (default ``n_ops + 3``)
then truncation. ``info``: ``success``, ``format_error``, ``n_calls``, ``progress``.

Oracle. The state counts the operations of the expression already evaluated by a matching
call (``progress``, in evaluation order, operands in either order for ``+`` and ``*``); the
oracle calls the next pending operation with its exact operands and answers once all ``n_ops``
are done: ``n_ops`` calls then the answer, success 100%.

Example episode (defaults)::

    <task> ( 12 + 7 ) * 3
    <calc> 12 + 7 <eos>      <obs> <result> 19      reward -0.01
    <calc> 19 * 3 <eos>      <obs> <result> 57      reward -0.01
    <answer> 57 <eos>        <obs> <yes>            reward 1.0, terminated, success
"""
from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from flax import struct

from envs import token_ops as T
from envs import vocab
from envs.base import Env, TimeStep, finish_step

OP_CHARS = "+-*"
OP_TOKENS = (vocab.PLUS, vocab.MINUS, vocab.TIMES)


def apply_op(op, a, b):
    """op code 0/1/2 -> a + b, a - b, a * b (elementwise, int32)."""
    return jnp.where(op == 0, a + b, jnp.where(op == 1, a - b, a * b)).astype(jnp.int32)


@struct.dataclass
class CalculatorState:
    key: jax.Array
    turn: jax.Array          # int32 []
    done: jax.Array          # bool []
    terminated: jax.Array    # bool []
    truncated: jax.Array     # bool []
    operands: jax.Array      # int32 [n_ops + 1], a0, a1, ..., a_n
    ops: jax.Array           # int32 [n_ops], 0 '+', 1 '-', 2 '*'
    sides: jax.Array         # bool [n_ops], True: a_i op (expr) ; False: (expr) op a_i
    values: jax.Array        # int32 [n_ops + 1], v_0 = a0, v_i = value after operation i
    progress: jax.Array      # int32 [], operations already evaluated by matching calls
    n_calls: jax.Array       # int32 []


def _check_int(name, v, lo, hi):
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v!r}")
    return v


def _check_float(name, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= float(v) <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


def value_bounds(n_ops: int, m: int, allow_mul: bool, max_mul: int) -> list[int]:
    """Largest |v_i| (i = 0..n_ops) over all problems: operands <= m, <= max_mul products."""
    bounds = [m] * (n_ops + 1)
    for pattern in itertools.product([False, True] if allow_mul else [False], repeat=n_ops):
        if sum(pattern) > max_mul:
            continue
        b = m
        for i, mul in enumerate(pattern, start=1):
            b = b * m if mul else b + m
            bounds[i] = max(bounds[i], b)
    return bounds


class CalculatorEnv(Env):
    """Arithmetic with a calculator tool; see the module docstring."""

    name = "calculator"

    def __init__(self, n_ops: int = 2, operand_max: int = 20, ops: str = "+-*", max_mul: int = 1,
                 max_turns: int | None = None, call_cost: float = 0.01,
                 wrong_answer_reward: float = 0.0, format_penalty: float = 0.1):
        self.n_ops = _check_int("n_ops", n_ops, 1, 6)
        self.operand_max = _check_int("operand_max", operand_max, 2, 1000)
        if (not isinstance(ops, str) or not ops or any(c not in OP_CHARS for c in ops)
                or len(set(ops)) != len(ops)):
            raise ValueError(f"ops must be a non-empty string of distinct characters from "
                             f"{OP_CHARS!r}, got {ops!r}")
        self.ops = ops
        self.max_mul = _check_int("max_mul", max_mul, 0, self.n_ops)
        self._allowed = [OP_CHARS.index(c) for c in ops]
        self._non_mul = [o for o in self._allowed if o != 2]
        if not self._non_mul and self.max_mul < self.n_ops:
            raise ValueError(f"max_mul={max_mul} < n_ops={n_ops} needs '+' or '-' in ops, got {ops!r}")
        if max_turns is None:
            max_turns = self.n_ops + 3
        self.max_turns = _check_int("max_turns", max_turns, 1, 99)
        self.call_cost = _check_float("call_cost", call_cost, 0.0, 1.0)
        self.wrong_answer_reward = _check_float("wrong_answer_reward", wrong_answer_reward, -1.0, 0.0)
        self.format_penalty = _check_float("format_penalty", format_penalty, 0.0, 10.0)

        m = self.operand_max - 1
        bounds = value_bounds(self.n_ops, m, 2 in self._allowed, self.max_mul)
        self.value_bounds = bounds
        self.operand_digits = len(str(max(bounds[:-1])))      # digits of any calc operand
        self.answer_digits = len(str(bounds[-1]))
        if self.operand_digits > 4:
            raise ValueError(
                f"intermediate values reach {max(bounds[:-1])} (> 9999, the calculator's operand "
                f"limit) with n_ops={n_ops}, operand_max={operand_max}, max_mul={max_mul}; "
                f"lower operand_max or max_mul")
        self.result_digits = 2 * self.operand_digits
        self.x_digits = len(str(m))
        self.expr_len = 2 * (self.n_ops - 1) + (self.n_ops + 1) * self.x_digits + self.n_ops
        self.action_len = max(2 * self.operand_digits + 5, self.answer_digits + 3)
        self.obs_len = max(1 + self.expr_len, 3 + self.result_digits)

    # ------------------------------------------------------------------ helpers
    def _info(self, success, format_error, n_calls, progress):
        return {"success": jnp.asarray(success, bool),
                "format_error": jnp.asarray(format_error, bool),
                "n_calls": jnp.asarray(n_calls, jnp.int32),
                "progress": jnp.asarray(progress, jnp.int32)}

    def pending(self, state: CalculatorState, i):
        """Operation i (0-based, clipped) as (left, op, right) in evaluation order."""
        i = jnp.clip(i, 0, self.n_ops - 1)
        prev = T.take(state.values, i)
        x = T.take(state.operands, i + 1)
        side = T.take(state.sides, i) & (i > 0)
        left = jnp.where(side, x, prev)
        right = jnp.where(side, prev, x)
        return left, T.take(state.ops, i), right

    def expression(self, state: CalculatorState):
        """The problem's tokens: (int32 [expr_len] left-aligned, length)."""
        L = self.expr_len
        op_tok = jnp.asarray(OP_TOKENS, jnp.int32)[state.ops]
        cur, n = T.uint_to_tokens_var(state.operands[0], self.x_digits)
        cur = T.pad_row(cur, L)
        for i in range(self.n_ops):  # static unrolled construction, n_ops <= 6
            x, nx = T.uint_to_tokens_var(state.operands[i + 1], self.x_digits)
            if i == 0:
                cur, n = T.make_row([(cur, n), op_tok[i], (x, nx)], L), n + 1 + nx
                continue
            as_left = T.make_row([vocab.LPAREN, (cur, n), vocab.RPAREN, op_tok[i], (x, nx)], L)
            as_right = T.make_row([(x, nx), op_tok[i], vocab.LPAREN, (cur, n), vocab.RPAREN], L)
            cur, n = jnp.where(state.sides[i], as_right, as_left), n + 3 + nx
        return cur, n

    # ------------------------------------------------------------------ API
    def reset(self, key):
        n = self.n_ops
        key, sub = jax.random.split(key)
        u = jax.random.uniform(sub, (4, n + 1))   # one draw carved up (one threefry to compile)

        def uint(row, m, size):
            return jnp.clip(jnp.floor(u[row, :size] * m), 0, m - 1).astype(jnp.int32)

        operands = uint(0, self.operand_max, n + 1)
        allowed = jnp.asarray(self._allowed, jnp.int32)
        ops = allowed[uint(1, len(self._allowed), n)]
        if self._non_mul:
            non_mul = jnp.asarray(self._non_mul, jnp.int32)
            repl = non_mul[uint(2, len(self._non_mul), n)]
            is_mul = ops == 2
            over = is_mul & (jnp.cumsum(is_mul) > self.max_mul)
            ops = jnp.where(over, repl, ops)
        sides = (u[3, :n] < 0.5) & (jnp.arange(n) > 0)
        values = [operands[0]]
        for i in range(n):  # static unrolled, n_ops <= 6
            x = operands[i + 1]
            values.append(jnp.where(sides[i], apply_op(ops[i], x, values[-1]),
                                    apply_op(ops[i], values[-1], x)))
        state = CalculatorState(key=key, turn=jnp.int32(0), done=jnp.bool_(False),
                                terminated=jnp.bool_(False), truncated=jnp.bool_(False),
                                operands=operands, ops=ops.astype(jnp.int32), sides=sides,
                                values=jnp.stack(values).astype(jnp.int32),
                                progress=jnp.int32(0), n_calls=jnp.int32(0))
        expr, n_expr = self.expression(state)
        prompt = T.make_row([vocab.TASK, (expr, n_expr)], self.obs_len)
        return state, TimeStep(prompt, jnp.float32(0.0), jnp.bool_(False), jnp.bool_(False),
                               self._info(False, False, 0, 0))

    def parse(self, action):
        """-> (kind, a, op, b): kind 0 malformed, 1 ``<calc> a op b``, 2 ``<answer> a``."""
        x = T.action_row(action, self.action_len)
        # two stages, each stored once per env in one packed lane (T.materialize_small) instead
        # of re-parsed by every consumer: the first number, then the operator and second number
        D, AD, L = self.operand_digits, self.answer_digits, self.action_len
        length = T.action_length(x)
        a, na, ok_a = T.parse_int(x, 1, D)
        if AD == D:
            v, nv, ok_v = a, na, ok_a
        else:
            v, nv, ok_v = T.parse_int(x, 1, AD)
            (v,) = T.materialize(v)
        answer = (x[0] == vocab.ANSWER) & ok_v & (length == 1 + nv)
        head_calc = (x[0] == vocab.CALC) & ok_a
        # na <= D + 2, length <= L; |a| < 10**D <= 10**4 (checked in __init__)
        na, length, head_calc, answer, a = T.materialize_small(
            [(na, (D + 2).bit_length()), (length, L.bit_length()), (head_calc, 1), (answer, 1)], top=a)
        op_tok = T.take(x, 1 + na)
        op = jnp.where(op_tok == vocab.PLUS, 0,
                       jnp.where(op_tok == vocab.MINUS, 1, jnp.where(op_tok == vocab.TIMES, 2, -1)))
        b, nb, ok_b = T.parse_int(x, 2 + na, D)
        calc = head_calc & (op >= 0) & ok_b & (length == 2 + na + nb)
        kind = jnp.where(calc, 1, jnp.where(answer, 2, 0)).astype(jnp.int32)
        kind, op1, b = T.materialize_small([(kind, 2), (op + 1, 2)], top=b)
        first = jnp.where(kind == 2, v, a).astype(jnp.int32)
        return kind, first, op1 - 1, b

    def step(self, state: CalculatorState, action):
        kind, a, op, b = self.parse(action)
        calc, answer, fmt_err = kind == 1, kind == 2, kind == 0
        result = apply_op(op, a, b)
        left, p_op, right = self.pending(state, state.progress)
        commutative = p_op != 1
        matches = (op == p_op) & (((a == left) & (b == right))
                                  | (commutative & (a == right) & (b == left)))
        progress = state.progress + (calc & matches & (state.progress < self.n_ops)).astype(jnp.int32)
        correct = answer & (a == state.values[self.n_ops])
        # the observation: <obs> then <result> V / <yes> / <no> / <err>
        r_tok, r_n = T.int_to_tokens_var(result, self.result_digits)
        tag = jnp.where(calc, vocab.RESULT, jnp.where(answer, jnp.where(correct, vocab.YES, vocab.NO),
                                                      vocab.ERR))
        obs = T.make_row([vocab.OBS, tag, (r_tok, jnp.where(calc, r_n, 0))], self.obs_len)
        reward = jnp.where(fmt_err, -self.format_penalty,
                           jnp.where(calc, -self.call_cost,
                                     jnp.where(correct, 1.0, self.wrong_answer_reward)))
        nc = state.n_calls + calc.astype(jnp.int32)
        return finish_step(self, state, terminated=answer, observation=obs, reward=reward,
                           info=self._info(correct, fmt_err, nc, progress),
                           idle_info=self._info(False, False, state.n_calls, state.progress),
                           progress=progress, n_calls=nc)

    def oracle_action(self, state: CalculatorState, key=None):
        left, op, right = self.pending(state, state.progress)
        lt, ln = T.int_to_tokens_var(left, self.operand_digits)
        rt, rn = T.int_to_tokens_var(right, self.operand_digits)
        op_tok = T.take(jnp.asarray(OP_TOKENS, jnp.int32), op)
        call = T.make_row([vocab.CALC, (lt, ln), op_tok, (rt, rn), vocab.EOS], self.action_len)
        vt, vn = T.int_to_tokens_var(state.values[self.n_ops], self.answer_digits)
        ans = T.make_row([vocab.ANSWER, (vt, vn), vocab.EOS], self.action_len)
        return jnp.where(state.progress >= self.n_ops, ans, call)

    def render(self, state: CalculatorState) -> str:
        expr, n = self.expression(state)
        text = vocab.decode(jax.device_get(expr)[: int(n)])
        return (f"calculator: {text} = {int(state.values[self.n_ops])} "
                f"progress={int(state.progress)}/{self.n_ops} turn={int(state.turn)}/{self.max_turns} "
                f"done={bool(state.done)}")
