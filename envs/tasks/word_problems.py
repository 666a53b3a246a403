"""Word problems: arithmetic stories in natural language, with a calculator tool.

Task. The prompt is a short story about a person and a count of things, then a question::

    <task> Ann has 3 bags with 12 apples each. Bob gives her 7 more. She sells 5.
           How many apples does Ann have now?

It is the calculator task (``envs.tasks.calculator``) told in words: ``n_ops`` (default 2)
operations applied left to right to a running count, each one said by a sentence whose verbs
decide the operator:

- the start: ``NAME has A ITEMS.`` or, for a multiplication (only as the first operation),
  ``NAME has A CONTAINERS with B ITEMS each.``;
- ``+``: ``PRONOUN buys X more.`` / ``PRONOUN finds X more.`` / ``FRIEND gives her X more.``;
- ``-``: ``PRONOUN gives X to FRIEND.`` / ``PRONOUN loses X.`` / ``PRONOUN sells X.`` (never
  below zero: a subtraction from a count below 2 is said as an addition);
- the question ``How many ITEMS does NAME have now?``.

"gives" is an addition or a subtraction depending on who gives to whom, so a policy must read
the sentence, not just spot a keyword. Names, items, containers, numbers, operators and
sentence variants are drawn by ``reset`` from its key: every problem has a known answer (the
final count) and an oracle.

Words are **phrases** (``Env.phrases``): symbol ``vocab.size + i`` is ``PHRASES[i]``, a word
or a few words of text. The 64-symbol models cannot read them; the task runs with a Hugging Face
checkpoint whose tokenizer renders each phrase (``config.model.hf_checkpoint``;
``envs.tokenizer_bridge`` renders a phrase like any symbol: ``tokenizer.encode(" " + text)``).
``vocab.decode(row, phrases=env.phrases)`` gives the text.

Commands and rewards are the calculator's (one per turn, then ``<eos>``):
    ``<calc> A op B``   op in ``+ - *``       -> ``<obs> <result> V``
    ``<answer> V``      final answer           -> ``<obs> <yes>`` / ``<obs> <no>``
``-call_cost`` per call, 1.0 for the right answer, ``wrong_answer_reward`` for a wrong one,
``-format_penalty`` for a malformed action, ``max_turns`` (default ``n_ops + 3``). The oracle
calls each operation in order, then answers (success 100%). ``info``: ``success``,
``format_error``, ``n_calls``, ``progress``.

Example oracle episode (defaults)::

    <task> Eva has 7 apples. She buys 12 more. She gives 9 to Hugo. How many apples does Eva have now?
    <calc> 7 + 12 <eos>      <obs> <result> 19      reward -0.01
    <calc> 19 - 9 <eos>      <obs> <result> 10      reward -0.01
    <answer> 10 <eos>        <obs> <yes>            reward 1.0, terminated, success
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from envs import token_ops as T
from envs import vocab
from envs.base import TimeStep
from envs.tasks.calculator import CalculatorEnv, _check_int, apply_op

NAMES = ("Ann", "Bob", "Cara", "Dan", "Eva", "Finn", "Gina", "Hugo")   # even: she, odd: he
ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "coins")
CONTAINERS = ("bags", "boxes", "jars", "packs")
WORDS = ("She", "He", "her", "him", "has", "with", "each.", "buys", "finds", "gives", "loses",
         "sells", "more.", "to", ".", "How many", "does", "have now?")
PHRASES = NAMES + ITEMS + CONTAINERS + WORDS


def phrase_id(text: str) -> int:
    return vocab.phrase_id(PHRASES, text)


_NAME0, _ITEM0, _CONT0 = phrase_id(NAMES[0]), phrase_id(ITEMS[0]), phrase_id(CONTAINERS[0])
W = {w: phrase_id(w) for w in WORDS}
N_VARIANTS = 3          # sentences per operator


@struct.dataclass
class WordProblemsState:
    key: jax.Array
    turn: jax.Array          # int32 []
    done: jax.Array          # bool []
    terminated: jax.Array    # bool []
    truncated: jax.Array     # bool []
    operands: jax.Array      # int32 [n_ops + 1]: the start count (or containers), then each X
    ops: jax.Array           # int32 [n_ops], 0 '+', 1 '-', 2 '*' (first operation only)
    sides: jax.Array         # bool [n_ops]: all False (the running count is the left operand)
    values: jax.Array        # int32 [n_ops + 1]: the count after each operation
    progress: jax.Array      # int32 []: operations already evaluated by matching calls
    n_calls: jax.Array       # int32 []
    prompt: jax.Array        # int32 [obs_len]: the story and question (symbols and phrases)


class WordProblemsEnv(CalculatorEnv):
    """Arithmetic word problems with a calculator tool; see the module docstring."""

    name = "word_problems"
    phrases = PHRASES

    def __init__(self, n_ops: int = 2, operand_max: int = 20, ops: str = "+-*",
                 max_turns: int | None = None, call_cost: float = 0.01,
                 wrong_answer_reward: float = 0.0, format_penalty: float = 0.1):
        _check_int("n_ops", n_ops, 1, 4)
        _check_int("operand_max", operand_max, 3, 100)
        if not isinstance(ops, str) or "+" not in ops:
            raise ValueError(f"ops must be a string of distinct characters from '+-*' that holds "
                             f"'+' (a story's count never goes below zero), got {ops!r}")
        super().__init__(n_ops=n_ops, operand_max=operand_max, ops=ops,
                         max_mul=1 if isinstance(ops, str) and "*" in ops else 0,
                         max_turns=max_turns, call_cost=call_cost,
                         wrong_answer_reward=wrong_answer_reward, format_penalty=format_penalty)
        D = self.x_digits
        start = 7 + 2 * D if 2 in self._allowed else 5 + D
        event = 5 + D
        self.obs_len = max(start + (n_ops - 1) * event + 5, 5 + D + n_ops * event + 5)
        self.step_obs_len = 3 + self.result_digits

    # ------------------------------------------------------------------ the story
    def _number(self, x):
        return T.uint_to_tokens_var(x, self.x_digits)

    def _sentence(self, op, variant, x, pron, obj, friend):
        """One operation's sentence: (row [5 + D], length)."""
        L = 5 + self.x_digits
        num = self._number(x)
        rows = [  # + : buys / finds / FRIEND gives her
            T.make_row([pron, W["buys"], num, W["more."]], L),
            T.make_row([pron, W["finds"], num, W["more."]], L),
            T.make_row([friend, W["gives"], obj, num, W["more."]], L),
            # - : gives X to FRIEND / loses / sells
            T.make_row([pron, W["gives"], num, W["to"], friend, W["."]], L),
            T.make_row([pron, W["loses"], num, W["."]], L),
            T.make_row([pron, W["sells"], num, W["."]], L)]
        lens = jnp.asarray([3, 3, 4, 5, 3, 3], jnp.int32) + num[1]
        k = jnp.clip(op, 0, 1) * N_VARIANTS + variant
        row = jnp.stack(rows)[k]
        return row, lens[k]

    def story(self, operands, ops, who, friend, item, container, variants):
        """The prompt row: ``<task>`` then the story and the question (int32 [obs_len])."""
        D = self.x_digits
        name = _NAME0 + who
        pron = jnp.where(who % 2 == 0, W["She"], W["He"])
        obj = jnp.where(who % 2 == 0, W["her"], W["him"])
        item_tok = _ITEM0 + item
        a0, a1 = self._number(operands[0]), self._number(operands[1])
        L0 = 7 + 2 * D
        plain = T.make_row([name, W["has"], a0, item_tok, W["."]], L0)
        n_plain = 4 + a0[1]
        mul = T.make_row([name, W["has"], a0, _CONT0 + container, W["with"], a1, item_tok,
                          W["each."]], L0)
        n_mul = 6 + a0[1] + a1[1]
        is_mul = ops[0] == 2
        pieces = [vocab.TASK, (jnp.where(is_mul, mul, plain), jnp.where(is_mul, n_mul, n_plain))]
        for i in range(self.n_ops):        # static, n_ops <= 4
            row, n = self._sentence(ops[i], variants[i], operands[i + 1], pron, obj,
                                    _NAME0 + friend)
            if i == 0:
                n = jnp.where(is_mul, 0, n)     # the multiplication is told by the start
            pieces.append((row, n))
        pieces += [W["How many"], item_tok, W["does"], name, W["have now?"]]
        return T.make_row(pieces, self.obs_len)

    # ------------------------------------------------------------------ API
    def reset(self, key):
        n, m = self.n_ops, self.operand_max
        key, sub = jax.random.split(key)
        u = jax.random.uniform(sub, (5, max(n + 1, 4)))

        def pick(x, k):
            return jnp.clip(jnp.floor(x * k), 0, k - 1).astype(jnp.int32)

        allowed = jnp.asarray(self._allowed, jnp.int32)
        non_mul = jnp.asarray(self._non_mul or [0], jnp.int32)
        first = allowed[pick(u[1, 0], len(self._allowed))]
        rest = non_mul[pick(u[1, 1:n], max(len(self._non_mul), 1))]
        ops = jnp.concatenate([first[None], rest])
        operands = [2 + pick(u[0, 0], m - 2)]
        values = [operands[0]]
        op_list = []
        for i in range(n):             # static unrolled, n_ops <= 4
            v = values[-1]
            op = jnp.where((ops[i] == 1) & (v < 2), 0, ops[i])     # no count below zero
            hi = jnp.where(op == 1, jnp.clip(jnp.minimum(m - 1, v - 1), 1, None), m - 1)
            lo = jnp.where(op == 2, 2, 1)
            x = lo + jnp.floor(u[2, i + 1] * (hi - lo + 1)).astype(jnp.int32)
            x = jnp.clip(x, lo, jnp.maximum(hi, lo))
            operands.append(x)
            op_list.append(op)
            values.append(apply_op(op, v, x))
        ops = jnp.stack(op_list).astype(jnp.int32)
        operands = jnp.stack(operands).astype(jnp.int32)
        who = pick(u[3, 0], len(NAMES))
        friend = (who + 1 + pick(u[3, 1], len(NAMES) - 1)) % len(NAMES)
        item = pick(u[3, 2], len(ITEMS))
        container = pick(u[3, 3], len(CONTAINERS))
        variants = pick(u[4, :n], N_VARIANTS)
        prompt = self.story(operands, ops, who, friend, item, container, variants)
        state = WordProblemsState(key=key, turn=jnp.int32(0), done=jnp.bool_(False),
                                  terminated=jnp.bool_(False), truncated=jnp.bool_(False),
                                  operands=operands, ops=ops, sides=jnp.zeros((n,), bool),
                                  values=jnp.stack(values).astype(jnp.int32),
                                  progress=jnp.int32(0), n_calls=jnp.int32(0), prompt=prompt)
        return state, TimeStep(prompt, jnp.float32(0.0), jnp.bool_(False), jnp.bool_(False),
                               self._info(False, False, 0, 0))

    def render(self, state: WordProblemsState) -> str:
        text = vocab.decode(jax.device_get(state.prompt), phrases=self.phrases)
        return (f"word_problems: {text} = {int(state.values[self.n_ops])} "
                f"progress={int(state.progress)}/{self.n_ops} turn={int(state.turn)}/"
                f"{self.max_turns} done={bool(state.done)}")
