"""The one shared token vocabulary of every environment and model in the project.

64 tokens: 16 structural tokens, the digits, the lowercase letters and 12 operators.

Text form: ``encode`` splits on whitespace; a ``<tag>`` is one token, every other character
is one token (so ``"<calc> 12 + 7"`` -> ``[<calc>, 1, 2, +, 7]``). ``decode`` writes the
tokens back, a space before every structural token and between numbers / words that would
otherwise merge, so that ``encode(decode(ids)) == ids`` for every id sequence.

Turn grammar (shared by all tasks; each task documents its own commands):

    episode      := prompt (turn)*
    prompt       := <task> task-tokens <pad>*                      (Env.obs_len tokens)
    turn         := action observation
    action       := command-tokens <eos> <pad>*                    (Env.action_len tokens)
    observation  := <obs> result-tokens <pad>*                     (Env.obs_len tokens)

Actions and observations are left-aligned: real tokens first, ``<pad>`` after. An action
ends at its first ``<eos>`` or ``<pad>``; anything after is ignored. A task's commands are
``<search> ...``, ``<calc> ...``, ``<answer> ...``, ``< k ?``, a direction letter, and so on;
a sequence that does not parse yields an observation ``<obs> <err>`` and the task's format
penalty.
"""
from __future__ import annotations

from typing import Iterable, Sequence

SPECIALS = (
    "<pad>", "<eos>", "<bos>", "<obs>", "<task>", "<search>", "<answer>", "<calc>",
    "<summary>", "<summarize>", "<yes>", "<no>", "<err>", "<sep>", "<result>", "<goal>",
)
DIGITS = tuple("0123456789")
LETTERS = tuple("abcdefghijklmnopqrstuvwxyz")
OPERATORS = tuple("+-*/=<>?(),.")

TOKENS: tuple[str, ...] = SPECIALS + DIGITS + LETTERS + OPERATORS
size: int = len(TOKENS)
TOKEN_TO_ID: dict[str, int] = {t: i for i, t in enumerate(TOKENS)}

PAD = TOKEN_TO_ID["<pad>"]
EOS = TOKEN_TO_ID["<eos>"]
BOS = TOKEN_TO_ID["<bos>"]
OBS = TOKEN_TO_ID["<obs>"]
TASK = TOKEN_TO_ID["<task>"]
SEARCH = TOKEN_TO_ID["<search>"]
ANSWER = TOKEN_TO_ID["<answer>"]
CALC = TOKEN_TO_ID["<calc>"]
SUMMARY = TOKEN_TO_ID["<summary>"]
SUMMARIZE = TOKEN_TO_ID["<summarize>"]
YES = TOKEN_TO_ID["<yes>"]
NO = TOKEN_TO_ID["<no>"]
ERR = TOKEN_TO_ID["<err>"]
SEP = TOKEN_TO_ID["<sep>"]
RESULT = TOKEN_TO_ID["<result>"]
GOAL = TOKEN_TO_ID["<goal>"]

DIGIT_0 = TOKEN_TO_ID["0"]          # digit d has id DIGIT_0 + d
LETTER_A = TOKEN_TO_ID["a"]         # letter i (a=0) has id LETTER_A + i
PLUS, MINUS, TIMES, DIVIDE = (TOKEN_TO_ID[c] for c in "+-*/")
EQUALS, LESS, GREATER, QUESTION = (TOKEN_TO_ID[c] for c in "=<>?")
LPAREN, RPAREN, COMMA, PERIOD = (TOKEN_TO_ID[c] for c in "(),.")

assert size == 64, size


def encode(text: str) -> list[int]:
    """Text -> token ids. Raises ValueError naming the first character not in the vocab."""
    ids: list[int] = []
    i = 0
    while i < len(text):
        ch = text[i]
        if ch.isspace():
            i += 1
            continue
        if ch == "<":
            end = text.find(">", i)
            if end != -1 and text[i:end + 1] in TOKEN_TO_ID and end > i + 1:
                ids.append(TOKEN_TO_ID[text[i:end + 1]])
                i = end + 1
                continue
        if ch not in TOKEN_TO_ID:
            raise ValueError(f"character {ch!r} at position {i} of {text!r} is not in the vocabulary")
        ids.append(TOKEN_TO_ID[ch])
        i += 1
    return ids


#: a phrase that starts with one of these is written without a space before it
GLUED_PUNCTUATION = ".,;:!?'"


def phrase_kind(text: str) -> str:
    """"glued" for a phrase written right after the previous text (``"."``, ``"'s"``), else
    "phrase" (a space before it)."""
    return "glued" if text[:1] in GLUED_PUNCTUATION else "phrase"


def phrase_id(phrases: Sequence[str], text: str) -> int:
    """The symbol id of ``text`` among an env's ``phrases``: ``size + phrases.index(text)``."""
    return size + list(phrases).index(text)


def _kind(tok: str) -> str:
    if tok in SPECIALS:
        return "special"
    if tok in DIGITS:
        return "digit"
    if tok in LETTERS:
        return "letter"
    return "op"


def decode(tokens: Iterable[int], *, skip_pad: bool = True, phrases: Sequence[str] = ()) -> str:
    """Token ids -> text. ``<pad>`` is dropped unless ``skip_pad=False``.

    Runs of digits (a number) and runs of letters (a word) are written without spaces;
    everything else is separated by one space. ``phrases``: the words of an env that writes
    natural-language text (``Env.phrases``): id ``size + i`` is ``phrases[i]``, written after a
    space unless it starts with punctuation (``phrase_kind``). Raises ValueError on an id
    outside ``[0, size + len(phrases))``.
    """
    parts: list[str] = []
    prev_kind = None
    limit = size + len(phrases)
    for t in tokens:
        t = int(t)
        if not 0 <= t < limit:
            raise ValueError(f"token id {t} is outside the vocabulary [0, {limit})")
        if skip_pad and t == PAD:
            continue
        if t >= size:
            tok = phrases[t - size]
            kind = phrase_kind(tok)
        else:
            tok = TOKENS[t]
            kind = _kind(tok)
        if parts and kind != "glued" and not (kind == prev_kind and kind in ("digit", "letter")):
            parts.append(" ")
        parts.append(tok)
        prev_kind = kind
    return "".join(parts)


def pad_to(ids: Sequence[int], length: int) -> list[int]:
    """Left-align ``ids`` in a row of ``length`` tokens, ``<pad>`` after. Raises if too long."""
    if len(ids) > length:
        raise ValueError(f"{len(ids)} tokens do not fit in a row of {length}")
    return list(ids) + [PAD] * (length - len(ids))
