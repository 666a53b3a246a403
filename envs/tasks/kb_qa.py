"""Knowledge-base questions: multi-hop questions in words over a generated knowledge base, with a
search tool.

Task. Each episode draws a small world: ``people`` persons (default 8, named ``ann``, ``bob``,
...), each with a ``boss``, a ``friend``, a ``neighbour`` and a ``teacher`` (the first
``relations`` of them, default 3; each one another person, drawn at random). The prompt asks a
``hops``-hop question (default 2) about one person::

    <task> Who is the friend of the boss of gina?

The answer is the person reached by following the relations from the subject, innermost first
(here: gina's boss, then that person's friend). Nothing in the prompt gives it: the agent must
look the people up one after the other.

Commands (one per turn, then ``<eos>``; a name is its letters):
    ``<search> NAME``   -> ``<obs> <result> NAME's boss is X. NAME's friend is Y. ...`` (every
                           relation of that person), or ``<obs> <no>`` for a name not in the world
    ``<answer> NAME``   -> ``<obs> <yes>`` if NAME is the answer, else ``<obs> <no>``
Anything else is a format error (``<obs> <err>``, ``-format_penalty``).

Rewards. ``-search_cost`` (0.01) per search, 1.0 for the right answer (terminated, success),
``wrong_answer_reward`` (0.0, terminated) for a wrong one; ``max_turns`` (default ``hops + 3``)
then truncation. ``info``: ``success``, ``format_error``, ``n_searches``, ``progress`` (the
hops resolved by a search of the chain's next person, in order). The oracle searches the
subject and every intermediate person, then answers (``hops + 1`` turns, success 100%).

Words are **phrases** (``Env.phrases``: symbol ``vocab.size + i`` is ``PHRASES[i]``): the task
runs with a Hugging Face checkpoint's tokenizer (``config.model.hf_checkpoint``); the 64-symbol
models cannot read it. Names are lowercase so that a name copied from an observation parses as
the letters of an action.

Example oracle episode (defaults)::

    <task> Who is the friend of the boss of gina?
    <search> gina <eos>   <obs> <result> gina's boss is dan. gina's friend is eva. gina's neighbour is ann.
    <search> dan <eos>    <obs> <result> dan's boss is bob. dan's friend is hugo. dan's neighbour is gina.
    <answer> hugo <eos>   <obs> <yes>     reward 1.0, terminated, success
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from envs import token_ops as T
from envs import vocab
from envs.base import Env, TimeStep, finish_step
from envs.tasks.calculator import _check_float, _check_int

NAMES = ("ann", "bob", "cara", "dan", "eva", "finn", "gina", "hugo")
RELATIONS = ("boss", "friend", "neighbour", "teacher")
WORDS = ("Who is the", "of the", "of", "?", "'s", "is", ".")
PHRASES = NAMES + RELATIONS + WORDS
NAME_LETTERS = max(len(n) for n in NAMES)


def phrase_id(text: str) -> int:
    return vocab.phrase_id(PHRASES, text)


_NAME0, _REL0 = phrase_id(NAMES[0]), phrase_id(RELATIONS[0])
W = {w: phrase_id(w) for w in WORDS}
# every name as its letters' symbols, <pad> after: int32 [len(NAMES), NAME_LETTERS]
_NAME_TABLE = np.array([[vocab.TOKEN_TO_ID[c] for c in n] + [vocab.PAD] * (NAME_LETTERS - len(n))
                        for n in NAMES], np.int32)
_NAME_LEN = np.array([len(n) for n in NAMES], np.int32)


@struct.dataclass
class KbQaState:
    key: jax.Array
    turn: jax.Array          # int32 []
    done: jax.Array          # bool []
    terminated: jax.Array    # bool []
    truncated: jax.Array     # bool []
    kb: jax.Array            # int32 [people, relations]: kb[p, r] = the person related to p by r
    chain: jax.Array         # int32 [hops + 1]: the subject, then each hop's person (last: answer)
    rels: jax.Array          # int32 [hops]: the relation followed at each hop
    progress: jax.Array      # int32 []: hops resolved by searching chain[progress] in order
    n_searches: jax.Array    # int32 []
    prompt: jax.Array        # int32 [obs_len]: the question (symbols and phrases)


class KbQaEnv(Env):
    """Multi-hop questions over a generated knowledge base; see the module docstring."""

    name = "kb_qa"
    phrases = PHRASES

    def __init__(self, hops: int = 2, people: int = 8, relations: int = 3,
                 max_turns: int | None = None, search_cost: float = 0.01,
                 wrong_answer_reward: float = 0.0, format_penalty: float = 0.1):
        self.hops = _check_int("hops", hops, 1, 4)
        self.people = _check_int("people", people, 3, len(NAMES))
        self.relations = _check_int("relations", relations, 1, len(RELATIONS))
        if max_turns is None:
            max_turns = self.hops + 3
        self.max_turns = _check_int("max_turns", max_turns, 1, 99)
        self.search_cost = _check_float("search_cost", search_cost, 0.0, 1.0)
        self.wrong_answer_reward = _check_float("wrong_answer_reward", wrong_answer_reward, -1.0, 0.0)
        self.format_penalty = _check_float("format_penalty", format_penalty, 0.0, 10.0)
        self.action_len = 2 + NAME_LETTERS                   # <search> / <answer>, name, <eos>
        prompt_len = 4 + 2 * self.hops            # <task> Who is the r (of the r)* of NAME ?
        self.step_obs_len = 2 + 6 * self.relations           # <obs> <result> (N 's r is M .)*
        self.obs_len = max(prompt_len, self.step_obs_len)

    def _info(self, success, format_error, n_searches, progress):
        return {"success": jnp.asarray(success, bool),
                "format_error": jnp.asarray(format_error, bool),
                "n_searches": jnp.asarray(n_searches, jnp.int32),
                "progress": jnp.asarray(progress, jnp.int32)}

    # ------------------------------------------------------------------ text
    def question(self, chain, rels):
        """``<task> Who is the r_k of the ... r_1 of SUBJECT ?`` (int32 [obs_len])."""
        pieces = [vocab.TASK, W["Who is the"]]
        for i in reversed(range(self.hops)):              # outermost relation first
            pieces.append(_REL0 + rels[i])
            pieces.append(W["of the"] if i > 0 else W["of"])
        pieces += [_NAME0 + chain[0], W["?"]]
        return T.make_row(pieces, self.obs_len)

    def facts(self, kb, person):
        """``<obs> <result>`` then ``P's r is Q.`` for every relation r of ``person``."""
        pieces = [vocab.OBS, vocab.RESULT]
        for r in range(self.relations):
            pieces += [_NAME0 + person, W["'s"], _REL0 + r, W["is"], _NAME0 + kb[person, r], W["."]]
        return T.make_row(pieces, self.obs_len)

    # ------------------------------------------------------------------ API
    def reset(self, key):
        P, R, H = self.people, self.relations, self.hops
        key, sub = jax.random.split(key)
        k_kb, k_q = jax.random.split(sub)
        offset = jax.random.randint(k_kb, (P, R), 1, P)                  # never oneself
        kb = ((jnp.arange(P)[:, None] + offset) % P).astype(jnp.int32)
        u = jax.random.randint(k_q, (H + 1,), 0, P * R)
        subject = (u[0] % P).astype(jnp.int32)
        rels = (u[1:] % R).astype(jnp.int32)
        chain = [subject]
        for i in range(H):                                               # static, hops <= 4
            chain.append(kb[chain[-1], rels[i]])
        chain = jnp.stack(chain).astype(jnp.int32)
        prompt = self.question(chain, rels)
        state = KbQaState(key=key, turn=jnp.int32(0), done=jnp.bool_(False),
                          terminated=jnp.bool_(False), truncated=jnp.bool_(False), kb=kb,
                          chain=chain, rels=rels, progress=jnp.int32(0),
                          n_searches=jnp.int32(0), prompt=prompt)
        return state, TimeStep(prompt, jnp.float32(0.0), jnp.bool_(False), jnp.bool_(False),
                               self._info(False, False, 0, 0))

    def parse(self, action):
        """-> (kind, person): kind 0 malformed, 1 ``<search> NAME``, 2 ``<answer> NAME``;
        person = the name's index, -1 for letters that name nobody in this world."""
        x = T.action_row(action, self.action_len)
        n = T.action_length(x) - 1                                       # letters after the head
        window = x[1:1 + NAME_LETTERS]
        pos = jnp.arange(NAME_LETTERS)
        letters = jnp.where(pos < n, window, vocab.PAD)
        ok = (n >= 1) & (n <= NAME_LETTERS) & jnp.all(T.is_letter(letters) | (pos >= n))
        table = jnp.asarray(_NAME_TABLE[:self.people])
        hit = jnp.all(table == letters[None], axis=1) & (jnp.asarray(_NAME_LEN[:self.people]) == n)
        person = jnp.where(hit.any(), jnp.argmax(hit), -1).astype(jnp.int32)
        kind = jnp.where(ok & (x[0] == vocab.SEARCH), 1, jnp.where(ok & (x[0] == vocab.ANSWER), 2, 0))
        return kind.astype(jnp.int32), person

    def step(self, state: KbQaState, action):
        kind, person = self.parse(action)
        search, answer, fmt_err = kind == 1, kind == 2, kind == 0
        found = search & (person >= 0)
        nxt = T.take(state.chain, state.progress)
        progress = state.progress + (found & (person == nxt) & (state.progress < self.hops)
                                     ).astype(jnp.int32)
        correct = answer & (person == state.chain[self.hops])
        facts = self.facts(state.kb, jnp.clip(person, 0, self.people - 1))
        short = T.make_row([vocab.OBS, jnp.where(fmt_err, vocab.ERR,
                                                 jnp.where(correct, vocab.YES, vocab.NO))],
                           self.obs_len)
        obs = jnp.where(found, facts, short)
        reward = jnp.where(fmt_err, -self.format_penalty,
                           jnp.where(search, -self.search_cost,
                                     jnp.where(correct, 1.0, self.wrong_answer_reward)))
        ns = state.n_searches + search.astype(jnp.int32)
        return finish_step(self, state, terminated=answer, observation=obs, reward=reward,
                           info=self._info(correct, fmt_err, ns, progress),
                           idle_info=self._info(False, False, state.n_searches, state.progress),
                           progress=progress, n_searches=ns)

    def _name_action(self, head, person):
        name = jnp.asarray(_NAME_TABLE)[person]
        n = jnp.asarray(_NAME_LEN)[person]
        return T.make_row([head, (name, n), vocab.EOS], self.action_len)

    def oracle_action(self, state: KbQaState, key=None):
        done_hops = state.progress >= self.hops
        person = jnp.where(done_hops, state.chain[self.hops], T.take(state.chain, state.progress))
        return jnp.where(done_hops, self._name_action(vocab.ANSWER, person),
                         self._name_action(vocab.SEARCH, person))

    def render(self, state: KbQaState) -> str:
        text = vocab.decode(jax.device_get(state.prompt), phrases=self.phrases)
        kb = np.asarray(jax.device_get(state.kb))
        world = "; ".join(f"{NAMES[p]}: " + ", ".join(f"{RELATIONS[r]} {NAMES[kb[p, r]]}"
                                                      for r in range(self.relations))
                          for p in range(self.people))
        return (f"kb_qa: {text} = {NAMES[int(state.chain[self.hops])]} [{world}] "
                f"progress={int(state.progress)}/{self.hops} turn={int(state.turn)}/"
                f"{self.max_turns} done={bool(state.done)}")
