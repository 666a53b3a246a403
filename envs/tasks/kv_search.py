"""KV search: multi-hop question answering over a hidden knowledge base with a search tool.

Task (simulated search QA in the style of Search-R1 / ZeroSearch / SSRL). Every episode draws
a fresh knowledge base: ``n_entities`` entities (default 10) named by random two-token codes
(a letter and a digit, e.g. ``a3``), ``n_relations`` relations (default 4) named by random
letters, and a set of facts ``(entity, relation) -> entity``. The facts are a chain
``e0 -r1-> e1 -r2-> ... -rk-> ek`` of ``hops`` (default 2) links between distinct entities
plus ``n_distractors`` (default 8) random extra facts off the chain. The prompt asks for the
end of the chain: ``<task> e0 r1 ... rk ?``. The agent cannot see the facts; it must search.
With ``noise`` p > 0 (ZeroSearch's curriculum) a search of an existing fact returns, with
probability p, a uniformly random *wrong* entity instead; the noise draws are made at reset
from the episode key, one per turn, so they are a deterministic function of (key, turn).

Commands (one per turn, then ``<eos>``):
    ``<search> E R``  look up fact (E, R)   -> ``<obs> <result> O`` (its object; noisy w.p. p)
                                              or ``<obs> <result> <no>`` if there is no such fact
    ``<answer> E``    final answer          -> ``<obs> <yes>`` if E is the chain's end else ``<obs> <no>``
``E`` is an entity code (letter then digit), ``R`` a relation letter. Searching unknown codes
or letters is legal and returns ``<no>``. Anything else -> ``<obs> <err>``.

Rewards. ``-search_cost`` (0.01) per search; correct answer 1.0 (terminated, success); wrong
answer 0.0 (terminated); malformed action ``-format_penalty`` (0.1). ``max_turns`` (default
``2 * hops + 2``) then truncation. ``info``: ``success``, ``format_error``, ``n_searches``,
``hop`` (number of chain links found so far, see below).

Oracle. The state counts the chain links found so far (``hop``: advanced by a search of the
next link ``(e_hop, r_hop+1)`` whose result was not corrupted by noise); the oracle searches
that link, or answers ``e_k`` once ``hop == hops``. With noise it re-searches a corrupted link.

Example episode (hops 2; facts include a3 -r-> k7, k7 -s-> b0, k7 -r-> d5)::

    <task> a 3 rs ?
    <search> a 3 r <eos>     <obs> <result> k 7     reward -0.01
    <search> k 7 s <eos>     <obs> <result> b 0     reward -0.01
    <answer> b 0 <eos>       <obs> <yes>            reward 1.0, terminated, success
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from envs import token_ops as T
from envs import vocab
from envs.base import Env, TimeStep, finish_step

N_CODES = 26 * 10  # entity codes: letter * 10 + digit


@struct.dataclass
class KvSearchState:
    key: jax.Array
    turn: jax.Array          # int32 []
    done: jax.Array          # bool []
    terminated: jax.Array    # bool []
    truncated: jax.Array     # bool []
    ent_codes: jax.Array     # int32 [n_entities], code = letter * 10 + digit, distinct
    rel_letters: jax.Array   # int32 [n_relations], letter index 0..25, distinct
    table: jax.Array         # int32 [n_entities, n_relations], object entity index or -1
    chain: jax.Array         # int32 [hops + 1], entity indices e0..ek
    chain_rels: jax.Array    # int32 [hops], relation indices r1..rk
    noise_flip: jax.Array    # bool [max_turns], whether turn t's search result is corrupted
    noise_obj: jax.Array     # int32 [max_turns], offset in [1, n_entities) of the wrong entity
    hop: jax.Array           # int32 [], chain links found so far
    n_searches: jax.Array    # int32 []


def _sample_distinct(u: jax.Array, k: int) -> jax.Array:
    """k distinct integers from [0, len(u)) in random order: top-k of the uniform scores u."""
    _, idx = jax.lax.top_k(u, k)
    return idx.astype(jnp.int32)


def _uniform_int(u: jax.Array, n: int) -> jax.Array:
    """Uniform draws u in [0, 1) -> integers in [0, n)."""
    return jnp.clip(jnp.floor(u * n), 0, n - 1).astype(jnp.int32)


def _check_int(name, v, lo, hi):
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise ValueError(f"{name} must be an int in [{lo}, {hi}], got {v!r}")
    return v


def _check_float(name, v, lo, hi):
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= float(v) <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {v!r}")
    return float(v)


class KvSearchEnv(Env):
    """Multi-hop search QA over a random per-episode KB; see the module docstring."""

    name = "kv_search"

    def __init__(self, hops: int = 2, n_entities: int = 10, n_relations: int = 4,
                 n_distractors: int = 8, noise: float = 0.0, max_turns: int | None = None,
                 search_cost: float = 0.01, format_penalty: float = 0.1):
        self.hops = _check_int("hops", hops, 1, 12)
        self.n_entities = _check_int("n_entities", n_entities, self.hops + 1, N_CODES)
        self.n_relations = _check_int("n_relations", n_relations, 1, 26)
        free = self.n_entities * self.n_relations - self.hops
        self.n_distractors = _check_int("n_distractors", n_distractors, 0, free)
        self.noise = _check_float("noise", noise, 0.0, 1.0)
        if max_turns is None:
            max_turns = 2 * self.hops + 2
        self.max_turns = _check_int("max_turns", max_turns, 1, 99)
        self.search_cost = _check_float("search_cost", search_cost, 0.0, 1.0)
        self.format_penalty = _check_float("format_penalty", format_penalty, 0.0, 10.0)
        self.action_len = 5                          # <search> l d r <eos>
        self.prompt_len = 1 + 2 + self.hops + 1      # <task> l d r1..rk ?
        self.obs_len = max(self.prompt_len, 4)       # <obs> <result> l d

    # ------------------------------------------------------------------ helpers
    def _info(self, success, format_error, n_searches, hop):
        return {"success": jnp.asarray(success, bool),
                "format_error": jnp.asarray(format_error, bool),
                "n_searches": jnp.asarray(n_searches, jnp.int32),
                "hop": jnp.asarray(hop, jnp.int32)}

    def entity_tokens(self, state, idx):
        """Entity index -> int32 [2] (letter token, digit token)."""
        code = T.take(state.ent_codes, jnp.clip(idx, 0, self.n_entities - 1))
        return jnp.stack([T.letter_token(code // 10), T.digit_token(code % 10)])

    def relation_token(self, state, idx):
        return T.letter_token(T.take(state.rel_letters, jnp.clip(idx, 0, self.n_relations - 1)))

    # ------------------------------------------------------------------ API
    def reset(self, key):
        ne, nr, k, T_ = self.n_entities, self.n_relations, self.hops, self.max_turns
        # one uniform vector carved into every draw of the episode (one random call site:
        # each threefry instance is expensive to compile under vmap on CPU)
        sizes = [N_CODES, 26, ne, k, ne * nr, ne * nr, T_, T_]
        key, sub = jax.random.split(key)
        u = jax.random.uniform(sub, (sum(sizes),))
        parts, o = [], 0
        for n in sizes:
            parts.append(u[o:o + n])
            o += n
        u_ent, u_rel, u_chain, u_crel, u_cells, u_obj, u_flip, u_wrong = parts
        ent_codes = _sample_distinct(u_ent, ne)
        rel_letters = _sample_distinct(u_rel, nr)
        chain = _sample_distinct(u_chain, k + 1)
        chain_rels = _uniform_int(u_crel, nr)
        # distractors: the n_distractors lowest-scored cells that are not chain cells
        cell_of_chain = chain[:-1] * nr + chain_rels
        scores = u_cells.at[cell_of_chain].set(2.0)
        if self.n_distractors:
            _, lowest = jax.lax.top_k(-scores, self.n_distractors)
            is_distractor = jnp.zeros((ne * nr,), bool).at[lowest].set(True)
        else:
            is_distractor = jnp.zeros((ne * nr,), bool)
        objects = _uniform_int(u_obj, ne)
        table = jnp.where(is_distractor, objects, -1)
        table = table.at[cell_of_chain].set(chain[1:]).reshape(ne, nr).astype(jnp.int32)
        noise_flip = u_flip < self.noise
        noise_obj = 1 + _uniform_int(u_wrong, ne - 1)
        state = KvSearchState(key=key, turn=jnp.int32(0), done=jnp.bool_(False),
                              terminated=jnp.bool_(False), truncated=jnp.bool_(False),
                              ent_codes=ent_codes, rel_letters=rel_letters, table=table,
                              chain=chain, chain_rels=chain_rels, noise_flip=noise_flip,
                              noise_obj=noise_obj, hop=jnp.int32(0), n_searches=jnp.int32(0))
        rels = T.letter_token(rel_letters[chain_rels])
        prompt = T.make_row([vocab.TASK, self.entity_tokens(state, chain[0]), rels, vocab.QUESTION],
                            self.obs_len)
        return state, TimeStep(prompt, jnp.float32(0.0), jnp.bool_(False), jnp.bool_(False),
                               self._info(False, False, 0, 0))

    def parse(self, action):
        """-> (kind, code, rel_letter): kind 0 malformed, 1 ``<search> E R``, 2 ``<answer> E``."""
        a = T.action_row(action, self.action_len)
        length = T.action_length(a)
        ent_ok = T.is_letter(a[1]) & T.is_digit(a[2])
        code = T.letter_index(a[1]) * 10 + T.digit_value(a[2])
        search = (a[0] == vocab.SEARCH) & ent_ok & T.is_letter(a[3]) & (length == 4)
        answer = (a[0] == vocab.ANSWER) & ent_ok & (length == 3)
        kind = jnp.where(search, 1, jnp.where(answer, 2, 0)).astype(jnp.int32)
        return kind, code, T.letter_index(a[3])

    def step(self, state: KvSearchState, action):
        # values read by many outputs are computed once per env, in one packed int32 (see
        # T.materialize_small): kind 0..2, code = letter * 10 + digit in [-11, 259], letter in [-1, 25]
        kind, code, rel_letter = self.parse(action)
        kind, code, rel_letter = T.materialize_small([(kind, 2), (code + 11, 9), (rel_letter + 1, 5)])
        code, rel_letter = code - 11, rel_letter - 1
        search, answer, fmt_err = kind == 1, kind == 2, kind == 0
        # index of the first matching entity / relation (argmax of the match; 0 if none), as a
        # min-reduction: cheaper than argmax's (value, index) reduction
        ent = T.first_index(state.ent_codes == code)
        rel = T.first_index(state.rel_letters == rel_letter)
        ent_known, rel_known = ent < self.n_entities, rel < self.n_relations
        ent = jnp.where(ent_known, ent, 0)
        rel = jnp.where(rel_known, rel, 0)
        t = jnp.clip(state.turn, 0, self.max_turns - 1)
        h = jnp.clip(state.hop, 0, self.hops - 1)
        # the look-ups, once: the fact's object (a gather), this turn's noise and the next chain
        # link (T.take: select chains over tables of <= T.SELECT_MAX entries)
        ne = self.n_entities.bit_length()           # obj + 1 in [0, n_entities], offset < n_entities
        obj, flip, offset, link, last = T.materialize_small([
            (jnp.where(ent_known & rel_known, T.take2(state.table, ent, rel, -1), -1) + 1, ne),
            (T.take(state.noise_flip, t), 1), (T.take(state.noise_obj, t), ne),
            ((ent == T.take(state.chain, h)) & (rel == T.take(state.chain_rels, h)), 1),
            (ent == state.chain[self.hops], 1)])
        obj = obj - 1
        found = obj >= 0
        flip = flip & found
        shown = jnp.where(flip, (obj + offset) % self.n_entities, obj)
        # chain bookkeeping for the oracle: the next link found with a clean result
        next_link = ent_known & rel_known & link & (state.hop < self.hops)
        hop = state.hop + (search & next_link & ~flip).astype(jnp.int32)
        correct = answer & ent_known & last
        # <obs> <result> l d | <obs> <result> <no> | <obs> <yes>/<no> | <obs> <err>, from
        # three tokens stored once per env
        e_tok = self.entity_tokens(state, shown)
        tok1 = jnp.where(search, vocab.RESULT,
                         jnp.where(answer, jnp.where(correct, vocab.YES, vocab.NO), vocab.ERR))
        tok2 = jnp.where(search, jnp.where(found, e_tok[0], vocab.NO), vocab.PAD)
        tok3 = jnp.where(search & found, e_tok[1], vocab.PAD)
        obs = T.make_row([vocab.OBS, jnp.stack([tok1, tok2, tok3])], self.obs_len)
        reward = jnp.where(fmt_err, -self.format_penalty,
                           jnp.where(search, -self.search_cost, jnp.where(correct, 1.0, 0.0)))
        ns = state.n_searches + search.astype(jnp.int32)
        return finish_step(self, state, terminated=answer, observation=obs, reward=reward,
                           info=self._info(correct, fmt_err, ns, hop),
                           idle_info=self._info(False, False, state.n_searches, state.hop),
                           hop=hop, n_searches=ns)

    def oracle_action(self, state: KvSearchState, key=None):
        h = jnp.clip(state.hop, 0, self.hops - 1)
        search = T.make_row([vocab.SEARCH, self.entity_tokens(state, T.take(state.chain, h)),
                             self.relation_token(state, T.take(state.chain_rels, h)), vocab.EOS],
                            self.action_len)
        answer = T.make_row([vocab.ANSWER, self.entity_tokens(state, state.chain[self.hops]),
                             vocab.EOS], self.action_len)
        return jnp.where(state.hop >= self.hops, answer, search)

    def render(self, state: KvSearchState) -> str:
        codes = [f"{chr(97 + c // 10)}{c % 10}" for c in map(int, state.ent_codes)]
        rels = [chr(97 + int(r)) for r in state.rel_letters]
        table = jax.device_get(state.table)
        facts = [f"{codes[e]}-{rels[r]}->{codes[int(table[e, r])]}"
                 for e in range(self.n_entities) for r in range(self.n_relations) if table[e, r] >= 0]
        chain = [codes[int(c)] for c in state.chain]
        crels = [rels[int(r)] for r in state.chain_rels]
        path = chain[0] + "".join(f" -{r}-> {c}" for r, c in zip(crels, chain[1:]))
        return (f"kv_search: chain {path} | facts {' '.join(facts)} | hop={int(state.hop)} "
                f"turn={int(state.turn)}/{self.max_turns} done={bool(state.done)}")
