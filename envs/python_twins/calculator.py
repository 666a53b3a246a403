"""Plain-Python twin of ``envs.tasks.calculator.CalculatorEnv``: the same semantics written the
way a Python env library would (Python ints, text in, text out), for cross-checks and speed
comparisons.

    twin = CalculatorTwin.from_state(jax_state, env)      # knobs read from env (or defaults)
    obs_text, reward, terminated, truncated, info = twin.step("<calc> 12 + 7 <eos>")

``step`` takes the action as text, e.g. ``vocab.decode(action_tokens, skip_pad=False)``: the
command is the text before the first ``<eos>`` / ``<pad>``, cut into items by a small lexer (as decode
writes them: a tag, an operator or a number per item). The problem (operands, operators, sides)
comes from the jitted env's reset state; its value is recomputed here with Python ints.
"""
from __future__ import annotations

import operator
import re
from typing import Any

import numpy as np

# one item per tag, number, word or other character (what decode separates by spaces)
LEXER = re.compile(r"<[a-z]+>|[0-9]+|[a-z]+|\S")

OPS = {"+": operator.add, "-": operator.sub, "*": operator.mul}
OP_CHARS = "+-*"


class CalculatorTwin:
    def __init__(self, operands: list[int], ops: list[str], sides: list[bool], *, max_turns: int,
                 operand_digits: int, answer_digits: int, call_cost: float = 0.01,
                 wrong_answer_reward: float = 0.0, format_penalty: float = 0.1, turn: int = 0,
                 progress: int = 0, n_calls: int = 0, terminated: bool = False, truncated: bool = False):
        self.operands = list(operands)
        self.ops = list(ops)
        self.sides = list(sides)     # True: "x op ( expr )", False: "( expr ) op x"
        self.max_turns = max_turns
        self.operand_digits = operand_digits
        self.answer_digits = answer_digits
        self.call_cost = call_cost
        self.wrong_answer_reward = wrong_answer_reward
        self.format_penalty = format_penalty
        self.turn = turn
        self.progress = progress
        self.n_calls = n_calls
        self.terminated = terminated
        self.truncated = truncated
        self.steps = self._evaluation_order()
        self.value = self.steps[-1][3]

    @classmethod
    def from_state(cls, state: Any, env: Any = None) -> "CalculatorTwin":
        """Build from a single (unbatched) ``CalculatorState`` (jax or numpy leaves)."""
        ops = [OP_CHARS[int(o)] for o in np.asarray(state.ops)]
        if env is not None:
            knobs = {k: getattr(env, k) for k in ("max_turns", "operand_digits", "answer_digits",
                                                  "call_cost", "wrong_answer_reward", "format_penalty")}
        else:   # CalculatorEnv defaults with this many operations
            from envs.tasks.calculator import CalculatorEnv
            d = CalculatorEnv(n_ops=len(ops))
            knobs = dict(max_turns=d.max_turns, operand_digits=d.operand_digits,
                         answer_digits=d.answer_digits, call_cost=d.call_cost,
                         wrong_answer_reward=d.wrong_answer_reward, format_penalty=d.format_penalty)
        return cls([int(x) for x in np.asarray(state.operands)], ops,
                   [bool(s) for s in np.asarray(state.sides)], turn=int(state.turn),
                   progress=int(state.progress), n_calls=int(state.n_calls),
                   terminated=bool(state.terminated), truncated=bool(state.truncated), **knobs)

    def _evaluation_order(self) -> list[tuple[int, str, int, int]]:
        """[(left, op, right, result)] for each operation, innermost first."""
        steps, value = [], self.operands[0]
        for i, (op, x) in enumerate(zip(self.ops, self.operands[1:])):
            left, right = (x, value) if (i > 0 and self.sides[i]) else (value, x)
            value = OPS[op](left, right)
            steps.append((left, op, right, value))
        return steps

    @property
    def done(self) -> bool:
        return self.terminated or self.truncated

    def expression(self) -> str:
        text = str(self.operands[0])
        for i, (op, x) in enumerate(zip(self.ops, self.operands[1:])):
            if i == 0:
                text = f"{text} {op} {x}"
            elif self.sides[i]:
                text = f"{x} {op} ( {text} )"
            else:
                text = f"( {text} ) {op} {x}"
        return text

    def prompt(self) -> str:
        return f"<task> {self.expression()}"

    def _info(self, success=False, format_error=False) -> dict:
        return {"success": success, "format_error": format_error, "n_calls": self.n_calls,
                "progress": self.progress}

    @staticmethod
    def _number(items: list[str], max_digits: int) -> tuple[int | None, list[str]]:
        """Read an optionally negative number from the front of items -> (value, rest)."""
        neg = bool(items) and items[0] == "-"
        if neg:
            items = items[1:]
        if not items or not items[0].isdigit() or len(items[0]) > max_digits:
            return None, items
        value = int(items[0])
        return (-value if neg else value), items[1:]

    def step(self, action_text: str):
        if self.done:
            return "<obs>", 0.0, self.terminated, self.truncated, self._info()
        items = LEXER.findall(action_text.split("<eos>")[0].split("<pad>")[0])
        head, rest = (items[0], items[1:]) if items else ("", [])
        call = answer = None
        if head == "<calc>":
            a, rest2 = self._number(rest, self.operand_digits)
            if a is not None and rest2 and rest2[0] in OPS:
                b, rest3 = self._number(rest2[1:], self.operand_digits)
                if b is not None and not rest3:
                    call = (a, rest2[0], b)
        elif head == "<answer>":
            v, rest2 = self._number(rest, self.answer_digits)
            if v is not None and not rest2:
                answer = v
        if call is not None:
            a, op, b = call
            result = OPS[op](a, b)
            if self.progress < len(self.steps):
                left, p_op, right, _ = self.steps[self.progress]
                if op == p_op and ((a, b) == (left, right) or (op != "-" and (a, b) == (right, left))):
                    self.progress += 1
            self.n_calls += 1
            obs, reward, info = f"<obs> <result> {result}", -self.call_cost, self._info()
        elif answer is not None:
            correct = answer == self.value
            self.terminated = True
            obs = "<obs> <yes>" if correct else "<obs> <no>"
            reward = 1.0 if correct else self.wrong_answer_reward
            info = self._info(success=correct)
        else:
            obs, reward, info = "<obs> <err>", -self.format_penalty, self._info(format_error=True)
        self.turn += 1
        if not self.terminated and self.turn >= self.max_turns:
            self.truncated = True
        return obs, reward, self.terminated, self.truncated, info

    def oracle_command(self) -> str:
        """Call the next pending operation, or answer once all are evaluated."""
        if self.progress >= len(self.steps):
            return f"<answer> {self.value} <eos>"
        left, op, right, _ = self.steps[self.progress]
        return f"<calc> {left} {op} {right} <eos>"
